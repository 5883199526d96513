"""The digits demo dataset: contents, split, determinism, and use by the loaders."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from megatron_ibxl.config import load_config
from megatron_ibxl.data.demo import CLASS_NAMES, make_demo_data
from megatron_ibxl.data.eval_images import iter_eval_images
from megatron_ibxl.data.loader import build_train_loader
from megatron_ibxl.data.tokenizer import load_tokenizer

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "launch" / "configs" / "demo-cpu.yaml"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, make_demo_data(out)


def test_every_digit_is_used_once_with_a_fifth_held_out(demo):
    out, summary = demo
    digits = load_digits()
    assert summary["train_samples"] + summary["heldout_samples"] == len(digits.target) == 1797
    train_keys = set()
    for name in (out / "train.txt").read_text().split():
        with tarfile.open(out / name) as tar:
            train_keys |= {m.name.split(".")[0] for m in tar.getmembers()}
    heldout_files = sorted((out / "heldout").glob("*/*.jpg"))
    heldout_keys = {path.stem for path in heldout_files}
    assert len(train_keys) == summary["train_samples"] and not train_keys & heldout_keys
    # Held out: ceil(class size / 5) per class, in the folder of its true label.
    for label in range(10):
        folder = {p.stem for p in heldout_files if p.parent.name == str(label)}
        size = int((digits.target == label).sum())
        assert len(folder) == -(-size // 5)
        assert all(digits.target[int(key)] == label for key in folder)


def test_classes_templates_and_captions(demo):
    out, _ = demo
    lines = (out / "classes.tsv").read_text().splitlines()
    assert lines == [f"{i}\t{name}" for i, name in enumerate(CLASS_NAMES)]
    templates = (out / "templates.txt").read_text().splitlines()
    assert len(templates) >= 3 and all("{}" in t for t in templates)
    with tarfile.open(out / "train-0000.tar") as tar:
        texts = {
            m.name: tar.extractfile(m).read().decode()
            for m in tar.getmembers()
            if m.name.endswith(".txt")
        }
    digits = load_digits()
    phrasings = set()
    for name, text in texts.items():
        label = int(digits.target[int(name.split(".")[0])])
        assert CLASS_NAMES[label] in text or str(label) in text
        phrasings.add(text.replace(CLASS_NAMES[label], "#").replace(str(label), "#"))
    assert len(phrasings) >= 5


def test_tokenizer_fits_the_demo_config(demo):
    out, summary = demo
    tokenizer = load_tokenizer(out / "tokenizer.json")
    config = load_config(DEMO_CONFIG)
    assert tokenizer.vocab_size == summary["tokenizer_vocab"]
    assert tokenizer.vocab_size <= config.model.text.vocab_size
    assert tokenizer.decode(tokenizer.encode("a handwritten digit seven.")) == (
        "a handwritten digit seven."
    )


def test_output_is_deterministic(demo, tmp_path):
    out, _ = demo
    make_demo_data(tmp_path)

    def digest(root: Path) -> dict[str, str]:
        files = sorted(p for p in root.rglob("*") if p.is_file())
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}

    assert digest(out) == digest(tmp_path)


@pytest.mark.parametrize("loader_name", ["dali", "torch"])
def test_demo_config_loads_the_demo_data(demo, loader_name):
    out, summary = demo
    config = load_config(DEMO_CONFIG)
    config.data.train_shards = str(out / "train.txt")
    config.data.loader = loader_name
    tokenizer = load_tokenizer(out / "tokenizer.json")
    loader = build_train_loader(config, 0, 2, tokenizer)
    batch = next(loader)
    b, size = config.data.micro_batch, config.model.vision.image_size
    assert batch.images.shape == (b, 3, size, size)
    assert batch.tokens.shape == (b, config.model.text.context_length)
    assert loader.stats.samples_per_epoch == summary["train_samples"]
    assert loader.stats.samples_skipped == 0
    loader.close()

    paths = sorted(str(p) for p in (out / "heldout").glob("*/*.jpg"))[:40]
    batches = list(iter_eval_images(paths, config, batch_size=16))
    images = np.concatenate([b.images.cpu().numpy() for b in batches])
    assert images.shape == (40, 3, size, size) and not any(b.failed for b in batches)
