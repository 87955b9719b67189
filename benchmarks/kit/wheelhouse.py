"""A wheelhouse for a GPU host without internet that already has CUDA torch (``benchmarks/wheelhouse.sh``
runs this script from a source checkout: the sfdeploy wheel is built from it). A tool for building a
release, not part of the library: it lives beside the script that runs it, not in the package.

1. Resolve sfdeploy's runtime dependencies for the target Python on manylinux x86_64 with pip's
   own resolver (``pip install --dry-run --report``: metadata only, nothing is downloaded), torch
   included so that every pick is compatible with it.
2. Keep what is reachable from sfdeploy's requirements without passing through a skipped package
   (default: torch, triton and the NVIDIA CUDA wheels: the host has them), and download exactly
   those versions as wheels.
3. Build the sfdeploy wheel from this checkout.
4. Split every file over ``--max-part-mb`` into numbered parts (transfers are size-limited).
5. Write ``install.sh``: on the host it checks the Python and torch, reassembles and verifies every
   file (sha256), keeps the host's own copy of "host-first" packages (numpy: a numpy 2 host keeps
   numpy 2), and installs the rest with ``pip install --no-index --no-deps``, then runs
   ``sfdeploy doctor`` (the script is ``wheelhouse_install.sh.in`` beside this file, filled in).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.utils import canonicalize_name as canonical  # PEP 503: what pip compares

from sfdeploy.artifacts import sha256

REPO = Path(__file__).resolve().parents[2]  # the source checkout (pyproject.toml), checked in main()
ORT = {"gpu": "onnxruntime-gpu", "cpu": "onnxruntime", "none": None}
# torch and what only torch pulls in: the host's CUDA build brings its own (nvidia-pytriton is shipped)
DEFAULT_SKIP = "torch,triton,nvidia-cu*,nvidia-nccl*,nvidia-nv*,cuda-*"
DEFAULT_HOST_FIRST = "numpy"
PART = ".part"  # name.whl -> name.whl.part000, name.whl.part001, ...


def sfdeploy_project() -> dict:
    """The ``[project]`` table of this checkout's ``pyproject.toml``."""
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def sfdeploy_requirements(ort: str) -> list[str]:
    """sfdeploy's runtime requirements plus those of the ``--ort`` extra (``none``: no ONNX Runtime),
    as ``pyproject.toml`` pins them."""
    project = sfdeploy_project()
    return [*project["dependencies"], *project["optional-dependencies"].get(ort, [])]  # --ort none: no extra


def platform_args(python: str) -> list[str]:
    """pip's target-platform options: CPython ``python`` on manylinux x86_64, glibc 2.5 .. 2.35
    (nvidia-pytriton's tritonserver needs 2.35)."""
    tags = [f"manylinux_2_{minor}_x86_64" for minor in range(5, 36)]
    tags += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    abi = "cp" + python.replace(".", "")
    args = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp", "--abi", abi]
    for tag in tags:
        args += ["--platform", tag]
    return args


