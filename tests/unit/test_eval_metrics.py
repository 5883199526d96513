"""Zero-shot accuracy and retrieval recall, exact, from a stand-in model with known answers.

The stand-in (tests/helpers/eval_fixtures.py) embeds an image as the one-hot of its solid
colour, read back after the real evaluation pipeline (DALI, or the PIL fallback), and a
text as the vector of the first phrase it contains. Every expected value below is counted
by hand from those rules; ties count against the query (rank = number of wrong items that
score at least as high as the right one; a hit at k when rank < k).
"""

import math

import pytest
import torch

from megatron_ibxl.evaluation import EvalShard, EvalTowers, run_evaluation
from megatron_ibxl.evaluation.formats import fill_template, read_class_names, read_templates
from megatron_ibxl.evaluation.retrieval import text_to_image_ranks
from megatron_ibxl.evaluation.zero_shot import build_classifier, true_class_rank
from tests.helpers.eval_fixtures import (
    IMAGENET_PHRASES,
    StandIn,
    colour_vector,
    eval_config,
    make_coco2017,
    make_imagenet_tree,
    make_karpathy,
)

# ImageNet tree (IMAGENET_TREE), one row per image: class vector . image one-hot.
#   tench (red):           red 1 ok | red 1 ok | green: tench 0, 999 others >= 0 -> wrong
#   goldfish (.6r + .8g):  green: .8 < great white shark 1 -> rank 1 (top-5 only)
#                          red:   .6 < tench 1             -> rank 1 (top-5 only)
#   great white (green):   green 1 ok
#   tiger shark (blue):    blue 1 ok | yellow: 0, all others >= 0 -> wrong
#   hammerhead (yellow):   yellow 1 ok (its corrupt file is counted, not evaluated)
# 9 images: top-1 5, top-5 7. Per-class top-1 recall 2/3, 0, 1, 1/2, 1.
IMAGENET_EXPECTED = {
    "acc1": 5 / 9,
    "acc5": 7 / 9,
    "mean_per_class_recall": (2 / 3 + 0 + 1 + 1 / 2 + 1) / 5,
    "num_images": 9,
    "num_classes": 1000,
    "num_classes_with_images": 5,
    "images_unreadable": 1,
    "unknown_class_folders": 1,
    "images_in_unknown_folders": 2,
}

# Karpathy test split, gallery A red, B green, C blue, D red (E's file is missing, G has no
# captions). Captions by colour: A 5 red; B 3 green, 1 blue, 1 none; C 3 blue; D 1 red,
# 4 yellow (no yellow image is left).
# text -> image, 18 captions: A's 5 red tie with D -> rank 1; B's greens rank 0 (3 hits);
#   B's "blue sky" and "plain" score 0 on B, 3 images >= -> rank 3; C's blues rank 0
#   (3 hits); D's "red car" ties with A -> rank 1; D's yellows rank 3.
#   R@1 = 6/18; every rank is <= 3, so R@5 = R@10 = 1.
# image -> text, 4 images: A: D's "red car" >= -> rank 1; B: no other green -> 0;
#   C: B's "blue sky" -> 1; D: A's 5 reds -> 5. R@1 = 1/4, R@5 = 3/4, R@10 = 1.
KARPATHY_EXPECTED = {
    "image_retrieval_recall@1": 6 / 18,
    "image_retrieval_recall@5": 1.0,
    "image_retrieval_recall@10": 1.0,
    "text_retrieval_recall@1": 1 / 4,
    "text_retrieval_recall@5": 3 / 4,
    "text_retrieval_recall@10": 1.0,
    "num_images": 4,
    "num_captions": 18,
    "images_listed": 6,
    "images_missing": 1,
    "images_without_captions": 1,
    "images_with_fewer_than_5_captions": 1,
    "captions_ignored_beyond_5": 1,
    "captions_without_image": 0,
    "captions_of_missing_images": 5,
    "images_unreadable": 0,
}

# captions_val2017 (COCO_IMAGES): gallery 11 red, 12 green, 13 blue, 14 yellow, 15 cyan,
# 16 magenta, 17 red (18's file is missing, 19 has no captions) -> 7 images, 33 captions.
# text -> image: 11's and 17's 5 reds tie -> rank 1 (10 captions); "a dog", "a red hat",
#   "a green cat" score 0 on their own image, all 6 others >= -> rank 6; the other 20
#   rank 0. R@1 = 20/33, R@5 = 30/33, R@10 = 33/33.
# image -> text: 11 and 17 each have 6 wrong reds above ("red hat" + the other's 5)
#   -> rank 6; 12 has "a green cat" -> rank 1; 13, 14, 15, 16 rank 0.
#   R@1 = 4/7, R@5 = 5/7, R@10 = 7/7.
COCO_EXPECTED = {
    "image_retrieval_recall@1": 20 / 33,
    "image_retrieval_recall@5": 30 / 33,
    "image_retrieval_recall@10": 1.0,
    "text_retrieval_recall@1": 4 / 7,
    "text_retrieval_recall@5": 5 / 7,
    "text_retrieval_recall@10": 1.0,
    "num_images": 7,
    "num_captions": 33,
    "images_listed": 9,
    "images_missing": 1,
    "images_without_captions": 1,
    "images_with_fewer_than_5_captions": 1,
    "captions_ignored_beyond_5": 2,
    "captions_without_image": 1,
    "captions_of_missing_images": 5,
}


