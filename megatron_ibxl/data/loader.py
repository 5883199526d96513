"""Training batches of image-caption pairs, resumable under any data-parallel layout.

Shape letters: b pairs per data-parallel rank per micro-batch (data.micro_batch), c image
channels, H = W = model.vision.image_size, L = model.text.context_length.

How the global order maps to ranks
----------------------------------
`order.py` defines one stream of samples, epoch after epoch, from data.seed alone. Every
micro-batch consumes the next `b * dp` stream positions, and data-parallel rank r takes the
r-th block of b of them:

    micro-batch k after stream position g0, rank r:  positions g0 + k*b*dp + r*b + [0, b)

Tensor- and pipeline-parallel ranks of one data-parallel group pass the same dp_rank and
so read the same samples. An optimizer step of `accumulation` micro-batches consumes
`global_batch = b * dp * accumulation` positions under every layout, so the stream position
at a step boundary does not depend on the layout, and a run saved with 2 data-parallel
ranks continues with 4 or 1 without repeating or losing a sample. The position is saved as
`{"epoch": g // N, "sample_index": g % N}` (N usable samples per epoch): the number of
samples of the epoch consumed by all data-parallel ranks together. An epoch's last
micro-batch may run into the next epoch; no sample is dropped at the boundary.

Each sample is read by exactly one data-parallel rank per epoch, straight from its byte
range in the shard. Shards are therefore divided among ranks sample by sample, not file
by file: a file-level split would tie the order to the number of ranks. Set
data.shuffle_window_shards to bound how many shards are read from at a time.

Bad samples
-----------
Samples that are unusable from their bytes (see `shards.py`) are left out of the index
before the order is made, so every rank skips the same ones and the positions stay exact.
An image that passes those checks yet fails in the decoder is replaced in its micro-batch
by a copy of another pair of the same micro-batch, so the batch keeps b pairs and the
positions stay exact; it is counted in `stats.decode_errors` and logged with its shard.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from megatron_ibxl.config import RunConfig
from megatron_ibxl.data.backends import build_backend, select_loader
from megatron_ibxl.data.order import SampleOrder
from megatron_ibxl.data.shards import DatasetIndex, build_index, expand_shards, read_caption
from megatron_ibxl.data.tokenizer import TextTokenizer
from megatron_ibxl.errors import DataError

logger = logging.getLogger(__name__)


@dataclass
class Batch:
    """One micro-batch of b image-caption pairs for one data-parallel rank."""

    images: torch.Tensor
    """float32 [b, c, H, W], normalised; on the GPU when DALI decodes there."""
    tokens: torch.Tensor
    """int64 [b, L]: caption ids, end-of-text at lengths - 1, end-of-text padding."""
    lengths: torch.Tensor
    """int64 [b]: real tokens per caption including end-of-text, 1..L."""
    keys: list[str]
    """The b sample keys (as in the shards)."""


@dataclass
class LoaderStats:
    """Counters of a training loader. Index counts are dataset-wide (the same on every rank);
    decode errors and micro-batches are this rank's."""

    backend: str
    samples_per_epoch: int
    samples_skipped: int
    """Samples left out of the index, all reasons together."""
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    skipped_by_shard: dict[str, int] = field(default_factory=dict)
    decode_errors: int = 0
    """Images of this rank replaced in their micro-batch after a decoder error."""
    micro_batches: int = 0
    """Micro-batches returned by next() on this rank."""