def resolve(python: str, requirements: list[str]) -> dict:
    """pip's resolution for the target (metadata only): the ``--report`` JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                        "--target", str(Path(tmp) / "never"), "--report", str(report), *platform_args(python),
                        *requirements], check=True)
        return json.loads(report.read_text())


def _environment(python: str, extra: str = "") -> dict[str, str]:
    return {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux",
            "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
            "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": extra}


def select(report: dict, requirements: list[str], python: str, skip: list[str]) -> tuple[dict[str, dict], set[str]]:
    """The packages to ship: reachable from ``requirements`` without passing through a package
    matching ``skip``. Returns ({canonical name: report item}, skipped names)."""
    from packaging.requirements import Requirement

    items = {canonical(i["metadata"]["name"]): i for i in report["install"]}
    ship: dict[str, dict] = {}
    skipped: set[str] = set()
    seen: set[tuple[str, str]] = set()
    queue = [(Requirement(r), "") for r in requirements]
    while queue:
        req, parent_extra = queue.pop()
        if req.marker is not None and not req.marker.evaluate(_environment(python, parent_extra)):
            continue
        name = canonical(req.name)
        if any(fnmatch.fnmatch(name, pattern) for pattern in skip):
            skipped.add(name)
            continue
        for extra in [""] + sorted(req.extras):
            if (name, extra) in seen:
                continue
            seen.add((name, extra))
            item = items[name]
            ship[name] = item
            for dep in item["metadata"].get("requires_dist") or []:
                dep_req = Requirement(dep)
                # a dependency of an extra counts only when that extra is asked for
                if dep_req.marker is None or "extra" not in str(dep_req.marker):
                    if extra == "":
                        queue.append((dep_req, ""))
                elif extra:
                    queue.append((dep_req, extra))
    return ship, skipped


def download(ship: dict[str, dict], python: str, out: Path) -> None:
    """Download exactly the versions pip resolved, as wheels for the target platform, without their
    dependencies (the selection already has what ships)."""
    pins = [f"{item['metadata']['name']}=={item['metadata']['version']}" for item in ship.values()]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(out),
                    *platform_args(python), *pins], check=True)


def build_sfdeploy(out: Path) -> Path:
    """Build the sfdeploy wheel from this checkout into ``out``; returns its path."""
    before = set(out.glob("sfdeploy-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
                    "--wheel-dir", str(out), str(REPO)], check=True)
    built = sorted(set(out.glob("sfdeploy-*.whl")) - before) or sorted(out.glob("sfdeploy-*.whl"))
    return built[-1]


def split_large(out: Path, max_part_mb: float | None) -> list[dict]:
    """Every wheel of ``out`` with its sha256; those over ``max_part_mb`` (None: no limit) replaced
    by numbered parts ``NAME.part000``, ``NAME.part001``, ... that install.sh concatenates."""
    limit = int(max_part_mb * 1_000_000) if max_part_mb else None  # MB: 10^6 bytes, the stricter reading
    files = []
    for path in sorted(out.glob("*.whl")):
        entry = {"name": path.name, "sha256": sha256(path), "size": path.stat().st_size, "parts": []}
        if limit is not None and entry["size"] > limit:
            with open(path, "rb") as handle:
                for index, block in enumerate(iter(lambda: handle.read(limit), b"")):
                    part = out / f"{path.name}{PART}{index:03d}"
                    part.write_bytes(block)
                    entry["parts"].append(part.name)
            path.unlink()
        files.append(entry)
    return files


#: install.sh's text, with @PYTHON@, @PY_MAJOR@, @PY_MINOR@, @PART@, @HOST_FIRST@ and @ORT_NOTE@ to fill in
INSTALL_SH = Path(__file__).with_name("wheelhouse_install.sh.in")


def write_install_script(out: Path, files: list[dict], python: str, host_first: list[str], ort: str) -> Path:
    """``FILES`` (name, sha256, number of parts per line) and ``install.sh`` in ``out``."""
    (out / "FILES").write_text("".join(f"{f['name']} {f['sha256']} {len(f['parts'])}\n" for f in files))
    major, minor = python.split(".")
    text = (INSTALL_SH.read_text().replace("@PYTHON@", python).replace("@PY_MAJOR@", major).replace("@PY_MINOR@", minor)
            .replace("@PART@", PART).replace("@HOST_FIRST@", " ".join(canonical(h) for h in host_first))
            .replace("@ORT_NOTE@", f"ONNX Runtime: {ORT[ort] or 'none, the host keeps its own'}"))
    script = out / "install.sh"
    script.write_text(text)
    script.chmod(0o755)
    return script


def main(argv: list[str] | None = None) -> int:
    """``wheelhouse.sh``: resolve, select, download, build, split, and write ``install.sh`` and
    ``wheelhouse.json`` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="wheelhouse.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", required=True, help="target CPython version, e.g. 3.12")
    parser.add_argument("--out", required=True, type=Path, help="folder to write (outside the repository)")
    parser.add_argument("--max-part-mb", type=float, default=0, help="split files over this size (0: never)")
    parser.add_argument("--ort", choices=sorted(ORT), default="gpu",
                        help="ONNX Runtime build to ship: gpu (onnxruntime-gpu, CUDA 13), cpu, or none [gpu]")
    parser.add_argument("--skip", default=DEFAULT_SKIP,
                        help=f"comma-separated names (fnmatch patterns) never shipped [{DEFAULT_SKIP}]")
    parser.add_argument("--host-first", default=DEFAULT_HOST_FIRST,
                        help=f"shipped, but installed only where the host has none [{DEFAULT_HOST_FIRST}]")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"3\.\d+", args.python):
        parser.error("--python takes a version like 3.12")
    if not (REPO / "pyproject.toml").is_file():
        parser.error(f"{REPO} is not an sfdeploy source checkout: run benchmarks/wheelhouse.sh from a clone")
    out = args.out.resolve()
    if out == REPO or REPO in out.parents:
        parser.error(f"--out {out} is inside the repository: write the wheelhouse elsewhere (e.g. /tmp)")
    if out.exists() and any(out.iterdir()):
        parser.error(f"--out {out} is not empty: choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    skip = [canonical(s.strip()) for s in args.skip.split(",") if s.strip()]
    host_first = [canonical(s.strip()) for s in args.host_first.split(",") if s.strip()]
    requirements = sfdeploy_requirements(args.ort)
    print(f"wheelhouse: resolving {len(requirements)} requirements for CPython {args.python}, manylinux x86_64",
          file=sys.stderr)
    ship, skipped = select(resolve(args.python, requirements), requirements, args.python, skip)
    print(f"wheelhouse: downloading {len(ship)} wheels (not shipped: {', '.join(sorted(skipped))})",
          file=sys.stderr)
    download(ship, args.python, out)
    build_sfdeploy(out)
    files = split_large(out, args.max_part_mb or None)
    write_install_script(out, files, args.python, host_first, args.ort)
    (out / "wheelhouse.json").write_text(json.dumps({
        "python": args.python, "platform": "manylinux x86_64 (glibc 2.35+ for nvidia-pytriton)", "ort": args.ort,
        "skipped": sorted(skipped), "host_first": host_first, "files": files,
        "built_with": " ".join(shlex.quote(a) for a in sys.argv)}, indent=2) + "\n")
    biggest = max(p.stat().st_size for p in out.iterdir()) / 1e6
    print(f"wheelhouse: {out}: {len(files)} wheels in {sum(1 for _ in out.iterdir())} files "
          f"(largest {biggest:.1f} MB); on the host: bash install.sh", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
