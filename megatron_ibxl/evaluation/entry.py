"""`megatron-ibxl eval` and the evaluation hook of the training loop.

    megatron-ibxl eval --config FILE --checkpoint DIR --task imagenet --data DIR
        [--classes FILE] [--templates FILE]
    megatron-ibxl eval --config FILE --checkpoint DIR --task coco --data DIR

Launched like training (torchrun, mpirun, srun, or a plain single process). Every rank
embeds its share of the data over the data-parallel group; the rank that owns the metrics
(first tensor-parallel rank of data-parallel rank 0) prints one JSON object on stdout.

`evaluate_zero_shot(model, config, ctx, tokenizer)` is the same evaluation without the
command line, for the training loop every `eval.every_steps` steps.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_ibxl.config import ConfigError, EvalConfig, RunConfig
from megatron_ibxl.errors import CheckpointError
from megatron_ibxl.evaluation.embed import EvalShard, EvalTowers
from megatron_ibxl.evaluation.formats import (
    ClassificationSet,
    RetrievalSet,
    load_retrieval_set,
    read_class_names,
    read_templates,
    scan_image_folder,
)
from megatron_ibxl.evaluation.retrieval import retrieval_recall
from megatron_ibxl.evaluation.zero_shot import zero_shot_classification

logger = logging.getLogger(__name__)


@dataclass
class EvalData:
    """An evaluation set read from disk, ready to embed: one of the two is set."""

    classification: ClassificationSet | None = None
    """ImageFolder images and class names (task imagenet)."""
    templates: list[str] = field(default_factory=list)
    """Prompt templates (task imagenet)."""
    retrieval: RetrievalSet | None = None
    """Images and captions (task coco)."""


def load_eval_data(eval_cfg: EvalConfig) -> EvalData:
    """Read the class list, templates and image tree, or the captions, that `eval_cfg` names.

    Raises ConfigError for task `none` or an empty data path, DataError for data in no
    supported layout or an unreadable class, template or annotation file.
    """
    if eval_cfg.task == "none":
        raise ConfigError("eval.task='none': nothing to evaluate; set eval.task=imagenet or coco")
    if not eval_cfg.data:
        raise ConfigError(f"eval.task={eval_cfg.task!r} needs eval.data; pass --data DIR")
    if eval_cfg.task == "coco":
        return EvalData(retrieval=load_retrieval_set(eval_cfg.data))
    classes = read_class_names(eval_cfg.classes or None)
    templates = read_templates(eval_cfg.templates or None)
    source = eval_cfg.classes or "the packaged ImageNet-1K list"
    return EvalData(scan_image_folder(eval_cfg.data, classes, source), templates)


def run_evaluation(
    eval_cfg: EvalConfig, towers: EvalTowers, shard: EvalShard, data: EvalData | None = None
) -> dict[str, Any]:
    """Evaluate `eval_cfg.task` on `eval_cfg.data`; the metric dict, the same on every rank.

    The core of both entry points, written against `EvalTowers` so that tests can pass a
    model whose answers are known. `data` is what `load_eval_data(eval_cfg)` returns (read
    here when None). Collective: call on every rank.
    """
    data = data or load_eval_data(eval_cfg)
    batch_size = max(1, eval_cfg.batch_size)
    header: dict[str, Any] = {"task": eval_cfg.task, "data": eval_cfg.data}
    if data.classification is not None:
        metrics = zero_shot_classification(
            data.classification, data.templates, towers, shard, batch_size
        )
        return header | metrics
    header["layout"] = data.retrieval.layout
    return header | retrieval_recall(data.retrieval, towers, shard, batch_size)


def towers_from_model(model, config: RunConfig, device: torch.device, tokenizer) -> EvalTowers:
    """EvalTowers over a DualEncoder: its encode_image / encode_text, the tokenizer at
    `model.text.context_length`, and images through `iter_eval_images` (DALI or PIL).

    Under ZeRO-3 the root FSDP2 unit holds the projection heads and unshards them only
    around `forward`, so encode_image and encode_text are registered as forward methods too.
    On GPUs with `optimizer.precision: bf16` the towers run under bf16 autocast.
    """
    from megatron_ibxl.data.eval_images import iter_eval_images

    _register_fsdp_methods(model)
    context_length = config.model.text.context_length
    vision = config.model.vision
    use_bf16 = config.optimizer.precision == "bf16" and device.type == "cuda"

    def encode_images(images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            return model.encode_image(images)  # [b, c, H, W] -> [b, d]

    def encode_texts(texts: list[str]) -> torch.Tensor:
        tokens, lengths = tokenizer.encode_batch(texts, context_length)  # [b, s], [b]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            return model.encode_text(tokens.to(device), lengths.to(device))  # -> [b, d]

    def read_images(paths: list[str], batch_size: int):
        return iter_eval_images(paths, config, batch_size)

    return EvalTowers(
        encode_images=encode_images,
        encode_texts=encode_texts,
        read_images=read_images,
        image_shape=(vision.channels, vision.image_size, vision.image_size),
    )


def _register_fsdp_methods(model) -> None:
    """Let FSDP2 unshard the root's parameters around encode_image / encode_text (once)."""
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

    if isinstance(model, FSDPModule) and not getattr(model, "_eval_methods_registered", False):
        register_fsdp_forward_method(model, "encode_image")
        register_fsdp_forward_method(model, "encode_text")
        model._eval_methods_registered = True


