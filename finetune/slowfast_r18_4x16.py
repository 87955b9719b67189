# sfdeploy preset: slowfast_r18_4x16
#
# The distillation student of slowfast_r50_4x16: the same 4x16 clips (this config
# inherits the R50 preset's pipelines and recipe, so teacher and student see the same batch and
# the clip spec of the export is the same), with ResNet3d-18 pathways at half width (256 + 32
# output channels instead of 2048 + 256). Train it with
#
#     sfdeploy finetune DATA --work-dir WORK_STUDENT --distill-from WORK_TEACHER
#
# (this is the default student of a slowfast_r50_4x16 teacher). There is no public Kinetics-400
# checkpoint for SlowFast R18, so it trains from scratch: on a small dataset that is what the
# teacher's soft targets are for; trained on the labels alone it will fall well short of a
# pretrained R50. Give it more epochs than the R50 finetune (it starts from nothing).
#
# This is a plain MMAction2 config: copy it (with slowfast_r50_4x16.py beside it) into your own
# MMAction2 project as it is.
_base_ = ['./slowfast_r50_4x16.py']

model = dict(
    backbone=dict(
        # ResNet3d-18 pathways (BasicBlocks) at half the R50's width: 32 channels in the first slow
        # stage, 4 in the fast one (still 1/8). At full width a BasicBlock's inflated 3x3x3 convs in
        # res4/res5 would hold as many parameters as all of R50 (34M), for 3/4 of its GFLOP; at half
        # width it is ~1/4 of both.
        slow_pathway=dict(depth=18, base_channels=32),
        fast_pathway=dict(depth=18, base_channels=4)),
    cls_head=dict(in_channels=288))  # 256 (slow: 32 * 8, BasicBlock) + 32 (fast: 4 * 8)

# No public checkpoint for this architecture: from scratch (the R50 preset's Kinetics weights
# do not fit ResNet-18 pathways).
load_from = None

# From scratch needs longer than adapting pretrained features.
train_cfg = dict(max_epochs=40)
