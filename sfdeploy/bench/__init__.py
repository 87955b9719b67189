"""``sfdeploy bench``: throughput and latency of every way to run the model, in stages that resume."""

from sfdeploy.artifacts import PRECISIONS  # noqa: F401 - the precisions a run may ask for

#: What a benchmark can measure, in the order of its table (light: the CLI's --help reads it).
BACKENDS = ("mmaction2", "eager", "torchscript", "onnxruntime", "triton-http", "triton-grpc", "triton-shm",
            "triton-video")
#: The stages, in the order a run measures them; ``compile`` (torch.compile / CUDA graphs: minutes of
#: compilation per shape) only when asked for.
STAGES = ("model", "triton", "e2e", "compile")
DEFAULT_STAGES = ("model", "triton", "e2e")
