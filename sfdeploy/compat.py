"""MMAction2 / mmengine compatibility with this stack, handled once, here.

Every sfdeploy entry point that touches MMAction2 calls :func:`ensure_mmaction` first; nothing
else in sfdeploy works around these traps. Each fix is small, checks whether it is needed, and
leaves a correct installation alone.

1. **The mmaction2 1.2.0 wheel lacks** ``mmaction/models/localizers/drn`` although
   ``mmaction.models.localizers`` imports it, so ``import mmaction.models`` fails. ``import
   sfdeploy`` appends an import hook to ``sys.meta_path`` (:func:`install_import_hook`) that
   supplies a placeholder (whose ``DRN`` raises when built) only when the real module cannot be
   found; so after ``import sfdeploy``, MMAction2's own APIs (``from mmaction.apis import
   init_recognizer``) work without any sfdeploy call, and nothing heavy is imported until then.
   SlowFast never uses DRN.

2. **Checkpoints and torch >= 2.6.** ``torch.load`` now defaults to ``weights_only=True``, and
   checkpoints written by a plain mmengine Runner stop loading: their message hub holds
   ``HistoryBuffer`` objects whose bound methods are pickled through ``builtins.getattr``, which
   no safe unpickler may allow (``getattr`` on an allowed class reaches methods that write files).
   Meanwhile mmengine's URL loader calls ``torch.hub.load_state_dict_from_url`` whose default is
   ``weights_only=False``: a downloaded file could run code. sfdeploy therefore
   (a) re-registers mmengine's local and http(s) checkpoint loaders (through mmengine's own
   ``CheckpointLoader.register_scheme``) with :func:`load_checkpoint_file`, which *always* uses
   ``weights_only=True`` and allows only numpy's plain array/scalar types (published OpenMMLab
   checkpoints may hold numpy values in ``meta``), and (b) writes its own training checkpoints as
   plain data (:mod:`sfdeploy.train.hooks` turns the message hub into lists on save and back into
   ``HistoryBuffer`` on resume), so they load with ``weights_only=True`` anywhere, MMAction2's
   own ``init_recognizer`` included. Nothing is ever fully unpickled.

3. **``mmaction::`` config paths** make mmengine import ``pkg_resources``, which setuptools >= 82
   removed. sfdeploy pins ``setuptools<82``; if ``pkg_resources`` is missing anyway,
   :func:`load_config` resolves ``mmaction::<path>`` to the file under
   ``mmaction/.mim/configs/`` itself, so presets keep the portable form users copy.

4. **transformers >= 5 breaks ``import mmaction.models``.** mmaction2 1.2.0 imports its multimodal
   models (VindLU) whenever ``transformers>=4.28`` is installed (``mmaction.utils.dependency.
   WITH_MULTIMODAL``), and they import ``apply_chunking_to_forward``, which transformers 5 removed,
   plus ``timm``, ``einops`` and ``scipy``. GPU images ship transformers 5, and there nothing that
   imports MMAction2 worked. The same import hook wraps the loading of ``mmaction.utils.dependency``
   and turns ``WITH_MULTIMODAL`` off when those models cannot import here
   (:func:`multimodal_unavailable`: transformers >= 5, or one of their other imports missing), so
   MMAction2 registers its own placeholders for them (building one says what to install), exactly
   as it does without transformers. Nothing is imported to decide (package metadata and
   ``find_spec`` only). SlowFast never uses the multimodal models.

5. **decord loads its library with ``RTLD_GLOBAL``** (``decord._ffi.base``), and with it the
   libvpx 6.4 its wheel bundles. libvpx has no symbol versions, so every library loaded later that
   needs libvpx binds to decord's copy: PyAV's FFmpeg (libvpx 11) then fails ``avcodec_open2`` for
   ``libvpx-vp9`` with EINVAL (the ABI check), in any process that decoded a video with decord
   first (the fidelity sweep's VP9 videos, inside the test suite only). The same import hook loads
   decord's library with ``RTLD_LOCAL``: decord reaches it through its own handle, so nothing else
   changes. Decoding is unaffected either way (FFmpeg decodes VP9 natively).
"""

from __future__ import annotations

import ast
import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import tempfile
import types
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from sfdeploy.errors import EnvironmentProblem, InputError

_APPLIED = False


def _mmaction_root() -> Path:
    spec = importlib.util.find_spec("mmaction")
    if spec is None or spec.origin is None:
        raise EnvironmentProblem(
            "MMAction2 is not installed", fix="pip install 'mmaction2==1.2.0' (or reinstall sfdeploy)"
        )
    return Path(spec.origin).parent


