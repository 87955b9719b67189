# sfdeploy preset: slowfast_tiny_student
#
# The distillation student of slowfast_tiny: the same clips (this config inherits slowfast_tiny's
# pipelines, so teacher and student see the same batch and the clip spec of the export is the
# same), a slimmer network. Train it with
#
#     sfdeploy finetune DATA --work-dir WORK_STUDENT --distill-from WORK_TEACHER
#
# (this is the default student of a slowfast_tiny teacher). Each change below says why; on 2 CPU
# cores it runs ~3x the teacher's clips/s (eager, batch 8) at ~1/8 of its GFLOP and parameters.
#
# This is a plain MMAction2 config: copy it (with slowfast_tiny.py beside it) into your own
# MMAction2 project as it is.
_base_ = ['./slowfast_tiny.py']

model = dict(
    backbone=dict(
        # Sparser in time: the slow pathway sees every 8th frame (2 of the 16) instead of every 4th,
        # the fast pathway every 4th (alpha 2: 4 of 16) instead of all 16. The input clip is
        # unchanged (the network samples it), and 4 frames still show which way things move.
        resample_rate=8,
        speed_ratio=2,
        # The fast pathway keeps the teacher's 2 channels (1/4 of the slow pathway's, not 1/8):
        # the motion classes live there. The slow pathway gets half the teacher's channels.
        channel_ratio=4,
        # One residual block per stage instead of two: at 64 px the teacher's time goes into many
        # small convs, so the number of layers costs as much as their width.
        slow_pathway=dict(base_channels=8, stage_blocks=(1, 1, 1, 1)),
        fast_pathway=dict(base_channels=2, stage_blocks=(1, 1, 1, 1))),
    cls_head=dict(in_channels=80))  # 64 (slow: 8 * 8) + 16 (fast: 2 * 8)

# A network this small takes a larger step: at slowfast_tiny's 3e-3 it had not learnt the
# synthetic set in 15 epochs; at 6e-3 it matches the teacher by epoch ~9 (per 8 videos; sfdeploy
# scales it to the effective batch).
optim_wrapper = dict(optimizer=dict(lr=6e-3))

# Trained from scratch (no public checkpoint for this architecture), with the teacher's soft
# targets when distilled.
load_from = None
