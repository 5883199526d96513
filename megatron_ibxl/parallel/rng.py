"""A CPU replacement for Megatron-core's CUDA RNG state tracker.

With sequence parallelism, Megatron-core's TransformerBlock forks the `model-parallel-rng`
state of its CUDA RNG tracker, and its activation checkpointing saves and restores CUDA RNG
state. On a machine without CUDA both would fail; `install_cpu_rng_tracker` puts a tracker in
their place that keeps named states of the CPU generator.
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core.tensor_parallel import random as mcore_random


class CpuRNGStatesTracker(mcore_random.CudaRNGStatesTracker):
    """Named CPU generator states with the interface of Megatron-core's CUDA tracker."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def add(self, name: str, seed: int) -> None:
        """Track a new state seeded with `seed` under `name`."""
        self._is_initialized = True
        if seed in self.seeds_ or name in self.states_:
            raise ValueError(f"RNG tracker: seed {seed} or state {name!r} is already in use")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        """Run the body with the CPU generator set to the named state, then restore it."""
        if name not in self.states_:
            raise ValueError(f"RNG tracker: state {name!r} was never added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _cpu_get_rng_state(*args, **kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, *args, **kwargs) -> None:
    torch.set_rng_state(new_state)


def install_cpu_rng_tracker(seed: int, tp_rank: int) -> None:
    """Replace Megatron-core's CUDA RNG tracker with the CPU one and seed it.

    The model-parallel state differs per tensor-parallel rank (as Megatron seeds it:
    seed + 2718 + tp_rank); the default generator gets `seed` on every rank.
    """
    mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # Megatron's checkpoint reads "the CUDA state" directly; on CPU it is the CPU state.
    mcore_random._get_cuda_rng_state = _cpu_get_rng_state
    mcore_random._set_cuda_rng_state = _cpu_set_rng_state
    torch.manual_seed(seed)
    mcore_random._CUDA_RNG_STATE_TRACKER.add(
        mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank
    )
