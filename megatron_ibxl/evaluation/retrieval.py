"""Image-text retrieval: recall@k in both directions.

Shapes: `G` images in the gallery (every rank holds all of them), `n` captions of this
rank's share, `d` the shared embedding width.

Metric names follow the CLIP benchmark, where the name says what is retrieved:

- `image_retrieval_recall@k`: text -> image. For each caption, is its image among the k
  images most similar to it? Averaged over captions.
- `text_retrieval_recall@k`: image -> text. For each image, is at least one of its
  captions among the k captions most similar to it? Averaged over images.

Ties count against the query: the answer is at rank r when r wrong items score at least as
high as the best right one, and a hit at k when r < k. The counts need no sorting, so they
combine over ranks exactly: the image embeddings are gathered to every rank, each rank
scores its own captions, and for image -> text the best right score (a maximum) and then
the number of wrong captions at or above it (a sum) are reduced over the group.
"""

from __future__ import annotations

import logging
import time

import torch

from megatron_ibxl.errors import DataError
from megatron_ibxl.evaluation.embed import (
    EvalShard,
    EvalTowers,
    assemble_rows,
    embed_image_share,
    embed_text_share,
    embedding_width,
)
from megatron_ibxl.evaluation.formats import RetrievalSet

logger = logging.getLogger(__name__)

RECALL_AT = (1, 5, 10)
"""The k of recall@k."""

_CHUNK = 4096
"""Captions scored at once: bounds the [G, chunk] score matrix (5,000 x 4,096 floats)."""


def text_to_image_ranks(
    text_emb: torch.Tensor, text_image: torch.Tensor, image_emb: torch.Tensor
) -> torch.Tensor:
    """int64 [n]: for each caption, how many other images score at least as high as its own.

    text_emb [n, d], text_image int64 [n] (gallery column of each caption's image),
    image_emb [G, d].
    """
    scores = text_emb @ image_emb.T  # [n, d] @ [d, G] -> [n, G]
    right = scores.gather(1, text_image[:, None])  # [n, 1]
    return (scores >= right).sum(dim=1) - 1  # its own image is not counted


def _image_to_text_partials(
    text_emb: torch.Tensor, text_image: torch.Tensor, image_emb: torch.Tensor, best: torch.Tensor
) -> torch.Tensor:
    """Wrong captions of this share scoring at least `best` for each image: int64 [G]."""
    scores = image_emb @ text_emb.T  # [G, d] @ [d, n] -> [G, n]
    gallery = torch.arange(image_emb.shape[0], device=scores.device)
    right = gallery[:, None] == text_image[None, :]  # [G, n]
    return ((scores >= best[:, None]) & ~right).sum(dim=1)


def _best_right_score(
    text_emb: torch.Tensor, text_image: torch.Tensor, image_emb: torch.Tensor
) -> torch.Tensor:
    """float32 [G]: the highest score of each image's own captions in this share (-inf if
    it has none here)."""
    scores = image_emb @ text_emb.T  # [G, d] @ [d, n] -> [G, n]
    gallery = torch.arange(image_emb.shape[0], device=scores.device)
    right = gallery[:, None] == text_image[None, :]  # [G, n]
    return scores.masked_fill(~right, float("-inf")).max(dim=1).values


def _chunks(n: int):
    return [slice(start, min(start + _CHUNK, n)) for start in range(0, n, _CHUNK)]


def retrieval_recall(
    dataset: RetrievalSet, towers: EvalTowers, shard: EvalShard, batch_size: int
) -> dict[str, float | int]:
    """Recall@1/5/10 in both directions over `dataset`, the same on every rank.

    Images that do not decode are left out of the gallery with their captions, and
    counted; the caption counts cover the evaluated images only (see
    `RetrievalSet.evaluated_counts`). Call on every rank of the job. Raises DataError when
    no image decodes.
    """
    start = time.perf_counter()
    share = embed_image_share(dataset.image_paths, towers, shard, batch_size)
    width = embedding_width(share.image_emb, shard)
    image_emb_all, decoded = assemble_rows(
        share.image_emb, share.positions, len(dataset.image_paths), width, shard
    )  # [N, d], [N]
    if not bool(decoded.any()):
        raise DataError(f"{dataset.annotation_file}: none of the images could be decoded")

    # Keep decoded images and their captions; every rank derives the same lists.
    column = torch.cumsum(decoded.long(), 0) - 1  # gallery column of each kept image
    image_emb = image_emb_all[decoded]  # [G, d]
    caption_image = torch.tensor(dataset.caption_image, device=shard.device)
    keep = decoded[caption_image]
    captions = [c for c, k in zip(dataset.captions, keep.tolist()) if k]
    text_image_all = column[caption_image[keep]]

    span, text_emb = embed_text_share(captions, towers, shard, batch_size)  # [n, d]
    text_image = text_image_all[span.start : span.stop]
    hits = _recall_hits(text_emb, text_image, image_emb, shard)
    num_images, num_captions = int(image_emb.shape[0]), len(captions)

    metrics: dict[str, float | int] = {}
    for i, k in enumerate(RECALL_AT):
        metrics[f"image_retrieval_recall@{k}"] = float(hits[0, i]) / num_captions
    for i, k in enumerate(RECALL_AT):
        metrics[f"text_retrieval_recall@{k}"] = float(hits[1, i]) / num_images
    metrics.update(
        num_images=num_images,
        num_captions=num_captions,
        **dataset.evaluated_counts(decoded.tolist()),
        eval_time_s=round(time.perf_counter() - start, 3),
    )
    logger.info(
        "retrieval: %d images, %d captions; text->image R@1/5/10 = %s; image->text = %s",
        num_images,
        num_captions,
        "/".join(f"{metrics[f'image_retrieval_recall@{k}']:.4f}" for k in RECALL_AT),
        "/".join(f"{metrics[f'text_retrieval_recall@{k}']:.4f}" for k in RECALL_AT),
    )
    return metrics


def _recall_hits(
    text_emb: torch.Tensor, text_image: torch.Tensor, image_emb: torch.Tensor, shard: EvalShard
) -> torch.Tensor:
    """int64 [2, len(RECALL_AT)]: hits of text -> image (row 0) and image -> text (row 1),
    summed over the group."""
    ks = torch.tensor(RECALL_AT, device=image_emb.device)
    hits = torch.zeros(2, len(RECALL_AT), dtype=torch.long, device=image_emb.device)
    num_images = image_emb.shape[0]

    # Text -> image: each caption's rank is local to its rank.
    for part in _chunks(text_emb.shape[0]):
        ranks = text_to_image_ranks(text_emb[part], text_image[part], image_emb)  # [n]
        hits[0] += (ranks[:, None] < ks[None, :]).sum(dim=0)

    # Image -> text: the best right caption may live on another rank, so reduce its score
    # first (max), then count wrong captions at or above it everywhere (sum).
    best = torch.full((num_images,), float("-inf"), device=image_emb.device)
    for part in _chunks(text_emb.shape[0]):
        best = torch.maximum(best, _best_right_score(text_emb[part], text_image[part], image_emb))
    shard.max(best)  # [G] max over dp
    wrong_above = torch.zeros(num_images, dtype=torch.long, device=image_emb.device)
    for part in _chunks(text_emb.shape[0]):
        wrong_above += _image_to_text_partials(text_emb[part], text_image[part], image_emb, best)
    shard.sum(wrong_above)  # [G] summed over dp
    if shard.rank == 0:  # count the images once; the sum below adds every rank's hits
        hits[1] = (wrong_above[:, None] < ks[None, :]).sum(dim=0)
    return shard.sum(hits)  # [2, K] summed over dp
