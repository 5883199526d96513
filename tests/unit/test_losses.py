"""Single-process tests of the contrastive losses and of the accumulation-aware train step.

The model here is a small stand-in with the DualEncoder interface (forward(images, tokens,
lengths) -> two L2-normalised [b, d] embeddings, `.scale()`, `.logit_bias`), so these tests
need no process group. The multi-process exactness tests with the real model live in
tests/distributed/test_loss_exact.py.

Run `python -m tests.unit.test_losses` to print the memory tables of the README.
"""

from __future__ import annotations

import math
import sys
import weakref
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import random as mcore_random
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from megatron_ibxl.config import RunConfig
from megatron_ibxl.losses import (
    clamp_logit_scale_,
    contrastive_loss,
    infonce_loss_serial,
    sigmoid_loss_serial,
)
from megatron_ibxl.models.dual_encoder import DualEncoder
from megatron_ibxl.parallel.rng import install_cpu_rng_tracker
from megatron_ibxl.training.step import RngSnapshot, train_step

PATCH = 2
"""Stand-in image tower: 2 x 2 pixel patches of 16 px images, 64 patch tokens per image."""


class StandInDualEncoder(nn.Module):
    """A dual encoder with per-token MLPs, mean pooling and dropout (CPU and tracker RNG).

    Activations scale with b * tokens * hidden, so the memory test can tell activation memory
    from the embedding cache. The text dropout runs inside Megatron's RNG tracker fork, as
    the real towers' attention dropout does, so replaying the tracker state is tested too.
    """

    def __init__(self, hidden=64, embed_dim=8, vocab=32, dropout=0.0, kind="infonce"):
        super().__init__()
        self.image_mlp = nn.Sequential(
            nn.Linear(3 * PATCH * PATCH, hidden), nn.GELU(), nn.Linear(hidden, hidden)
        )
        self.token_embedding = nn.Embedding(vocab, hidden)
        self.text_mlp = nn.Sequential(nn.GELU(), nn.Linear(hidden, hidden))
        self.dropout = nn.Dropout(dropout)
        self.image_head = nn.Linear(hidden, embed_dim, bias=False)
        self.text_head = nn.Linear(hidden, embed_dim, bias=False)
        sigmoid = kind == "sigmoid"
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0 if sigmoid else 1 / 0.07)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0)) if sigmoid else None
        self.logit_scale_max = math.log(100.0)

    def forward(self, images, tokens, lengths):
        b, c, height, width = images.shape
        patches = images.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH)  # [b, c, H/p, W/p, p, p]
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(b, -1, c * PATCH * PATCH)
        image_tokens = self.dropout(self.image_mlp(patches))  # [b, s, 3 p p] -> [b, s, h]
        image_emb = self.image_head(image_tokens.mean(dim=1))  # [b, h] @ [h, d] -> [b, d]

        with mcore_random.get_cuda_rng_tracker().fork():
            text_tokens = self.dropout(self.text_mlp(self.token_embedding(tokens)))  # [b, s, h]
        mask = torch.arange(tokens.shape[1]) < lengths[:, None]  # [b, s]
        pooled = (text_tokens * mask[..., None]).sum(1) / lengths[:, None]  # [b, s, h] -> [b, h]
        text_emb = self.text_head(pooled)  # [b, h] @ [h, d] -> [b, d]
        return F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1)

    def scale(self):
        return torch.exp(torch.clamp(self.logit_scale, max=self.logit_scale_max))


@dataclass
class Batch:
    images: torch.Tensor
    tokens: torch.Tensor
    lengths: torch.Tensor


def make_pairs(count: int, seed: int = 0, vocab: int = 32, context: int = 8) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(count, 3, 16, 16, generator=generator)
    tokens = torch.randint(0, vocab, (count, context), generator=generator)
    lengths = torch.randint(2, context + 1, (count,), generator=generator)
    return Batch(images, tokens, lengths)


