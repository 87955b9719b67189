"""Triton python-backend entry point of an sfdeploy model.

The model logic lives in sfdeploy (sfdeploy/serving/python_backend.py): it runs the artifact named
in config.pbtxt's parameters with onnxruntime or torch, on the instance's GPU or the CPU.
"""

from sfdeploy.serving.python_backend import TritonPythonModel  # noqa: F401
