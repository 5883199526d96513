"""Evaluation over several processes gives the metrics of one process, exactly.

Each data-parallel rank embeds its share through the real image pipeline with the stand-in
model of tests/helpers/eval_fixtures.py; the shares are combined over the dp group. The
reference is the single-process run in the test process, and both must equal the
hand-computed values of tests/unit/test_eval_metrics.py. Layouts: dp=2, dp=3 (odd; one
rank's share of the Karpathy gallery is empty), and tp=2 with dp=1 (both tensor-parallel
ranks read the same share and must agree). Every rank must also make the same number of
tower calls, which ZeRO-3's parameter gathers need.
"""

from pathlib import Path

import pytest

from megatron_ibxl.config import ParallelConfig
from megatron_ibxl.evaluation import EvalShard, run_evaluation
from tests.helpers.dist import run_distributed
from tests.helpers.eval_fixtures import (
    IMAGENET_PHRASES,
    StandIn,
    eval_config,
    make_coco2017,
    make_imagenet_tree,
    make_karpathy,
)
from tests.unit.test_eval_metrics import (
    COCO_EXPECTED,
    IMAGENET_EXPECTED,
    KARPATHY_EXPECTED,
    assert_metrics,
)

BATCH = 2
"""Images or texts per tower call: small, so shares span several calls and differ in
their number of real calls."""


def _evaluate_all(shard: EvalShard, trees: dict[str, str], templates: str):
    """Metrics of the three data sets, and the stand-in's tower call counts."""
    config = eval_config(batch_size=BATCH)
    config.eval.templates = templates
    results, calls = {}, {}
    for name, task, phrases in (
        ("imagenet", "imagenet", IMAGENET_PHRASES),
        ("karpathy", "coco", None),
        ("coco2017", "coco", None),
    ):
        config.eval.task, config.eval.data = task, trees[name]
        stand_in = StandIn(config, phrases)
        metrics = run_evaluation(config.eval, stand_in.towers(), shard)
        metrics.pop("eval_time_s")
        results[name], calls[name] = metrics, stand_in.calls
    return results, calls


def _rank_fn(ctx, trees, templates):
    return _evaluate_all(EvalShard.from_context(ctx), trees, templates)


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-data")
    templates = root / "templates.txt"
    templates.write_text("a picture showing a {}.\na sketch of a {}.\n")
    paths = {
        "imagenet": str(make_imagenet_tree(root / "imagenet")),
        "karpathy": str(make_karpathy(root / "karpathy")),
        "coco2017": str(make_coco2017(root / "coco2017")),
    }
    reference, _ = _evaluate_all(EvalShard.single(), paths, str(templates))
    return paths, str(templates), reference


@pytest.mark.parametrize(
    "world_size, tp",
    [(2, 1), (3, 1), (2, 2)],
    ids=["dp2", "dp3", "tp2"],
)
def test_distributed_equals_single_process(trees, tmp_path: Path, world_size, tp):
    paths, templates, reference = trees
    assert_metrics(reference["imagenet"], IMAGENET_EXPECTED)
    assert_metrics(reference["karpathy"], KARPATHY_EXPECTED)
    assert_metrics(reference["coco2017"], COCO_EXPECTED)

    parallel = ParallelConfig(tp=tp, backend="gloo", timeout_s=120)
    outputs = run_distributed(
        _rank_fn, world_size, tmp_path, paths, templates, parallel=parallel, timeout_s=400
    )
    for rank, (results, _) in enumerate(outputs):
        for name, expected in reference.items():
            assert results[name] == expected, f"rank {rank}, {name}"
    call_counts = [calls for _, calls in outputs]
    assert all(c == call_counts[0] for c in call_counts), call_counts
