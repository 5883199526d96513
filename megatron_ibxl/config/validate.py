"""Cross-field checks of a run configuration against a world size. Pure: no process group."""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_ibxl.config.core import RunConfig
from megatron_ibxl.config.errors import ConfigError


@dataclass(frozen=True)
class BatchLayout:
    """Sizes derived from a valid configuration and a world size."""

    tp: int
    """Tensor-parallel size."""
    pp: int
    """Pipeline-parallel size."""
    dp: int
    """Data-parallel size: world_size / (tp * pp)."""
    micro_batch: int
    """Pairs per data-parallel rank per micro-batch (b)."""
    accumulation: int
    """Micro-batches per optimizer step."""
    global_batch: int
    """Pairs per optimizer step: micro_batch * dp * accumulation."""


def validate(config: RunConfig, world_size: int) -> BatchLayout:
    """Check every cross-field rule of `config` for `world_size` processes.

    Returns the derived batch layout. Raises ConfigError listing every problem found, one
    line each, naming the dotted key, its value, the keys it conflicts with, and a fix.
    """
    problems: list[str] = []
    tp, pp = config.parallel.tp, config.parallel.pp
    dp = _check_parallel(config, world_size, problems)
    _check_model(config, tp, problems)
    accumulation = _check_batch(config, dp, problems)
    _check_training(config, problems)
    if problems:
        raise ConfigError(problems)
    return BatchLayout(tp, pp, dp, config.data.micro_batch, accumulation, config.data.global_batch)


def _divisors(n: int) -> str:
    return "{" + ", ".join(str(d) for d in range(1, n + 1) if n % d == 0) + "}"


def _check_parallel(config: RunConfig, world_size: int, problems: list[str]) -> int:
    par = config.parallel
    if world_size < 1:
        problems.append(f"world size {world_size}: must be at least 1; check --world-size")
        return 1
    if par.tp < 1:
        problems.append(f"parallel.tp={par.tp}: must be at least 1")
    if par.pp != 1:
        problems.append(
            f"parallel.pp={par.pp}: pipeline parallelism is not implemented for the dual "
            "encoder yet; set parallel.pp=1 (the planner still models pp > 1)"
        )
    if par.sequence_parallel and par.tp == 1:  # tp < 1 is reported above
        problems.append(
            f"parallel.sequence_parallel=true needs parallel.tp > 1 (parallel.tp={par.tp}); "
            "set parallel.sequence_parallel=false or raise parallel.tp"
        )
    if par.timeout_s <= 0:
        problems.append(f"parallel.timeout_s={par.timeout_s}: must be > 0 seconds")
    model_parallel = max(par.tp, 1) * max(par.pp, 1)
    if world_size % model_parallel:
        problems.append(
            f"world size {world_size} does not divide by parallel.tp * parallel.pp = "
            f"{par.tp} * {par.pp} = {model_parallel}; launch a multiple of {model_parallel} "
            f"processes or use tp * pp in {_divisors(world_size)}"
        )
        return 1
    return world_size // model_parallel


def _check_tower(name: str, hidden: int, heads: int, mlp: int, tp: int, problems: list[str]):
    key = f"model.{name}"
    for field, value in (("hidden", hidden), ("num_heads", heads), ("mlp_hidden", mlp)):
        if value < 1:
            problems.append(f"{key}.{field}={value}: must be at least 1")
    if heads < 1 or hidden < 1:
        return
    if hidden % heads:
        problems.append(
            f"{key}.num_heads={heads}: does not divide {key}.hidden={hidden}; "
            f"use num_heads in {_divisors(hidden)}"
        )
    if tp >= 1 and heads >= 1 and heads % tp:
        problems.append(
            f"parallel.tp={tp}: does not divide {key}.num_heads={heads}; "
            f"use tp in {_divisors(heads)}"
        )
    if tp >= 1 and mlp % tp:
        problems.append(
            f"parallel.tp={tp}: does not divide {key}.mlp_hidden={mlp}; "
            f"use tp in {_divisors(mlp)} or change mlp_hidden"
        )


