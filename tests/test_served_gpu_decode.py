"""Server-side GPU decoding, what needs no GPU: where a `<name>_video` instance decodes (its plan
from the repository's `decode` parameter, the instance's kind and the server's decoders), what a
request may ask, the repository `repo --decode` writes (instance kinds, the GPU tensor parameter,
the fidelity record beside model.py), and the pool's per-call CPU decoding. The decoding itself
on NVDEC is checked on a GPU (tests/test_gpu_decode.py, benchmarks/gpu_check.sh phase 3).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from sfdeploy.decode.gpu.backends import spooled
from sfdeploy.decode.gpu.gate import GATE_FILE, read_gates
from sfdeploy.decode.gpu.select import INSTALL_FIX
from sfdeploy.decode.pool import DecodePool
from sfdeploy.errors import EnvironmentProblem, InputError
from sfdeploy.serving.config import instance_device, parse_config
from sfdeploy.serving.repo import GPU_DECODE_INSTANCES, RepoOptions, write_repository
from sfdeploy.serving.video_backend import (
    ASKED_CPU,
    RequestRefused,
    request_decode,
    server_plan,
)

from badvideos import good_video

KIND_GPU, KIND_CPU = 1, 2  # ModelInstanceGroup.Kind


def test_a_cpu_instance_decodes_on_the_cpu_and_says_why() -> None:
    for mode, why in (("auto", "this instance runs on the CPU (KIND_CPU)"),
                      ("cpu", "the repository decodes on the CPU (sfdeploy repo --decode cpu)")):
        plan = server_plan(mode, "cpu", {})
        assert plan.backend is None and plan.why == why
    assert server_plan("cpu", "cuda:0", {}).backend is None  # --decode cpu holds on a GPU instance too
    with pytest.raises(EnvironmentProblem, match="this instance runs on the CPU") as info:
        server_plan("gpu", "cpu", {})
    assert "sfdeploy repo --device cuda" in info.value.fix
    with pytest.raises(InputError, match="unknown decode parameter 'nvdec'"):
        server_plan("nvdec", "cpu", {})


def test_a_gpu_instance_without_a_gpu_decoder_decodes_on_the_cpu_or_refuses_to_load() -> None:
    """This machine has no GPU decoder that runs (none installed, or no CUDA): the probes say so,
    auto decodes on the CPU with their reasons, gpu fails the load with the install fix."""
    plan = server_plan("auto", "cuda:0", {})
    assert plan.backend is None and plan.why.startswith("no GPU video decoder here (pynvvideocodec: ")
    with pytest.raises(EnvironmentProblem, match="--decode gpu: no GPU video decoder here") as info:
        server_plan("gpu", "cuda:0", {})
    assert info.value.fix == INSTALL_FIX


def test_instance_device_is_the_instances_gpu_or_the_cpu() -> None:
    assert instance_device({"model_instance_kind": "GPU", "model_instance_device_id": "3"}) == "cuda:3"
    assert instance_device({"model_instance_kind": "CPU", "model_instance_device_id": "0"}) == "cpu"


def test_what_a_request_may_ask_of_the_decoder() -> None:
    cpu_plan = server_plan("auto", "cpu", {})
    assert request_decode(None, cpu_plan) is None and request_decode("{}", cpu_plan) is None
    assert request_decode(json.dumps({"decode": "auto"}), cpu_plan) is None
    assert request_decode(json.dumps({"decode": "cpu"}), cpu_plan) == ASKED_CPU
    with pytest.raises(RequestRefused, match="asked for GPU decoding, but this server decodes on the CPU"):
        request_decode(json.dumps({"decode": "gpu"}), cpu_plan)
    with pytest.raises(RequestRefused, match="unknown decode parameter 'fast'"):
        request_decode(json.dumps({"decode": "fast"}), cpu_plan)


def _configs(repo: Path) -> dict[str, object]:
    return {folder.name: parse_config((folder / "config.pbtxt").read_text()) for folder in repo.iterdir()}


def test_repo_decode_gpu_writes_gpu_video_instances_and_gpu_inputs(tiny_export: Path, tmp_path: Path) -> None:
    written = write_repository(tiny_export, RepoOptions(repo=tmp_path / "gpu", device="cuda", decode="gpu",
                                                        runtime="torchscript", precision="fp32"))
    configs = _configs(tmp_path / "gpu")
    assert {f.name for f in written} == set(configs)
    video = configs["slowfast_video"]
    assert video.instance_group[0].kind == KIND_GPU and video.instance_group[0].count == GPU_DECODE_INSTANCES
    assert video.parameters["decode"].string_value == "gpu"
    assert [o.name for o in video.output] == ["probs", "label", "error", "decoder", "decoder_reason"]
    served = configs["slowfast"]  # GPU inputs (BLS clips from NVDEC, CUDA shared memory) stay on the GPU
    assert served.instance_group[0].kind == KIND_GPU
    assert served.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"

    write_repository(tiny_export, RepoOptions(repo=tmp_path / "cpu", device="cpu", runtime="torchscript",
                                              precision="fp32"))
    configs = _configs(tmp_path / "cpu")
    video = configs["slowfast_video"]
    assert video.instance_group[0].kind == KIND_CPU and video.instance_group[0].count == os.cpu_count()
    assert video.parameters["decode"].string_value == "auto"
    assert "FORCE_CPU_ONLY_INPUT_TENSORS" not in configs["slowfast"].parameters

    write_repository(tiny_export, RepoOptions(repo=tmp_path / "cpu-decode", device="cuda", decode="cpu",
                                              runtime="torchscript", precision="fp32"))
    video = _configs(tmp_path / "cpu-decode")["slowfast_video"]  # decoding on the CPU: CPU instances, one per core
    assert video.instance_group[0].kind == KIND_CPU and video.instance_group[0].count == os.cpu_count()


def test_repo_refuses_gpu_decoding_on_cpu_instances_before_writing(tiny_export: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="--decode gpu decodes on the server's GPU") as info:
        write_repository(tiny_export, RepoOptions(repo=tmp_path / "repo", device="cpu", decode="gpu"))
    assert "--device cuda" in info.value.fix and not (tmp_path / "repo").exists()
    with pytest.raises(InputError, match="unknown --decode 'nvdec'"):
        write_repository(tiny_export, RepoOptions(repo=tmp_path / "repo", device="cpu", decode="nvdec"))


def test_the_exports_fidelity_record_travels_with_the_video_model(tiny_export: Path, tmp_path: Path) -> None:
    """`<name>_video`'s gate is the export's record, copied beside its model.py; a repository
    refreshed from an export without one loses its copy (no stale gate)."""
    export = tmp_path / "export"
    export.mkdir()
    for item in tiny_export.iterdir():
        os.link(item, export / item.name)
    record = {"schema": 1, "backends": {"pynvvideocodec": {
        "candidate": "pynvvideocodec", "reference": "pyav", "threshold": 0.995, "date": "2026-12-07T00:00:00",
        "codecs": {"h264": {"compared": 300, "agreed": 300, "refused": 0, "failed": 0, "agreement": 1.0,
                            "worst_prob_diff": 0.002, "max_pixel_diff": 3, "passed": True}}}}}
    (export / GATE_FILE).write_text(json.dumps(record))
    options = RepoOptions(repo=tmp_path / "repo", device="cuda", runtime="torchscript", precision="fp32")
    write_repository(export, options)
    version = tmp_path / "repo/slowfast_video/1"
    gates = read_gates(version)
    assert gates["pynvvideocodec"]["h264"][0] is True and "100.0% top-1 agreement on 300" in \
        gates["pynvvideocodec"]["h264"][1]
    (export / GATE_FILE).unlink()
    write_repository(export, options)
    assert not (version / GATE_FILE).exists() and read_gates(version) == {}


def test_a_video_in_memory_is_spooled_to_a_private_file_for_a_decoder_that_reads_files(tmp_path: Path) -> None:
    data = os.urandom(4096)
    with spooled(data) as path:
        assert Path(path).read_bytes() == data and (os.stat(path).st_mode & 0o777) == 0o600
        assert Path(path).name.startswith("sfdeploy-nvdec-")
    assert not Path(path).exists()
    with spooled(str(tmp_path / "a.mp4")) as same:  # a path is read where it is
        assert same == str(tmp_path / "a.mp4")


def test_a_request_asking_for_the_cpu_decoder_gets_it_with_the_reason(tmp_path: Path, tiny_export: Path) -> None:
    from sfdeploy.artifacts import Manifest

    spec = Manifest.read(tiny_export).clip_spec
    video = good_video(tmp_path / "v.mp4").read_bytes()
    with DecodePool(spec, workers=1) as pool:
        (index, clip, how), = pool.decode([video], cpu_because=ASKED_CPU)
        (_, plain, plain_how), = pool.decode([video])
    assert index == 0 and isinstance(clip, np.ndarray) and np.array_equal(clip, plain)
    assert (how.decoder, how.reason) == ("pyav", ASKED_CPU) and plain_how.reason == ""


def test_the_served_gpu_decoding_targets_of_a_record() -> None:
    """Issue 30's: NVDEC on the server >= 5x the same server decoding on its CPU, >= 90% of GPU
    decode-only; measured on a GPU only (a CPU record has neither line)."""
    from sfdeploy.bench.targets import targets

    def videos(backend: str, per_s: float) -> dict:
        return {"stage": "e2e", "backend": backend, "precision": "fp16", "batch": 1, "concurrency": 8,
                "kind": "videos", "status": "ok", "videos_per_s": per_s}

    record = {"profile": "full", "device_info": {"device": "cuda:0"}, "served": {}, "rows": [
        videos("triton-video:grpc", 70.0), videos("triton-video:grpc (nvdec)", 371.0),
        videos("gpu-decode-only:pynvvideocodec", 400.0), videos("gpu-decode-only:torchcodec", 300.0)]}
    got = {t["target"]: t for t in targets(record)}
    five_x = got["Served, NVDEC on the server >= 5x decoding on its CPU"]
    assert five_x["status"] == "met" and five_x["measured"].startswith("5.3x (371.0 vs 70.0 videos/s)")
    share = got["Served, NVDEC on the server >= 90% of GPU decode-only"]  # against the fastest decoder's
    assert share["status"] == "met" and share["measured"].startswith("93% (371.0 vs 400.0")
    record["rows"] = record["rows"][:1]
    assert {t["target"]: t["status"] for t in targets(record)}[
        "Served, NVDEC on the server >= 5x decoding on its CPU"] == "missing"
    record["device_info"]["device"] = "cpu"
    assert not any(t["target"].startswith("Served, NVDEC") for t in targets(record))


def test_infer_server_decode_takes_the_servers_decode_modes_only() -> None:
    """`infer --server-decode --decode auto|cpu|gpu` is asked of the server; a decoder of this
    machine by name is refused before anything runs, naming the option."""
    from sfdeploy.engines import check_local
    from sfdeploy.errors import OptionError
    from sfdeploy.infer_options import InferOptions
    from sfdeploy.target import ModelTarget

    target = ModelTarget(server_decode=True)
    for mode in ("auto", "cpu", "gpu"):
        check_local(target, InferOptions(decode=mode))
    with pytest.raises(OptionError, match="--decode pynvvideocodec names a decoder of this machine") as info:
        check_local(target, InferOptions(decode="pynvvideocodec"))
    assert "--decode auto or cpu or gpu" in info.value.fix
