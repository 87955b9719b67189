#!/usr/bin/env bash
# A wheelhouse for an air-gapped GPU host that already has CUDA torch: sfdeploy's runtime
# dependencies as wheels for one CPython on manylinux x86_64 (never torch), the sfdeploy wheel,
# large files split into parts, and an install.sh that installs them offline over the host's
# torch and numpy. Needs this repository's environment (pip) and PyPI; see benchmarks/README.md.
#   benchmarks/wheelhouse.sh --python 3.12 --out /tmp/wheelhouse [--max-part-mb 60] [--ort gpu|cpu|none]
#                            [--skip torch,triton,nvidia-*,cuda-*] [--host-first numpy]
set -euo pipefail
# The logic is kit/wheelhouse.py (a tool, not part of the library); it imports sfdeploy from this
# checkout, which needs no sfdeploy install.
HERE="$(cd "$(dirname "$0")" && pwd)"
export PYTHONPATH="$(dirname "$HERE")${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" "$HERE/kit/wheelhouse.py" "$@"
