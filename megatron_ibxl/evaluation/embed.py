"""Embedding an evaluation set in shares over the data-parallel group.

Shapes: `n` items of this rank's share, `N` items of the whole set, `d` the shared embedding
width, `c, H, W` image channels and side.

Each data-parallel rank embeds one contiguous share of the items (rank r holds items
[r * ceil(N / dp), (r + 1) * ceil(N / dp))). The tensor-parallel ranks of a group share a
dp rank, so they read the same items and run the towers together; their results are
identical. Shares are combined with sums and maxima over the data-parallel group only.

Every rank makes the same number of tower calls, whatever its share holds: with ZeRO-3
sharding a forward call gathers parameters over the data-parallel group, so a rank that
stopped early would leave its peers waiting in that gather. A rank whose share is exhausted
runs the towers on a placeholder (one black image, one empty text) and drops the result.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F


class ImageBatch(Protocol):
    """A batch of decoded images (megatron_ibxl.data.eval_images.EvalImageBatch)."""

    images: torch.Tensor
    """float32 [n, c, H, W], normalised."""
    indices: torch.Tensor
    """int64 [n], positions in the list of paths that was read."""


@dataclass
class EvalTowers:
    """What evaluation needs from a model: two embedding functions and an image reader.

    `towers_from_model` in entry.py builds one from a DualEncoder and a tokenizer; tests
    pass stand-ins whose right answers are known.
    """

    encode_images: Callable[[torch.Tensor], torch.Tensor]
    """images [n, c, H, W] -> L2-normalised [n, d]."""
    encode_texts: Callable[[list[str]], torch.Tensor]
    """n texts -> L2-normalised [n, d]."""
    read_images: Callable[[list[str], int], Iterable[ImageBatch]]
    """(paths, batch_size) -> batches in path order, one per `batch_size` paths; a path
    that is missing or does not decode is absent from every batch's `indices`."""
    image_shape: tuple[int, int, int]
    """(c, H, W) of the images the image tower takes (for the placeholder image)."""


@dataclass
class EvalShard:
    """This rank's place in the data-parallel group, and the reductions across it."""

    rank: int
    """Data-parallel rank."""
    size: int
    """Data-parallel size."""
    group: dist.ProcessGroup | None
    """The data-parallel process group (None in a single process)."""
    device: torch.device
    """Where embeddings and reductions live (the GPU under nccl)."""

    @classmethod
    def single(cls, device: str | torch.device = "cpu") -> EvalShard:
        """The whole set on this one process."""
        return cls(0, 1, None, torch.device(device))

    @classmethod
    def from_context(cls, ctx) -> EvalShard:
        """Shares over the data-parallel group of a ParallelContext."""
        return cls(ctx.dp_rank, ctx.dp, ctx.dp_group, ctx.device)

    def share_size(self, total: int) -> int:
        """Items per rank: ceil(total / size); the last ranks may hold fewer or none."""
        return math.ceil(total / self.size)

    def span(self, total: int) -> range:
        """This rank's contiguous positions among `total` items."""
        per_rank = self.share_size(total)
        start = min(self.rank * per_rank, total)
        return range(start, min(start + per_rank, total))

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the group, in place; returned for chaining."""
        if self.size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise maximum of `tensor` over the group, in place."""
        if self.size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)
        return tensor


@dataclass
class ImageShare:
    """Embeddings of the images of this rank's share that decoded."""

    positions: torch.Tensor
    """int64 [n]: position of each row in the full list of paths."""
    image_emb: torch.Tensor
    """float32 [n, d], L2-normalised."""
    unreadable: int
    """Paths of this share that were missing or did not decode."""


def _calls_per_rank(total: int, shard: EvalShard, batch_size: int, per_item: int = 1) -> int:
    """Tower calls every rank makes: enough for the largest share."""
    return math.ceil(shard.share_size(total) * per_item / batch_size)


