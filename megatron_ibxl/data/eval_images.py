"""Evaluation images from files: resize, centre crop, normalise, in batches.

The zero-shot evaluation reads image files (an ImageFolder tree, COCO images) through
`iter_eval_images`, which uses the DALI evaluation pipeline when `data.loader` resolves
to DALI and the PIL fallback otherwise. Files that are missing or do not decode are
reported by index, never raised, so one bad file does not stop an evaluation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_ibxl.config import RunConfig
from megatron_ibxl.data.backends import build_backend
from megatron_ibxl.data.shards import check_image_bytes

logger = logging.getLogger(__name__)


@dataclass
class EvalImageBatch:
    """One batch of evaluation images with their positions in the input list."""

    images: torch.Tensor
    """float32 [n, c, H, W]: centre-cropped to model.vision.image_size, normalised with
    data.mean / data.std; on the GPU when DALI decodes there, else on the CPU. n may be 0
    when every file of the batch failed."""
    indices: torch.Tensor
    """int64 [n]: position in `paths` of each row of `images`, increasing."""
    failed: list[int] = field(default_factory=list)
    """Positions in `paths` (of this batch's span) that were missing or did not decode."""


def _read(path: str) -> tuple[bytes | None, str]:
    """The file's bytes, or None and why not."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return None, exc.strerror or "unreadable"
    if check_image_bytes(data[:65536], data[-16:]):
        return None, "corrupt image"
    return data, ""


def iter_eval_images(
    paths: list[str], config: RunConfig, batch_size: int
) -> Iterator[EvalImageBatch]:
    """Decode `paths` in order, `batch_size` files per batch (the last may be shorter).

    Every span of `batch_size` paths yields exactly one batch, so `indices` and `failed`
    of all batches together cover every position of `paths` once.
    """
    backend = build_backend("eval", config, max(1, batch_size), config.data.seed)
    try:
        for start in range(0, len(paths), batch_size):
            encoded, positions, failed, reasons = [], [], [], []
            for position in range(start, min(start + batch_size, len(paths))):
                data, reason = _read(paths[position])
                if data is None:
                    failed.append(position)
                    reasons.append(f"{paths[position]} ({reason})")
                else:
                    encoded.append(data)
                    positions.append(position)

            decoded = backend(encoded)
            for row in decoded.failed:
                failed.append(positions[row])
                reasons.append(f"{paths[positions[row]]} (decoder error)")
            if reasons:
                logger.warning("eval images: skipped %d: %s", len(reasons), ", ".join(reasons))
            indices = torch.tensor([positions[row] for row in decoded.ok], dtype=torch.long)
            yield EvalImageBatch(decoded.images, indices, sorted(failed))
    finally:
        backend.close()
