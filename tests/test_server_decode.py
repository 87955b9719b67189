"""Server-side decoding: `<name>_video` on the real tritonserver, with the real decoders.

Encoded files in, the same probabilities as the client-decoded path out; bad payloads fail alone;
a decoder crash costs one request; clients: curl and plain tritonclient (the README's own code),
`sfdeploy infer --server-decode`, `Classifier.from_triton(server_decode=True)`.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from sfdeploy.artifacts import Manifest
from sfdeploy.cli import cli
from sfdeploy.client import Classifier, infer
from sfdeploy.clipspec import spec_of
from sfdeploy.decode.clips import load_video
from sfdeploy.errors import InputError, ServingError
from sfdeploy.runtime.triton import TritonPredictor
from sfdeploy.runtime.triton_video import TritonVideoPredictor
from sfdeploy.serving.config import parse_config
from sfdeploy.serving.repo import VIDEO_MODEL

from badvideos import corrupt_index, good_video, not_a_video, truncated, zero_byte
from conftest import REPO, executed_batches, run_cli

pytestmark = pytest.mark.skipif(
    int(np.__version__.split(".")[0]) >= 2,
    reason="numpy 2: nvidia-pytriton's python backend stub cannot pass BYTES tensors, so <name>_video "
           "refuses to load and `serve` leaves it out (tests/test_serving.py checks that)")


@pytest.fixture(scope="module")
def real_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Videos as they come from cameras and the web: sizes from 72 px wide to 720p, five codecs,
    four containers, 20 to 400 frames (fewer than the clip's 31: frames loop)."""
    root = tmp_path_factory.mktemp("real_world")
    cases = {
        "h264_1280x720.mp4": dict(width=1280, height=720, frames=40, codec="libx264", pix_fmt="yuv420p"),
        "h264_320x180_long.mp4": dict(width=320, height=180, frames=400, codec="libx264", pix_fmt="yuv420p"),
        "hevc_640x360.mkv": dict(width=640, height=360, frames=40, codec="libx265", pix_fmt="yuv420p"),
        "vp9_320x240_short.webm": dict(width=320, height=240, frames=20, codec="libvpx-vp9", pix_fmt="yuv420p"),
        "mpeg4_352x288.avi": dict(width=352, height=288, frames=60, codec="mpeg4", pix_fmt="yuv420p"),
        "mjpeg_426x240.avi": dict(width=426, height=240, frames=40, codec="mjpeg", pix_fmt="yuvj420p"),
        # decord mis-decodes 72 px wide streams: PyAV decodes it, on the server as on the client
        "h264_72x128_portrait.mov": dict(width=72, height=128, frames=40, codec="libx264", pix_fmt="yuv420p"),
    }
    # Encoded in a fresh interpreter: once decord is loaded (as earlier tests do), PyAV's libvpx
    # encoder fails to open in the same process (their bundled libraries clash); decoding is unaffected.
    jobs = {name: dict(kw, seed=i) for i, (name, kw) in enumerate(cases.items())}
    script = ("import json, sys\nfrom pathlib import Path\nfrom badvideos import encoded_video\n"
              "for name, kw in json.loads(sys.argv[1]).items():\n    encoded_video(Path(sys.argv[2]) / name, **kw)\n")
    result = subprocess.run([sys.executable, "-c", script, json.dumps(jobs), str(root)], cwd=Path(__file__).parent,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return {name: root / name for name in cases}


@pytest.fixture(scope="module")
def spec(tiny_export: Path):
    return Manifest.read(tiny_export).clip_spec


def _send(url: str, model: str, payloads: list[bytes], protocol: str = "http") -> dict[str, np.ndarray]:
    """One request carrying ``payloads`` (one item each), through plain tritonclient."""
    if protocol == "http":
        import tritonclient.http as client_module
    else:
        import tritonclient.grpc as client_module
    data = np.empty((len(payloads), 1), dtype=object)
    data[:, 0] = payloads
    video = client_module.InferInput("video", list(data.shape), "BYTES")
    video.set_data_from_numpy(data)
    client = client_module.InferenceServerClient(url)
    try:
        result = client.infer(model, [video], outputs=[client_module.InferRequestedOutput(n)
                                                       for n in ("probs", "label", "error")])
        return {name: result.as_numpy(name) for name in ("probs", "label", "error")}
    finally:
        client.close()


def _client_decoded(triton, paths: list[Path], spec) -> np.ndarray:
    """The client-side path: sfdeploy decodes here, `slowfast` classifies the clips."""
    predictor = TritonPredictor(triton.http_url, model="slowfast")
    try:
        return np.concatenate([predictor.predict(load_video(str(p), spec)[None]) for p in paths])
    finally:
        predictor.close()


def test_video_configs_parse_and_name_their_model(tiny_repo: Path, spec) -> None:
    from sfdeploy.serving.server import TritonServer

    for name, instances, limit in (("slowfast_video", os.cpu_count(), 256), ("slowfast_ort_video", 1, 1)):
        config = parse_config((tiny_repo / name / "config.pbtxt").read_text())
        assert config.backend == "python" and config.max_batch_size == 32 and spec_of(config) == spec
        assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [("video", 13, [1])]  # TYPE_STRING
        assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
            ("probs", 11, [4]), ("label", 13, [1]), ("error", 13, [1]), ("decoder", 13, [1]),
            ("decoder_reason", 13, [1])]  # FP32, TYPE_STRING
        assert config.parameters["decode"].string_value == "auto"
        assert config.output[0].label_filename == "labels.txt"
        batching = config.dynamic_batching  # each request alone to the next free instance, with a bounded wait
        assert list(batching.preferred_batch_size) == [1] and batching.max_queue_delay_microseconds == 0
        assert batching.default_queue_policy.default_timeout_microseconds == 30_000_000
        assert batching.default_queue_policy.max_queue_size == 128 and batching.default_queue_policy.timeout_action == 0
        assert int(config.parameters["max_video_pixels"].string_value) == 4096 * 2160
        assert config.instance_group[0].count == instances and config.instance_group[0].kind == 2  # KIND_CPU
        assert config.parameters["target_model"].string_value == name.removesuffix("_video")
        assert int(config.parameters["max_video_bytes"].string_value) == limit * 2**20
        assert (tiny_repo / name / "1/model.py").read_text() == VIDEO_MODEL
        assert (tiny_repo / name / "labels.txt").read_text().split() == list(spec.class_names)
    with pytest.raises(InputError, match="classifies the videos it decodes with 'slowfast'") as info:
        TritonServer(tiny_repo, models=["slowfast_video"]).start()  # refused before anything starts
    assert "--models slowfast_video slowfast" in info.value.fix


