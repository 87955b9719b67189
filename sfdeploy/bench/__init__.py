"""``sfdeploy bench``: throughput and latency of every way to run the model, in one run."""
