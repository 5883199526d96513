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


# ---------------------------------------------------------------------------------------
# The real path: a tiny DualEncoder, a trained tokenizer, ZeRO-3, against serial loops.
# ---------------------------------------------------------------------------------------

REAL_CLASSES = ["zero", "one", "two", "three", "four", "five", "six"]
REAL_TEMPLATES = ["a picture of {}.", "a drawing of the {}."]


def _tiny_config(tokenizer: str):
    config = eval_config(batch_size=BATCH)
    model = config.model
    model.vision.image_size, model.vision.patch_size = 16, 8
    model.vision.hidden, model.vision.num_layers = 32, 1
    model.vision.num_heads, model.vision.mlp_hidden = 2, 64
    model.text.vocab_size, model.text.vocab_pad_multiple = 320, 8
    model.text.context_length, model.text.hidden, model.text.num_layers = 12, 32, 1
    model.text.num_heads, model.text.mlp_hidden = 2, 64
    model.embed_dim = 16
    config.optimizer.precision = "fp32"
    config.parallel.tp, config.parallel.sequence_parallel, config.parallel.zero = 1, False, 3
    config.data.tokenizer = tokenizer
    return config


def _serial_reference(model, config, tokenizer, data) -> dict:
    """Metrics by plain loops over the whole set, one item per tower call, with torch.topk
    and scikit-learn's balanced accuracy (the CLIP benchmark's mean per-class recall)."""
    import torch
    import torch.nn.functional as F
    from sklearn.metrics import balanced_accuracy_score

    from megatron_ibxl.data.eval_images import iter_eval_images

    def text_emb(text):
        tokens, lengths = tokenizer.encode_batch([text], config.model.text.context_length)
        return model.encode_text(tokens, lengths)[0]

    def image_embs(paths):
        (batch,) = list(iter_eval_images(paths, config, len(paths)))
        return torch.stack(
            [model.encode_image(batch.images[i : i + 1])[0] for i in range(len(paths))]
        )

    classes = data.classification
    weights = []
    for name in classes.class_names:
        prompts = torch.stack([text_emb(t.replace("{}", name)) for t in REAL_TEMPLATES])
        weights.append(F.normalize(prompts.mean(0), dim=0))
    classifier = torch.stack(weights)
    logits = image_embs(classes.paths) @ classifier.T
    labels = torch.tensor(classes.labels)
    top5 = logits.topk(5, dim=1).indices
    reference = {
        "acc1": float((logits.argmax(1) == labels).double().mean()),
        "acc5": float((top5 == labels[:, None]).any(1).double().mean()),
        "mean_per_class_recall": balanced_accuracy_score(labels, logits.argmax(1)),
    }

    captions = data.retrieval
    scores = (
        torch.stack([text_emb(c) for c in captions.captions]) @ image_embs(captions.image_paths).T
    )
    owner = torch.tensor(captions.caption_image)
    for k in (1, 5, 10):
        top_images = scores.topk(min(k, scores.shape[1]), dim=1).indices
        reference[f"image_retrieval_recall@{k}"] = float(
            (top_images == owner[:, None]).any(1).double().mean()
        )
        top_texts = owner[scores.T.topk(min(k, scores.shape[0]), dim=1).indices]
        hits = top_texts == torch.arange(scores.shape[1])[:, None]
        reference[f"text_retrieval_recall@{k}"] = float(hits.any(1).double().mean())
    return reference  # fmt: skip


def _real_rank_fn(ctx, tokenizer_path, image_folder, classes_file, karpathy):
    import torch

    from megatron_ibxl.data.tokenizer import load_tokenizer
    from megatron_ibxl.evaluation import EvalData, evaluate_zero_shot, load_eval_data
    from megatron_ibxl.models import build_dual_encoder
    from megatron_ibxl.parallel.sharding import shard_model

    config = _tiny_config(tokenizer_path)
    tokenizer = load_tokenizer(tokenizer_path)
    plain = build_dual_encoder(config).eval()
    sharded = build_dual_encoder(config)  # same init seed, so the same weights
    shard_model(sharded, config, ctx)

    results = {}
    for name, model in (("plain", plain), ("zero3", sharded)):
        config.eval.task, config.eval.data = "imagenet", image_folder
        config.eval.classes, config.eval.templates = classes_file, classes_file + ".templates"
        metrics = evaluate_zero_shot(model, config, ctx, tokenizer)
        config.eval.task, config.eval.data = "coco", karpathy
        metrics |= evaluate_zero_shot(model, config, ctx, tokenizer)
        results[name] = metrics

    config.eval.task, config.eval.data = "imagenet", image_folder
    data = EvalData(classification=load_eval_data(config.eval).classification)
    config.eval.task, config.eval.data = "coco", karpathy
    data.retrieval = load_eval_data(config.eval).retrieval
    with torch.no_grad():
        results["reference"] = _serial_reference(plain, config, tokenizer, data)
    return results


