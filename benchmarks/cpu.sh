#!/usr/bin/env bash
# The CPU record: the small profile (slowfast_tiny at 64 px), every backend, end to end.
# Writes benchmarks/results/<device>-<date>.{json,md,png}. A few minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
sfdeploy bench --trace "$@"
