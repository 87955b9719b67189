#!/usr/bin/env bash
# The GPU checks of an air-gapped GPU host, as one prepared script in two calls (what one transfer can
# carry is size-limited, so the kit arrives in two parts; see benchmarks/README.md "GPU host"):
#
#   benchmarks/gpu_check.sh 1   # install kit part 1 (training, export, decoding, client), doctor, then
#                               # the bench record's model stage (R50 4x16, fp32 + fp16, plain vs rewritten)
#   benchmarks/gpu_check.sh 2   # install kit part 2 (tritonserver), then `sfdeploy demo`, the record's
#                               # triton and e2e stages, and `pytest -m gpu`
#   benchmarks/gpu_check.sh 3   # GPU decoding (issue 19; a kit made with --extra nvdec): install the kit's
#                               # further parts, the decoders' probe, tests/test_gpu_decode.py (issue 33 too:
#                               # a stream growing past the pixel limit refused on the GPU path, with the GPU
#                               # memory it took printed in pytest-gpu-decode's output), the fidelity
#                               # gate per decoder on the demo export, and the record's e2e stage again (its
#                               # gpu-decode rows beside the CPU decode-only ceiling measured in call 2)
#   benchmarks/gpu_check.sh 4   # torch.export / AOTInductor (issue 32): the demo's model exported on the GPU
#                               # in every format (AOTInductor packages compiled for this GPU), what `repo`
#                               # serves from that measurement, the GPU tests of the new formats, and the
#                               # record's model rows still missing (ExportedProgram, AOTInductor: fp16 at
#                               # batch 1 and 32 beside TorchScript plain and rewritten)
#   benchmarks/gpu_check.sh 5   # GPU-resident serving (issue 30): every kit part (NVDEC too), the GPU serving
#                               # tests (a KIND_GPU instance taking GPU inputs, <name>_video decoding on
#                               # NVDEC vs the client's CPU decoding, CUDA shared memory), `infer --shm cuda`
#                               # and `--server-decode` rows, the record's triton stage (triton-cuda-shm) and
#                               # e2e stage (triton-video on the server's CPU and NVDEC, with Triton's
#                               # statistics), then the served model's instances 1, 2, 4 at 8 in flight, a
#                               # record each (what sets `repo --instances`' GPU default)
#
# Every step has its own time limit inside an overall deadline (BUDGET_S, default 540 s a call), and
# what it produced is copied to $OUT as it finishes (the record after every stage): a call cut short
# still brings back everything done before the cut. The kit is made here with benchmarks/gpukit.sh
# --out .gpukit; state that must outlive a call (the record, the bench export, the demo) is in
# $SFDEPLOY_GPU_STATE (default /tmp/sfdeploy-gpu), which a warm machine keeps between calls.
#   benchmarks/gpu_check.sh 6   # training speed (issue 31): the record's train stage (R50 4x16 at batch 8 on
#                               # synthetic 320 px videos, fp32 and --amp, fixed steps: videos/s, data-wait
#                               # share, peak GPU memory; raw frames vs videos), then on 52 such videos
#                               # `finetune --batch-size auto` (the CUDA probe's trials) and one epoch with
#                               # --checkpointing beside a plain one (peak GPU memory), each summary into $OUT;
#                               # then bench --stage distill (R50 vs its R18 student) and eval --report-dir
# A plain GPU machine with internet can run the same: pip install -e ".[gpu,dev]" and KIT=none.
set -uo pipefail
cd "$(dirname "$0")/.."
PHASE="${1:?usage: benchmarks/gpu_check.sh 1|2|3|4|5|6}"
OUT="${OUT:-/tmp/sfdeploy-gpu-out}"
STATE="${SFDEPLOY_GPU_STATE:-/tmp/sfdeploy-gpu}"
KIT="${KIT:-.gpukit}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT" "$STATE"
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-540} ))
RECORD="$STATE/record.json"
export PYTHONUNBUFFERED=1 SFDEPLOY_TEST_DEMO="$STATE/demo"
# One set of bench settings for both calls (a resumed record refuses other settings).
# (PROFILE=small DEVICE=cpu PRECISIONS=fp32 KIT=none rehearse the script on a CPU machine.)
PROFILE_FLAG=(); [ "${PROFILE:-full}" = full ] && PROFILE_FLAG=(--full)
BENCH=(bench "${PROFILE_FLAG[@]}" --device "${DEVICE:-cuda}" --precision "${PRECISIONS:-fp32,fp16}" --batch-sizes "${BATCHES:-1,32}"
       --backends mmaction2,eager,torchscript,torch_export,aoti,triton-grpc,triton-http,triton-shm,triton-cuda-shm,triton-video
       --concurrency 1,8
       --triton-batch 32 --iters "${ITERS:-20}" --warmup 5 --e2e-videos "${E2E_VIDEOS:-128}"
       --trace --out "$RECORD" --resume)

