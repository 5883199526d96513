"""Retrieval counts with missing and unreadable images: every count covers what it says.

The Karpathy test split below lists 8 images (one more is in the train split):

    image  file        captions  fate
    A      red         5         evaluated
    B      green       3         evaluated, with fewer than 5 captions
    C      blue        7         evaluated with its first 5; 2 ignored
    M1     missing     1         dropped with its caption
    M2     missing     7         dropped with its 7 captions
    U1     corrupt     1         dropped with its caption
    U2     corrupt     6         dropped with its 6 captions
    N      blue        0         dropped (no caption)

Only evaluated images count as having fewer than 5 captions (B, not M1 or U1), and only
their captions as ignored beyond 5 (C's 2, not M2's or U2's). The captions of the listed
images add up: 5 + 3 + 7 + 1 + 7 + 1 + 6 = 30 = 13 evaluated + 2 ignored + 8 of missing
images + 7 of unreadable images.
"""

import pytest

from megatron_ibxl.evaluation import EvalShard, run_evaluation
from megatron_ibxl.evaluation.formats import load_retrieval_set
from tests.helpers.eval_fixtures import StandIn, eval_config, write_karpathy

IMAGES = [
    ("A", "red", "test", ["red"] * 5),
    ("B", "green", "test", ["green"] * 3),
    ("C", "blue", "test", ["blue"] * 7),
    ("M1", None, "test", ["yellow"]),
    ("M2", None, "test", ["cyan"] * 7),
    ("U1", "corrupt", "test", ["magenta"]),
    ("U2", "corrupt", "test", ["white"] * 6),
    ("N", "blue", "test", []),
    ("T", "green", "train", ["green"] * 5),
]

EXPECTED = {
    "images_listed": 8,
    "images_without_captions": 1,  # N
    "images_missing": 2,  # M1, M2
    "images_unreadable": 2,  # U1, U2
    "num_images": 3,  # A, B, C
    "images_with_fewer_than_5_captions": 1,  # B
    "captions_ignored_beyond_5": 2,  # C's 6th and 7th
    "captions_of_missing_images": 1 + 7,
    "captions_of_unreadable_images": 1 + 6,
    "captions_without_image": 0,
    "num_captions": 5 + 3 + 5,
}


def _make(root):
    return write_karpathy(root, IMAGES)


def test_counts_before_decoding(tmp_path):
    """The file system alone: U1 and U2 exist, so they are still among the found images."""
    dataset = load_retrieval_set(str(_make(tmp_path)))
    assert len(dataset.image_paths) == 5 and len(dataset.captions) == 5 + 3 + 5 + 1 + 5
    assert dataset.captions_listed == [5, 3, 7, 1, 6]
    counts = dataset.evaluated_counts([True, True, True, False, False])
    assert {k: counts[k] for k in counts if k in EXPECTED} == {
        k: v for k, v in EXPECTED.items() if k in counts
    }


@pytest.mark.parametrize("loader", ["auto", "torch"])
def test_counts_after_evaluation(tmp_path, loader):
    """DALI (auto) and the PIL fallback both find U1 and U2 unreadable."""
    config = eval_config(loader, batch_size=2)
    config.eval.task, config.eval.data = "coco", str(_make(tmp_path))
    result = run_evaluation(config.eval, StandIn(config).towers(), EvalShard.single())
    assert {key: result[key] for key in EXPECTED} == EXPECTED