class TrainLoader:
    """An endless iterator of `Batch`es for one data-parallel rank (see module doc)."""

    def __init__(
        self,
        config: RunConfig,
        dp_rank: int,
        dp_size: int,
        tokenizer: TextTokenizer,
        index: DatasetIndex,
        start: int,
    ):
        self._config = config
        self._dp_rank, self._dp_size = dp_rank, dp_size
        self._micro_batch = config.data.micro_batch
        self._tokenizer = tokenizer
        self._index = index
        self._start = start
        self._order = SampleOrder(
            [len(shard.keys) for shard in index.shards],
            config.data.seed,
            config.data.shuffle_window_shards,
        )
        self.stats = LoaderStats(
            backend=select_loader(config.data.loader),
            samples_per_epoch=index.num_samples,
            samples_skipped=index.skipped.total,
            skipped_by_reason=dict(index.skipped.by_reason),
            skipped_by_shard=dict(index.skipped.by_shard),
        )
        self._backend = None
        self._handles: dict[str, object] = {}
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, config.data.prefetch))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cuda_device = torch.cuda.current_device() if torch.cuda.is_available() else None

    @property
    def position(self) -> int:
        """Stream position after the micro-batches returned so far, all ranks together."""
        consumed = self.stats.micro_batches * self._micro_batch * self._dp_size
        return self._start + consumed

    def state_dict(self) -> dict:
        """The data position to save with a checkpoint, the same on every rank when all ranks
        have returned the same number of micro-batches. Pass it back as `position=`."""
        epoch, sample_index = divmod(self.position, self._index.num_samples)
        return {
            "epoch": epoch,
            "sample_index": sample_index,
            "samples_per_epoch": self._index.num_samples,
            "seed": self._config.data.seed,
        }

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> Batch:
        if self._config.data.prefetch == 0:
            batch = self._make_batch(self.stats.micro_batches)
        else:
            batch = self._next_prefetched()
        self.stats.micro_batches += 1
        return batch

    def _next_prefetched(self) -> Batch:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._produce, name=f"train-data-dp{self._dp_rank}", daemon=True
            )
            self._thread.start()
        while True:
            try:
                item = self._queue.get(timeout=1.0)
            except queue.Empty:
                if not self._thread.is_alive():
                    raise DataError("training data thread stopped without a batch") from None
                continue
            if isinstance(item, BaseException):
                raise item
            return item

    def _produce(self) -> None:
        """Background thread: make micro-batches in order and queue them."""
        if self._cuda_device is not None:
            torch.cuda.set_device(self._cuda_device)
        number = self.stats.micro_batches
        while not self._stop.is_set():
            try:
                item: Batch | BaseException = self._make_batch(number)
            except BaseException as exc:  # handed to the consumer, which raises it
                item = exc
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.5)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return
            number += 1

    def _read(self, samples: np.ndarray) -> tuple[list[bytes], list[str], list[str], list[str]]:
        """Image bytes, captions, keys and shard paths of sample numbers."""
        encoded, captions, keys, paths = [], [], [], []
        for sample in samples.tolist():
            shard, row = self._index.locate(sample)
            handle = self._handles.get(shard.path)
            if handle is None:
                handle = self._handles[shard.path] = open(shard.path, "rb")
            offset, size = shard.image_ranges[row].tolist()
            handle.seek(offset)
            encoded.append(handle.read(size))
            captions.append(read_caption(handle, *shard.caption_ranges[row].tolist()))
            keys.append(shard.keys[row])
            paths.append(shard.path)
        return encoded, captions, keys, paths

    def _make_batch(self, number: int) -> Batch:
        """Micro-batch `number` of this rank (counted from the start position)."""
        b, dp = self._micro_batch, self._dp_size
        first = self._start + number * b * dp + self._dp_rank * b
        positions = np.arange(first, first + b, dtype=np.int64)
        self._log_epoch_start(number)

        encoded, captions, keys, paths = self._read(self._order.samples_at(positions))
        if self._backend is None:
            seed = np.random.SeedSequence([self._config.data.seed, self._dp_rank, self._start])
            self._backend = build_backend("train", self._config, b, int(seed.generate_state(1)[0]))
        decoded = self._backend(encoded, seeds=positions.tolist())
        rows = self._rows_after_failures(decoded.ok, decoded.failed, keys, paths)

        # images: [n_ok, c, H, W] -> [b, c, H, W], failed rows filled with copies
        images = decoded.images[torch.tensor(rows, dtype=torch.long, device=decoded.images.device)]
        chosen = [decoded.ok[row] for row in rows]
        context = self._config.model.text.context_length
        tokens, lengths = self._tokenizer.encode_batch([captions[i] for i in chosen], context)
        return Batch(images, tokens, lengths, [keys[i] for i in chosen])

    def _log_epoch_start(self, number: int) -> None:
        """On dp rank 0, note when micro-batch `number` (all ranks together) reaches a new
        epoch."""
        n, span = self._index.num_samples, self._micro_batch * self._dp_size
        first = self._start + number * span
        if self._dp_rank == 0 and number > 0 and (first + span - 1) // n > (first - 1) // n:
            logger.info("train data: epoch %d begins", (first + span - 1) // n)

    def _rows_after_failures(
        self, ok: list[int], failed: list[int], keys: list[str], paths: list[str]
    ) -> list[int]:
        """For each of the b inputs, the row of the decoded images to use: its own, or for a
        failed one a copy of another input's row."""
        if not ok:
            raise DataError(
                f"shard {paths[0]}: no image of a micro-batch decoded (keys {keys[:4]} ...); "
                "the decoder or the shards are broken"
            )
        row_of = {position: row for row, position in enumerate(ok)}
        rows = []
        for position in range(len(keys)):
            if position in row_of:
                rows.append(row_of[position])
                continue
            replacement = position % len(ok)  # the row of input ok[replacement]
            self.stats.decode_errors += 1
            logger.warning(
                "shard %s: sample %s failed to decode; replaced in its micro-batch by %s",
                paths[position],
                keys[position],
                keys[ok[replacement]],
            )
            rows.append(replacement)
        return rows

    def close(self) -> None:
        """Stop the prefetch thread and release files and the pipeline."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10.0)
            self._thread = None
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()
        if self._backend is not None:
            self._backend.close()
            self._backend = None


def _start_position(position: dict | None, index: DatasetIndex, seed: int) -> int:
    """Stream position from a saved `state_dict()`, checked against the data."""
    if position is None:
        return 0
    n = index.num_samples
    saved_n = position.get("samples_per_epoch", n)
    if saved_n != n:
        raise DataError(
            f"data position {position}: saved with {saved_n} usable samples per epoch, but "
            f"data.train_shards now gives {n}; resume with the shards it was saved with"
        )
    try:
        epoch, sample_index = int(position["epoch"]), int(position["sample_index"])
    except (KeyError, TypeError, ValueError):
        raise DataError(
            f"data position {position}: needs integer 'epoch' and 'sample_index'"
        ) from None
    if epoch < 0 or not 0 <= sample_index < n:
        raise DataError(f"data position {position}: needs epoch >= 0, 0 <= sample_index < {n}")
    if position.get("seed", seed) != seed:
        logger.warning(
            "data position saved with data.seed=%s, resuming with data.seed=%d: the order of "
            "the rest of the epoch changes, so samples may repeat or be missed",
            position.get("seed"),
            seed,
        )
    return epoch * n + sample_index


def build_train_loader(
    config: RunConfig,
    dp_rank: int,
    dp_size: int,
    tokenizer: TextTokenizer,
    position: dict | None = None,
) -> TrainLoader:
    """The training loader of one data-parallel rank.

    Args:
        config: the run; reads data.* and model.vision.image_size, model.text.context_length.
        dp_rank, dp_size: this rank's data-parallel coordinate and the data-parallel size.
        tokenizer: turns captions into [b, L] ids.
        position: a `state_dict()` saved earlier (under any dp_size) to continue from.

    Raises DataError for shards that cannot be opened, no usable sample, or a position that
    does not fit the data.
    """
    data = config.data
    shards = expand_shards(data.train_shards)
    index = build_index(shards, data.min_image_side, data.max_aspect_ratio)
    start = _start_position(position, index, data.seed)
    loader = TrainLoader(config, dp_rank, dp_size, tokenizer, index, start)
    if dp_rank == 0:
        logger.info(
            "train data: %d samples per epoch in %d shards (%d skipped: %s), %s loader, "
            "starting at epoch %d sample %d",
            index.num_samples,
            len(shards),
            index.skipped.total,
            dict(index.skipped.by_reason) or "none",
            loader.stats.backend,
            start // index.num_samples,
            start % index.num_samples,
        )
        if index.num_samples < data.global_batch:
            logger.warning(
                "train data: %d usable samples per epoch, fewer than data.global_batch=%d: "
                "every contrastive batch holds repeated pairs, so a pair is also scored "
                "against copies of itself; add shards or lower data.global_batch",
                index.num_samples,
                data.global_batch,
            )
    return loader
