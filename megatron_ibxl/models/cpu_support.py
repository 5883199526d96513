"""Let Megatron-core's sequence-parallel collectives allocate on the CPU when there is no CUDA.

Megatron-core's sequence-parallel paths allocate their all-gather and reduce-scatter outputs
with `device=torch.cuda.current_device()` (the gather/scatter mappings, the column-parallel
linear's gathered input and its reduce-scattered input gradient, and the global memory
buffer). On a machine without CUDA that call fails, so sequence parallelism could not run on
CPU at all, although the collectives themselves work over gloo.

`allow_megatron_on_cpu` rebinds the name `torch` inside exactly those three Megatron-core
modules to a view of torch whose `cuda.current_device()` is the CPU; everything else is the
real torch. Only called when CUDA is absent (where the original call can only fail), so GPU
runs are untouched.
"""

from __future__ import annotations

import torch
from megatron.core import utils as mcore_utils
from megatron.core.tensor_parallel import layers as mcore_layers
from megatron.core.tensor_parallel import mappings as mcore_mappings

_PATCHED_MODULES = (mcore_mappings, mcore_layers, mcore_utils)


class _CudaOnCpu:
    """`torch.cuda` whose current device is the CPU."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")


class _TorchOnCpu:
    """`torch` whose `cuda` attribute is `_CudaOnCpu`."""

    cuda = _CudaOnCpu()

    def __getattr__(self, name):
        return getattr(torch, name)


def allow_megatron_on_cpu() -> None:
    """Make Megatron-core's sequence-parallel allocations land on the CPU. Idempotent; does
    nothing when CUDA is available."""
    if torch.cuda.is_available():
        return
    for module in _PATCHED_MODULES:
        if not isinstance(module.torch, _TorchOnCpu):
            module.torch = _TorchOnCpu()
