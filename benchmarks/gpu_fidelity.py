"""GPU-decoding fidelity: a sweep of videos (h264, hevc, mpeg4, vp9, mjpeg; 96 px to 1080p; odd sizes;
variable frame rate) decoded by the CPU path and by a candidate decoder, through an export's model;
per codec the top-1 agreement and the worst probability difference, and the gate ``sfdeploy infer``
reads (``EXPORT/decode_fidelity.json``). The logic is :mod:`sfdeploy.bench.fidelity`.

::

    python benchmarks/gpu_fidelity.py --export EXPORT --candidate pynvvideocodec   # on a GPU host
    python benchmarks/gpu_fidelity.py --export EXPORT --candidate torchcodec
    python benchmarks/gpu_fidelity.py --export EXPORT --candidate decord --device cpu --per-size 1  # CPU check
"""

from __future__ import annotations

import sys

from sfdeploy.bench.fidelity import main

if __name__ == "__main__":
    sys.exit(main())