def split(batch: Batch, parts: int) -> list[Batch]:
    return [
        Batch(*pieces)
        for pieces in zip(
            batch.images.chunk(parts), batch.tokens.chunk(parts), batch.lengths.chunk(parts)
        )
    ]


def config_for(negatives: str, kind: str = "infonce") -> RunConfig:
    config = RunConfig()
    config.loss.negatives = negatives
    config.loss.kind = kind
    return config


@pytest.fixture(autouse=True)
def cpu_rng_tracker():
    """The CPU RNG tracker init_parallel installs on CPU machines, removed after the test."""
    names = (
        "_CUDA_RNG_STATE_TRACKER",
        "_CUDA_RNG_STATE_TRACKER_INITIALIZED",
        "_get_cuda_rng_state",
        "_set_cuda_rng_state",
    )
    saved = {name: getattr(mcore_random, name) for name in names}
    install_cpu_rng_tracker(seed=0, tp_rank=0)
    yield
    for name, value in saved.items():
        setattr(mcore_random, name, value)


SINGLE = SimpleNamespace(dp=1, dp_group=None, device=torch.device("cpu"))
"""The ParallelContext fields train_step reads, for one process."""


def grads_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(actual, expected, rel=1e-5):
    """Per tensor: max |actual - expected| <= rel * max |expected| (fp32 summation order)."""
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        bound = rel * value.abs().max().clamp_min(1e-12)
        diff = (actual[name] - value).abs().max()
        assert diff <= bound, f"{name}: max diff {diff:.3e} > {bound:.3e}"


# ---------------------------------------------------------------------------- serial losses


def test_infonce_serial_matches_hand_computation():
    # Independent reference: the per-pair definition written as loops with explicit
    # log-sum-exp, in float64 (CLIP, Radford et al. 2021, Figure 3).
    generator = torch.Generator().manual_seed(1)
    image_emb = F.normalize(torch.randn(5, 4, generator=generator, dtype=torch.float64), dim=1)
    text_emb = F.normalize(torch.randn(5, 4, generator=generator, dtype=torch.float64), dim=1)
    scale = torch.tensor(7.0, dtype=torch.float64)
    total = 0.0
    for i in range(5):
        row = [float(scale * image_emb[i] @ text_emb[j]) for j in range(5)]
        column = [float(scale * image_emb[j] @ text_emb[i]) for j in range(5)]
        total += math.log(sum(math.exp(v) for v in row)) - row[i]
        total += math.log(sum(math.exp(v) for v in column)) - column[i]
    expected = total / (2 * 5)
    assert float(infonce_loss_serial(image_emb, text_emb, scale)) == pytest.approx(expected)


def test_sigmoid_serial_matches_hand_computation():
    # SigLIP (Zhai et al. 2023, Algorithm 1): -1/B sum_ij log sigmoid(z_ij (t x_i.y_j + b)).
    generator = torch.Generator().manual_seed(2)
    image_emb = F.normalize(torch.randn(4, 3, generator=generator, dtype=torch.float64), dim=1)
    text_emb = F.normalize(torch.randn(4, 3, generator=generator, dtype=torch.float64), dim=1)
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    total = 0.0
    for i in range(4):
        for j in range(4):
            z = 1.0 if i == j else -1.0
            logit = float(scale * image_emb[i] @ text_emb[j] + bias)
            total += math.log(1.0 + math.exp(-z * logit))  # -log sigmoid(z * logit)
    loss = sigmoid_loss_serial(image_emb, text_emb, scale, bias)
    assert float(loss) == pytest.approx(total / 4)


