"""GPU video decoding (NVDEC) inside sfdeploy's one decode package, imported only when a run's
plan uses it: a CPU-only run needs nothing from here.

* :mod:`~sfdeploy.decode.gpu.select`: which GPU decoders are here (pynvvideocodec, torchcodec),
  what NVDEC decodes, and the rules that choose a decoder per stream, with the reason
  (:func:`~sfdeploy.decode.gpu.select.plan_decoding` makes the plan the decode pool takes);
* :mod:`~sfdeploy.decode.gpu.route`: what the decode pool runs with a GPU plan (the workers'
  probe hands NVDEC's streams to this process, which decodes them in a few threads);
* :mod:`~sfdeploy.decode.gpu.backends`: the two decoders through their documented APIs, and the
  resize and crop in torch on the GPU;
* :mod:`~sfdeploy.decode.gpu.gate`: the fidelity gate each GPU decoder must have passed, per
  codec, before ``--decode auto`` uses it (measured by :mod:`sfdeploy.bench.fidelity` on the sweep
  of :mod:`sfdeploy.bench.sweep`).

Light to import: torch and the decoders are imported where they run.
"""