def test_the_video_model_refuses_to_load_where_the_stubs_numpy_bridge_is_broken(tiny_repo: Path,
                                                                                tmp_path: Path) -> None:
    """Under numpy 2, nvidia-pytriton 0.7.0's stub corrupts BYTES tensors (sfdeploy.serving.tensors):
    <name>_video must not load, and `sfdeploy serve` must say why and what to do. The suite runs
    numpy 1, so only the probe's answer is replaced; the server, the load and the refusal are real."""
    from sfdeploy.serving.ports import free_port

    repo = tmp_path / "repo"
    for name in ("slowfast", "slowfast_video"):
        shutil.copytree(tiny_repo / name, repo / name)
    (repo / "slowfast_video/1/model.py").write_text(
        "import sfdeploy.serving.tensors as tensors\n\n"
        "tensors.numpy_bridge_works = lambda: False  # what the probe answers under numpy 2\n" + VIDEO_MODEL)
    result = run_cli("serve", "--repo", str(repo), "--http-port", str(free_port()), "--grpc-port", str(free_port()),
                     "--metrics-port", str(free_port()), check=False, timeout=180)
    assert result.returncode == 1
    assert "model 'slowfast_video' cannot run with numpy" in result.stderr
    assert "pip install numpy==1.26.4" in result.stderr and "sfdeploy serve --models slowfast" in result.stderr