def missing_drn_module() -> bool:
    """True when the installed mmaction lacks the DRN localizer package (the 1.2.0 wheel bug)."""
    return not (_mmaction_root() / "models" / "localizers" / "drn").is_dir()


_DRN_PACKAGE = "mmaction.models.localizers.drn"
_DRN_MODULE = "mmaction.models.localizers.drn.drn"


class DRN:
    """Placeholder: stands in for the DRN localizer that the mmaction2 1.2.0 wheel does not ship."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise EnvironmentProblem(
            "DRN is not part of the installed mmaction2 wheel",
            fix="install mmaction2 from source if you need the DRN localizer",
        )


class _MissingDRNFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Supplies ``mmaction.models.localizers.drn`` only when the real one cannot be found.

    It sits at the *end* of ``sys.meta_path``, so Python asks it only after every real finder has
    failed: an mmaction2 that ships DRN imports its own, and this finder never answers. It knows
    two module names and imports nothing, so installing it (on ``import sfdeploy``) costs nothing.
    """

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        """A spec for the two DRN module names (asked only once every real finder has failed), None for any other
        name."""
        if fullname not in (_DRN_PACKAGE, _DRN_MODULE):
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=fullname == _DRN_PACKAGE)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        """Let the import system make a plain module (importlib requires this method of a loader)."""
        return None  # the default module object

    def exec_module(self, module: types.ModuleType) -> None:
        """Make the DRN package importable as an empty package, and its module hold the :class:`DRN` placeholder that
        says what to install."""
        if module.__name__ == _DRN_PACKAGE:
            module.__path__ = []  # a package, so that ``from .drn.drn import DRN`` resolves
        else:
            module.DRN = DRN  # type: ignore[attr-defined]


_DEPENDENCY_MODULE = "mmaction.utils.dependency"
_MULTIMODAL_IMPORTS = ("timm", "einops", "scipy")  # what VindLU imports besides transformers


def multimodal_unavailable() -> str | None:
    """Why MMAction2's multimodal models cannot be imported here (None when they can, or when
    transformers is absent, in which case MMAction2 leaves them out by itself)."""
    from importlib import metadata

    try:
        version = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return None
    major = version.split(".")[0]
    if major.isdigit() and int(major) >= 5:
        return (f"transformers {version} (mmaction2 1.2.0's VindLU imports apply_chunking_to_forward, "
                "removed in transformers 5)")
    missing = [name for name in _MULTIMODAL_IMPORTS if importlib.util.find_spec(name) is None]
    if missing:
        return f"transformers {version} without {', '.join(missing)} (VindLU imports them)"
    return None


def _gate_multimodal(module: types.ModuleType) -> None:
    """After ``mmaction.utils.dependency`` ran: ``WITH_MULTIMODAL`` off where the multimodal models
    cannot import (trap 4)."""
    reason = multimodal_unavailable()
    if reason and getattr(module, "WITH_MULTIMODAL", False):
        module.WITH_MULTIMODAL = False  # type: ignore[attr-defined]
        module.SFDEPLOY_MULTIMODAL_OFF = reason  # type: ignore[attr-defined]  # for doctor


@contextlib.contextmanager
def _libraries_load_locally() -> Iterator[None]:
    """While ``decord._ffi.base`` runs: its ``ctypes.CDLL(path, ctypes.RTLD_GLOBAL)`` loads with
    ``RTLD_LOCAL`` (trap 5). Held for the module's own import only, under the import lock."""
    import ctypes

    saved = ctypes.RTLD_GLOBAL
    ctypes.RTLD_GLOBAL = ctypes.RTLD_LOCAL  # type: ignore[misc]
    try:
        yield
    finally:
        ctypes.RTLD_GLOBAL = saved  # type: ignore[misc]


_DECORD_FFI_MODULE = "decord._ffi.base"
_Around = Callable[[], AbstractContextManager[None]]
#: module -> (a context to run it in, what to do to it after): the real modules, run with a fix
_WRAPPED: dict[str, tuple[_Around | None, Callable[[types.ModuleType], None] | None]] = {
    _DEPENDENCY_MODULE: (None, _gate_multimodal),
    _DECORD_FFI_MODULE: (_libraries_load_locally, None),
}


