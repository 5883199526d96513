"""Tensor and sequence parallel towers equal the single-process model.

One spawn of 4 processes (each spawn costs tens of seconds on the shared CI machine). Inside
it, Megatron-core's parallel state is rebuilt three times: tp=1 computes the reference, then
tp=2 (two tp groups, dp=2) and tp=4 rebuild the same model (same init seed, so the same
full-size weights) with and without sequence parallelism and under each activation checkpointing
mode (the full matrix for one tower variant, see CASES). Embeddings, initial weights and
gradients, gathered to full shape, must match the reference within 1e-5 relative (norm-wise) in
fp32: tensor parallelism reorders the sums of the row-parallel matmuls and all-reduces, so
results differ from tp=1 by float32 rounding (about 1e-7 relative), not bit for bit.
Comparisons run inside the workers; only the errors come back. With dropout on, recompute must
replay the same masks: same gradients as without.

Odd lengths on purpose: captions have 11 token positions and images 3 x 3 = 9 patches (10
tokens with the class token), neither a multiple of 4 and mostly not of 2, so sequence
parallelism pads them and must mask the padding out of attention and pooling.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_ibxl.config import ParallelConfig, RunConfig
from megatron_ibxl.models import build_dual_encoder, gather_full_parameters
from megatron_ibxl.models.attention import LocalCoreAttention
from megatron_ibxl.parallel.rng import install_cpu_rng_tracker
from tests.helpers.dist import run_distributed

EOT = 50256  # GPT-2 end-of-text: the highest id of a 50,257-token vocabulary
CONTEXT = 11
LENGTHS = [11, 5, 1, 7]
LAYERS = 2
RECOMPUTE = ("none", "selective", "full")
# (sequence_parallel, recompute) per tower variant: the full matrix for the class-token
# model; the mean-pooled one (9 tokens, odd for every tp) with and without SP, to keep the
# file within a few minutes of CPU time.
CASES = {
    "cls_conv": [(sp, recompute) for sp in (False, True) for recompute in RECOMPUTE],
    "mean_linear": [(False, "none"), (True, "none"), (True, "full")],
}
TOLERANCE = 1e-5


def _config(variant: str, sequence_parallel: bool = False, recompute: str = "none") -> RunConfig:
    config = RunConfig()
    vision, text = config.model.vision, config.model.text
    vision.image_size, vision.patch_size, vision.channels = 24, 8, 3
    vision.hidden, vision.num_layers, vision.num_heads, vision.mlp_hidden = 32, LAYERS, 4, 64
    if variant == "mean_linear":
        vision.use_class_token, vision.pool, vision.patch_embed = False, "mean", "linear"
    text.vocab_size, text.context_length = 50257, CONTEXT
    text.hidden, text.num_layers, text.num_heads, text.mlp_hidden = 48, LAYERS, 4, 96
    config.model.embed_dim = 16
    config.parallel.sequence_parallel = sequence_parallel
    config.parallel.recompute = recompute
    return config


def _batch():
    """Four pairs; hand-made captions covering the pooling cases."""
    generator = torch.Generator().manual_seed(7)
    images = torch.randn(4, 3, 24, 24, generator=generator)
    tokens = torch.randint(1, 50000, (4, CONTEXT), generator=generator)
    tokens[0, 3] = EOT - 1  # truncated caption, no end-of-text; an argmax would stop here
    tokens[1, 4:] = EOT  # end-of-text at 4, then padding that reuses the end-of-text id
    tokens[2, 0], tokens[2, 1:] = EOT, 0  # empty caption: end-of-text only, zero padding
    tokens[3, 6], tokens[3, 7:] = EOT, 0
    return images, tokens, torch.tensor(LENGTHS)


def _use_tp(tp: int) -> None:
    """Rebuild Megatron-core's parallel state with tensor-parallel size `tp` over the same
    processes (the CPU RNG tracker is re-seeded for the new tp rank)."""
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, create_gloo_process_groups=False
    )
    install_cpu_rng_tracker(0, parallel_state.get_tensor_model_parallel_rank())


_COUNTS = {"core": 0, "layer": 0}


def _install_counters() -> None:
    """Count core-attention and layer forward calls, to prove that recompute really re-runs
    them."""
    if getattr(LocalCoreAttention.forward, "counted", False):
        return
    core_forward, layer_forward = LocalCoreAttention.forward, TransformerLayer.forward

    def core(self, *args, **kwargs):
        _COUNTS["core"] += 1
        return core_forward(self, *args, **kwargs)

    def layer(self, *args, **kwargs):
        _COUNTS["layer"] += 1
        return layer_forward(self, *args, **kwargs)

    core.counted = True
    LocalCoreAttention.forward, TransformerLayer.forward = core, layer


def _full_grads(model) -> dict[str, torch.Tensor]:
    """Gradients gathered to full shape. Under sequence parallelism each rank's norms (and
    row-parallel biases) saw only its s/tp rows, so Megatron leaves their gradients partial
    and marks the parameters `sequence_parallel`; training all-reduces them over tp (the
    sharding code does), and so must this test before comparing with tp=1."""
    group = parallel_state.get_tensor_model_parallel_group()
    for param in model.parameters():
        if getattr(param, "sequence_parallel", False) and param.grad is not None:
            dist.all_reduce(param.grad, group=group)
    return gather_full_parameters(model, which="grad")


def _run_case(variant, sequence_parallel, recompute, dropout=0.0) -> dict:
    """Build, embed the batch, back-propagate a symmetric InfoNCE loss; full-size results.
    The RNG streams are reset first, so runs with dropout draw the same masks."""
    config = _config(variant, sequence_parallel, recompute)
    config.model.hidden_dropout = config.model.attention_dropout = dropout
    model = build_dual_encoder(config)
    install_cpu_rng_tracker(1, parallel_state.get_tensor_model_parallel_rank())
    _COUNTS.update(core=0, layer=0)
    image_emb, text_emb = model(*_batch())
    logits = model.scale() * image_emb @ text_emb.T  # [b, d] @ [d, b] -> [b, b]
    target = torch.arange(len(logits))
    loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    loss.backward()
    return dict(
        image_emb=image_emb.detach(),
        text_emb=text_emb.detach(),
        params=gather_full_parameters(model),
        grads=_full_grads(model),
        counts=(_COUNTS["core"], _COUNTS["layer"]),
    )


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """|got - want| / |want| (Frobenius); inf for a shape mismatch; 0 when both are zero."""
    if got.shape != want.shape:
        return float("inf")
    error, scale = (got - want).norm().item(), want.norm().item()
    return error / scale if scale > 0 else error


def _errors(result: dict, reference: dict) -> dict[str, float]:
    errors = {
        key: _relative_error(result[key], reference[key]) for key in ("image_emb", "text_emb")
    }
    for kind in ("params", "grads"):
        if result[kind].keys() != reference[kind].keys():
            errors[f"{kind} names"] = float("inf")
            continue
        for name, want in reference[kind].items():
            errors[f"{kind[:-1]} {name}"] = _relative_error(result[kind][name], want)
    return errors


def _prefix_embeddings(sequence_parallel: bool):
    """The padded batch's text embeddings, and each caption alone cut to its length. With a
    causal mask the end-of-text state depends only on the tokens up to it, so pooling at
    lengths - 1 must give the same vectors whatever the padding ids or padded length."""
    model = build_dual_encoder(_config("cls_conv", sequence_parallel))
    _, tokens, lengths = _batch()
    with torch.no_grad():
        batch = model.encode_text(tokens, lengths)
        alone = [
            model.encode_text(tokens[i : i + 1, :n], lengths[i : i + 1])
            for i, n in enumerate(LENGTHS)
        ]
    return batch, torch.cat(alone)


def _truncated_change() -> float:
    """How much the truncated caption's embedding moves when its last token changes (pooling
    at the argmax id, position 3, would not move at all)."""
    model = build_dual_encoder(_config("cls_conv"))
    _, tokens, lengths = _batch()
    changed = tokens.clone()
    changed[0, -1] = 12345
    with torch.no_grad():
        delta = model.encode_text(tokens, lengths)[0] - model.encode_text(changed, lengths)[0]
    return delta.abs().max().item()


def _check_dropout_recompute(report, prefix, sequence_parallel) -> None:
    """With dropout, recompute must replay the same masks (Megatron's checkpoint restores the
    RNG states, the CPU tracker included): the same gradients as without recompute. Returns
    the text embeddings of the run without recompute."""
    runs = {r: _run_case("cls_conv", sequence_parallel, r, dropout=0.1) for r in RECOMPUTE}
    for recompute in ("selective", "full"):
        label = f"{prefix} dropout recompute={recompute}"
        report["errors"][label] = _errors(runs[recompute], runs["none"])
    return runs["none"]["text_emb"]


def _all_layouts(ctx) -> dict:
    """tp=1 reference, then tp=2 and tp=4; returns errors and recompute call counts only."""
    _install_counters()
    report = {"errors": {}, "counts": {}}

    _use_tp(1)
    reference = {
        (variant, recompute): _run_case(variant, False, recompute)
        for variant, cases in CASES.items()
        for recompute in RECOMPUTE
        if (False, recompute) in cases
    }
    for (variant, recompute), result in reference.items():
        label = f"tp1 {variant} recompute={recompute}"
        report["counts"][label] = (recompute, result["counts"])
        report["errors"][label] = _errors(result, reference[(variant, "none")])
    dropped = _check_dropout_recompute(report, "tp1", sequence_parallel=False)
    # The dropout runs must differ from the deterministic ones, or the check above is empty.
    report["dropout_effect"] = _relative_error(dropped, reference[("cls_conv", "none")]["text_emb"])
    batch_tp1, alone = _prefix_embeddings(False)
    report["errors"]["tp1 pooling"] = {"padded vs alone": _relative_error(batch_tp1, alone)}
    report["truncated_change"] = _truncated_change()

    for tp in (2, 4):
        _use_tp(tp)
        for variant, cases in CASES.items():
            for sp, recompute in cases:
                label = f"tp{tp} {variant} sp={sp} recompute={recompute}"
                result = _run_case(variant, sp, recompute)
                report["counts"][label] = (recompute, result["counts"])
                report["errors"][label] = _errors(result, reference[(variant, "none")])
        if tp == 2:
            _check_dropout_recompute(report, "tp2", sequence_parallel=True)
        batch, alone = _prefix_embeddings(True)
        report["errors"][f"tp{tp} sp pooling"] = {
            "padded vs alone": _relative_error(batch, alone),
            "padded vs tp1": _relative_error(batch, batch_tp1),
        }
    _use_tp(ctx.tp)
    return report


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    parallel = ParallelConfig(tp=4, backend="gloo", timeout_s=120)
    path = tmp_path_factory.mktemp("towers")
    # Under a minute of CPU time; the generous limit is for a shared, overloaded machine.
    return run_distributed(_all_layouts, 4, path, parallel=parallel, timeout_s=1800)


def _assert_within_tolerance(reports, prefix: str) -> None:
    checked = 0
    for rank, report in enumerate(reports):
        for label, errors in report["errors"].items():
            if not label.startswith(prefix):
                continue
            bad = {name: err for name, err in errors.items() if not err <= TOLERANCE}
            assert not bad, f"rank {rank} {label}: relative errors above {TOLERANCE}: {bad}"
            checked += len(errors)
    assert checked > 0, f"no results for {prefix}"


def _assert_recompute_counts(reports, prefix: str) -> None:
    # Two towers of LAYERS layers: each layer runs once forward; selective re-runs the
    # attention core in backward, full re-runs the whole layer (and so its core too).
    once = 2 * LAYERS
    expected = {"none": (once, once), "selective": (2 * once, once), "full": (2 * once, 2 * once)}
    for label, (recompute, counts) in reports[0]["counts"].items():
        if label.startswith(prefix):
            assert counts == expected[recompute], f"{label}: (core, layer) calls {counts}"


def test_tp1_recompute_modes_match(reports):
    _assert_within_tolerance(reports, "tp1 ")
    _assert_recompute_counts(reports, "tp1 ")


def test_tp1_pools_end_of_text(reports):
    _assert_within_tolerance(reports, "tp1 pooling")
    assert reports[0]["truncated_change"] > 1e-3


def test_tp2_matches_tp1_with_and_without_sequence_parallel(reports):
    _assert_within_tolerance(reports, "tp2 ")
    _assert_recompute_counts(reports, "tp2 ")


def test_tp4_matches_tp1_with_and_without_sequence_parallel(reports):
    _assert_within_tolerance(reports, "tp4 ")
    _assert_recompute_counts(reports, "tp4 ")


def test_recompute_replays_dropout_masks(reports):
    for prefix in ("tp1 dropout", "tp2 dropout"):
        _assert_within_tolerance(reports, prefix)
    assert reports[0]["dropout_effect"] > 1e-3


def test_sequence_parallel_pooling_ignores_padding(reports):
    _assert_within_tolerance(reports, "tp2 sp pooling")
    _assert_within_tolerance(reports, "tp4 sp pooling")
