#!/usr/bin/env bash
# An install kit for an air-gapped GPU host whose image has CUDA torch (and most of the scientific
# stack): only the packages the host lacks, unpacked and xz-packed, in parts of at most 58 MB, each
# with an install_part.sh. Needs this repository's environment (pip) and PyPI; see benchmarks/README.md.
#   benchmarks/gpukit.sh --python 3.12 --host-packages benchmarks/hosts/nvidia-h200-cuda.txt --out /tmp/kit
#                        [--max-part-mb 58] [--ort none|gpu|cpu] [--extra nvdec]   (nvdec: the GPU video decoders)
# On the host, from the sfdeploy checkout: bash KIT/part1/install_part.sh; bash KIT/part2/install_part.sh
set -euo pipefail
# The logic is kit/gpukit.py (a tool, not part of the library); it imports sfdeploy from this checkout.
HERE="$(cd "$(dirname "$0")" && pwd)"
export PYTHONPATH="$(dirname "$HERE")${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" "$HERE/kit/gpukit.py" "$@"
