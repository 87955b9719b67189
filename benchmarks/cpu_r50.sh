#!/usr/bin/env bash
# SlowFast R50 4x16 on this CPU, every runtime and precision side by side in one run: TorchScript (as
# loaded and optimised), ONNX Runtime, the ExportedProgram and the AOTInductor package, in fp32 and
# bf16 (where the CPU has AVX512-BF16 or AMX), at batch 1 and 8; then the served model (what `repo
# --runtime auto` chooses from those rows) beside its runtime in process. Then R50 through `sfdeploy
# export` (the parity gate, bf16 included, and its timings) and what `repo` serves from them
# (benchmarks/r50_export.py). About 40 minutes on 2 cores. Stopped? Run it again: --resume keeps the
# rows already measured. Extra options pass through to bench (e.g. --note "...").
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/cpu-2c-r50-formats-$(date +%F).json}"
sfdeploy bench --full --device cpu --backends mmaction2,torchscript,onnxruntime,torch_export,aoti,triton-grpc \
  --batch-sizes 1,8 --stage model,triton --triton-batch 1 --concurrency 1 --out "$OUT" --resume "$@"
python benchmarks/r50_export.py --out "${OUT%.json}-export.json"
