"""WebDataset shards as img2dataset writes them: listing, indexing and reading samples.

A shard is a tar file whose members are grouped into samples by key: `KEY.jpg` (or
`.jpeg`, `.png`, `.webp`), `KEY.txt` (the caption) and optionally `KEY.json` (metadata,
not used here). The key is the member name up to the first dot of its last path part.

`index_shards` scans each shard's tar headers once and keeps, for every usable sample, where
its image and caption bytes lie, so samples can be read in any order. Unusable samples are
left out of the index, counted by reason and logged with the shard name:

| reason | what |
| --- | --- |
| `missing_caption` | an image without a `.txt` member |
| `missing_image` | a caption without an image member |
| `empty_caption` | a caption that is empty or only white space |
| `corrupt_image` | image bytes whose header does not parse, or a JPEG/PNG cut short |
| `too_small` | an image side below `min_image_side` pixels |
| `extreme_aspect` | a long side more than `max_aspect_ratio` times the short side |
| `truncated_shard` | the members of a tar that ends inside a member |

Because the index depends only on the bytes of the shards, every rank builds the same one,
which is what lets the sample order be defined independently of the data-parallel layout
(see `order.py`). A shard that cannot be opened at all raises DataError naming it.

Note: building the index reads every caption and the header of every image, on every rank,
at start-up. That takes well under a second per small shard; at the scale of billions of
pairs it would take hours, and an index written once next to the shards would be needed
(not implemented).
"""

from __future__ import annotations

import io
import itertools
import logging
import math
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from megatron_ibxl.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
"""Member extensions read as the image of a sample, in order of preference."""

_HEADER_BYTES = 65536
"""Bytes read from the start of an image to parse its header (the whole image if smaller)."""

_BRACE = re.compile(r"\{([^{}]*)\}")


def _expand_braces(pattern: str) -> list[str]:
    """`a-{00..02}.tar` -> a-00.tar, a-01.tar, a-02.tar; `{x,y}` lists alternatives."""
    parts: list[list[str]] = []
    last = 0
    for match in _BRACE.finditer(pattern):
        parts.append([pattern[last : match.start()]])
        body = match.group(1)
        range_match = re.fullmatch(r"(\d+)\.\.(\d+)", body)
        if range_match:
            first, end = range_match.groups()
            width = len(first) if first.startswith("0") else 0
            step = 1 if int(end) >= int(first) else -1
            values = range(int(first), int(end) + step, step)
            parts.append([str(v).zfill(width) for v in values])
        else:
            parts.append(body.split(","))
        last = match.end()
    parts.append([pattern[last:]])
    return ["".join(choice) for choice in itertools.product(*parts)]


def expand_shards(spec: str) -> list[str]:
    """Shard paths from a brace pattern or from a list file (one path a line).

    A list file is any existing file that is not a `.tar`; blank lines and lines starting
    with `#` are ignored, and relative entries resolve against the list file's folder.
    Raises DataError when the spec is empty or names no shard.
    """
    spec = spec.strip()
    if not spec:
        raise DataError("data.train_shards is empty; give a brace pattern or a list file")
    path = Path(spec)
    if path.is_file() and not spec.endswith(".tar"):
        lines = path.read_text().splitlines()
        entries = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
        shards = [str(path.parent / entry) for entry in entries]
    else:
        shards = _expand_braces(spec)
    if not shards:
        raise DataError(f"data.train_shards={spec}: names no shard")
    return shards


@dataclass
class SkipCounts:
    """Samples left out of the index, by reason and by shard, with a few keys as examples."""

    by_reason: Counter = field(default_factory=Counter)
    by_shard: Counter = field(default_factory=Counter)
    examples: list[tuple[str, str, str]] = field(default_factory=list)
    """Up to 100 (shard, key, reason) triples, the first ones found."""

    @property
    def total(self) -> int:
        """Samples skipped for any reason."""
        return sum(self.by_reason.values())

    def add(self, shard: str, key: str, reason: str) -> None:
        """Count one skipped sample."""
        self.by_reason[reason] += 1
        self.by_shard[shard] += 1
        if len(self.examples) < 100:
            self.examples.append((shard, key, reason))

    def merge(self, other: SkipCounts) -> None:
        """Add another shard's counts to these."""
        self.by_reason.update(other.by_reason)
        self.by_shard.update(other.by_shard)
        self.examples.extend(other.examples[: max(0, 100 - len(self.examples))])


