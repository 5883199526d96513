"""A real, small demo dataset: the handwritten digits that ship with scikit-learn.

`megatron-ibxl make-demo-data OUT_DIR` turns the 1,797 scans of digits (8x8 pixels, 17 grey
levels, 10 classes, from the UCI optical recognition of handwritten digits data) into
32x32 RGB JPEGs with captions, and writes:

| path | what |
| --- | --- |
| `train-0000.tar` ... | WebDataset shards of 256 training pairs: `KEY.jpg`, `KEY.txt`, `KEY.json` |
| `train.txt` | the list file of the training shards (data.train_shards) |
| `heldout/<digit>/KEY.jpg` | the held-out fifth of every class as an ImageFolder tree |
| `heldout-0000.tar`, `heldout.txt` | the same held-out pairs as shards |
| `classes.tsv` | `folder<TAB>class name` per class, e.g. `3	three` |
| `templates.txt` | prompt templates for zero-shot classification, `{}` for the name |
| `tokenizer.json` | byte-level BPE trained on the training captions and the prompts |

Each image gets one of several caption phrasings of its class, drawn from a fixed seed, so
the output is the same on every run. Nothing is downloaded: the digits are a data file of
the scikit-learn package.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from megatron_ibxl.data.tokenizer import train_tokenizer
from megatron_ibxl.data.writer import write_shard
from megatron_ibxl.errors import UserError
from megatron_ibxl.logging_setup import setup_logging

logger = logging.getLogger(__name__)

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
IMAGE_SIZE = 32
SHARD_SAMPLES = 256
HELDOUT_EVERY = 5
"""One image of every five of each class is held out."""
TOKENIZER_VOCAB = 1024
"""Matches model.text.vocab_size of launch/configs/demo-cpu.yaml. The captions have too
few distinct words to fill it, so the trained vocabulary is smaller; every id is below it."""

CAPTIONS = (
    "a handwritten digit {name}",
    "the number {name}, written by hand",
    "a scan of a handwritten {name}",
    "a small grey picture of the digit {digit}",
    "the digit {digit} drawn with a pen",
    "a blurry {name} on a black background",
    "someone wrote the number {name}",
)
"""Caption phrasings; {name} is the class word, {digit} the numeral."""

TEMPLATES = (
    "a handwritten digit {}.",
    "a scan of a handwritten {}.",
    "the number {}, written by hand.",
    "a blurry {} on a black background.",
)
"""Zero-shot prompt templates; {} is the class word."""


def _to_jpeg(pixels: np.ndarray) -> bytes:
    """8x8 grey levels 0..16 -> 32x32 RGB JPEG, white ink on black."""
    grey = Image.fromarray((pixels * (255.0 / 16.0)).round().astype(np.uint8))
    grey = grey.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
    buffer = io.BytesIO()
    grey.convert("RGB").save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def _split(labels: list[int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training and held-out images: every fifth of each class, shuffled."""
    heldout = []
    for label in range(len(CLASS_NAMES)):
        members = rng.permutation(np.flatnonzero(np.asarray(labels) == label))
        heldout.extend(members[::HELDOUT_EVERY].tolist())
    heldout_mask = np.zeros(len(labels), dtype=bool)
    heldout_mask[heldout] = True
    return np.flatnonzero(~heldout_mask), np.flatnonzero(heldout_mask)


def _sample(index: int, pixels: np.ndarray, label: int, caption: str):
    """One WebDataset sample: key and parts."""
    meta = {"label": label, "class": CLASS_NAMES[label], "source_index": index}
    return f"{index:05d}", {
        "jpg": _to_jpeg(pixels),
        "txt": caption.encode(),
        "json": json.dumps(meta).encode(),
    }


def _write_shards(out: Path, prefix: str, samples: list) -> list[str]:
    """Shards of SHARD_SAMPLES samples and their list file; returns the shard names."""
    names = []
    for number, start in enumerate(range(0, len(samples), SHARD_SAMPLES)):
        name = f"{prefix}-{number:04d}.tar"
        write_shard(out / name, samples[start : start + SHARD_SAMPLES])
        names.append(name)
    (out / f"{prefix}.txt").write_text("".join(f"{name}\n" for name in names))
    return names


def make_demo_data(out_dir: str | Path) -> dict:
    """Write the digits demo dataset to `out_dir` (see the module doc); returns a summary:
    counts, shard names and the tokenizer's vocabulary size."""
    from sklearn.datasets import load_digits

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    labels = [int(label) for label in digits.target]
    rng = np.random.default_rng(0)
    train, heldout = _split(labels, rng)

    phrasing = rng.integers(0, len(CAPTIONS), size=len(labels))
    captions = [
        CAPTIONS[phrasing[i]].format(name=CLASS_NAMES[labels[i]], digit=labels[i])
        for i in range(len(labels))
    ]
    samples = {i: _sample(i, digits.images[i], labels[i], captions[i]) for i in range(len(labels))}
    train_shards = _write_shards(out, "train", [samples[i] for i in train.tolist()])
    heldout_shards = _write_shards(out, "heldout", [samples[i] for i in heldout.tolist()])

    for i in heldout.tolist():
        folder = out / "heldout" / str(labels[i])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:05d}.jpg").write_bytes(samples[i][1]["jpg"])
    (out / "classes.tsv").write_text(
        "".join(f"{label}\t{name}\n" for label, name in enumerate(CLASS_NAMES))
    )
    (out / "templates.txt").write_text("".join(f"{template}\n" for template in TEMPLATES))

    prompts = [template.format(name) for template in TEMPLATES for name in CLASS_NAMES]
    tokenizer = train_tokenizer([captions[i] for i in train.tolist()] + prompts, TOKENIZER_VOCAB)
    tokenizer.save(out / "tokenizer.json")
    return {
        "out_dir": str(out),
        "train_samples": len(train),
        "heldout_samples": len(heldout),
        "train_shards": train_shards,
        "heldout_shards": heldout_shards,
        "classes": len(CLASS_NAMES),
        "tokenizer_vocab": tokenizer.vocab_size,
    }


def run_cli(args) -> int:
    """`megatron-ibxl make-demo-data OUT_DIR`."""
    setup_logging()
    if not str(args.out_dir).strip():
        raise UserError("OUT_DIR is empty; name the folder to write the demo data to")
    summary = make_demo_data(args.out_dir)
    logger.info(
        "demo data in %s: %d training pairs in %d shards, %d held out, %d classes, "
        "tokenizer of %d entries",
        summary["out_dir"],
        summary["train_samples"],
        len(summary["train_shards"]),
        summary["heldout_samples"],
        summary["classes"],
        summary["tokenizer_vocab"],
    )
    return 0
