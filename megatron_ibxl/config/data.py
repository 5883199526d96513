"""Data section: shards, batch sizes, augmentation and tokenizer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class DataConfig:
    """Training data and the batch layout."""

    train_shards: str = ""
    """WebDataset shards: a brace pattern (`shards/train-{0000..0099}.tar`) or a text file
    listing one shard path per line. Relative paths resolve against the working directory,
    and relative entries of a list file against the list file's folder."""
    micro_batch: int = 32
    """Pairs per data-parallel rank per micro-batch (b)."""
    global_batch: int = 32768
    """Pairs per optimizer step: micro_batch * dp * accumulation. It is also the contrastive
    batch under `loss.negatives: global`."""
    accumulation: int | None = None
    """Micro-batches per optimizer step. Derived from global_batch / (micro_batch * dp) when
    null; when given it must agree with that."""
    seed: int = 0
    """Seed of the shard and sample order and of augmentation."""
    loader: Literal["auto", "dali", "torch"] = "auto"
    """Input pipeline: NVIDIA DALI, the pure PyTorch fallback, or `auto` (DALI when it
    imports)."""
    num_threads: int = 2
    """Decoder threads per rank."""
    tokenizer: str = ""
    """A `tokenizer.json`, or a folder with GPT-2 style `vocab.json` and `merges.txt`."""
    randaugment_n: int = 2
    """RandAugment: operations per image (0 disables it)."""
    randaugment_m: int = 9
    """RandAugment: magnitude, 0 to 30."""
    crop_scale_min: float = 0.9
    """Random resized crop: smallest area fraction kept, in (0, 1]."""
    mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    """Per-channel mean subtracted after scaling pixels to [0, 1]."""
    std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    """Per-channel standard deviation divided after the mean."""
    shuffle_window_shards: int = 0
    """Shards whose samples are shuffled together: each epoch permutes the shards, cuts them
    into windows of this many, and permutes the samples inside each window. 0 shuffles all
    samples of the epoch together. Smaller windows read from fewer shards at a time."""
    min_image_side: int = 8
    """Images with a side shorter than this many pixels are skipped (counted as too_small)."""
    max_aspect_ratio: float = 10.0
    """Images whose long side exceeds this many times the short side are skipped (counted as
    extreme_aspect)."""
    prefetch: int = 2
    """Micro-batches prepared ahead in a background thread per rank; 0 prepares each one
    inside next()."""
