"""An install kit for an air-gapped GPU host whose image already has CUDA torch and most of the
scientific stack, moved in small parts (``benchmarks/gpukit.sh`` runs this script). A tool for
building a release, not part of the library: it lives beside the script that runs it, not in the package.

Where ``wheelhouse.py`` (beside this file) ships every runtime dependency as wheels for ``pip install
--no-index``, this kit ships only what the host's image lacks, unpacked and xz-compressed (~30%
smaller than the wheels), in numbered parts of at most ``--max-part-mb`` each, because what can be
carried to such a host at once is size-limited (64 MiB per transfer on the machines this was made
for, checkout included). Each part installs on its own, in order:

1. Resolve sfdeploy's requirements for the target Python with pip (metadata only), as the
   wheelhouse does, and keep what is reachable without passing through a package the host has
   (``--host-packages FILE``: one distribution name per line, e.g. the image's ``pip list``) or an
   equivalent of one (:data:`EQUIVALENT`: the host's ``opencv-python-headless`` provides ``cv2``).
2. Download those wheels, unpack each into a ``site-packages`` tree (``*.data/purelib|platlib``
   merged, console scripts dropped: sfdeploy calls none of them), drop files no host of this Python
   can use (nvidia-pytriton's python-backend stubs and libpython of other Pythons), and pack each
   distribution as its own ``<dist>.tar.xz``.
3. Assign the packs to parts in :data:`PART_ORDER` (what training, export and decoding need
   first, then the client, then the server), starting a new part when the next would overflow.
4. Write ``install_part.sh`` into every part: on the host it checks the Python, verifies each pack
   against the part's ``SHA256SUMS``, untars it into the interpreter's ``purelib``, and once every
   part of the kit is in (``KIT``), installs the sfdeploy checkout it is run from (``pip install
   --no-deps --no-build-isolation -e``) and runs ``sfdeploy doctor`` (the script is
   ``install_part.sh.in`` beside this file, filled in).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import shutil
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from packaging.utils import canonicalize_name as canonical

# beside this file (the folder of the script that runs is on the path)
from wheelhouse import REPO, download, resolve, select, sfdeploy_project, sfdeploy_requirements

from sfdeploy.artifacts import sha256

#: a distribution sfdeploy requires -> host distributions that provide the same import (any one will do)
EQUIVALENT: dict[str, tuple[str, ...]] = {
    "opencv-python": ("opencv-python-headless", "opencv-contrib-python", "opencv-contrib-python-headless"),
    "opencv-contrib-python": ("opencv-contrib-python-headless", "opencv-python-headless", "opencv-python"),
}
#: never shipped: the host's CUDA torch and what only torch pulls in
ALWAYS_SKIP = ("torch", "triton", "nvidia-cu*", "nvidia-nccl*", "nvidia-nv*", "cuda-*")
#: packing order: what training/export/decoding need, then the client, the GPU decoders (``--extra nvdec``),
#: then the server (largest)
PART_ORDER = ("mmengine", "mmcv-lite", "mmaction2", "addict", "yapf", "platformdirs", "termcolor",
              "importlib-metadata", "zipp", "decord", "av", "tritonclient", "python-rapidjson",
              "geventhttpclient", "gevent", "greenlet", "zope-event", "zope-interface", "brotli",
              "pynvvideocodec", "torchcodec", "nvidia-pytriton")
#: files inside a distribution that only a host of Python 3.<minor> can use: nvidia-pytriton's
#: python-backend stub per Python, and the libpython auditwheel vendored for one of them
#: (``nvidia_pytriton.libs/libpython3-419a3a08.13.so.1.0``: 32 MB for 3.13 alone)
_PER_PYTHON_FILES = (re.compile(r"tritonserver/python_backend_stubs/3\.(\d+)/"),
                     re.compile(r"(?:^|/)libpython3(?:-[0-9a-f]+)?\.(\d+)\.so"))


def read_host_packages(path: Path) -> set[str]:
    """The distributions of a ``--host-packages`` file (one per line, ``#`` comments and
    ``==version`` ignored), by canonical name."""
    names = set()
    for line in Path(path).read_text().splitlines():
        name = line.split("#", 1)[0].strip().split("==")[0].strip()
        if name:
            names.add(canonical(name))
    return names


def host_provides(dist: str, host: set[str]) -> bool:
    """Whether the host has ``dist``, by name or through an :data:`EQUIVALENT` (its
    ``opencv-python-headless`` for our ``opencv-python``)."""
    return dist in host or any(canonical(e) in host for e in EQUIVALENT.get(dist, ()))


def kit_requirements(ort: str, host: set[str]) -> list[str]:
    """sfdeploy's requirements, those the host satisfies (by name or equivalent) left out."""
    from packaging.requirements import Requirement

    return [r for r in sfdeploy_requirements(ort) if not host_provides(canonical(Requirement(r).name), host)]


