"""Where a served model is found by default: the one owner of these facts.

``sfdeploy repo`` names the model :data:`DEFAULT_MODEL`, ``sfdeploy serve`` binds
:data:`LOOPBACK` on :data:`DEFAULT_HTTP_PORT` / :data:`DEFAULT_GRPC_PORT`, and every client
(``infer``, ``eval``, :class:`sfdeploy.target.ModelTarget`) talks to :data:`DEFAULT_HTTP_URL` unless
told otherwise, so the defaults of both sides cannot drift apart. No imports: the lowest layer.
"""

from __future__ import annotations

DEFAULT_MODEL = "slowfast"  # the served model (`repo --name`); <name>_video decodes on the server
LOOPBACK = "127.0.0.1"  # servers bind it unless asked otherwise (--host)
DEFAULT_HTTP_PORT = 8000
DEFAULT_GRPC_PORT = 8001
DEFAULT_METRICS_PORT = 8002
DEFAULT_HTTP_URL = f"{LOOPBACK}:{DEFAULT_HTTP_PORT}"
#: the protocols a Triton client speaks (``--protocol``; http, the first, is the default)
PROTOCOLS: tuple[str, ...] = ("http", "grpc")