def evaluate_zero_shot(model, config: RunConfig, ctx, tokenizer) -> dict[str, Any]:
    """Evaluate `model` as `config.eval` says (imagenet or coco); the metric dict.

    For the training loop: call it on every rank (it is collective over the model's
    groups); every rank gets the same dict and the caller logs it where it owns metrics.
    The model is put in eval mode for the duration and restored.

    Args:
        model: a DualEncoder (sharded or not) with encode_image / encode_text.
        config: the run config; `eval.task`, `eval.data`, `eval.classes`,
            `eval.templates` and `eval.batch_size` say what to evaluate.
        ctx: the ParallelContext.
        tokenizer: the TextTokenizer the model is trained with.

    Raises ConfigError / DataError (on every rank alike) for a task or data that cannot be
    evaluated.
    """
    towers = towers_from_model(model, config, ctx.device, tokenizer)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return run_evaluation(config.eval, towers, EvalShard.from_context(ctx))
    finally:
        model.train(was_training)


_STEP_DIR = re.compile(r"^step_(\d+)$")


def resolve_checkpoint(path: str) -> Path:
    """The checkpoint folder to load: `path` itself when it is a step_N folder or holds a
    meta.json (a checkpoint copied under another name); else the newest complete checkpoint
    of a run's `checkpoints/` folder or of a run folder (the one `latest` names, as
    training's `find_latest` resolves it).

    Raises CheckpointError naming the path, and what layout is expected, when there is none.
    """
    from megatron_ibxl.training.checkpoint import META, find_latest

    given = Path(path)
    if not given.is_dir():
        raise CheckpointError(f"{path}: checkpoint folder not found; pass an existing folder")
    if _STEP_DIR.match(given.name) or (given / META).is_file():
        return given
    root = given if given.name == "checkpoints" else given / "checkpoints"
    found = find_latest(root.parent)
    if found is not None:
        return found
    renamed = sorted(
        child.name
        for child in (root.iterdir() if root.is_dir() else ())
        if (child / META).is_file() and not _STEP_DIR.match(child.name)
    )
    hint = (
        f"; {root / renamed[0]} holds {META} but is not named step_<N>: pass that folder "
        "itself or rename it step_<N>"
        if renamed
        else ""
    )
    raise CheckpointError(
        f"{path}: no complete checkpoint found; expected a checkpoint folder holding {META} "
        f"(training writes RUN_DIR/checkpoints/step_<N>), a checkpoints folder holding "
        f"step_<N> folders with {META} (or a `latest` file naming one), or a run folder "
        f"holding such a checkpoints folder{hint}"
    )


def _eval_config(args, world_size: int) -> RunConfig:
    """The run config with the command line's task and data, validated for `world_size`.

    The training batch layout does not matter here, so it is set to one micro-batch per
    rank before validation: a config trained on 512 GPUs evaluates on fewer.
    """
    from megatron_ibxl.config import load_config, validate

    config = load_config(args.config, args.overrides)
    config.eval.task = args.task
    config.eval.data = args.data
    if args.classes:
        config.eval.classes = args.classes
    if args.templates:
        config.eval.templates = args.templates
    if not config.data.tokenizer:
        raise ConfigError(
            "data.tokenizer is empty: evaluation needs the tokenizer the model was trained "
            "with; set data.tokenizer or --set data.tokenizer=FILE"
        )
    checked = copy.deepcopy(config)
    model_parallel = max(1, config.parallel.tp) * max(1, config.parallel.pp)
    checked.data.accumulation = None
    checked.data.global_batch = config.data.micro_batch * max(1, world_size // model_parallel)
    validate(checked, world_size)
    return config


def run(args) -> int:
    """`megatron-ibxl eval`: load the checkpoint, evaluate, print one JSON object.

    An orchestrator whose paragraphs are the steps. The config, data, checkpoint path and
    tokenizer are checked before the process groups start, so their errors come at once.
    """
    from megatron_ibxl.data.tokenizer import load_tokenizer
    from megatron_ibxl.logging_setup import setup_logging
    from megatron_ibxl.models import build_dual_encoder
    from megatron_ibxl.parallel import detect_launch_env, init_parallel, shutdown_parallel
    from megatron_ibxl.training.checkpoint import load_checkpoint

    launch = detect_launch_env()
    setup_logging(launch.rank, logging.INFO if launch.rank == 0 else logging.WARNING)
    config = _eval_config(args, launch.world_size)
    data = load_eval_data(config.eval)
    checkpoint = resolve_checkpoint(args.checkpoint)
    tokenizer = load_tokenizer(config.data.tokenizer)

    ctx = init_parallel(config.parallel, seed=config.data.seed, launch=launch)
    logging.getLogger().setLevel(logging.INFO if ctx.owns_metrics else logging.WARNING)
    try:
        model = build_dual_encoder(config).to(ctx.device)
        load_checkpoint(checkpoint, model, None, None, ctx)
        logger.info("evaluating %s on %s (task %s)", checkpoint, args.data, args.task)
        towers = towers_from_model(model, config, ctx.device, tokenizer)
        model.eval()
        with torch.no_grad():
            metrics = run_evaluation(config.eval, towers, EvalShard.from_context(ctx), data)
    finally:
        shutdown_parallel()

    metrics["checkpoint"] = str(checkpoint)
    if ctx.owns_metrics:
        print(json.dumps(metrics), flush=True)
    return 0