def _check_vision_input(config: RunConfig, problems: list[str]) -> None:
    vision = config.model.vision
    sizes = ("image_size", "patch_size", "channels")
    for key in sizes:
        if getattr(vision, key) < 1:
            problems.append(f"model.vision.{key}={getattr(vision, key)}: must be at least 1")
    if min(getattr(vision, key) for key in sizes) >= 1 and vision.image_size % vision.patch_size:
        problems.append(
            f"model.vision.image_size={vision.image_size}: does not divide by "
            f"model.vision.patch_size={vision.patch_size}; use an image size that is a multiple "
            "of the patch size"
        )
    if vision.pool == "cls" and not vision.use_class_token:
        problems.append(
            "model.vision.pool='cls' needs model.vision.use_class_token=true; "
            "set pool: mean or use_class_token: true"
        )


def _check_model(config: RunConfig, tp: int, problems: list[str]) -> None:
    vision, text, model = config.model.vision, config.model.text, config.model
    _check_tower("vision", vision.hidden, vision.num_heads, vision.mlp_hidden, tp, problems)
    _check_tower("text", text.hidden, text.num_heads, text.mlp_hidden, tp, problems)
    for name, layers in (("vision", vision.num_layers), ("text", text.num_layers)):
        if layers < 1:
            problems.append(f"model.{name}.num_layers={layers}: must be at least 1")
    _check_vision_input(config, problems)
    for key, value in (
        ("vocab_size", text.vocab_size),
        ("context_length", text.context_length),
        ("vocab_pad_multiple", text.vocab_pad_multiple),
        ("embed_dim", None),
    ):
        value = model.embed_dim if value is None else value
        prefix = "model." if key == "embed_dim" else "model.text."
        least = 2 if key == "context_length" else 1
        if value < least:
            why = " (a token and the end-of-text token)" if least == 2 else ""
            problems.append(f"{prefix}{key}={value}: must be at least {least}{why}")
    for key in ("hidden_dropout", "attention_dropout"):
        value = getattr(model, key)
        if not 0.0 <= value < 1.0:
            problems.append(f"model.{key}={value}: must be in [0, 1)")
    if not math.isfinite(model.norm_eps) or model.norm_eps <= 0:
        problems.append(f"model.norm_eps={model.norm_eps}: must be a finite number > 0")
    if model.logit_scale_init > model.logit_scale_max:
        problems.append(
            f"model.logit_scale_init={model.logit_scale_init:.4f}: exceeds "
            f"model.logit_scale_max={model.logit_scale_max:.4f}; lower the initial scale"
        )


def _check_batch(config: RunConfig, dp: int, problems: list[str]) -> int:
    data = config.data
    if data.micro_batch < 1:
        problems.append(f"data.micro_batch={data.micro_batch}: must be at least 1")
        return 1
    per_micro = data.micro_batch * dp
    if data.global_batch < 1 or data.global_batch % per_micro:
        problems.append(
            f"data.global_batch={data.global_batch}: must be a multiple of data.micro_batch * dp"
            f" = {data.micro_batch} * {dp} = {per_micro}; e.g. data.global_batch="
            f"{max(1, round(data.global_batch / per_micro)) * per_micro}"
        )
        return 1
    accumulation = data.global_batch // per_micro
    contrastive = per_micro if config.loss.negatives == "micro" else data.global_batch
    if contrastive < 2:
        problems.append(
            f"data.global_batch={data.global_batch}: a contrastive batch of {contrastive} pair "
            "has no negatives (loss.negatives="
            f"{config.loss.negatives}); use at least 2 pairs per contrastive batch"
        )
    if data.accumulation is not None and data.accumulation != accumulation:
        problems.append(
            f"data.accumulation={data.accumulation}: data.global_batch={data.global_batch} != "
            f"data.micro_batch * dp * data.accumulation = {data.micro_batch} * {dp} * "
            f"{data.accumulation}; set data.accumulation={accumulation} or leave it null"
        )
    _check_normalisation(config, problems)
    if not 0 <= data.randaugment_m <= 30 or data.randaugment_n < 0:
        problems.append(
            f"data.randaugment_n={data.randaugment_n}, data.randaugment_m="
            f"{data.randaugment_m}: need n >= 0 and m in [0, 30]"
        )
    if not 0.0 < data.crop_scale_min <= 1.0:
        problems.append(f"data.crop_scale_min={data.crop_scale_min}: must be in (0, 1]")
    if data.seed < 0:
        problems.append(f"data.seed={data.seed}: must be >= 0")
    for key, least, meaning in (
        ("shuffle_window_shards", 0, "0 shuffles the whole epoch"),
        ("prefetch", 0, "0 prepares each micro-batch when it is asked for"),
        ("min_image_side", 1, "pixels"),
        ("num_threads", 1, "decoder threads per rank"),
    ):
        if getattr(data, key) < least:
            problems.append(f"data.{key}={getattr(data, key)}: must be >= {least} ({meaning})")
    if data.max_aspect_ratio < 1.0:
        problems.append(f"data.max_aspect_ratio={data.max_aspect_ratio}: must be >= 1")
    return accumulation