def extra_requirements(extra: str) -> list[str]:
    """``--extra``: requirements, each as given or, when it names one of sfdeploy's extras
    (``nvdec``), that extra's pinned requirements from ``pyproject.toml``."""
    extras = sfdeploy_project()["optional-dependencies"]
    out: list[str] = []
    for item in (part.strip() for part in extra.split(",")):
        if item:
            out += extras.get(item, [item])
    return out


def _keep(member: str, python: str) -> bool:
    """Whether an unpacked file is useful on a host of ``python`` (e.g. ``3.12``)."""
    minor = python.split(".")[1]
    for pattern in _PER_PYTHON_FILES:
        found = pattern.search(member)
        if found and found.group(1) != minor:
            return False
    return True


def unpack_wheel(wheel: Path, into: Path, python: str) -> list[str]:
    """Unpack ``wheel`` as pip would into a site-packages folder ``into`` (``*.data/purelib`` and
    ``platlib`` merged in, ``scripts``/``headers``/``data`` dropped); returns the files written."""
    written = []
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            if info.is_dir():
                continue
            name = info.filename
            parts = name.split("/")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue
                name = "/".join(parts[2:])
            if not _keep(name, python):
                continue
            dest = into / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as source, open(dest, "wb") as sink:
                shutil.copyfileobj(source, sink)
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                dest.chmod(mode)
            written.append(name)
    return written


def pack(tree: Path, out: Path) -> Path:
    """``tree``'s content as ``out`` (tar.xz, preset 9e: these packs are made once, moved often)."""
    import lzma

    with lzma.open(out, "wb", preset=9 | lzma.PRESET_EXTREME) as xz, tarfile.open(fileobj=xz, mode="w") as tar:
        for path in sorted(tree.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(tree)), recursive=False)
    return out


def order_key(dist: str) -> tuple[int, int, str]:
    """Where ``dist`` goes in :data:`PART_ORDER`; a distribution it does not name goes just before
    the last one (the server: the largest, and needed last)."""
    if dist in PART_ORDER:
        return (PART_ORDER.index(dist), 1, dist)
    return (len(PART_ORDER) - 1, 0, dist)


