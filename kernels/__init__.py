"""Triton kernels, shipped in the wheel as ``fidelity_kld.kernels`` (pyproject's wheel.packages).

One op per module, the same stem as its C++ and test files: ``logit_stats`` (the fused per-token
statistics). Importing this package imports neither torch nor triton; the op modules do.
"""