def assert_metrics(result: dict, expected: dict) -> None:
    """Every expected key equal (floats to rounding of the division only)."""
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-12), key


def _evaluate(config, task, data, phrases=None, templates=""):
    config.eval.task, config.eval.data, config.eval.templates = task, str(data), templates
    stand_in = StandIn(config, phrases)
    return run_evaluation(config.eval, stand_in.towers(), EvalShard.single())


def test_stand_in_prompts_name_one_class_each():
    """Precondition of IMAGENET_EXPECTED: each phrase appears in the prompts of exactly one
    of the 1,000 classes, so every other class gets the "other" vector."""
    template = read_templates()[0]
    prompts = [fill_template(template, name) for _, name in read_class_names()]
    stand_in = StandIn(eval_config(), IMAGENET_PHRASES)
    for pattern, _ in stand_in.phrases:
        assert sum(bool(pattern.search(p)) for p in prompts) == 1, pattern.pattern


@pytest.mark.parametrize("loader", ["auto", "torch"])
def test_imagenet_zero_shot_exact(tmp_path, loader):
    """DALI (auto) and the PIL fallback, packaged class list and packaged templates."""
    config = eval_config(loader, batch_size=64 if loader == "auto" else 4)
    result = _evaluate(config, "imagenet", make_imagenet_tree(tmp_path), IMAGENET_PHRASES)
    assert_metrics(result, IMAGENET_EXPECTED)
    assert result["num_templates"] == len(read_templates())
    assert result["task"] == "imagenet"


def test_karpathy_retrieval_exact(tmp_path):
    result = _evaluate(eval_config(batch_size=3), "coco", make_karpathy(tmp_path))
    assert_metrics(result, KARPATHY_EXPECTED)
    assert result["layout"] == "karpathy"


def test_coco2017_retrieval_exact(tmp_path):
    result = _evaluate(eval_config(batch_size=4), "coco", make_coco2017(tmp_path))
    assert_metrics(result, COCO_EXPECTED)
    assert result["layout"] == "coco"


def test_classifier_is_normalised_mean_over_templates():
    """Two templates give a class the unit vectors at 0 and 45 degrees in the (red, other)
    plane; their normalised mean points at 22.5 degrees: (cos pi/8, sin pi/8)."""

    def encode_texts(texts):
        rows = []
        for text in texts:
            other = 1.0 if "sketch" in text else 0.0
            rows.append(torch.nn.functional.normalize(torch.tensor([1.0, other]), dim=0))
        return torch.stack(rows)

    towers = EvalTowers(lambda x: x, encode_texts, lambda p, b: iter(()), (3, 4, 4))
    classifier = build_classifier(
        ["x"], ["a photo of {}", "a sketch of {}"], towers, EvalShard.single(), 1
    )
    expected = torch.tensor([[math.cos(math.pi / 8), math.sin(math.pi / 8)]])
    torch.testing.assert_close(classifier, expected)


def test_ties_count_against_the_query():
    logits = torch.tensor([[1.0, 1.0, 0.0], [0.5, 0.2, 0.9], [0.0, 0.0, 0.0]])
    # Row 0: class 1 ties with the true class 0 -> rank 1. Row 1: 0.9 above 0.2 and 0.5
    # -> rank 2. Row 2: all tie -> rank 2 (a constant model is never right by luck).
    ranks = true_class_rank(logits, torch.tensor([0, 1, 2]))
    assert ranks.tolist() == [1, 2, 2]
    text_emb = torch.tensor([colour_vector(red=1.0)])
    image_emb = torch.tensor([colour_vector(red=1.0), colour_vector(red=1.0)])
    assert text_to_image_ranks(text_emb, torch.tensor([1]), image_emb).tolist() == [1]


def test_no_decodable_image_is_a_data_error(tmp_path):
    from megatron_ibxl.errors import DataError

    (tmp_path / "val" / "n01440764").mkdir(parents=True)
    (tmp_path / "val" / "n01440764" / "x.JPEG").write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError, match="none of 1 images could be decoded"):
        _evaluate(eval_config(), "imagenet", tmp_path, IMAGENET_PHRASES, templates="")


def test_config_errors():
    from megatron_ibxl.config import ConfigError

    config = eval_config()
    towers = StandIn(config).towers()
    with pytest.raises(ConfigError, match="eval.task='none'"):
        run_evaluation(config.eval, towers, EvalShard.single())
    config.eval.task = "coco"
    with pytest.raises(ConfigError, match="eval.task='coco' needs eval.data"):
        run_evaluation(config.eval, towers, EvalShard.single())
