"""count_parameters (from the config alone) equals the parameters of a real model.

The 30B check is pure arithmetic on the shipped config. The instantiated check builds small
models, which needs Megatron-core's parallel state, so it runs in one spawned group of two
processes (tests/helpers/dist.py) that counts under tp=1 and then tp=2.
"""

import math

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_ibxl.config import ParallelConfig, RunConfig, load_config
from megatron_ibxl.models import build_dual_encoder, count_parameters, no_weight_decay
from megatron_ibxl.parallel.rng import install_cpu_rng_tracker
from tests.helpers.dist import run_distributed

REFERENCE = "launch/configs/ibxl-30b-h100x512.yaml"


def test_30b_config_counts_30_1_billion():
    config = load_config(REFERENCE)
    counts = count_parameters(config.model, tp=config.parallel.tp, loss_kind=config.loss.kind)
    # DESIGN.md: about 30.1B in all, vision 9.7B, text 20.4B.
    assert math.isclose(counts.total, 30.1e9, abs_tol=0.3e9), counts
    assert math.isclose(counts.vision, 9.7e9, abs_tol=0.1e9), counts
    assert math.isclose(counts.text, 20.4e9, abs_tol=0.1e9), counts


def test_30b_vision_count_by_hand():
    # Independent arithmetic for the ViT: 48 layers of width 4096, MLP 16384, 257 tokens.
    h, f, layers = 4096, 16384, 48
    per_layer = (3 * h * h + 3 * h) + (h * h + h) + (2 * h * f + f + h) + 4 * h
    patch = 3 * 14 * 14 * h + h
    expected = patch + h + 257 * h + layers * per_layer + 2 * h
    config = load_config(REFERENCE)
    assert count_parameters(config.model, tp=8).vision == expected


def _small(variant: str) -> RunConfig:
    config = RunConfig()
    vision, text = config.model.vision, config.model.text
    vision.image_size, vision.patch_size = 28, 14
    vision.hidden, vision.num_layers, vision.num_heads, vision.mlp_hidden = 32, 2, 4, 64
    text.vocab_size, text.context_length = 1000, 9
    text.hidden, text.num_layers, text.num_heads, text.mlp_hidden = 48, 3, 4, 80
    config.model.embed_dim = 24
    if variant == "mean_linear_sigmoid":
        vision.use_class_token, vision.pool, vision.patch_embed = False, "mean", "linear"
        config.loss.kind = "sigmoid"
    if variant == "odd_vocab":
        text.vocab_size, text.vocab_pad_multiple = 50257, 3  # padded to lcm(3, tp) rows
    return config


VARIANTS = ("cls_conv", "mean_linear_sigmoid", "odd_vocab")


def _count_model(model, tp_group) -> dict[str, int]:
    """Full-model counts per part: tensor-parallel shards summed over the tp group (the
    vocabulary padding rows included, as the formula counts them), replicated parameters
    counted once."""
    parts = {"vision": 0, "text": 0, "heads": 0}
    for name, param in model.named_parameters():
        part = "vision" if name.startswith("image_tower.") else "text"
        if not name.startswith(("image_tower.", "text_tower.")):
            part = "heads"
        numel = torch.tensor(param.numel())
        if getattr(param, "tensor_model_parallel", False):
            dist.all_reduce(numel, group=tp_group)
        parts[part] += int(numel)
    return parts


def _counts_under(ctx, layouts):
    results = {}
    for tp in layouts:
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, create_gloo_process_groups=False
        )
        install_cpu_rng_tracker(0, parallel_state.get_tensor_model_parallel_rank())
        group = parallel_state.get_tensor_model_parallel_group()
        for variant in VARIANTS:
            config = _small(variant)
            config.parallel.sequence_parallel = tp > 1
            model = build_dual_encoder(config)
            results[(tp, variant)] = _count_model(model, group)
            results[("decayed", tp, variant)] = sorted(
                name for name, param in model.named_parameters() if not no_weight_decay(name, param)
            )
    return results


@pytest.fixture(scope="module")
def instantiated(tmp_path_factory):
    parallel = ParallelConfig(tp=2, backend="gloo", timeout_s=120)
    path = tmp_path_factory.mktemp("counts")
    return run_distributed(_counts_under, 2, path, (1, 2), parallel=parallel, timeout_s=600)[0]


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("variant", VARIANTS)
def test_formula_matches_instantiated_model(instantiated, tp, variant):
    config = _small(variant)
    counts = count_parameters(config.model, tp=tp, loss_kind=config.loss.kind)
    expected = {"vision": counts.vision, "text": counts.text, "heads": counts.heads}
    assert instantiated[(tp, variant)] == expected


@pytest.mark.parametrize("tp", [1, 2])
def test_weight_decay_applies_to_matrices_only(instantiated, tp):
    # Decayed: the GEMM weights of each layer, the patch projection, the token embedding and
    # the heads. Not decayed: norms, biases, positions, class token, logit scale and bias.
    layers = {"image_tower": 2, "text_tower": 3}
    expected = [
        f"{tower}.block.layers.{i}.{module}.weight"
        for tower, count in layers.items()
        for i in range(count)
        for module in ("mlp.linear_fc1", "mlp.linear_fc2", "self_attention.linear_proj")
    ]
    expected += [
        f"{tower}.block.layers.{i}.self_attention.linear_qkv.weight"
        for tower, count in layers.items()
        for i in range(count)
    ]
    expected += [
        "image_tower.patch_embed.proj.weight",
        "text_tower.word_embeddings.weight",
        "image_head.weight",
        "text_head.weight",
    ]
    assert instantiated[("decayed", tp, "mean_linear_sigmoid")] == sorted(expected)