@dataclass
class ShardIndex:
    """The usable samples of one shard, in member order: byte ranges of image and caption."""

    path: str
    keys: list[str]
    image_ranges: np.ndarray
    """int64 [samples, 2]: offset and size of each image in the tar file."""
    caption_ranges: np.ndarray
    """int64 [samples, 2]: offset and size of each caption."""
    skipped: SkipCounts


def _open_shard(path: str) -> tuple[tarfile.TarFile, int]:
    """Open a shard as a tar file, or raise DataError naming it."""
    try:
        size = os.path.getsize(path)
        handle = open(path, "rb")
    except OSError as exc:
        raise DataError(f"shard {path}: cannot be opened: {exc.strerror or exc}") from None
    try:
        return tarfile.open(fileobj=handle, mode="r:"), size
    except (tarfile.TarError, OSError, EOFError) as exc:
        handle.close()
        raise DataError(f"shard {path}: cannot be opened as a tar file: {exc}") from None


def shard_problem(path: str) -> str | None:
    """Why the shard at `path` cannot be opened as a tar file (one line), or None when its
    first header reads. Reads one 512-byte block: a check for before training, not a scan."""
    try:
        tar, _ = _open_shard(path)
    except DataError as exc:
        return str(exc)
    tar.fileobj.close()
    return None


def _scan_members(path: str) -> tuple[dict[str, dict[str, tuple[int, int]]], bool]:
    """Members grouped by key -> extension -> (offset, size), and whether the tar is cut."""
    tar, file_size = _open_shard(path)
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    truncated = False
    with tar, tar.fileobj:
        while True:
            try:
                info = tar.next()
            except (tarfile.TarError, OSError, EOFError):
                truncated = True
                break
            if info is None:
                # A whole tar ends with two zero blocks of 512 bytes; fewer bytes left means
                # the file stops inside a member header or right after a member.
                truncated = file_size - tar.offset < 1024
                break
            if not info.isfile():
                continue
            if info.offset_data + info.size > file_size:
                truncated = True
                break
            directory, _, base = info.name.rpartition("/")
            stem, dot, extension = base.partition(".")
            if not dot:
                continue
            key = f"{directory}/{stem}" if directory else stem
            samples.setdefault(key, {})[extension.lower()] = (info.offset_data, info.size)
    return samples, truncated


def check_image_bytes(
    head: bytes, tail: bytes, min_side: int = 1, max_aspect: float = math.inf
) -> str:
    """The skip reason for an image from its first bytes (enough for the header) and its
    last 16 bytes, or '' when it looks usable."""
    try:
        with Image.open(io.BytesIO(head)) as image:
            width, height = image.size
            kind = image.format
    except Exception:
        return "corrupt_image"
    if kind == "JPEG" and b"\xff\xd9" not in tail:
        return "corrupt_image"  # no end-of-image marker: the JPEG was cut short
    if kind == "PNG" and b"IEND" not in tail:
        return "corrupt_image"
    if min(width, height) < min_side:
        return "too_small"
    if max(width, height) > max_aspect * min(width, height):
        return "extreme_aspect"
    return ""


def _image_problem(handle, offset: int, size: int, min_side: int, max_aspect: float) -> str:
    """`check_image_bytes` for an image stored at `offset` in an open shard."""
    if size == 0:
        return "corrupt_image"
    handle.seek(offset)
    head = handle.read(min(size, _HEADER_BYTES))
    handle.seek(offset + size - min(size, 16))
    tail = handle.read(min(size, 16))
    return check_image_bytes(head, tail, min_side, max_aspect)


def read_caption(handle, offset: int, size: int) -> str:
    """A caption's text (UTF-8; undecodable bytes replaced), stripped of white space."""
    handle.seek(offset)
    return handle.read(size).decode("utf-8", errors="replace").strip()


