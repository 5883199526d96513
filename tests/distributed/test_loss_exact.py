"""The contrastive loss and its gradients do not depend on the layout: multi-process, gloo.

The same 32 pairs and the same weights (the real dual encoder, built from one init seed) are
run as (DP=1, A=1), (DP=2, A=4), (DP=4, A=2) and, with tensor and sequence parallelism, as
(TP=2, DP=2, A=4). Under `loss.negatives: global` all of them contrast the 32 pairs against
each other, so the loss and every parameter gradient (summed over the data-parallel ranks,
as the sharding code sums them) must equal those of a one-pass full-batch reference.

Tolerance: fp32 throughout; the layouts add the same terms in different orders (row blocks,
rank sums), which moves a result by a few ulps times the number of terms. 1e-5 of a
tensor's largest gradient (per tensor) and 1e-5 relative for the loss leave two orders of
magnitude of margin over that and fail on any missing or doubled term.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from megatron_ibxl.config import ParallelConfig, RunConfig
from megatron_ibxl.losses import infonce_loss_serial, sigmoid_loss_serial
from megatron_ibxl.models import build_dual_encoder, gather_full_parameters
from megatron_ibxl.training.step import train_step
from tests.helpers.dist import run_distributed

PAIRS = 32
REL = 1e-5


def toy_config(kind: str = "infonce", tp: int = 1, dropout: float = 0.0) -> RunConfig:
    """Hidden 32, 2 layers, 8 x 8 patches of 16 px images, context 8."""
    config = RunConfig()
    vision, text = config.model.vision, config.model.text
    vision.image_size, vision.patch_size = 16, 8
    vision.hidden, vision.num_layers, vision.num_heads, vision.mlp_hidden = 32, 2, 4, 64
    text.vocab_size, text.vocab_pad_multiple, text.context_length = 64, 8, 8
    text.hidden, text.num_layers, text.num_heads, text.mlp_hidden = 32, 2, 4, 64
    config.model.embed_dim = 16
    config.model.hidden_dropout = config.model.attention_dropout = dropout
    config.parallel.tp = tp
    config.parallel.sequence_parallel = tp > 1
    config.loss.kind = kind
    return config


def make_pairs(count: int = PAIRS, seed: int = 0) -> SimpleNamespace:
    generator = torch.Generator().manual_seed(seed)
    return SimpleNamespace(
        images=torch.randn(count, 3, 16, 16, generator=generator),
        tokens=torch.randint(0, 64, (count, 8), generator=generator),
        lengths=torch.randint(2, 9, (count,), generator=generator),
    )


def rows(pairs: SimpleNamespace, start: int, count: int) -> SimpleNamespace:
    return SimpleNamespace(**{k: v[start : start + count] for k, v in vars(pairs).items()})


def layout_batches(pairs, dp: int, dp_rank: int, accumulation: int) -> list[SimpleNamespace]:
    """This rank's micro-batches: micro-batch m of dp rank k holds block m * dp + k."""
    b = pairs.images.shape[0] // (dp * accumulation)
    return [rows(pairs, (m * dp + dp_rank) * b, b) for m in range(accumulation)]


def serial_loss(model, batch, kind):
    image_emb, text_emb = model(batch.images, batch.tokens, batch.lengths)
    if kind == "infonce":
        return infonce_loss_serial(image_emb, text_emb, model.scale())
    return sigmoid_loss_serial(image_emb, text_emb, model.scale(), model.logit_bias)


def full_grads(model, ctx) -> dict[str, torch.Tensor]:
    """Full-size gradients of this dp rank (sequence-parallel norm grads summed over tp)."""
    for param in model.parameters():
        if getattr(param, "sequence_parallel", False) and ctx.tp > 1:
            dist.all_reduce(param.grad, group=ctx.tp_group)
    return gather_full_parameters(model, "grad")


