"""benchmarks/wheelhouse.sh (benchmarks/kit/wheelhouse.py), the pieces that run offline: which packages
ship, splitting, and the generated install.sh (reassembly, sha256 check, host-first packages, pip
--no-index) on a small wheelhouse made here. The download itself (PyPI, ~1 GB) is checked by hand:
benchmarks/README.md."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import kit_tool

wheelhouse = kit_tool("wheelhouse")


def _wheel(folder: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal valid wheel (stored uncompressed, so its size is its content's)."""
    dist = f"{name}-{version}.dist-info"
    contents = {**files, f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
                f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    path = folder / f"{name}-{version}-py3-none-any.whl"
    records = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for arcname, data in contents.items():
            archive.writestr(arcname, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            records.append(f"{arcname},sha256={digest},{len(data)}")
        archive.writestr(f"{dist}/RECORD", "\n".join([*records, f"{dist}/RECORD,,"]) + "\n")
    return path


def _install(house: Path, target: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(house / "install.sh"), "--python", sys.executable, "--no-doctor", "--",
                           "--target", str(target), "--quiet"], capture_output=True, text=True, timeout=300)


def test_install_sh_reassembles_verifies_and_keeps_host_numpy(tmp_path: Path) -> None:
    house = tmp_path / "house"
    house.mkdir()
    payload = os.urandom(2_500_000)
    _wheel(house, "sfdeploy_probe", "1.0", {"sfdeploy_probe/__init__.py": b"", "sfdeploy_probe/blob.bin": payload})
    _wheel(house, "numpy", "0.0.1", {"numpy_impostor/__init__.py": b""})
    files = wheelhouse.split_large(house, 1)
    probe = next(f for f in files if f["name"].startswith("sfdeploy_probe"))
    assert len(probe["parts"]) == 3 and not (house / probe["name"]).exists()
    assert max(p.stat().st_size for p in house.iterdir()) <= 1_000_000
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    wheelhouse.write_install_script(house, files, python, ["numpy"], "none")

    result = _install(house, tmp_path / "site")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "site" / "sfdeploy_probe" / "blob.bin").read_bytes() == payload
    assert "keeping the host's numpy" in result.stdout and not (tmp_path / "site" / "numpy_impostor").exists()

    part = house / probe["parts"][1]
    part.write_bytes(part.read_bytes()[:-1])  # one byte lost in transfer
    result = _install(house, tmp_path / "site2")
    assert result.returncode == 1 and "does not match its sha256" in result.stderr and "fix:" in result.stderr
    assert not (tmp_path / "site2").exists()


def _item(name: str, *requires: str) -> dict:
    return {"metadata": {"name": name, "version": "1.0", "requires_dist": list(requires)}}


def test_only_what_sfdeploy_needs_ships_never_torch_or_its_cuda_wheels() -> None:
    report = {"install": [
        _item("A_pkg", "b", "torch>=2", "c; extra == 'x'", "e; extra == 'other'"), _item("b", "Typing_Extensions"),
        _item("c"), _item("e"), _item("typing-extensions"), _item("torch", "sympy", "nvidia-cudnn-cu13", "triton"),
        _item("sympy"), _item("nvidia-cudnn-cu13"), _item("triton"), _item("d"), _item("nvidia-pytriton", "c"),
        _item("f", "nvidia-cublas")]}
    skip = wheelhouse.DEFAULT_SKIP.split(",")
    ship, skipped = wheelhouse.select(report, ["a-pkg[x]", "d; python_version < '3.10'", "nvidia-pytriton", "f"],
                                      "3.12", skip)
    assert set(ship) == {"a-pkg", "b", "c", "typing-extensions", "nvidia-pytriton", "f"}
    assert skipped == {"torch", "nvidia-cublas"}
