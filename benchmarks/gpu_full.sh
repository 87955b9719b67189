#!/usr/bin/env bash
# The GPU record: SlowFast R50 4x16 at 224 px (the model users deploy), every runtime (TorchScript plain
# and rewritten, ONNX Runtime, the ExportedProgram, the AOTInductor package compiled for this GPU), fp32 and fp16, batch 1..128,
# Triton at batch 32 with 1/8/32 requests in flight beside in-process with 1/8/32 threads, end to
# end on 256 synthetic videos, and a profile of where the time goes. Needs a CUDA GPU and sfdeploy
# with onnxruntime-gpu (`pip install -e ".[gpu]"`, or benchmarks/wheelhouse.sh on an air-gapped host).
#
# One `sfdeploy bench --resume` per stage (each under ~8 minutes on an H100; see README.md), every
# row saved the moment it is measured: stop it anywhere and run this script again to continue.
#   benchmarks/gpu_full.sh                         # model, triton, e2e
#   STAGES="compile" benchmarks/gpu_full.sh        # torch.compile / CUDA-graph variants (slow to compile)
#   SFDEPLOY_BENCH_OUT=path.json benchmarks/gpu_full.sh   # another record [default: continue the
#                                                  # newest results/<gpu>-<date>.json, else start today's]
set -euo pipefail
cd "$(dirname "$0")/.."
today="$(python -c 'from sfdeploy.bench.run import default_out; print(default_out("cuda"))')"
newest="$(ls -t "${today%-????-??-??.json}"-????-??-??.json 2>/dev/null | head -n 1 || true)"
OUT="${SFDEPLOY_BENCH_OUT:-${newest:-$today}}"
echo "gpu_full.sh: record $OUT" >&2
for stage in ${STAGES:-model triton e2e}; do
  sfdeploy bench --full --device cuda --precision fp32,fp16 --batch-sizes 1,8,16,32,64,128 \
    --backends "${BACKENDS:-mmaction2,eager,torchscript,onnxruntime,torch_export,aoti,triton-http,triton-grpc,triton-shm,triton-video}" \
    --concurrency 1,8,32 --triton-batch 32 --iters 20 --warmup 5 --e2e-videos 256 --trace \
    --out "$OUT" --resume --stage "$stage" "$@"
done
