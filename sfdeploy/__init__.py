"""sfdeploy: SlowFast video action recognition from labelled videos to a served, batched model.

The library lives in sub-modules (``sfdeploy.data``, ``sfdeploy.train``, ...); importing this
package is cheap on purpose (no torch, no mmaction), so that the CLI starts instantly.
"""

__version__ = "0.1.0"