def test_real_model_zero3_matches_serial_reference(tmp_path_factory, tmp_path):
    """Two processes, dp=2 with ZeRO-3: evaluate_zero_shot on the FSDP2-sharded model and on
    the plain one equal a serial reference computed with torch.topk and scikit-learn."""
    import random

    from megatron_ibxl.data.tokenizer import train_tokenizer
    from tests.helpers.eval_fixtures import COLOURS, write_image

    root = tmp_path_factory.mktemp("real-eval")
    rng = random.Random(0)
    lines = []
    for index, name in enumerate(REAL_CLASSES):
        lines.append(f"{index}\t{name}")
        for i in range(2):
            write_image(root / "digits" / str(index) / f"{i}.jpg", rng.choice(COLOURS))
    classes_file = root / "classes.tsv"
    classes_file.write_text("\n".join(lines) + "\n")
    Path(str(classes_file) + ".templates").write_text("\n".join(REAL_TEMPLATES) + "\n")
    karpathy = make_karpathy(root / "coco")

    texts = [t.replace("{}", n) for n in REAL_CLASSES for t in REAL_TEMPLATES]
    texts += ["a red box", "green grass", "a blue sea", "a yellow cab", "plain"] * 4
    tokenizer_path = root / "tokenizer.json"
    train_tokenizer(texts, 300).save(tokenizer_path)

    parallel = ParallelConfig(tp=1, backend="gloo", timeout_s=120, zero=3)
    outputs = run_distributed(
        _real_rank_fn,
        2,
        tmp_path,
        str(tokenizer_path),
        str(root / "digits"),
        str(classes_file),
        str(karpathy),
        parallel=parallel,
        timeout_s=400,
    )
    for rank, results in enumerate(outputs):
        reference = results["reference"]
        for name in ("plain", "zero3"):
            for key, value in reference.items():
                assert results[name][key] == pytest.approx(value, abs=1e-12), (rank, name, key)


# ---------------------------------------------------------------------------------------
# The command: a saved checkpoint evaluated by 1 process and by 2 (tp=2, torchrun).
# ---------------------------------------------------------------------------------------

_SAVE_AND_EVALUATE = '''
"""Save a perturbed demo model at step 3, evaluate it in-process; print fresh and saved JSON."""
import json, sys
import torch
from megatron_ibxl.config import load_config
from megatron_ibxl.data.tokenizer import load_tokenizer
from megatron_ibxl.evaluation import evaluate_zero_shot
from megatron_ibxl.models import build_dual_encoder
from megatron_ibxl.parallel import detect_launch_env, init_parallel, shutdown_parallel
from megatron_ibxl.training.checkpoint import save_checkpoint

config_path, run_dir, *overrides = sys.argv[1:]
config = load_config(config_path, overrides)
ctx = init_parallel(config.parallel, seed=0, launch=detect_launch_env())
model = build_dual_encoder(config)
tokenizer = load_tokenizer(config.data.tokenizer)
fresh = evaluate_zero_shot(model, config, ctx, tokenizer)
generator = torch.Generator().manual_seed(7)
with torch.no_grad():  # far from the initialisation, so that loading must matter
    for param in model.parameters():
        if param.ndim >= 2:
            param.add_(0.3 * torch.randn(param.shape, generator=generator))
save_checkpoint(run_dir, 3, model, torch.optim.AdamW(model.parameters()), None, {}, config, ctx)
saved = evaluate_zero_shot(model, config, ctx, tokenizer)
shutdown_parallel()
print(json.dumps(fresh))
print(json.dumps(saved))
'''


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _json_lines(proc) -> list[dict]:
    import json

    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_cli_one_and_two_processes_agree(tmp_path):
    """`megatron-ibxl eval` on the digits demo's held-out ImageFolder with --classes and
    --templates, two processes under torchrun (tp=2 with sequence parallelism, the tp=1
    checkpoint resharded), prints one JSON object equal to evaluating the saved model in the
    one process (tp=1) that saved it, and different from the fresh model's."""
    import os
    import subprocess
    import sys

    from megatron_ibxl.data.demo import make_demo_data

    root = Path(__file__).resolve().parents[2]
    demo, run_dir = tmp_path / "demo", tmp_path / "run"
    make_demo_data(demo)
    script = tmp_path / "save_and_evaluate.py"
    script.write_text(_SAVE_AND_EVALUATE)
    config = "launch/configs/demo-cpu.yaml"
    eval_args = {
        "data": str(demo / "heldout"),
        "classes": str(demo / "classes.tsv"),
        "templates": str(demo / "templates.txt"),
    }
    common = [f"data.tokenizer={demo}/tokenizer.json"]
    one_process = ["parallel.tp=1", "parallel.sequence_parallel=false"]

    def run(args: list[str], torchrun: bool = False) -> list[dict]:
        port = _free_port()
        env = {**os.environ, "MASTER_PORT": str(port), "PYTHONPATH": str(root)}
        launcher = [sys.executable]
        if torchrun:
            launcher += ["-m", "torch.distributed.run", "--nproc_per_node", "2"]
            launcher += ["--master_port", str(port)]
        proc = subprocess.run(
            [*launcher, *args], cwd=root, env=env, capture_output=True, text=True, timeout=600
        )
        return _json_lines(proc)

    overrides = common + one_process + ["eval.task=imagenet"]
    overrides += [f"eval.{key}={value}" for key, value in eval_args.items()]
    fresh, saved = run([str(script), config, str(run_dir), *overrides])

    cli = ["-m", "megatron_ibxl.cli", "eval", "--config", config, "--checkpoint", str(run_dir)]
    cli += ["--task", "imagenet"] + [f"--{key}={value}" for key, value in eval_args.items()]
    cli += [arg for item in common for arg in ("--set", item)]
    (double,) = run(cli, torchrun=True)  # the demo layout: tp=2, sequence parallel

    assert double["checkpoint"].endswith("checkpoints/step_3")
    for key in ("acc1", "acc5", "mean_per_class_recall", "num_images", "num_classes"):
        assert double[key] == saved[key], key
    assert fresh["mean_per_class_recall"] != saved["mean_per_class_recall"]
    assert double["num_images"] == 364 and double["num_classes"] == 10  # the held-out fifth