def test_server_decoded_probs_equal_the_client_decoded_path(triton, real_world: dict[str, Path], spec) -> None:
    paths = list(real_world.values())
    expected = _client_decoded(triton, paths, spec)
    one_by_one = np.concatenate([_send(triton.http_url, "slowfast_video", [p.read_bytes()])["probs"] for p in paths])
    together = _send(triton.grpc_url, "slowfast_video", [p.read_bytes() for p in paths], protocol="grpc")
    for got in (one_by_one, together["probs"]):
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-5, np.abs(got - expected).max()
    labels = [spec.class_names[i] for i in expected.argmax(axis=1)]
    assert [label.decode() for label in together["label"][:, 0]] == labels
    assert set(together["error"][:, 0]) == {b""}
    print(f"max |probs diff| server vs client decoding: {np.abs(one_by_one - expected).max():.2e} one video per "
          f"request, {np.abs(together['probs'] - expected).max():.2e} all in one request")


def test_a_bad_video_fails_alone(triton, real_world: dict[str, Path], synth_root: Path, spec,
                                 tmp_path: Path) -> None:
    from tritonclient.utils import InferenceServerException

    good = [real_world["h264_320x180_long.mp4"], real_world["mjpeg_426x240.avi"]]
    source = sorted((synth_root / "move_left").glob("*.mp4"))[0]
    bad = {
        "corrupt": corrupt_index(tmp_path / "corrupt.mp4", source).read_bytes(),
        "truncated": truncated(tmp_path / "truncated.mp4", source).read_bytes(),
        "zero_byte": zero_byte(tmp_path / "empty.mp4").read_bytes(),
        "text": not_a_video(tmp_path / "notes.mp4").read_bytes(),
    }
    expected = _client_decoded(triton, good, spec)
    mixed = _send(triton.http_url, "slowfast_video", [good[0].read_bytes(), bad["corrupt"], good[1].read_bytes()])
    assert np.abs(mixed["probs"][[0, 2]] - expected).max() <= 1e-5
    assert [e.decode() for e in mixed["error"][:, 0]][::2] == ["", ""]
    assert "cannot decode" in mixed["error"][1, 0].decode() and "re-encode it" in mixed["error"][1, 0].decode()
    assert mixed["label"][1, 0] == b"" and not mixed["probs"][1].any()

    causes = {"corrupt": "cannot decode", "truncated": "cannot decode", "zero_byte": "empty (0 bytes)",
              "text": "cannot decode: not a video, or its header is damaged (FFmpeg: "}
    for name, payload in bad.items():  # one video per request: the request fails with the cause
        with pytest.raises(InferenceServerException) as info:
            _send(triton.http_url, "slowfast_video", [payload])
        assert info.value.status() == "400" and causes[name] in info.value.message(), (name, info.value.message())
    over = np.random.default_rng(0).integers(0, 256, size=int(1.5 * 2**20), dtype=np.uint8).tobytes()
    with pytest.raises(InferenceServerException) as info:  # slowfast_ort_video: --max-video-mb 1
        _send(triton.grpc_url, "slowfast_ort_video", [over], protocol="grpc")
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "1.5 MB, over this model's limit of 1 MB, and was not decoded" in info.value.message()
    assert "--max-video-mb" in info.value.message()
    several = _send(triton.http_url, "slowfast_video", list(bad.values()))  # all failed, each with its cause
    assert [causes[name] in e.decode() for name, e in zip(bad, several["error"][:, 0], strict=True)] == [True] * 4

    predictor = TritonPredictor(triton.http_url, model="slowfast_video")  # the server and the model go on
    try:
        assert predictor._client().is_server_ready() and predictor._client().is_model_ready("slowfast_video")
    finally:
        predictor.close()
    assert np.abs(_send(triton.http_url, "slowfast_video", [good[0].read_bytes()])["probs"] - expected[:1]).max() \
        <= 1e-5


