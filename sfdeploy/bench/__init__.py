"""``sfdeploy bench``: throughput and latency of every way to run the model, in one run."""

#: What a benchmark can measure, in the order of its table (light: the CLI's --help reads it).
BACKENDS = ("mmaction2", "eager", "torchscript", "onnxruntime", "triton-http", "triton-grpc", "triton-video")
