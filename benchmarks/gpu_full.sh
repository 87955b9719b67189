#!/usr/bin/env bash
# The GPU record: SlowFast R50 4x16 at 224 px (the model users deploy), fp32 and fp16, batch sweep
# up to 128, Triton at batch 32 with 1/8/32 requests in flight, end to end on 256 px videos, and a
# profile of where the time goes. Needs a CUDA GPU and `pip install -e ".[gpu]"`.
set -euo pipefail
cd "$(dirname "$0")/.."
sfdeploy bench --full --device cuda --precision fp32,fp16 --batch-sizes 1,8,16,32,64,128 \
  --concurrency 1,8,32 --triton-batch 32 --iters 20 --warmup 5 --e2e-videos 256 --trace "$@"
