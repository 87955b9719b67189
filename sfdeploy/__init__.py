"""sfdeploy: SlowFast video action recognition from labelled videos to a served, batched model.

The library lives in sub-modules (``sfdeploy.data``, ``sfdeploy.train``, ...); importing this
package is cheap on purpose (no torch, no mmaction), so that the CLI starts instantly. It installs
one import hook (:func:`sfdeploy.compat.install_import_hook`): after ``import sfdeploy``,
MMAction2's own APIs import on the mmaction2 1.2.0 wheel, which lacks a module they import.
"""

from sfdeploy.compat import install_import_hook as _install_import_hook

__version__ = "0.1.0"

_install_import_hook()
