"""Triton python-backend entry point of an sfdeploy video model (server-side decoding).

The model logic lives in sfdeploy (sfdeploy/serving/video_backend.py): it decodes the encoded videos
of each request with sfdeploy's preprocessing and runs the clips through the model named in
config.pbtxt's parameters (target_model).
"""

from sfdeploy.serving.video_backend import TritonPythonModel  # noqa: F401