step() {  # step NAME SECONDS COMMAND...: run with the smaller of its limit and the time left
  local name="$1" limit="$2"; shift 2
  local left=$(( DEADLINE - $(date +%s) ))
  local t=$(( limit < left ? limit : left ))
  if [ "$t" -lt 10 ]; then echo "gpu_check: SKIP $name (deadline)"; echo "$name skipped-deadline" >> "$OUT/summary.txt"; return 0; fi
  echo "gpu_check: === $name (limit ${t}s) $(date +%T)"
  local start=$(date +%s)
  timeout --kill-after=15 "$t" bash -c '"$@"' _ "$@"  # through bash: the functions below are steps too
  local rc=$?
  echo "gpu_check: === $name rc=$rc in $(( $(date +%s) - start ))s"
  echo "$name rc=$rc $(( $(date +%s) - start ))s" >> "$OUT/summary.txt"
  return 0
}

save_record() {
  [ -f "$RECORD" ] || return 0
  local name
  name="$("$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); i=d["device_info"]
import re; print(re.sub(r"[^a-z0-9]+","-",(i.get("gpu") or "gpu").lower()).strip("-")+"-"+d["date"])' "$RECORD")"
  cp "$RECORD" "$OUT/$name.json"; cp "${RECORD%.json}.md" "$OUT/$name.md" 2>/dev/null || true
}

install_part() {
  if [ "$KIT" = none ]; then return 0; fi
  bash "$KIT/part$1/install_part.sh" --python "$PY" --checkout "$PWD" --no-doctor
}

env_report() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,power.limit --format=csv
  "$PY" -c 'import torch, numpy, platform; print("python", platform.python_version(), "torch", torch.__version__,
"cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), "numpy", numpy.__version__,
torch.cuda.get_device_name(0))'
  df -h /dev/shm | tail -1
  "$PY" -m sfdeploy doctor
}

serve_gpu() {  # the demo's export for GPU instances, <name>_video on NVDEC where a GPU decoder runs, served
  local decode=cpu
  "$PY" -c 'import sys; from sfdeploy.decode.gpu.select import probe_backends
sys.exit(0 if any(s.available for s in probe_backends()) else 1)' && decode=gpu
  "$PY" -m sfdeploy repo "$STATE/demo/export" --repo "$STATE/repo-gpu" --device "${DEVICE:-cuda}" --decode "$decode" \
    --decode-instances 2 || return 1
  cp "$STATE/repo-gpu/slowfast/config.pbtxt" "$OUT/repo-gpu-slowfast.pbtxt"
  cp "$STATE/repo-gpu/slowfast_video/config.pbtxt" "$OUT/repo-gpu-slowfast_video.pbtxt"
  "$PY" -m sfdeploy serve --repo "$STATE/repo-gpu" --http-port 18000 --grpc-port 18001 --metrics-port 18002 \
    > "$OUT/serve-gpu.log" 2>&1 &
  echo $! > "$STATE/serve.pid"
  "$PY" -c 'import sys, time, urllib.request
for _ in range(90):
    try:
        urllib.request.urlopen("http://127.0.0.1:18000/v2/health/ready", timeout=2); sys.exit(0)
    except OSError:
        time.sleep(1)
sys.exit(1)' 
}

train_run() {  # train_run NAME FINETUNE-OPTIONS...: one epoch of $TRAIN_PRESET on $STATE/train-data, summary to $OUT
  local name="$1"; shift
  rm -rf "$STATE/train-$name"
  "$PY" -m sfdeploy finetune "$STATE/train-data" --work-dir "$STATE/train-$name" --preset "$TRAIN_PRESET" \
    --pretrained none --epochs 1 "$@" || return 1
  cp "$STATE/train-$name/finetune_summary.json" "$OUT/finetune-$name.json"
  "$PY" -c 'import json, sys; s = json.load(open(sys.argv[1])); p = s["speed"]
print(sys.argv[2], "batch", s["batch_size"], "videos/s", p["videos_per_s"], "data wait", p["data_wait_share"],
      "peak MB", p.get("peak_gpu_mem_mb", p.get("peak_rss_mb")), "auto:", s.get("batch_size_auto"))' \
    "$OUT/finetune-$name.json" "$name" | tee -a "$OUT/train-runs.txt"
}

train_data() {  # 52 + 12 synthetic videos at the train stage's size, prepared once
  [ -f "$STATE/train-data/dataset.json" ] && return 0
  "$PY" -m sfdeploy data synth "$STATE/train-videos" --size "$TRAIN_SIZE" --frames "$TRAIN_FRAMES" &&
    "$PY" -m sfdeploy data prepare "$STATE/train-videos" --out "$STATE/train-data" --preset "$TRAIN_PRESET"
}

