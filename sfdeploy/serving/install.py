"""Where the tritonserver that ships in ``nvidia-pytriton`` lives, and how to run it here.

The wheel carries the server binary, its shared libraries (``nvidia_pytriton.libs``), the python
backend (``libtriton_python.so``) and one backend stub per Python version. The server needs the
libraries on ``LD_LIBRARY_PATH`` and a backend directory in which the stub for *this* Python sits
beside the backend library; :func:`make_backend_dir` builds that directory. The stub links the
shared Python library (``libpython3.X.so.1.0``): :meth:`TritonInstall.env` also puts the folder of
this interpreter's own one on the path (a pyenv or conda Python keeps it outside the system's
library folders, where the stub would not find it).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from sfdeploy.errors import EnvironmentProblem

_FIX = "pip install 'nvidia-pytriton==0.7.0' (it ships the tritonserver binary)"


@dataclass(frozen=True)
class TritonInstall:
    """Where the pieces of the tritonserver that nvidia-pytriton ships are: the binary, its
    libraries, the python backend, and the backend stub built for this Python (the one that can
    import sfdeploy)."""

    binary: Path
    libs: Path
    python_backend: Path  # folder holding libtriton_python.so and triton_python_backend_utils.py
    stub: Path  # triton_python_backend_stub built for this Python version

    def env(self, base: dict[str, str]) -> dict[str, str]:
        """``base`` (an environment) with what the server and its backend stub need to load their
        shared libraries: the wheel's libraries, then ``base``'s path, then the folder of this
        Python's shared library."""
        paths = [str(self.libs), base.get("LD_LIBRARY_PATH", ""), python_library_dir() or ""]
        return {**base, "LD_LIBRARY_PATH": os.pathsep.join(p for p in paths if p)}


def python_library_dir() -> str | None:
    """The folder holding this interpreter's shared library (``libpython3.X.so.1.0``), if it has one."""
    folder, name = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    return folder if folder and name and os.path.isfile(os.path.join(folder, name)) else None


def find_tritonserver() -> TritonInstall:
    """The tritonserver of the installed nvidia-pytriton wheel, every piece checked to exist, so that
    ``serve`` fails here with the fix rather than inside the server's log. An
    :class:`EnvironmentProblem` when the wheel is missing, incomplete, or has no stub for this
    Python."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        raise EnvironmentProblem("nvidia-pytriton is not installed", fix=_FIX)
    package = Path(spec.origin).parent
    root = package / "tritonserver"
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    install = TritonInstall(
        binary=root / "bin" / "tritonserver",
        libs=package.parent / "nvidia_pytriton.libs",
        python_backend=root / "backends" / "python",
        stub=root / "python_backend_stubs" / py / "triton_python_backend_stub",
    )
    for path in (install.binary, install.libs, install.python_backend / "libtriton_python.so"):
        if not path.exists():
            raise EnvironmentProblem("incomplete nvidia-pytriton install: missing", path=path, fix=_FIX)
    if not install.stub.exists():
        raise EnvironmentProblem(f"nvidia-pytriton has no python backend stub for Python {py}",
                                 path=install.stub.parent, fix="use Python 3.8-3.13")
    return install


def make_backend_dir(install: TritonInstall, dest: Path) -> Path:
    """A ``--backend-directory`` with the python backend and this Python's stub; returns ``dest``."""
    python = dest / "python"
    python.mkdir(parents=True, exist_ok=True)
    for item in install.python_backend.iterdir():
        if item.is_file():
            shutil.copy2(item, python / item.name)
    shutil.copy2(install.stub, python / install.stub.name)
    return dest