def sum_over(grads: dict[str, torch.Tensor], group) -> dict[str, torch.Tensor]:
    """What the sharding code leaves behind: gradients summed over the dp ranks."""
    if group is not None:
        for grad in grads.values():
            dist.all_reduce(grad, group=group)
    return grads


def compare(name: str, loss, grads, ref_loss, ref_grads) -> list[str]:
    """Problems, one line each; empty when the layout agrees with the reference."""
    # Written as `not (diff <= bound)` so that a NaN loss or gradient counts as a problem.
    problems = []
    if not abs(loss - ref_loss) <= REL * abs(ref_loss):
        problems.append(f"{name}: loss {loss!r} != reference {ref_loss!r}")
    for key, ref in ref_grads.items():
        diff = float((grads[key] - ref).abs().max())
        bound = REL * float(ref.abs().max())
        if not diff <= bound:
            problems.append(f"{name}: grad {key} max diff {diff:.3e} > {bound:.3e}")
    return problems


def run_layout(model, pairs, config, negatives, dp, dp_rank, group, accumulation, ctx):
    config.loss.negatives = negatives
    layout = SimpleNamespace(dp=dp, dp_group=group, device=torch.device("cpu"))
    model.zero_grad()
    batches = layout_batches(pairs, dp, dp_rank, accumulation)
    output = train_step(model, batches, config, layout)
    return output, sum_over(full_grads(model, ctx), group)


def _tp1_all(ctx):
    """Both loss kinds on 4 ranks with tp=1, sharing the process groups."""
    # Two dp groups of 2 inside the 4 ranks (every rank creates every group, in order).
    halves = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    return {kind: _tp1_layouts(ctx, kind, halves) for kind in ("infonce", "sigmoid")}