if [ "${PROFILE:-full}" = full ]; then TRAIN_PRESET=slowfast_r50_4x16 TRAIN_SIZE=320 TRAIN_FRAMES=64
else TRAIN_PRESET=slowfast_tiny TRAIN_SIZE=96 TRAIN_FRAMES=48; fi
export -f train_run train_data
export TRAIN_PRESET TRAIN_SIZE TRAIN_FRAMES
export -f install_part env_report serve_gpu
export KIT PY STATE OUT
case "$PHASE" in
  1)
    step install-part1 120 install_part 1
    # sfdeploy itself, so that its presets (installed as sfdeploy.presets) resolve before part 2 is in
    step install-sfdeploy 60 "$PY" -m pip install --quiet --no-index --no-deps --no-build-isolation -e .
    step env 60 env_report
    step bench-model 400 "$PY" -m sfdeploy "${BENCH[@]}" --stage model
    save_record
    ;;
  2)
    step install-part2 120 install_part 2
    step demo 200 "$PY" -m sfdeploy demo --workdir "$STATE/demo"
    [ -f "$STATE/demo/export/manifest.json" ] && cp "$STATE/demo/export/manifest.json" "$OUT/demo-manifest.json"
    step pytest-gpu 200 "$PY" -m pytest -m gpu -q -rA -p no:cacheprovider --timeout 190 --junitxml "$OUT/pytest-gpu.xml"
    step bench-triton 150 "$PY" -m sfdeploy "${BENCH[@]}" --stage triton
    save_record
    step bench-e2e 90 "$PY" -m sfdeploy "${BENCH[@]}" --stage e2e
    save_record
    ;;
  3)
    for part in "$KIT"/part*; do  # parts 3.. (made by --extra nvdec); 1 and 2 again are harmless
      [ -d "$part" ] && step "install-$(basename "$part")" 60 install_part "${part##*part}"
    done
    step nvdec-probe 60 "$PY" -c 'from sfdeploy.decode.gpu.select import probe_backends
