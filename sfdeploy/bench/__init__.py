"""``sfdeploy bench``: throughput and latency of every way to run the model, in stages that resume."""

from sfdeploy.precision import PRECISIONS  # noqa: F401 - every precision a row may have (the report's order)

#: What a benchmark can measure, in the order of its table (light: the CLI's --help reads it).
BACKENDS = ("mmaction2", "eager", "torchscript", "onnxruntime", "torch_export", "aoti", "triton-http", "triton-grpc",
            "triton-shm", "triton-cuda-shm", "triton-video")
#: What it measures unless told: all but the AOTInductor package (minutes of compilation for R50;
#: `--backends ...,aoti` adds it) and the input in CUDA shared memory (a GPU run with cuda-python;
#: `--backends ...,triton-cuda-shm` adds it, recorded as skipped, with the reason, where it cannot run)
DEFAULT_BACKENDS = tuple(b for b in BACKENDS if b not in ("aoti", "triton-cuda-shm"))
#: The stages, in the order a run measures them; ``compile`` (torch.compile / CUDA graphs: minutes of
#: compilation per shape) only when asked for.
STAGES = ("model", "triton", "e2e", "compile", "train", "distill")
DEFAULT_STAGES = ("model", "triton", "e2e")
