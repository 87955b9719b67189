#!/usr/bin/env bash
# The CPU record: the small profile (slowfast_tiny at 64 px), every backend, every stage but compile.
# Writes benchmarks/results/<device>-<date>.{json,md,png}, a row at a time; a few minutes on 2 cores.
# Stopped? Run it again: --resume keeps the rows already measured. Extra options pass through
# (e.g. --note "the 2 cores were shared with other jobs").
set -euo pipefail
cd "$(dirname "$0")/.."
sfdeploy bench --trace --resume "$@"