@pytest.mark.parametrize("kind", ["infonce", "sigmoid"])
def test_single_process_loss_equals_serial_with_gradients(kind):
    generator = torch.Generator().manual_seed(3)
    image_emb = F.normalize(torch.randn(6, 4, generator=generator), dim=1).requires_grad_()
    text_emb = F.normalize(torch.randn(6, 4, generator=generator), dim=1).requires_grad_()
    scale = torch.tensor(5.0, requires_grad=True)
    bias = torch.tensor(-2.0, requires_grad=True) if kind == "sigmoid" else None
    inputs = [image_emb, text_emb, scale] + ([bias] if bias is not None else [])

    output = contrastive_loss(image_emb, text_emb, scale, bias, kind, group=None)
    actual = torch.autograd.grad(output.loss, inputs)
    if kind == "infonce":
        reference = infonce_loss_serial(image_emb, text_emb, scale)
    else:
        reference = sigmoid_loss_serial(image_emb, text_emb, scale, bias)
    expected = torch.autograd.grad(reference, inputs)
    assert output.loss.item() == pytest.approx(reference.item(), rel=1e-6)
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert output.num_pairs == 6


@pytest.mark.parametrize("kind", ["infonce", "sigmoid"])
def test_top1_counts_match_a_known_permutation(kind):
    # Texts equal to the images except pairs 0 and 1, whose texts are swapped: image 0's best
    # text is text 1 and vice versa, so 4 of 6 are right in each direction.
    image_emb = torch.eye(6, 8)
    text_emb = image_emb[[1, 0, 2, 3, 4, 5]]
    bias = torch.tensor(0.0) if kind == "sigmoid" else None
    output = contrastive_loss(image_emb, text_emb, torch.tensor(10.0), bias, kind, None)
    assert int(output.correct_i2t) == 4
    assert int(output.correct_t2i) == 4


def test_loss_errors_name_the_problem():
    emb = torch.eye(2)
    with pytest.raises(ValueError, match="loss.kind='softmax'"):
        contrastive_loss(emb, emb, torch.tensor(1.0), None, "softmax", None)
    with pytest.raises(ValueError, match="logit_bias"):
        contrastive_loss(emb, emb, torch.tensor(1.0), None, "sigmoid", None)


# ---------------------------------------------------------------------------- the step


def one_pass_reference(model, batch: Batch, kind: str = "infonce"):
    """Loss and gradients of the whole batch in one forward: the DP=1, A=1 definition."""
    model.zero_grad()
    image_emb, text_emb = model(batch.images, batch.tokens, batch.lengths)
    if kind == "infonce":
        loss = infonce_loss_serial(image_emb, text_emb, model.scale())
    else:
        loss = sigmoid_loss_serial(image_emb, text_emb, model.scale(), model.logit_bias)
    loss.backward()
    return loss.item(), grads_of(model)


def run_step(model, micro_batches, negatives, kind="infonce"):
    model.zero_grad()
    output = train_step(model, micro_batches, config_for(negatives, kind), SINGLE)
    return output, grads_of(model)


@pytest.mark.parametrize("kind", ["infonce", "sigmoid"])
def test_global_negatives_with_accumulation_equal_one_pass(kind):
    torch.manual_seed(0)
    model = StandInDualEncoder(kind=kind)
    batch = make_pairs(16)
    loss, grads = one_pass_reference(model, batch, kind)
    output, step_grads = run_step(model, split(batch, 4), "global", kind)
    assert output.loss == pytest.approx(loss, rel=1e-5)
    assert_grads_close(step_grads, grads)
    assert output.contrastive_batch == 16 and output.micro_batches == 4


def test_micro_negatives_equal_mean_of_independent_micro_batch_losses():
    torch.manual_seed(0)
    model = StandInDualEncoder()
    micro_batches = split(make_pairs(16), 4)
    # Reference: each micro-batch on its own, then the average of losses and gradients.
    losses, grad_sums = [], {}
    for micro in micro_batches:
        loss, grads = one_pass_reference(model, micro)
        losses.append(loss)
        for name, grad in grads.items():
            grad_sums[name] = grad_sums.get(name, 0) + grad / len(micro_batches)
    output, step_grads = run_step(model, micro_batches, "micro")
    assert output.loss == pytest.approx(sum(losses) / 4, rel=1e-6)
    assert_grads_close(step_grads, grad_sums)
    assert output.contrastive_batch == 4

    # With 4 micro-batches the two modes contrast against 16 and 4 pairs: they must differ.
    global_output, global_grads = run_step(model, micro_batches, "global")
    assert abs(global_output.loss - output.loss) > 1e-3
    assert (global_grads["image_head.weight"] - step_grads["image_head.weight"]).abs().max() > 1e-4


