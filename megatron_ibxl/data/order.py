"""The global sample order: a function of the seed and the epoch, not of the layout.

Samples are numbered 0..N-1 in shard-list order, then member order (the index of
`shards.py`). Epoch e orders them like this:

1. the shards are permuted with a generator seeded by (seed, e);
2. the permuted shard list is cut into windows of `window_shards` shards (0: one window
   holding every shard);
3. the samples of window w, taken shard by shard, are permuted with a generator seeded by
   (seed, e, w);
4. the epoch's order is the windows one after another.

Epochs follow each other into one stream: stream position g holds sample
`order_e[g - e * N]` with e = g // N. The data-parallel layout only decides which positions
a rank reads (see `loader.py`), so any layout can continue from a stream position.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np


class SampleOrder:
    """Maps stream positions to sample numbers, computing one window's permutation at a
    time (a few are cached), so memory does not grow with the dataset."""

    def __init__(self, shard_sizes: Sequence[int], seed: int, window_shards: int = 0):
        """Args:
        shard_sizes: usable samples per shard, in shard-list order.
        seed: non-negative seed of the order (data.seed).
        window_shards: shards per shuffle window; 0 for a single window.
        """
        self._sizes = np.asarray(shard_sizes, dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(self._sizes)[:-1]]).astype(np.int64)
        self._seed = seed
        self._window = window_shards if window_shards > 0 else max(1, len(self._sizes))
        self.samples_per_epoch = int(self._sizes.sum())
        """N: usable samples in one epoch."""
        self._epoch_plans: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._windows: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's shard permutation and the first epoch position of each window."""
        if epoch not in self._epoch_plans:
            shards = np.random.default_rng([self._seed, epoch]).permutation(len(self._sizes))
            window_sizes = np.add.reduceat(
                self._sizes[shards], np.arange(0, len(shards), self._window)
            )
            starts = np.concatenate([[0], np.cumsum(window_sizes)]).astype(np.int64)
            self._epoch_plans[epoch] = (shards, starts)
            if len(self._epoch_plans) > 2:
                self._epoch_plans.popitem(last=False)
        return self._epoch_plans[epoch]

    def _window_order(self, epoch: int, window: int) -> np.ndarray:
        """Sample numbers of one window of one epoch, in their shuffled order."""
        key = (epoch, window)
        if key not in self._windows:
            shards, _ = self._plan(epoch)
            members = shards[window * self._window : (window + 1) * self._window]
            samples = np.concatenate(
                [np.arange(self._starts[k], self._starts[k] + self._sizes[k]) for k in members]
            )
            rng = np.random.default_rng([self._seed, epoch, window])
            self._windows[key] = samples[rng.permutation(len(samples))]
            if len(self._windows) > 8:
                self._windows.popitem(last=False)
        return self._windows[key]

    def samples_at(self, positions: np.ndarray) -> np.ndarray:
        """Sample numbers at stream positions (int64 array of any shape)."""
        positions = np.asarray(positions, dtype=np.int64)
        flat = positions.reshape(-1)
        result = np.empty_like(flat)
        epochs, offsets = np.divmod(flat, self.samples_per_epoch)
        for i, (epoch, offset) in enumerate(zip(epochs.tolist(), offsets.tolist())):
            _, starts = self._plan(epoch)
            window = int(np.searchsorted(starts, offset, side="right")) - 1
            result[i] = self._window_order(epoch, window)[offset - starts[window]]
        return result.reshape(positions.shape)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The full order of one epoch (N sample numbers); for tests and tools."""
        start = epoch * self.samples_per_epoch
        return self.samples_at(np.arange(start, start + self.samples_per_epoch))
