"""Benchmarks shipped with megatron-ibxl: communication overhead and single-GPU smoke checks.

Run them from the repository root as modules (`python -m benchmarks.comm_overhead ...`), so
that they import the engine from the checkout even where it is not installed.
"""
