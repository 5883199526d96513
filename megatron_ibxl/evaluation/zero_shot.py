"""Zero-shot classification: a classifier from class names and prompt templates.

Shapes: `C` classes, `T` templates, `n` images of this rank's share, `d` the shared
embedding width.

The weight of class c is the L2-normalised mean over templates of the L2-normalised text
embeddings of its prompts (Radford et al. 2021, "Learning Transferable Visual Models From
Natural Language Supervision", section 3.1.4, prompt ensembling). An image's logits are its
embedding times every class weight.

Ties count against the image: the true class is at rank r when r other classes score at
least as high, and the image is correct at k when r < k. So a model whose embeddings are
all equal scores 0, not 1, and the result does not depend on how ranks split the work.
Metric names follow the CLIP benchmark: `acc1`, `acc5` (fractions of images) and
`mean_per_class_recall` (top-1 recall averaged over the classes that have images).
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn.functional as F

from megatron_ibxl.errors import DataError
from megatron_ibxl.evaluation.embed import (
    EvalShard,
    EvalTowers,
    assemble_rows,
    embed_image_share,
    embed_texts,
    embedding_width,
)
from megatron_ibxl.evaluation.formats import ClassificationSet, fill_template

logger = logging.getLogger(__name__)


def build_classifier(
    class_names: list[str],
    templates: list[str],
    towers: EvalTowers,
    shard: EvalShard,
    batch_size: int,
) -> torch.Tensor:
    """Class weights float32 [C, d], replicated on every rank.

    Each data-parallel rank embeds the prompts of its share of the classes; the shares are
    assembled over the group.
    """
    span = shard.span(len(class_names))
    num_templates = len(templates)
    prompts = [
        fill_template(t, name) for name in class_names[span.start : span.stop] for t in templates
    ]
    calls = math.ceil(shard.share_size(len(class_names)) * num_templates / batch_size)
    text_emb = embed_texts(prompts, towers, shard, batch_size, calls)  # [c * T, d]

    weights = torch.empty(0, 0, device=shard.device)
    if len(span):
        per_prompt = F.normalize(text_emb, dim=-1).view(len(span), num_templates, -1)  # [c, T, d]
        weights = F.normalize(per_prompt.mean(dim=1), dim=-1)  # [c, T, d] -> [c, d]
    width = embedding_width(weights, shard)
    positions = torch.arange(span.start, span.stop, device=shard.device)
    classifier, _ = assemble_rows(weights, positions, len(class_names), width, shard)
    return classifier  # [C, d]


def true_class_rank(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """int64 [n]: how many other classes score at least as high as the true one.

    logits float [n, C], labels int64 [n]. A tie with the true class counts against it.
    """
    true_logit = logits.gather(1, labels[:, None])  # [n, 1]
    return (logits >= true_logit).sum(dim=1) - 1  # the true class itself is not counted


def classify(
    dataset: ClassificationSet,
    classifier: torch.Tensor,
    towers: EvalTowers,
    shard: EvalShard,
    batch_size: int,
) -> dict[str, float | int]:
    """Top-1, top-5 and mean per-class recall of the images of `dataset`.

    Returns the metrics with counts (num_images evaluated, images_unreadable, ...), the
    same on every rank. Raises DataError when no image of the set decodes.
    """
    num_classes = classifier.shape[0]
    share = embed_image_share(dataset.paths, towers, shard, batch_size)
    labels_all = torch.tensor(dataset.labels, dtype=torch.long, device=shard.device)

    # Per-class totals on this rank: [3, C] rows images, top-1 hits, top-5 hits.
    totals = torch.zeros(3, num_classes, dtype=torch.long, device=shard.device)
    if share.positions.numel():
        labels = labels_all[share.positions]
        logits = share.image_emb @ classifier.T  # [n, d] @ [d, C] -> [n, C]
        rank = true_class_rank(logits, labels)
        totals[0] = torch.bincount(labels, minlength=num_classes)
        totals[1] = torch.bincount(labels[rank < 1], minlength=num_classes)
        totals[2] = torch.bincount(labels[rank < 5], minlength=num_classes)
    unreadable = torch.tensor([share.unreadable], device=shard.device)
    shard.sum(totals)  # [3, C] summed over dp
    shard.sum(unreadable)

    images, hits1, hits5 = totals
    evaluated = int(images.sum())
    if evaluated == 0:
        raise DataError(f"{dataset.root}: none of {len(dataset.paths)} images could be decoded")
    with_images = images > 0
    recall = hits1[with_images].double() / images[with_images].double()
    return {
        "acc1": float(hits1.sum()) / evaluated,
        "acc5": float(hits5.sum()) / evaluated,
        "mean_per_class_recall": float(recall.mean()),
        "num_images": evaluated,
        "num_classes": num_classes,
        "num_classes_with_images": int(with_images.sum()),
        "images_unreadable": int(unreadable.item()),
        "unknown_class_folders": len(dataset.unknown_folders),
        "images_in_unknown_folders": dataset.images_in_unknown_folders,
    }


def zero_shot_classification(
    dataset: ClassificationSet,
    templates: list[str],
    towers: EvalTowers,
    shard: EvalShard,
    batch_size: int,
) -> dict[str, float | int]:
    """Build the classifier from `dataset.class_names` and `templates`, then classify.

    Call on every rank of the job (the towers and the reductions are collective).
    """
    start = time.perf_counter()
    classifier = build_classifier(dataset.class_names, templates, towers, shard, batch_size)
    classifier_s = time.perf_counter() - start
    metrics = classify(dataset, classifier, towers, shard, batch_size)
    metrics["num_templates"] = len(templates)
    metrics["eval_time_s"] = round(time.perf_counter() - start, 3)
    logger.info(
        "zero-shot: classifier of %d classes x %d templates in %.1f s; %d images: "
        "acc1=%.4f acc5=%.4f mean_per_class_recall=%.4f",
        len(dataset.class_names),
        len(templates),
        classifier_s,
        metrics["num_images"],
        metrics["acc1"],
        metrics["acc5"],
        metrics["mean_per_class_recall"],
    )
    return metrics