for s in probe_backends(): print(s)'
    step demo 120 "$PY" -m sfdeploy demo --workdir "$STATE/demo"
    step pytest-gpu-decode 240 "$PY" -m pytest -m gpu -q -rA -s -p no:cacheprovider --timeout 230 \
      --junitxml "$OUT/pytest-gpu-decode.xml" tests/test_gpu_decode.py
    for decoder in pynvvideocodec torchcodec; do
      step "fidelity-$decoder" 150 "$PY" benchmarks/gpu_fidelity.py --export "$STATE/demo/export" \
        --candidate "$decoder" --per-size "${FIDELITY_PER_SIZE:-2}" --frames 32 --sweep "$STATE/sweep" \
        --out "$OUT/decode-fidelity-$decoder.json"
    done
    step bench-e2e-gpu-decode 150 "$PY" -m sfdeploy "${BENCH[@]}" --stage e2e
    save_record
    ;;
  4)
    step demo 150 "$PY" -m sfdeploy demo --workdir "$STATE/demo"
    step export-all-formats 300 "$PY" -m sfdeploy export "$STATE/demo/work" --out "$STATE/export-all" --device cuda \
      --formats torchscript,onnx,torch_export,aoti --parity-videos 12
    [ -f "$STATE/export-all/manifest.json" ] && cp "$STATE/export-all/manifest.json" "$OUT/export-all-manifest.json"
    step repo-auto 60 "$PY" -m sfdeploy repo "$STATE/export-all" --repo "$STATE/repo-auto" --device cuda --no-video
    [ -f "$STATE/repo-auto/slowfast/config.pbtxt" ] && cp "$STATE/repo-auto/slowfast/config.pbtxt" "$OUT/repo-auto.pbtxt"
    # --device auto with an AOTInductor package: the Device value and the placement rule on a GPU
    # (auto = the kind the package was compiled for), and the one decode pool feeding it
    step infer-aoti-auto 90 "$PY" -m sfdeploy infer "$STATE/demo/videos" --backend aoti --export "$STATE/export-all" \
      --precision fp16 --decode auto --out "$OUT/infer-aoti-auto.csv"
    step pytest-gpu-formats 300 "$PY" -m pytest -m gpu -q -rA -p no:cacheprovider --timeout 290 \
      --junitxml "$OUT/pytest-gpu-formats.xml" tests/test_gpu.py -k "parity or new_formats or measured_fastest"
    step bench-model-formats 400 "$PY" -m sfdeploy "${BENCH[@]}" --stage model
    save_record
    ;;
  5)
    for part in "$KIT"/part*; do  # every part (NVDEC's too): a fresh machine has none, a warm one all
      [ -d "$part" ] && step "install-$(basename "$part")" 60 install_part "${part##*part}"
    done
    step install-sfdeploy 60 "$PY" -m pip install --quiet --no-index --no-deps --no-build-isolation -e .
    step demo 200 "$PY" -m sfdeploy demo --workdir "$STATE/demo"
    step pytest-gpu-serving 240 "$PY" -m pytest -m gpu -q -rA -s -p no:cacheprovider --timeout 230 \
      --junitxml "$OUT/pytest-gpu-serving.xml" tests/test_gpu_serving.py tests/test_cuda_shm.py
    step serve-gpu 30 serve_gpu
    step infer-shm-cuda 60 "$PY" -m sfdeploy infer "$STATE/demo/videos" --url "127.0.0.1:18001" --protocol grpc \
      --shm cuda --out "$OUT/infer-shm-cuda.csv"
    step infer-server-nvdec 60 "$PY" -m sfdeploy infer "$STATE/demo/videos" --url "127.0.0.1:18001" --protocol grpc \
      --server-decode --decode gpu --out "$OUT/infer-server-nvdec.csv"
    [ -f "$STATE/serve.pid" ] && kill "$(cat "$STATE/serve.pid")" 2>/dev/null; sleep 3
    step bench-triton-serving 200 "$PY" -m sfdeploy "${BENCH[@]}" --stage triton
    save_record
    step bench-e2e-serving 150 "$PY" -m sfdeploy "${BENCH[@]}" --stage e2e
    save_record
    for n in 1 2 4; do
      step "bench-instances-$n" 90 "$PY" -m sfdeploy bench "${PROFILE_FLAG[@]}" --device "${DEVICE:-cuda}" \
        --precision "${SWEEP_PRECISION:-${PRECISIONS:-fp16}}" --backends torchscript,triton-grpc,triton-shm --stage triton --concurrency 8 --triton-batch 32 \
        --instances "$n" --iters 10 --warmup 3 --export "$STATE/record.work/export" --out "$STATE/instances-$n.json" --resume
      cp "$STATE/instances-$n.json" "$STATE/instances-$n.md" "$OUT/" 2>/dev/null  # not its .work: the repository
    done
    ;;
  6)
    for part in "$KIT"/part*; do  # a fresh machine has no kit, a warm one all of it
      [ -d "$part" ] && step "install-$(basename "$part")" 60 install_part "${part##*part}"
    done
    [ "$KIT" = none ] || step install-sfdeploy 60 "$PY" -m pip install --quiet --no-index --no-deps \
      --no-build-isolation -e .
    # fixed steps a row: 2 epochs of TRAIN_STEPS (the first the warm-up); the record resumes if cut short
    step bench-train 300 "$PY" -m sfdeploy bench "${PROFILE_FLAG[@]}" --device "${DEVICE:-cuda}" --stage train \
      --precision "${PRECISIONS:-fp32,fp16}" --iters "${TRAIN_STEPS:-10}" --out "$STATE/train.json" --resume
    cp "$STATE/train.json" "$STATE/train.md" "$OUT/" 2>/dev/null
    step train-data 120 train_data
    step train-plain 120 train_run plain --batch-size 8
    step train-checkpointing 120 train_run checkpointing --batch-size 8 --checkpointing
    step train-batch-auto 180 train_run batch-auto --batch-size auto
    # the distilled student beside its teacher on the GPU (R50 vs R18 student: GFLOP, clips/s), and
    # eval's model analysis (mean class accuracy, confusion, misclassified sheet) with --device cuda
    step bench-distill 150 "$PY" -m sfdeploy bench "${PROFILE_FLAG[@]}" --device "${DEVICE:-cuda}" --stage distill \
      --precision fp32 --batch-sizes "${BATCHES:-1,32}" --out "$STATE/distill.json" --resume
    cp "$STATE/distill.json" "$STATE/distill.md" "$OUT/" 2>/dev/null
    [ -f "$STATE/demo/export/manifest.json" ] || step demo 200 "$PY" -m sfdeploy demo --workdir "$STATE/demo"
    step eval-analysis 120 "$PY" -m sfdeploy eval "$STATE/demo/export" --data "$STATE/demo/data" \
      --device "${DEVICE:-cuda}" --report-dir "$OUT/eval-analysis" --out "$OUT/eval-analysis/report.json"
    ;;
  *) echo "usage: benchmarks/gpu_check.sh 1|2|3|4|5|6" >&2; exit 2 ;;
esac
echo "gpu_check: phase $PHASE done $(date +%T)"; cat "$OUT/summary.txt"
