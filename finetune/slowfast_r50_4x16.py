# sfdeploy preset: slowfast_r50_4x16 (the default)
#
# SlowFast R50 4x16x1 from MMAction2's Kinetics-400 recipe, changed for finetuning on a small
# custom dataset. Each change below says why. This is a plain MMAction2 config: copy it into your
# own MMAction2 project as it is. `sfdeploy finetune` fills in what depends on your data
# (annotation files, num_classes, the schedule length, batch size, work dir) and writes the full
# merged result to WORK/config.py.
_base_ = ['mmaction::recognition/slowfast/slowfast_r50_8xb8-4x16x1-256e_kinetics400-rgb.py']

# Start from the Kinetics-400 weights of this exact config. The 400-class head does not fit your
# classes: sfdeploy keeps the backbone weights and re-initialises the head (and says so).
load_from = 'https://download.openmmlab.com/mmaction/v1.0/recognition/slowfast/slowfast_r50_8xb8-4x16x1-256e_kinetics400-rgb/slowfast_r50_8xb8-4x16x1-256e_kinetics400-rgb_20220901-701b0f6f.pth'  # noqa: E501

model = dict(cls_head=dict(num_classes=400))  # replaced by the number of classes in your data

# SGD at lr 0.1 is tuned for 256 epochs on 240k videos; on a few hundred videos AdamW at 1e-3
# adapts the pretrained features within ~10 epochs where SGD 0.01 had not learnt after 8.
optim_wrapper = dict(
    _delete_=True,
    optimizer=dict(type='AdamW', lr=1e-3, weight_decay=1e-4),
    clip_grad=dict(max_norm=40, norm_type=2))
auto_scale_lr = dict(enable=True, base_batch_size=8)  # lr above is for 8 videos per optimizer step

# Validate every epoch (the Kinetics recipe validates every 5 of 256), so that the best
# checkpoint and early stopping see every epoch. The warm-up + cosine schedule is sized to
# --epochs by sfdeploy; the base's 34-epoch warm-up would never end on a short run.
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=20, val_begin=1, val_interval=1)