def embed_image_share(
    paths: list[str], towers: EvalTowers, shard: EvalShard, batch_size: int
) -> ImageShare:
    """Read and embed this rank's share of `paths`, `batch_size` images per tower call."""
    span = shard.span(len(paths))
    calls = _calls_per_rank(len(paths), shard, batch_size)
    positions, rows, decoded, made = [], [], 0, 0
    for batch in towers.read_images(paths[span.start : span.stop], batch_size):
        images = batch.images.to(shard.device)
        if images.shape[0] == 0:  # every file of the batch failed: keep the call count
            images = _placeholder_image(towers, shard.device)
            towers.encode_images(images)
        else:
            rows.append(_as_embedding(towers.encode_images(images)))  # [n, c, H, W] -> [n, d]
            positions.append(batch.indices.to(torch.long) + span.start)
            decoded += images.shape[0]
        made += 1
    _check_calls(made, calls, "image")
    for _ in range(calls - made):
        towers.encode_images(_placeholder_image(towers, shard.device))

    if rows:
        return ImageShare(
            torch.cat(positions).to(shard.device), torch.cat(rows), len(span) - decoded
        )
    empty = torch.empty(0, dtype=torch.long, device=shard.device)
    return ImageShare(empty, torch.empty(0, 0, device=shard.device), len(span) - decoded)


def embed_texts(
    texts: list[str], towers: EvalTowers, shard: EvalShard, batch_size: int, calls: int
) -> torch.Tensor:
    """Embed `texts` (this rank's share) in `calls` tower calls of up to `batch_size`.

    Returns float32 [len(texts), d]. `calls` must be the same on every rank and at least
    ceil(len(texts) / batch_size); the extra calls embed a placeholder.
    """
    made = math.ceil(len(texts) / batch_size)
    _check_calls(made, calls, "text")
    rows = [
        _as_embedding(towers.encode_texts(texts[start : start + batch_size]))  # -> [b, d]
        for start in range(0, len(texts), batch_size)
    ]
    for _ in range(calls - made):
        towers.encode_texts([""])
    if rows:
        return torch.cat(rows).to(shard.device)
    return torch.empty(0, 0, device=shard.device)


def embed_text_share(
    texts: list[str], towers: EvalTowers, shard: EvalShard, batch_size: int
) -> tuple[range, torch.Tensor]:
    """(this rank's span of `texts`, its embeddings float32 [n, d])."""
    span = shard.span(len(texts))
    calls = _calls_per_rank(len(texts), shard, batch_size)
    return span, embed_texts(texts[span.start : span.stop], towers, shard, batch_size, calls)


def assemble_rows(
    rows: torch.Tensor, positions: torch.Tensor, total: int, width: int, shard: EvalShard
) -> tuple[torch.Tensor, torch.Tensor]:
    """Put every rank's rows in place: ([total, width] float32, present [total] bool).

    Shares are disjoint, so each rank fills its positions of a zero matrix and a sum over
    the group assembles the whole; adding zeros leaves every value exact.
    """
    full = torch.zeros(total, width, device=shard.device)
    present = torch.zeros(total, dtype=torch.int32, device=shard.device)
    if positions.numel():
        full[positions] = rows
        present[positions] = 1
    shard.sum(full)  # [total, width] summed over dp
    shard.sum(present)
    return full, present.bool()


def embedding_width(rows: torch.Tensor, shard: EvalShard) -> int:
    """d, agreed over the group (a rank with an empty share does not know it)."""
    width = torch.tensor([rows.shape[1] if rows.numel() else 0], device=shard.device)
    return int(shard.max(width).item())


def _as_embedding(emb: torch.Tensor) -> torch.Tensor:
    """float32, L2-normalised again (a no-op for the towers, a guard for bf16 output)."""
    return F.normalize(emb.detach().float(), dim=-1)


def _placeholder_image(towers: EvalTowers, device: torch.device) -> torch.Tensor:
    return torch.zeros(1, *towers.image_shape, device=device)


def _check_calls(made: int, calls: int, what: str) -> None:
    if made > calls:
        raise RuntimeError(
            f"{what} tower called {made} times on this rank but {calls} on its peers; the "
            "image reader must yield one batch per batch_size paths"
        )
