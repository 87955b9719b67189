"""GPU video decoding (NVDEC) inside sfdeploy's one decode adapter.

* :mod:`~sfdeploy.gpudecode.select`: which GPU decoders are here (pynvvideocodec, torchcodec),
  what NVDEC decodes, and the rules that choose a decoder per stream, with the reason;
* :mod:`~sfdeploy.gpudecode.backends`: the two decoders through their documented APIs, and the
  resize and crop in torch on the GPU;
* :mod:`~sfdeploy.gpudecode.pool`: the routed decoding ``sfdeploy infer`` runs (CPU workers probe
  every stream and decode what stays on the CPU, the GPU decoder reads the rest in this process);
* :mod:`~sfdeploy.gpudecode.fidelity`: the sweep of test videos, the harness comparing two
  decoders through a model, and the gate it records.

Light to import: torch and the decoders are imported where they run.
"""