def _decode_workers(triton, model: str) -> list[int]:
    """PIDs of the decode workers of ``model``'s instances (children of its backend stubs)."""
    def children(pid: int) -> list[tuple[int, str]]:
        pids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
        return [(int(p), Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()) for p in pids]

    stubs = [pid for pid, args in children(triton.process.pid) if f"/{model}/1/model.py" in args]
    return [pid for stub in stubs for pid, args in children(stub) if "sfdeploy.workers" in args]


def test_a_decoder_crash_costs_its_request_not_the_instance(triton, real_world: dict[str, Path]) -> None:
    from tritonclient.utils import InferenceServerException

    workers = _decode_workers(triton, "slowfast_video")
    assert len(workers) == os.cpu_count()  # one per instance, started at load time
    payload = real_world["hevc_640x360.mkv"].read_bytes()
    for pid in workers:  # the decoder stops in the middle of its work ...
        os.kill(pid, signal.SIGSTOP)
    outcome: list[BaseException | dict] = []
    request = threading.Thread(target=lambda: outcome.append(_try_send(triton.http_url, payload)))
    request.start()
    time.sleep(3)  # ... the request reaches an instance, whose decoder is stopped ...
    for pid in workers:  # ... and dies, as a segfault in native decoder code would kill it
        os.kill(pid, signal.SIGKILL)
    request.join(timeout=60)
    assert isinstance(outcome[0], InferenceServerException) and outcome[0].status() == "400"
    assert "the decoder crashed: worker process died (exit code -9)" in outcome[0].message()
    for pid in workers:  # the other instances' decoders died idle; once the kernel has ended them ...
        _wait_dead(pid)
    for _ in range(4):  # ... they are replaced unblamed: every instance answers again, with new decoders
        assert _send(triton.http_url, "slowfast_video", [payload])["error"][0, 0] == b""
    replaced = _decode_workers(triton, "slowfast_video")
    assert len(replaced) == len(workers) and not set(replaced) & set(workers)


