"""Triton serving: the model repository, the local tritonserver, and its python backend."""