def test_step_reports_temperature_and_accuracy():
    torch.manual_seed(0)
    model = StandInDualEncoder()
    batch = make_pairs(8)
    output, _ = run_step(model, split(batch, 2), "global")
    with torch.no_grad():
        image_emb, text_emb = model(batch.images, batch.tokens, batch.lengths)
        logits_i2t = model.scale() * image_emb @ text_emb.t()  # [B, d] @ [d, B] -> [B, B]
    labels = torch.arange(8)
    assert output.logit_scale == pytest.approx(1 / 0.07, rel=1e-6)
    assert output.temperature == pytest.approx(0.07, rel=1e-6)
    assert output.acc_i2t == (logits_i2t.argmax(1) == labels).float().mean().item()
    assert output.acc_t2i == (logits_i2t.argmax(0) == labels).float().mean().item()
    assert set(output.metrics()) >= {"loss", "temperature", "acc_i2t", "acc_t2i"}


def test_step_rejects_an_empty_step():
    with pytest.raises(ValueError, match="at least one micro-batch"):
        train_step(StandInDualEncoder(), [], config_for("global"), SINGLE)


class EmbeddingRecorder:
    """Keeps a copy of every (image_emb, text_emb) the model returns."""

    def __init__(self, model):
        self.outputs = []
        model.register_forward_hook(
            lambda _m, _i, out: self.outputs.append(tuple(t.detach().clone() for t in out))
        )


def test_dropout_masks_are_replayed_between_the_two_passes():
    torch.manual_seed(5)
    model = StandInDualEncoder(dropout=0.3)
    batch = make_pairs(12)
    recorder = EmbeddingRecorder(model)

    # Dropout is live: two forwards without a replay differ.
    first = model(batch.images, batch.tokens, batch.lengths)
    second = model(batch.images, batch.tokens, batch.lengths)
    assert not torch.equal(first[0], second[0]) and not torch.equal(first[1], second[1])

    # The step's gradient-pass embeddings are bitwise those of its no-gradient pass.
    snapshot = RngSnapshot.capture()
    recorder.outputs.clear()
    output, step_grads = run_step(model, split(batch, 3), "global")
    no_grad_pass, grad_pass = recorder.outputs[:3], recorder.outputs[3:]
    for (image_a, text_a), (image_b, text_b) in zip(no_grad_pass, grad_pass):
        assert torch.equal(image_a, image_b) and torch.equal(text_a, text_b)

    # Reference: the same RNG start, the three micro-batches embedded once with gradients
    # (so with the same masks), one full-batch loss.
    snapshot.restore()
    model.zero_grad()
    embeddings = [model(m.images, m.tokens, m.lengths) for m in split(batch, 3)]
    image_emb = torch.cat([e[0] for e in embeddings])  # 3 x [b, d] -> [B, d]
    text_emb = torch.cat([e[1] for e in embeddings])  # 3 x [b, d] -> [B, d]
    loss = infonce_loss_serial(image_emb, text_emb, model.scale())
    loss.backward()
    assert output.loss == pytest.approx(loss.item(), rel=1e-6)
    assert_grads_close(step_grads, grads_of(model))


# ---------------------------------------------------------------------------- logit scale