def assign_parts(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Packs in :data:`PART_ORDER` (unknown ones before the server), a new part whenever the next
    pack would overflow ``max_bytes``; a single pack larger than that is an error."""
    parts: list[list[str]] = [[]]
    used = 0
    for dist in sorted(sizes, key=order_key):
        if sizes[dist] > max_bytes:
            raise ValueError(f"{dist} alone is {sizes[dist] / 1e6:.1f} MB packed, over --max-part-mb "
                             f"{max_bytes / 1e6:.0f}: ship it with the wheelhouse (split files) instead")
        if parts[-1] and used + sizes[dist] > max_bytes:
            parts.append([])
            used = 0
        parts[-1].append(dist)
        used += sizes[dist]
    return parts


#: install_part.sh's text, with @PYTHON@, @PY_MAJOR@, @PY_MINOR@ and @PARTS@ to fill in
INSTALL_PART_SH = Path(__file__).with_name("install_part.sh.in")


def write_part(folder: Path, name: str, packs: list[Path], python: str, all_parts: list[str]) -> None:
    """Fill ``folder`` as part ``name`` of the kit: its packs, their ``SHA256SUMS``, ``PART`` (its
    name and packs) and its ``install_part.sh``, which knows every part of the kit (``all_parts``) to
    tell when the install is complete."""
    folder.mkdir(parents=True, exist_ok=True)
    for pack_file in packs:
        shutil.move(str(pack_file), folder / pack_file.name)
    (folder / "SHA256SUMS").write_text("".join(f"{sha256(folder / p.name)}  {p.name}\n" for p in packs))
    (folder / "PART").write_text(f"{name} {' '.join(p.name.removesuffix('.tar.xz') for p in packs)}\n")
    major, minor = python.split(".")
    script = folder / "install_part.sh"
    script.write_text(INSTALL_PART_SH.read_text().replace("@PYTHON@", python).replace("@PY_MAJOR@", major)
                      .replace("@PY_MINOR@", minor).replace("@PARTS@", " ".join(all_parts)))
    script.chmod(0o755)


def main(argv: list[str] | None = None) -> int:
    """``gpukit.sh``: resolve, download, unpack and pack, assign to parts, write them and
    ``kit.json`` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="gpukit.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", required=True, help="target CPython version, e.g. 3.12")
    parser.add_argument("--out", required=True, type=Path, help="folder to write (new or empty)")
    parser.add_argument("--host-packages", required=True, type=Path,
                        help="file: distributions the host image has (one per line), never shipped")
    parser.add_argument("--max-part-mb", type=float, default=58.0,
                        help="largest part, in MB (10^6 bytes) [58: a part + the checkout stay under 64 MiB]")
    parser.add_argument("--ort", choices=("none", "gpu", "cpu"), default="none",
                        help="ONNX Runtime build to ship: none (keep the host's), gpu (onnxruntime-gpu: "
                             "~256 MB, its own parts), cpu [none]")
    parser.add_argument("--extra", default="", help="comma-separated extra requirements (e.g. pytest-timeout), or "
                        "sfdeploy extras by name (nvdec: the GPU video decoders)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    if out.exists() and any(out.iterdir()):
        parser.error(f"--out {out} is not empty: choose a new folder")
    host = read_host_packages(args.host_packages)
    requirements = kit_requirements(args.ort, host) + extra_requirements(args.extra)
    print(f"gpukit: resolving {len(requirements)} requirements for CPython {args.python} (the host has "
          f"{len(host)} distributions)", file=sys.stderr)
    skip = [*ALWAYS_SKIP, *sorted(host), *[d for d in EQUIVALENT if host_provides(d, host)]]
    ship, skipped = select(resolve(args.python, requirements), requirements, args.python,
                           [canonical(s) if "*" not in s else s for s in skip])
    ship = {name: item for name, item in ship.items() if not host_provides(name, host)
            and not any(fnmatch.fnmatch(name, p) for p in ALWAYS_SKIP)}
    print(f"gpukit: shipping {len(ship)}: {', '.join(sorted(ship))}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheels, packs = Path(tmp) / "wheels", Path(tmp) / "packs"
        wheels.mkdir()
        packs.mkdir()
        download(ship, args.python, wheels)
        sizes, files = {}, {}
        for wheel in sorted(wheels.glob("*.whl")):
            dist = canonical(wheel.name.split("-")[0])
            tree = Path(tmp) / "tree" / dist
            unpack_wheel(wheel, tree, args.python)
            files[dist] = pack(tree, packs / f"{dist}.tar.xz")
            sizes[dist] = files[dist].stat().st_size
            shutil.rmtree(tree)
            print(f"gpukit: {dist}: wheel {wheel.stat().st_size / 1e6:.1f} MB -> {sizes[dist] / 1e6:.1f} MB packed",
                  file=sys.stderr)
        groups = assign_parts(sizes, int(args.max_part_mb * 1e6))
        names = [f"part{i + 1}" for i in range(len(groups))]
        for name, group in zip(names, groups, strict=True):
            write_part(out / name, name, [files[d] for d in group], args.python, names)
    (out / "kit.json").write_text(json.dumps({
        "python": args.python, "ort": args.ort, "host_packages": str(args.host_packages),
        "parts": {n: {"packs": g, "bytes": sum(sizes[d] for d in g)} for n, g in zip(names, groups, strict=True)},
        "not_shipped": sorted(skipped)}, indent=2) + "\n")
    for name, group in zip(names, groups, strict=True):
        print(f"gpukit: {out / name}: {sum(sizes[d] for d in group) / 1e6:.1f} MB ({', '.join(group)})",
              file=sys.stderr)
    print(f"gpukit: on the host, from the sfdeploy checkout: bash {names[0]}/install_part.sh, then each next part",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    if not (REPO / "pyproject.toml").is_file():
        sys.exit(f"{REPO} is not an sfdeploy source checkout: run benchmarks/gpukit.sh from a clone")
    sys.exit(main())