def _tp1_layouts(ctx, kind: str, halves):
    """The reference and the layouts DP=1/A=1, DP=2/A=4, DP=4/A=2 of one loss kind."""
    config = toy_config(kind)
    model = build_dual_encoder(config)
    pairs = make_pairs()
    model.zero_grad()
    ref_loss = serial_loss(model, pairs, kind)
    ref_loss.backward()
    ref_loss, ref_grads = ref_loss.item(), full_grads(model, ctx)

    layouts = {
        "DP=1,A=1": (1, 0, None, 1),
        "DP=2,A=4": (2, ctx.rank % 2, halves[ctx.rank // 2], 4),
        "DP=4,A=2": (4, ctx.rank, ctx.dp_group, 2),
    }
    problems, results = [], {}
    for name, (dp, dp_rank, group, accumulation) in layouts.items():
        output, grads = run_layout(
            model, pairs, config, "global", dp, dp_rank, group, accumulation, ctx
        )
        problems += compare(f"{kind} {name} global", output.loss, grads, ref_loss, ref_grads)
        results[name] = output

    # `micro` with DP=2, A=4: negatives are the 8 pairs of one micro-batch over both ranks;
    # the reference averages 4 independent one-pass losses over those 8 pairs.
    dp, dp_rank, group, accumulation = layouts["DP=2,A=4"]
    micro_ref_loss, micro_ref_grads = 0.0, {}
    for m in range(accumulation):
        model.zero_grad()
        loss = serial_loss(model, rows(pairs, m * 8, 8), kind) / accumulation
        loss.backward()
        micro_ref_loss += loss.item()
        for key, grad in full_grads(model, ctx).items():
            micro_ref_grads[key] = micro_ref_grads.get(key, 0) + grad
    output, grads = run_layout(model, pairs, config, "micro", dp, dp_rank, group, 4, ctx)
    problems += compare(
        f"{kind} DP=2,A=4 micro", output.loss, grads, micro_ref_loss, micro_ref_grads
    )
    results["micro"] = output
    # Tensors do not survive the queue once their process exits: send numpy arrays.
    ref_arrays = {key: grad.numpy() for key, grad in ref_grads.items()}
    return dict(problems=problems, results=results, ref_loss=ref_loss, ref_grads=ref_arrays)


@pytest.fixture(scope="module")
def tp1_runs(tmp_path_factory):
    """Both loss kinds on 4 tp=1 ranks, in one spawn of 4 processes: {kind: [rank results]}."""
    results = run_distributed(_tp1_all, 4, tmp_path_factory.mktemp("loss_tp1"), timeout_s=600)
    return {kind: [by_rank[kind] for by_rank in results] for kind in ("infonce", "sigmoid")}


@pytest.mark.parametrize("kind", ["infonce", "sigmoid"])
def test_global_negatives_are_layout_independent(tp1_runs, kind):
    for rank, result in enumerate(tp1_runs[kind]):
        assert not result["problems"], f"rank {rank}:\n" + "\n".join(result["problems"])
        outputs = result["results"]
        assert {outputs[n].contrastive_batch for n in ("DP=1,A=1", "DP=2,A=4", "DP=4,A=2")} == {
            PAIRS
        }


@pytest.mark.parametrize("kind", ["infonce", "sigmoid"])
def test_micro_negatives_average_micro_batch_losses_and_differ_from_global(tp1_runs, kind):
    # Checked against the averaged reference inside the run (problems above); here: the two
    # modes contrast against 32 and 8 pairs, so the test can tell them apart.
    outputs = tp1_runs[kind][0]["results"]
    assert outputs["micro"].contrastive_batch == 8
    assert abs(outputs["micro"].loss - outputs["DP=2,A=4"].loss) > 1e-3


def _tp2_dp2(ctx, ref_loss, ref_grads):
    """TP=2 (sequence parallel) x DP=2, A=4, global, against the tp=1 reference; then the
    dropout replay: with dropout on, both passes of each micro-batch embed bitwise alike."""
    ref_grads = {key: torch.from_numpy(array) for key, array in ref_grads.items()}
    config = toy_config("infonce", tp=2)
    model = build_dual_encoder(config)
    pairs = make_pairs()
    output, grads = run_layout(
        model, pairs, config, "global", ctx.dp, ctx.dp_rank, ctx.dp_group, 4, ctx
    )
    problems = compare("TP=2,DP=2,A=4 global", output.loss, grads, ref_loss, ref_grads)

    dropout_model = build_dual_encoder(toy_config("infonce", tp=2, dropout=0.2))
    recorded = []
    dropout_model.register_forward_hook(
        lambda _m, _i, out: recorded.append([t.detach().clone() for t in out])
    )
    batches = layout_batches(pairs, ctx.dp, ctx.dp_rank, 2)
    config.loss.negatives = "global"
    train_step(dropout_model, batches, config, ctx)
    for (image_a, text_a), (image_b, text_b) in zip(recorded[:2], recorded[2:]):
        if not (torch.equal(image_a, image_b) and torch.equal(text_a, text_b)):
            problems.append("dropout: the gradient pass embedded differently from the first")
    # Without the replay the same micro-batch embeds differently (dropout is really on).
    again = dropout_model(batches[0].images, batches[0].tokens, batches[0].lengths)
    if torch.equal(again[0], recorded[0][0]):
        problems.append("dropout: a fresh forward repeated the masks; dropout seems off")
    return dict(problems=problems, loss=output.loss)


def test_tp2_dp2_global_equals_the_single_process_reference(tp1_runs, tmp_path):
    reference = tp1_runs["infonce"][0]
    parallel = ParallelConfig(tp=2, sequence_parallel=True, backend="gloo", timeout_s=120)
    results = run_distributed(
        _tp2_dp2,
        4,
        tmp_path,
        reference["ref_loss"],
        reference["ref_grads"],
        parallel=parallel,
        timeout_s=600,
    )
    for rank, result in enumerate(results):
        assert not result["problems"], f"rank {rank}:\n" + "\n".join(result["problems"])
    # Tensor-parallel ranks hold the same embeddings and report the same (not a doubled) loss.
    assert len({r["loss"] for r in results}) == 1
