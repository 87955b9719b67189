"""benchmarks/gpukit.sh (benchmarks/kit/gpukit.py), the parts that run offline: what the host already has is
not shipped, per-Python files of other Pythons are dropped, packs are assigned to parts under the
size limit in install order, and each part's install_part.sh verifies and installs on its own,
the kit completing only when every part is in. The PyPI download is checked on a real GPU host
(benchmarks/README.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_wheelhouse import _wheel

from conftest import kit_tool

gpukit = kit_tool("gpukit")

PY = f"{sys.version_info.major}.{sys.version_info.minor}"


def test_per_python_files_of_other_pythons_are_dropped() -> None:
    assert not gpukit._keep("nvidia_pytriton.libs/libpython3-419a3a08.13.so.1.0", "3.12")
    assert gpukit._keep("nvidia_pytriton.libs/libpython3-419a3a08.13.so.1.0", "3.13")
    assert not gpukit._keep("pytriton/tritonserver/python_backend_stubs/3.11/triton_python_backend_stub", "3.12")
    assert gpukit._keep("pytriton/tritonserver/python_backend_stubs/3.12/triton_python_backend_stub", "3.12")
    assert gpukit._keep("nvidia_pytriton.libs/libicudata-c1404396.so.70.1", "3.12")


def test_the_host_provides_a_package_by_name_or_by_an_equivalent(tmp_path: Path) -> None:
    listing = tmp_path / "host.txt"
    listing.write_text("# the image\nopencv-python-headless\nNumPy==2.5.2\ntorch  # CUDA build\n")
    host = gpukit.read_host_packages(listing)
    assert host == {"opencv-python-headless", "numpy", "torch"}
    assert gpukit.host_provides("opencv-contrib-python", host) and gpukit.host_provides("numpy", host)
    assert not gpukit.host_provides("mmengine", host)
    kept = gpukit.kit_requirements("none", host)
    assert not any(r.startswith(("numpy", "torch", "opencv")) for r in kept)
    assert any(r.startswith("mmaction2") for r in kept) and any(r.startswith("nvidia-pytriton") for r in kept)


def test_parts_follow_the_install_order_and_the_size_limit() -> None:
    mb = 1_000_000
    sizes = {"nvidia-pytriton": 26 * mb, "av": 25 * mb, "mmengine": 1 * mb, "decord": 10 * mb, "zzz-new": 2 * mb}
    parts = gpukit.assign_parts(sizes, 58 * mb)
    assert parts == [["mmengine", "decord", "av", "zzz-new"], ["nvidia-pytriton"]]
    with pytest.raises(ValueError, match="av alone is 25.0 MB packed, over --max-part-mb 20"):
        gpukit.assign_parts(sizes, 20 * mb)


def test_the_gpu_decoders_ship_as_an_extra_before_the_server() -> None:
    """`--extra nvdec` names the pinned GPU decoders of pyproject's [nvdec] (never sfdeploy's default
    dependencies); packed after the client, before the server, at their real sizes they fill a part
    of their own ahead of it."""
    assert gpukit.extra_requirements("nvdec, pytest-timeout") == ["pynvvideocodec==2.2.4", "torchcodec==0.17.0",
                                                                  "pytest-timeout"]
    assert not any(r.startswith(("pynvvideocodec", "torchcodec")) for r in gpukit.kit_requirements("gpu", set()))
    mb = 1_000_000
    sizes = {"nvidia-pytriton": 34 * mb, "tritonclient": 5 * mb, "av": 25 * mb, "pynvvideocodec": 27 * mb,
             "torchcodec": 10 * mb}
    assert gpukit.assign_parts(sizes, 58 * mb) == [["av", "tritonclient", "pynvvideocodec"], ["torchcodec",
                                                                                            "nvidia-pytriton"]]


def _kit(tmp_path: Path) -> Path:
    """A two-part kit of two small wheels, made by gpukit's own functions."""
    wheels, packs, kit = tmp_path / "wheels", tmp_path / "packs", tmp_path / "kit"
    for folder in (wheels, packs):
        folder.mkdir()
    made = {
        "alpha": _wheel(wheels, "alpha", "1.0", {"alpha/__init__.py": b"VALUE = 'alpha'\n"}),
        "beta": _wheel(wheels, "beta", "2.0", {
            "beta/__init__.py": b"VALUE = 'beta'\n",
            f"pytriton/tritonserver/python_backend_stubs/3.{sys.version_info.minor + 1}/stub": b"other Python",
            f"pytriton/tritonserver/python_backend_stubs/{PY}/stub": b"this Python's",
        }),
    }
    files = {}
    for dist, wheel in made.items():
        tree = tmp_path / "tree" / dist
        gpukit.unpack_wheel(wheel, tree, PY)
        files[dist] = gpukit.pack(tree, packs / f"{dist}.tar.xz")
    names = ["part1", "part2"]
    for name, group in zip(names, [["alpha"], ["beta"]], strict=True):
        gpukit.write_part(kit / name, name, [files[d] for d in group], PY, names)
    return kit


def _install(part: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(part / "install_part.sh"), "--python", sys.executable, "--site", str(site),
                           "--kit-only"], capture_output=True, text=True, timeout=120)


def test_each_part_installs_on_its_own_and_the_kit_completes_with_the_last(tmp_path: Path) -> None:
    kit, site = _kit(tmp_path), tmp_path / "site"
    site.mkdir()
    first = _install(kit / "part1", site)
    assert first.returncode == 0, first.stderr
    assert "still to install: part2" in first.stdout and (site / "alpha" / "__init__.py").is_file()
    assert (site / "alpha-1.0.dist-info" / "METADATA").is_file()  # pip sees what the kit installed
    second = _install(kit / "part2", site)
    assert second.returncode == 0, second.stderr
    assert "every part installed" in second.stdout
    found = subprocess.run([sys.executable, "-c", "import alpha, beta; print(alpha.VALUE, beta.VALUE)"],
                           capture_output=True, text=True, env={"PYTHONPATH": str(site)}, check=True)
    assert found.stdout.split() == ["alpha", "beta"]
    stubs = site / "pytriton" / "tritonserver" / "python_backend_stubs"
    assert [p.name for p in stubs.iterdir()] == [PY]  # the other Python's stub was left out


def test_a_damaged_part_is_refused_with_the_fix(tmp_path: Path) -> None:
    kit, site = _kit(tmp_path), tmp_path / "site"
    site.mkdir()
    pack = kit / "part1" / "alpha.tar.xz"
    pack.write_bytes(pack.read_bytes()[:-10])
    result = _install(kit / "part1", site)
    assert result.returncode == 1
    assert "does not match its sha256" in result.stderr and "fix: copy the part again" in result.stderr
    assert not (site / "alpha").exists()
    other = subprocess.run(["bash", str(kit / "part2" / "install_part.sh"), "--python", "/bin/false", "--kit-only"],
                           capture_output=True, text=True, timeout=60)
    assert other.returncode == 1 and f"is not Python {PY}" in other.stderr