def index_shard(
    path: str, min_image_side: int = 1, max_aspect_ratio: float = math.inf
) -> ShardIndex:
    """Scan one shard: its usable samples and the ones left out (see the module table)."""
    members, truncated = _scan_members(path)
    skipped = SkipCounts()
    keys: list[str] = []
    image_ranges: list[tuple[int, int]] = []
    caption_ranges: list[tuple[int, int]] = []
    with open(path, "rb") as handle:
        for key, parts in members.items():
            image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in parts), None)
            reason = ""
            if image_ext is None:
                reason = "missing_image"
            elif "txt" not in parts:
                reason = "missing_caption"
            elif not read_caption(handle, *parts["txt"]):
                reason = "empty_caption"
            else:
                reason = _image_problem(handle, *parts[image_ext], min_image_side, max_aspect_ratio)
            if reason:
                skipped.add(path, key, reason)
                continue
            keys.append(key)
            image_ranges.append(parts[image_ext])
            caption_ranges.append(parts["txt"])
    if truncated:
        skipped.add(path, "(end of file)", "truncated_shard")
    return ShardIndex(
        path,
        keys,
        np.asarray(image_ranges, dtype=np.int64).reshape(-1, 2),
        np.asarray(caption_ranges, dtype=np.int64).reshape(-1, 2),
        skipped,
    )


def log_skips(index: ShardIndex) -> None:
    """One warning per shard that lost samples: the shard name, counts by reason, keys."""
    if not index.skipped.total:
        return
    reasons = ", ".join(f"{r}={n}" for r, n in sorted(index.skipped.by_reason.items()))
    keys = ", ".join(f"{key} ({reason})" for _, key, reason in index.skipped.examples[:5])
    logger.warning(
        "shard %s: skipped %d samples (%s): %s",
        index.path,
        index.skipped.total,
        reasons,
        keys,
    )


def iter_captions(shards: list[str]) -> Iterator[str]:
    """The captions of every usable sample of the shards, in shard and member order."""
    for path in shards:
        index = index_shard(path)
        log_skips(index)
        with open(path, "rb") as handle:
            for offset, size in index.caption_ranges:
                yield read_caption(handle, int(offset), int(size))


@dataclass
class DatasetIndex:
    """The usable samples of every shard, numbered in shard-list order then member order."""

    shards: list[ShardIndex]
    skipped: SkipCounts
    starts: np.ndarray
    """int64 [shards + 1]: number of the first sample of each shard; the last is N."""

    @property
    def num_samples(self) -> int:
        """N: usable samples over all shards."""
        return int(self.starts[-1])

    def locate(self, sample: int) -> tuple[ShardIndex, int]:
        """The shard holding sample number `sample`, and its position inside the shard."""
        shard = int(np.searchsorted(self.starts, sample, side="right")) - 1
        return self.shards[shard], sample - int(self.starts[shard])


_INDEX_CACHE: dict[tuple, DatasetIndex] = {}


def build_index(
    shards: list[str], min_image_side: int = 1, max_aspect_ratio: float = math.inf
) -> DatasetIndex:
    """Index every shard (cached in memory per process while the files are unchanged),
    logging the skipped samples of each shard once. Raises DataError for a shard that
    cannot be opened, or when no shard has a usable sample."""
    stamps = []
    for path in shards:
        try:
            stat = os.stat(path)
        except OSError as exc:
            raise DataError(f"shard {path}: cannot be opened: {exc.strerror or exc}") from None
        stamps.append((path, stat.st_size, stat.st_mtime_ns))
    cache_key = (tuple(stamps), min_image_side, max_aspect_ratio)
    if cache_key in _INDEX_CACHE:
        return _INDEX_CACHE[cache_key]

    indexes = [index_shard(path, min_image_side, max_aspect_ratio) for path in shards]
    skipped = SkipCounts()
    for index in indexes:
        log_skips(index)
        skipped.merge(index.skipped)
    sizes = [len(index.keys) for index in indexes]
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    if starts[-1] == 0:
        raise DataError(
            f"shards {shards[0]} ... ({len(shards)} files): no usable sample; skipped "
            f"{dict(skipped.by_reason)}"
        )
    dataset = DatasetIndex(indexes, skipped, starts)
    _INDEX_CACHE[cache_key] = dataset
    return dataset