def _check_normalisation(config: RunConfig, problems: list[str]) -> None:
    data, channels = config.data, config.model.vision.channels
    if channels < 1:  # already reported; a mean of any length would be blamed for it
        return
    if len(data.mean) != channels:
        problems.append(f"data.mean={data.mean}: needs model.vision.channels={channels} values")
    if len(data.std) != channels or any(s <= 0 for s in data.std):
        problems.append(
            f"data.std={data.std}: needs model.vision.channels={channels} positive values"
        )


def _check_training(config: RunConfig, problems: list[str]) -> None:
    opt, sched = config.optimizer, config.schedule
    if not math.isfinite(opt.lr) or opt.lr <= 0:
        problems.append(f"optimizer.lr={opt.lr}: must be a finite number > 0")
    if not math.isfinite(opt.weight_decay) or opt.weight_decay < 0:
        problems.append(f"optimizer.weight_decay={opt.weight_decay}: must be finite and >= 0")
    if not math.isfinite(opt.eps) or opt.eps <= 0:
        problems.append(f"optimizer.eps={opt.eps}: must be a finite number > 0")
    if opt.clip_grad < 0:
        problems.append(f"optimizer.clip_grad={opt.clip_grad}: must be >= 0 (0 disables it)")
    if not (0 <= opt.beta1 < 1 and 0 <= opt.beta2 < 1):
        problems.append(
            f"optimizer.beta1={opt.beta1}, optimizer.beta2={opt.beta2}: must be in [0, 1)"
        )
    if sched.total_steps < 1:
        problems.append(f"schedule.total_steps={sched.total_steps}: must be at least 1")
    elif sched.warmup_steps < 0 or sched.warmup_steps >= sched.total_steps:
        problems.append(
            f"schedule.warmup_steps={sched.warmup_steps}: must be >= 0 and below "
            f"schedule.total_steps={sched.total_steps}; lower warmup or raise total_steps"
        )
    if not 0 <= sched.min_lr <= opt.lr:
        problems.append(f"schedule.min_lr={sched.min_lr}: must be in [0, optimizer.lr={opt.lr}]")
    if config.checkpoint.keep_last < 1:
        problems.append(f"checkpoint.keep_last={config.checkpoint.keep_last}: must be >= 1")
    for key in ("checkpoint.every_steps", "eval.every_steps", "logging.log_every"):
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if key == "logging.log_every" and value < 1:
            problems.append(f"{key}={value}: must be at least 1 (log every N steps)")
        elif value < 0:
            problems.append(f"{key}={value}: must be >= 0 (0 turns it off)")
    if config.eval.batch_size < 1:
        problems.append(
            f"eval.batch_size={config.eval.batch_size}: must be at least 1 (images or captions "
            "per rank per batch)"
        )
    if config.eval.task != "none" and not config.eval.data:
        problems.append(
            f"eval.task={config.eval.task!r} needs eval.data (the data folder); "
            "set eval.data or eval.task=none"
        )
