"""``python -m sfdeploy.serving.guard CONFIG_JSON``: the server's front, as :class:`TritonServer` starts it."""

import sys

from sfdeploy.serving.guard import main

sys.exit(main(sys.argv))