def test_scale_gradient_flows_at_and_below_the_clamp_and_stops_above():
    # d exp(min(x, m)) / dx = exp(x) for x <= m (the clamp must let the optimizer lower a
    # scale that sits exactly at the clamp) and 0 above it. DualEncoder.scale is called on a
    # bare holder of the two attributes it reads.
    maximum = math.log(100.0)
    for value, expected in (
        (maximum - 0.5, math.exp(maximum - 0.5)),
        (maximum, 100.0),
        (maximum + 0.5, 0.0),
    ):
        holder = SimpleNamespace(
            logit_scale=torch.tensor(value, requires_grad=True), logit_scale_max=maximum
        )
        scale = DualEncoder.scale(holder)
        scale.backward()
        assert scale.item() == pytest.approx(math.exp(min(value, maximum)), rel=1e-6)
        assert float(holder.logit_scale.grad) == pytest.approx(expected, rel=1e-6, abs=0)


def test_clamp_logit_scale_acts_on_the_parameter_only_above_the_limit():
    model = StandInDualEncoder()
    with torch.no_grad():
        model.logit_scale.fill_(9.0)
    clamp_logit_scale_(model)
    # The largest fp32 number not above ln 100 (fp32's nearest, 4.6051702, is above it).
    assert float(model.logit_scale) <= math.log(100.0)
    assert float(model.logit_scale) == pytest.approx(math.log(100.0), rel=1e-7)
    with torch.no_grad():
        model.logit_scale.fill_(1.0)
    clamp_logit_scale_(model)
    assert float(model.logit_scale) == 1.0
    # Wrapped models are searched for the module that holds the parameter.
    wrapper = nn.Sequential(model)
    with torch.no_grad():
        model.logit_scale.fill_(9.0)
    clamp_logit_scale_(wrapper)
    assert float(model.logit_scale) == pytest.approx(math.log(100.0))


def test_clamp_logit_scale_names_a_model_without_one():
    with pytest.raises(ValueError, match="Linear has no logit_scale"):
        clamp_logit_scale_(nn.Linear(2, 2))