def _wait_dead(pid: int, timeout_s: float = 30.0) -> None:
    """Until ``pid`` has exited (a zombie or gone): SIGKILL is delivered at once, the exit is not."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return
        if stat[stat.rindex(")") + 2] in "ZX":
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} still runs {timeout_s:.0f} s after SIGKILL")


def _try_send(url: str, payload: bytes) -> BaseException | dict:
    try:
        return _send(url, "slowfast_video", [payload])
    except BaseException as exc:  # the test inspects it
        return exc


def test_200_video_requests_at_concurrency_16(triton, synth_root: Path) -> None:
    videos = [p.read_bytes() for p in sorted(synth_root.rglob("*.mp4"))]
    payloads = [videos[i % len(videos)] for i in range(200)]
    model_before, _ = executed_batches(triton.http_url, "slowfast")
    _, videos_before = executed_batches(triton.http_url, "slowfast_video")
    predictor = TritonVideoPredictor(triton.http_url, model="slowfast")
    answers: list = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client(mine: list[bytes]) -> None:
        for payload in mine:
            try:
                answer = predictor.predict([payload])[0]
            except BaseException as exc:  # counted: the test asserts there are none
                errors.append(exc)
                continue
            with lock:
                answers.append(answer)

    threads = [threading.Thread(target=client, args=(payloads[i::16],)) for i in range(16)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        predictor.close()
    assert errors == [] and len(answers) == 200
    assert all(a.probs.shape == (4,) and abs(a.probs.sum() - 1) < 1e-4 and a.decoded_by.decoder == "pyav"
               for a in answers)
    model_after, _ = executed_batches(triton.http_url, "slowfast")
    _, videos_after = executed_batches(triton.http_url, "slowfast_video")
    assert videos_after - videos_before == 200
    new = {size: model_after.get(size, 0) - model_before.get(size, 0) for size in model_after}
    assert sum(size * count for size, count in new.items()) == 200  # each video's clips ran once
    assert any(size > 1 and count > 0 for size, count in new.items()), new  # clips of several requests merged


def _readme_block(language: str, marker: str) -> str:
    blocks = re.findall(rf"```{language}\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    return next(block for block in blocks if marker in block)


def test_the_readme_curl_call_returns_the_label(triton, real_world: dict[str, Path], spec, tmp_path: Path) -> None:
    script = _readme_block("bash", "Inference-Header-Content-Length")
    assert script.startswith("VIDEO=clip.mp4 URL=127.0.0.1:8000\n")
    video = real_world["h264_1280x720.mp4"]
    expected = _client_decoded(triton, [video], spec)[0]

    def run(path: Path) -> dict:
        text = script.replace("VIDEO=clip.mp4 URL=127.0.0.1:8000", f"VIDEO={path} URL={triton.http_url}", 1)
        result = subprocess.run(["bash", "-c", text], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    answer = {o["name"]: o["data"] for o in run(video)["outputs"]}
    assert answer["label"] == [spec.class_names[int(expected.argmax())]]
    score, index, label = answer["probs"][0].split(":")  # classification extension: score:index:label
    assert (int(index), label) == (int(expected.argmax()), answer["label"][0])
    assert abs(float(score) - expected.max()) < 1e-5
    assert "not a video, or its header is damaged" in run(not_a_video(tmp_path / "notes.mp4"))["error"]


def test_the_readme_tritonclient_client_runs_without_sfdeploy(triton, real_world: dict[str, Path], spec) -> None:
    code = _readme_block("python", "import tritonclient.http as http")
    assert "sfdeploy" not in code and len(code.strip().splitlines()) <= 14
    code = code.replace('"127.0.0.1:8000"', repr(triton.http_url))
    paths = [real_world["vp9_320x240_short.webm"], real_world["mpeg4_352x288.avi"]]
    guard = "import sys\nsys.modules['sfdeploy'] = None  # importing sfdeploy would fail\n"
    result = subprocess.run([sys.executable, "-c", guard + code, *map(str, paths)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    labels = [spec.class_names[i] for i in _client_decoded(triton, paths, spec).argmax(axis=1)]
    assert result.stdout.splitlines() == [f"{path} {label}" for path, label in zip(paths, labels, strict=True)]


def test_infer_server_decode_gives_the_same_rows(triton, synth_root: Path, real_world: dict[str, Path],
                                                 tmp_path: Path) -> None:
    folder = tmp_path / "videos"
    (folder / "synth").mkdir(parents=True)
    (folder / "real").mkdir()
    for video in sorted((synth_root / "move_up").glob("*.mp4"))[:6]:
        os.link(video, folder / "synth" / video.name)
    for name in ("h264_1280x720.mp4", "hevc_640x360.mkv", "h264_72x128_portrait.mov"):
        os.link(real_world[name], folder / "real" / name)
    source = good_video(tmp_path / "source.mp4")
    truncated(folder / "bad" / "truncated.mp4", source)
    zero_byte(folder / "bad" / "empty.mp4")
    not_a_video(folder / "bad" / "notes.avi")

    client_side = tmp_path / "client.csv"
    with Classifier.from_triton(triton.http_url, model="slowfast") as classifier:
        infer([folder], client_side, classifier, batch_size=4, concurrency=2, show_progress=False)
    server_side = tmp_path / "server.csv"
    first = run_cli("infer", str(folder / "synth"), "--url", triton.grpc_url, "--protocol", "grpc",
                    "--server-decode", "--out", str(server_side))
    assert "6 classified, 0 failed" in first.stderr
    resumed = run_cli("infer", str(folder), "--url", triton.http_url, "--server-decode", "--batch-size", "3",
                      "--out", str(server_side), "--resume", check=False)
    assert resumed.returncode == 1  # the three bad files
    assert "3 classified, 3 failed, 6 already in" in resumed.stderr

    expected = {row["path"]: row for row in csv.DictReader(client_side.open())}
    got = list(csv.DictReader(server_side.open()))
    assert sorted(row["path"] for row in got) == sorted(expected)  # every input once
    for row in got:
        want = expected[row["path"]]
        assert (row["status"], row["label"]) == (want["status"], want["label"]), row["path"]
        if row["status"] == "ok":
            assert abs(float(row["score"]) - float(want["score"])) <= 1e-5
            assert [c for c, _ in json.loads(row["top_k"])] == [c for c, _ in json.loads(want["top_k"])]
        else:  # the same cause, from the same decoding code
            assert row["error"].split(" (")[0] == want["error"].split(" (")[0], (row["error"], want["error"])


def test_each_answer_says_which_decoder_read_the_video_and_a_request_may_ask_for_the_cpu(
        triton, real_world: dict[str, Path]) -> None:
    """The server's decoder per video, in the response and in `infer`'s rows; the request parameter
    `decode` (what `infer --server-decode --decode` sends): cpu is followed, gpu refused by a server
    whose instances decode on the CPU, with the reason."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from sfdeploy.serving.video_backend import ASKED_CPU

    payloads = [real_world[name].read_bytes() for name in ("h264_320x180_long.mp4", "vp9_320x240_short.webm")]
    data = np.empty((2, 1), dtype=object)
    data[:, 0] = payloads
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        video = grpcclient.InferInput("video", [2, 1], "BYTES")
        video.set_data_from_numpy(data)
        outputs = [grpcclient.InferRequestedOutput(n) for n in ("probs", "decoder", "decoder_reason")]
        plain = client.infer("slowfast_video", [video], outputs=outputs)
        asked = client.infer("slowfast_video", [video], outputs=outputs, parameters={"decode": "cpu"})
        assert [d.decode() for d in plain.as_numpy("decoder")[:, 0]] == ["pyav", "pyav"]
        reasons = {r.decode() for r in plain.as_numpy("decoder_reason")[:, 0]}
        assert reasons == {"this instance runs on the CPU (KIND_CPU)"}
        assert {r.decode() for r in asked.as_numpy("decoder_reason")[:, 0]} == {ASKED_CPU}
        assert np.array_equal(plain.as_numpy("probs"), asked.as_numpy("probs"))
        with pytest.raises(InferenceServerException, match="asked for GPU decoding, but this server decodes on th"):
            client.infer("slowfast_video", [video], outputs=outputs, parameters={"decode": "gpu"})
    finally:
        client.close()
    with Classifier.from_triton(triton.grpc_url, protocol="grpc", server_decode=True) as served:
        rows = list(served.classify([real_world["hevc_640x360.mkv"]], decode="cpu"))
        assert [(r.decoder, r.decoder_reason) for r in rows] == [("pyav", ASKED_CPU)]
        with pytest.raises(ServingError, match="refused the request: decoder refused: the request asked for GPU") \
                as info:  # the option is at fault, not the video: the run stops, saying so
            list(served.classify([real_world["hevc_640x360.mkv"]], decode="gpu"))
    assert "--decode auto or cpu" in info.value.fix


def test_classifier_from_triton_server_decode(triton, real_world: dict[str, Path]) -> None:
    videos = list(real_world.values())[:4]
    with Classifier.from_triton(triton.grpc_url, protocol="grpc", server_decode=True) as served, \
            Classifier.from_triton(triton.grpc_url, protocol="grpc") as local:
        assert served.predictor.name == "triton-grpc:slowfast_video" and served.spec == local.spec
        remote = {p.path: p for p in served.classify(videos, batch_size=3, concurrency=2)}
        here = {p.path: p for p in local.classify(videos, batch_size=3, concurrency=2)}
    assert set(remote) == set(here) == {str(v) for v in videos}
    for path, prediction in remote.items():
        assert prediction.ok and prediction.label == here[path].label
        assert abs(prediction.score - here[path].score) <= 1e-5
    with pytest.raises(InputError, match="--shm"):
        Classifier.from_triton(triton.grpc_url, protocol="grpc", shm=True, server_decode=True)
    result = CliRunner().invoke(cli, ["infer", str(videos[0]), "--backend", "onnxruntime", "--server-decode"])
    assert result.exit_code == 2 and "--backend triton" in result.output
