"""TorchScript export: ``torch.jit.trace`` of the deploy module, clip spec as an extra file.

``torch.jit.script`` cannot compile mmcv's ``Conv3d.forward``; tracing records the graph with the
batch size read from the input (``aten::size``), so any batch size works. The trace is reloaded
with plain ``torch.jit.load`` and compared with the module it came from before export returns.

**The tracer bakes cuDNN's settings into the graph.** Every convolution is recorded as
``aten::_convolution(..., benchmark, deterministic, cudnn_enabled, allow_tf32)`` with the values
torch's global flags had *while tracing*; at run time the artifact ignores the flags of the process
that runs it. Traced with torch's defaults, an fp32 artifact therefore ran its convolutions in TF32
on every GPU, whatever the parity gate or the user set (on an H200: 1.1e-4..2.3e-4 off the CPU on
the demo's probabilities, where the same graph run eagerly without TF32 was 2.4e-7 off), and no
artifact ever used cuDNN's benchmark mode (the fp16 artifact ran at half the speed of the same graph
run eagerly with it). So the flags are set on purpose while tracing (:func:`baked_conv_flags`):

* fp32: no TF32, no benchmark mode: IEEE fp32 with cuDNN's deterministic algorithm heuristics, the
  arithmetic the parity gate holds to 1e-4, on any device. (On a GPU, fp16 is what is served by
  default and the fast choice.)
* fp16 / bf16: benchmark mode: cuDNN times its algorithms once per input shape and keeps the
  fastest (the served shapes are fixed per batch size; TF32 does not apply to half precisions).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from sfdeploy.export.formats import Written, artifact_info, check_reloaded
from sfdeploy.runtime.torchscript import INFO_FILE, SPEC_FILE, load_torchscript


def export_torchscript(module: torch.nn.Module, example: torch.Tensor, path: Path, spec_json: str,
                       precision: str = "fp32", *, check_device: str | None = None) -> Written:
    """Trace ``module`` on ``example``'s device, write ``path`` (the clip spec and the artifact's
    facts, the torch version that wrote it included, as extra files), reload it there and compare
    (``check_device`` is ignored: a trace is checked where it was made)."""
    info = artifact_info("torchscript", precision)
    with warnings.catch_warnings():
        # "torch.jit.trace is deprecated": it is still the exporter that handles mmcv's layers.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*torch.jit.trace.*")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        with torch.no_grad(), baked_conv_flags(precision):
            traced = torch.jit.trace(module, (example,), check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={SPEC_FILE: spec_json, INFO_FILE: json.dumps(info)})
        reloaded = load_torchscript(path, str(example.device)).module
    return Written(check_reloaded(module, reloaded, example, path, precision, what="TorchScript model",
                                  runtime=f"torch {torch.__version__}",
                                  fix="report this with the model config; export --formats onnx meanwhile"), info)


@contextlib.contextmanager
def baked_conv_flags(precision: str) -> Iterator[None]:
    """The cuDNN flags the tracer records into each convolution of a ``precision`` artifact (see
    the module docstring); torch's own flags are restored afterwards."""
    if precision == "fp32":
        from sfdeploy.runtime.cuda import exact_fp32

        with exact_fp32():  # TF32 and benchmark mode off
            yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def conv_flags(module: torch.jit.ScriptModule) -> set[tuple[bool, bool]]:
    """The (benchmark, allow_tf32) pairs baked into the convolutions of a traced module (for
    tests and diagnostics)."""
    found = set()
    graph = module.inlined_graph  # the submodules' calls inlined; kept alive while its nodes are read
    for node in graph.findAllNodes("aten::_convolution"):
        inputs = list(node.inputs())
        found.add((bool(inputs[9].toIValue()), bool(inputs[12].toIValue())))
    return found
