# sfdeploy preset: slowfast_tiny
#
# A small SlowFast (ResNet3d-18 pathways, 16x2 clips at 64 px) that learns the synthetic motion
# dataset on 2 CPU cores in well under a minute. It exists for the demo and the tests, and as a
# quick smoke test of a new dataset; use slowfast_r50_4x16 for real accuracy.
#
# This is a plain MMAction2 config: copy it into your own MMAction2 project as it is.
# `sfdeploy finetune` fills in what depends on your data (annotation files, num_classes,
# the schedule length, batch size, work dir) and writes the full merged result to WORK/config.py.
_base_ = ['mmaction::_base_/default_runtime.py']

clip_len = 16
frame_interval = 2
short_side = 64
crop_size = 64

model = dict(
    type='Recognizer3D',
    backbone=dict(
        type='ResNet3dSlowFast',
        pretrained=None,
        resample_rate=4,  # tau: the slow pathway sees every 4th of the 16 frames
        speed_ratio=4,  # alpha: the fast pathway runs at 4x the slow frame rate
        channel_ratio=8,  # beta_inv: fast pathway has 1/8 of the slow channels
        slow_pathway=dict(
            type='resnet3d',
            depth=18,
            pretrained=None,
            lateral=True,
            base_channels=16,
            conv1_kernel=(1, 7, 7),
            dilations=(1, 1, 1, 1),
            conv1_stride_t=1,
            pool1_stride_t=1,
            inflate=(0, 0, 1, 1),
            norm_eval=False),
        fast_pathway=dict(
            type='resnet3d',
            depth=18,
            pretrained=None,
            lateral=False,
            base_channels=2,
            conv1_kernel=(5, 7, 7),
            conv1_stride_t=1,
            pool1_stride_t=1,
            norm_eval=False)),
    cls_head=dict(
        type='SlowFastHead',
        in_channels=144,  # 128 (slow, depth 18: 16 * 8) + 16 (fast: 2 * 8)
        num_classes=400,  # replaced by the number of classes in your data
        spatial_type='avg',
        dropout_ratio=0.5,
        average_clips='prob'),
    data_preprocessor=dict(
        type='ActionDataPreprocessor',
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        format_shape='NCTHW'))

dataset_type = 'VideoDataset'
file_client_args = dict(io_backend='disk')
train_pipeline = [
    dict(type='DecordInit', **file_client_args),
    dict(type='SampleFrames', clip_len=clip_len, frame_interval=frame_interval, num_clips=1),
    dict(type='DecordDecode'),
    dict(type='Resize', scale=(-1, short_side)),
    dict(type='RandomResizedCrop', area_range=(0.6, 1.0)),
    dict(type='Resize', scale=(crop_size, crop_size), keep_ratio=False),
    dict(type='Flip', flip_ratio=0.5),  # sfdeploy removes it for direction-sensitive data
    dict(type='FormatShape', input_format='NCTHW'),
    dict(type='PackActionInputs')
]
val_pipeline = [
    dict(type='DecordInit', **file_client_args),
    dict(type='SampleFrames', clip_len=clip_len, frame_interval=frame_interval, num_clips=1,
         test_mode=True),
    dict(type='DecordDecode'),
    dict(type='Resize', scale=(-1, short_side)),
    dict(type='CenterCrop', crop_size=crop_size),
    dict(type='FormatShape', input_format='NCTHW'),
    dict(type='PackActionInputs')
]
test_pipeline = [
    dict(type='DecordInit', **file_client_args),
    dict(type='SampleFrames', clip_len=clip_len, frame_interval=frame_interval, num_clips=2,
         test_mode=True),
    dict(type='DecordDecode'),
    dict(type='Resize', scale=(-1, short_side)),
    dict(type='ThreeCrop', crop_size=short_side),
    dict(type='FormatShape', input_format='NCTHW'),
    dict(type='PackActionInputs')
]

train_dataloader = dict(
    batch_size=8,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=True),
    dataset=dict(type=dataset_type, ann_file='', data_prefix=dict(video=''),
                 pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=8,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type=dataset_type, ann_file='', data_prefix=dict(video=''),
                 pipeline=val_pipeline, test_mode=True))
test_dataloader = dict(
    batch_size=1,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type=dataset_type, ann_file='', data_prefix=dict(video=''),
                 pipeline=test_pipeline, test_mode=True))

val_evaluator = dict(type='AccMetric')
test_evaluator = val_evaluator

train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=15, val_begin=1, val_interval=1)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')

# The learning rate is for base_batch_size videos per optimizer step; sfdeploy scales it to the
# effective batch of the run (batch x --accumulate x processes).
optim_wrapper = dict(
    optimizer=dict(type='AdamW', lr=3e-3, weight_decay=1e-4),
    clip_grad=dict(max_norm=40, norm_type=2))
auto_scale_lr = dict(enable=True, base_batch_size=8)

# Replaced by sfdeploy with a warm-up + cosine schedule sized to --epochs.
param_scheduler = [dict(type='CosineAnnealingLR', T_max=15, eta_min=0, by_epoch=True, begin=0,
                        end=15)]

# Trained from scratch: there is no public checkpoint for this architecture.
load_from = None
