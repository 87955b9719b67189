# sfdeploy preset: slowfast_r50_8x8
#
# SlowFast R50 8x8x1 (slow pathway sees 8 frames, fast pathway 32, alpha = 4), the same
# finetuning changes as slowfast_r50_4x16 (read that file for the reasons). More temporal
# resolution in the slow pathway: ~2x the compute of 4x16 for ~+1.5 top-1 on Kinetics-400.
_base_ = ['./slowfast_r50_4x16.py']

model = dict(
    backbone=dict(
        resample_rate=4,  # tau
        speed_ratio=4,  # alpha
        channel_ratio=8,  # beta_inv
        slow_pathway=dict(fusion_kernel=7)))

load_from = 'https://download.openmmlab.com/mmaction/v1.0/recognition/slowfast/slowfast_r50_8xb8-8x8x1-256e_kinetics400-rgb/slowfast_r50_8xb8-8x8x1-256e_kinetics400-rgb_20220818-1cb6dfc8.pth'  # noqa: E501