class _WrappingLoader(importlib.abc.Loader):
    """Runs the real module in its context from :data:`_WRAPPED`, then its fix."""

    def __init__(self, loader: importlib.abc.Loader, name: str) -> None:
        self._loader, self._name = loader, name

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        """Whatever the real loader makes: only running the module is wrapped."""
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        """Run the real module inside its context manager from :data:`_WRAPPED`, then apply its fix to the loaded
        module."""
        around, after = _WRAPPED[self._name]
        with around() if around else contextlib.nullcontext():
            self._loader.exec_module(module)
        if after:
            after(module)


class _WrappingFinder(importlib.abc.MetaPathFinder):
    """Answers for the modules of :data:`_WRAPPED` only: finds the real module with the other
    finders and wraps its loader. It must sit *before* them (the real modules exist), so it is
    first on ``sys.meta_path``; for every other name it returns None at once."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        """The real module's spec with its loader wrapped, for the names of :data:`_WRAPPED`; None at once for every
        other name, so other imports pay nothing."""
        if fullname not in _WRAPPED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _WrappingLoader(spec.loader, fullname)
                return spec
        return None


def multimodal_state() -> str:
    """How MMAction2's multimodal models stand in this process (for doctor): imported, left out by
    MMAction2 (no transformers), or turned off by sfdeploy with the reason."""
    dependency = sys.modules.get(_DEPENDENCY_MODULE)
    if dependency is None:
        return "not imported yet"
    if getattr(dependency, "SFDEPLOY_MULTIMODAL_OFF", None):
        return f"multimodal models off: {dependency.SFDEPLOY_MULTIMODAL_OFF}"
    return "multimodal models on" if dependency.WITH_MULTIMODAL else "multimodal models off (no transformers)"


def install_import_hook() -> None:
    """Make ``import mmaction.models`` work on the mmaction2 1.2.0 wheel and beside transformers 5,
    and keep decord's libraries to decord, in any process that has imported sfdeploy (done by
    ``sfdeploy/__init__.py``); idempotent. Must run before ``mmaction`` / ``decord`` are imported
    to help with traps 4 and 5 (``import sfdeploy`` first)."""
    if not any(isinstance(finder, _MissingDRNFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MissingDRNFinder())
    if not any(isinstance(finder, _WrappingFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _WrappingFinder())


def _safe_globals() -> list[Any]:
    """numpy's plain-data types, allowed under ``weights_only=True`` (arrays, scalars, dtypes).

    These rebuild arrays from bytes and call nothing else; ``builtins.getattr`` and mmengine's
    ``HistoryBuffer`` are deliberately absent (see the module docstring).
    """
    import numpy as np

    dtype_classes = [
        type(np.dtype(name))
        for name in ("float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint8", "bool")
    ]
    return [np.core.multiarray._reconstruct, np.core.multiarray.scalar, np.ndarray, np.dtype, *dtype_classes]


def load_checkpoint_file(source: str | Path, map_location: Any = "cpu") -> Any:
    """Load a checkpoint from a path or http(s) URL with ``weights_only=True``.

    Files that need anything beyond tensors, containers, numbers, strings and the mmengine types in
    :func:`_safe_globals` are refused with an explanation instead of being unpickled.
    """
    import torch

    source = str(source)
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            if source.startswith(("http://", "https://")):
                return torch.hub.load_state_dict_from_url(
                    source, map_location=map_location, progress=sys.stderr.isatty(), weights_only=True
                )
            path = Path(source).expanduser()
            if not path.is_file():
                raise InputError("checkpoint not found", path=path, fix="pass an existing .pth file")
            return torch.load(path, map_location=map_location, weights_only=True)
    except InputError:
        raise
    except OSError as exc:
        if source.startswith(("http://", "https://")):
            raise InputError(
                f"cannot download checkpoint ({exc})",
                path=source,
                fix="download it on a machine with internet access and pass the local .pth path",
            ) from exc
        raise InputError(f"cannot read checkpoint ({exc})", path=source, fix="check the file") from exc
    except Exception as exc:  # torch raises UnpicklingError / RuntimeError for unsafe content
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise InputError(
                "checkpoint holds Python objects that could run code when loaded (a plain mmengine "
                "Runner writes its training state so); sfdeploy loads checkpoints with "
                "torch.load(weights_only=True) only",
                path=source,
                fix="in an environment you trust, keep only the weights: "
                "torch.save({'state_dict': torch.load(p, weights_only=False)['state_dict']}, p2)",
            ) from exc
        raise InputError(
            f"not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})",
            path=source,
            fix="pass a .pth file written by torch.save / MMAction2",
        ) from exc


def _install_checkpoint_loaders() -> None:
    from mmengine.runner.checkpoint import CheckpointLoader

    def load_local_weights_only(filename: str, map_location: Any = None) -> Any:
        return load_checkpoint_file(filename, map_location)

    def load_http_weights_only(filename: str, map_location: Any = None) -> Any:
        return load_checkpoint_file(filename, map_location)

    # mmengine reports the loader by name (``name[10:]``): keep the ``load_from_`` prefix.
    load_local_weights_only.__name__ = "load_from_local_weights_only"
    load_http_weights_only.__name__ = "load_from_http_weights_only"
    CheckpointLoader.register_scheme(prefixes="", loader=load_local_weights_only, force=True)
    CheckpointLoader.register_scheme(
        prefixes=("http://", "https://"), loader=load_http_weights_only, force=True
    )


def ensure_mmaction() -> None:
    """Make ``mmaction`` importable and its checkpoint loading safe; idempotent, cheap after once."""
    global _APPLIED
    if _APPLIED:
        return
    install_import_hook()
    dependency = sys.modules.get(_DEPENDENCY_MODULE)  # imported before sfdeploy: gate it now
    if dependency is not None and "mmaction.models" not in sys.modules:
        _gate_multimodal(dependency)
    with warnings.catch_warnings():
        # mmcv-lite has no compiled ops; SlowFast needs none, so its import-time warning is noise.
        warnings.filterwarnings("ignore", message=".*MultiScaleDeformableAttention.*")
        import mmaction.models  # noqa: F401 - registers the model classes
    from mmaction.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    _install_checkpoint_loaders()
    _APPLIED = True


def has_pkg_resources() -> bool:
    """Whether ``pkg_resources`` is importable (gone in setuptools >= 82): mmengine needs it to resolve
    ``mmaction::`` config paths, and :func:`load_config` resolves them itself where it is missing."""
    return importlib.util.find_spec("pkg_resources") is not None


def mmaction_config_path(relative: str) -> Path:
    """Absolute path of an MMAction2 config shipped in the package (``mmaction/.mim/configs``)."""
    path = _mmaction_root() / ".mim" / "configs" / relative
    if not path.is_file():
        raise InputError(
            "MMAction2 config not found in the installed package",
            path=path,
            fix="check the config name, or reinstall mmaction2==1.2.0",
        )
    return path


def _bases(tree: ast.Module) -> list[ast.Constant]:
    """The string constants of the top-level ``_base_ = ...`` assignment."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_base_" for t in node.targets):
            return [n for n in ast.walk(node.value) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    return []


def _resolved_copy(path: Path, tmp: Path) -> Path:
    """A copy of the config at ``path`` in ``tmp`` whose ``_base_`` entries are absolute paths:
    ``mmaction::x`` -> the file in the mmaction package, local bases -> their resolved copies."""
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    edits = []
    for node in _bases(ast.parse(text)):
        if node.value.startswith("mmaction::"):
            target = mmaction_config_path(node.value.removeprefix("mmaction::"))
        else:
            target = _resolved_copy((path.parent / node.value).resolve(), tmp)
        start = offsets[node.lineno - 1] + node.col_offset
        end = offsets[node.end_lineno - 1] + node.end_col_offset
        edits.append((start, end, repr(str(target))))
    for start, end, new in sorted(edits, reverse=True):
        text = text[:start] + new + text[end:]
    copy = tmp / f"{len(list(tmp.iterdir()))}_{path.name}"
    copy.write_text(text)
    return copy


def load_config(path: str | Path) -> Any:
    """``mmengine.Config.fromfile`` that also works where ``pkg_resources`` is unavailable."""
    from mmengine.config import Config

    path = Path(path)
    if not path.is_file():
        raise InputError("config file not found", path=path, fix="pass an existing MMAction2 config")
    with warnings.catch_warnings():
        # setuptools 81 warns on every pkg_resources import mmengine makes; not actionable here.
        warnings.filterwarnings("ignore", message=".*pkg_resources.*")
        if has_pkg_resources():
            return Config.fromfile(str(path))
        with tempfile.TemporaryDirectory() as tmp:
            cfg = Config.fromfile(str(_resolved_copy(path.resolve(), Path(tmp))))
    object.__setattr__(cfg, "_filename", str(path))  # report the user's file, not the temp copy
    return cfg