# ---------------------------------------------------------------------------- memory


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the mode and still alive.

    Every op's outputs are tracked by storage (views share their base's bytes); a storage
    leaves the count when it is freed. The storages of `existing` tensors (parameters, input
    batches, made before the step) are never counted, not even through their views, so what
    is measured is what the step allocates: activations, the embedding cache, gradients.
    """

    def __init__(self, existing=()):
        super().__init__()
        self.live: dict[int, int] = {t.untyped_storage().data_ptr(): 0 for t in existing}
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key and key not in self.live:
                self.live[key] = storage.nbytes()
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
                weakref.finalize(storage, self._free, key)
        return out


def peak_step_bytes(accumulation: int, micro_batch: int, negatives: str | None) -> int:
    """Peak live bytes of one step; negatives None = all micro-batches in one grad pass."""
    torch.manual_seed(0)
    model = StandInDualEncoder(hidden=128, embed_dim=8)
    batch = make_pairs(micro_batch * accumulation)
    micro_batches = split(batch, accumulation)
    meter = LiveBytes([*model.parameters(), batch.images, batch.tokens, batch.lengths])
    with meter:
        if negatives is None:
            one_pass_reference(model, batch)
        else:
            train_step(model, micro_batches, config_for(negatives), SINGLE)
    return meter.peak


def test_global_mode_memory_grows_with_the_micro_batch_not_the_accumulation():
    # At a fixed micro-batch, the global mode's peak is one micro-batch's activations, the
    # gradients (plus one more copy while accumulating, from A = 2 on), a cache of A * b
    # embeddings of d = 8 floats and an [A * b, B] logit block: from A = 2 to A = 8 that
    # adds a few percent. Embedding all pairs in one pass with gradients holds A
    # micro-batches of activations: about 4 times as much at A = 8 as at A = 2.
    global_peaks = {a: peak_step_bytes(a, 4, "global") for a in (2, 8)}
    one_pass_peaks = {a: peak_step_bytes(a, 4, None) for a in (2, 8)}
    assert global_peaks[8] < 1.1 * global_peaks[2], global_peaks
    assert one_pass_peaks[8] > 3 * one_pass_peaks[2], one_pass_peaks
    # Doubling the micro-batch at A = 2 doubles the activations of the pass with gradients,
    # which are most of the peak (the stand-in's parameters and gradients are small).
    wider = peak_step_bytes(2, 8, "global")
    assert wider > 1.5 * global_peaks[2], (wider, global_peaks[2])


def print_memory_table() -> None:
    """The README's tables: peak live MiB of one step, stand-in and real model."""
    print("stand-in model (hidden 128, 64 tokens per image), micro-batch 4:")
    print("| accumulation A | global (MiB) | micro (MiB) | one pass over A*b (MiB) |")
    print("| --- | --- | --- | --- |")
    for accumulation in (1, 2, 4, 8):
        row = [peak_step_bytes(accumulation, 4, mode) / 2**20 for mode in ("global", "micro")]
        row.append(peak_step_bytes(accumulation, 4, None) / 2**20)
        print(f"| {accumulation} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    print("stand-in model, global mode, by micro-batch b:")
    print("| micro-batch b | A = 2 (MiB) | A = 8 (MiB) |")
    print("| --- | --- | --- |")
    for micro_batch in (4, 8, 16):
        row = [peak_step_bytes(a, micro_batch, "global") / 2**20 for a in (2, 8)]
        print(f"| {micro_batch} | " + " | ".join(f"{v:.2f}" for v in row) + " |")

    import tempfile

    from tests.helpers.dist import run_distributed

    with tempfile.TemporaryDirectory() as folder:
        (rows,) = run_distributed(_real_model_rows, 1, folder, 16, timeout_s=900)
    print("real DualEncoder (hidden 64, 2 layers, 32 px / 8 px patches, context 16), b = 16:")
    print("| accumulation A | B | global (MiB) | micro (MiB) | one pass over A*b (MiB) |")
    print("| --- | --- | --- | --- | --- |")
    for accumulation, values in rows:
        cells = " | ".join(f"{v / 2**20:.2f}" for v in values)
        print(f"| {accumulation} | {16 * accumulation} | {cells} |")


def _real_model_rows(ctx, micro_batch: int):
    """Peak live bytes of the real toy dual encoder's step, per accumulation count."""
    from megatron_ibxl.models import build_dual_encoder

    config = RunConfig()
    vision, text = config.model.vision, config.model.text
    vision.image_size, vision.patch_size = 32, 8
    vision.hidden, vision.num_layers, vision.num_heads, vision.mlp_hidden = 64, 2, 4, 256
    text.vocab_size, text.vocab_pad_multiple, text.context_length = 64, 8, 16
    text.hidden, text.num_layers, text.num_heads, text.mlp_hidden = 64, 2, 4, 256
    config.model.embed_dim = 32
    model = build_dual_encoder(config)
    rows = []
    for accumulation in (1, 2, 4, 8):
        generator = torch.Generator().manual_seed(accumulation)
        count = micro_batch * accumulation
        batch = Batch(
            torch.randn(count, 3, 32, 32, generator=generator),
            torch.randint(0, 64, (count, 16), generator=generator),
            torch.randint(2, 17, (count,), generator=generator),
        )
        values = []
        for negatives in ("global", "micro", None):
            model.zero_grad(set_to_none=True)
            config.loss.negatives = negatives or "global"
            micro_batches = split(batch, accumulation)
            meter = LiveBytes([*model.parameters(), batch.images, batch.tokens, batch.lengths])
            with meter:
                if negatives is None:
                    one_pass_reference(model, batch)
                else:
                    train_step(model, micro_batches, config, SINGLE)
            values.append(meter.peak)
        rows.append((accumulation, values))
    return rows


if __name__ == "__main__":
    install_cpu_rng_tracker(seed=0, tp_rank=0)
    sys.exit(print_memory_table())
