"""Scale out: ``sfdeploy infer --engine ray`` runs the same classification on a Ray cluster
(Ray Data: decode tasks on CPUs, model actors on GPUs or Triton URLs). Ray is imported only inside
functions, so the rest of sfdeploy works without the ``[ray]`` extra."""
