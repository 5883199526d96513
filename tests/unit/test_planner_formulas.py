"""The planner's formulas against the published ones and against values worked out by hand
in each test for small layouts (FLOPs, memory, bytes moved, ring times, overlap)."""

import dataclasses

import pytest

from megatron_ibxl.config import BatchLayout, load_config
from megatron_ibxl.models.param_count import count_parameters
from megatron_ibxl.planning.cluster import Cluster, Link, OverlapModel
from megatron_ibxl.planning.comm import simulate_pass, tp_layer_time
from megatron_ibxl.planning.flops import (
    LayerFlops,
    layer_flops,
    model_flops_per_step,
    recompute_flops,
)
from megatron_ibxl.planning.memory import GIB, layer_activation_bytes, stage_memory, stage_params
from megatron_ibxl.planning.plan import plan_layout
from megatron_ibxl.planning.shapes import TowerShape, tower_shapes

DEMO = "launch/configs/demo-cpu.yaml"
TOY = [
    # The demo file's layout with the model pinned here, so the hand counts below hold
    # whatever the demo is tuned to: 32 px images in 8 px patches plus a class token (17
    # tokens), 16 text tokens, both towers h = 64, f = 256, 4 heads, 2 layers; d = 32.
    *(f"model.vision.{k}" for k in ("image_size=32", "patch_size=8", "use_class_token=true")),
    "model.vision.pool=cls",
    "model.text.context_length=16",
    "model.text.vocab_size=1024",
    "model.text.vocab_pad_multiple=8",
    *(
        f"model.{tower}.{k}"
        for tower in ("vision", "text")
        for k in ("hidden=64", "mlp_hidden=256", "num_heads=4", "num_layers=2")
    ),
    "model.embed_dim=32",
    "data.micro_batch=32",
]


def _toy(*overrides):
    return load_config(DEMO, [*TOY, *overrides])


def _tower(seq, hidden, heads, layers=1, mlp=None):
    return TowerShape("t", seq, seq, hidden, mlp or 4 * hidden, heads, layers, 0, 0, 0, 0, 0)


def _cluster(**changes) -> Cluster:
    """A round-number cluster: 2 nodes of 4 GPUs, 100 TFLOP/s at 50% (no size penalty), an
    intra-node link of 100 GB/s and an inter-node one of 10 GB/s, no latency."""
    base = Cluster(
        name="toy",
        num_nodes=2,
        gpus_per_node=4,
        gpu_memory_gib=16.0,
        reserved_memory_gib=0.0,
        peak_bf16_tflops=100.0,
        achievable_flops_fraction=0.5,
        gemm_flops_fraction=0.5,
        nvlink=Link(100.0, 0.0),
        infiniband=Link(10.0, 0.0),
        gemm_half_rows=0,
        layer_floor_us=0.0,
        overlap=OverlapModel(tp_residual_fraction=0.0, dp_prefetch_layers=1),
    )
    return dataclasses.replace(base, **changes)


# --- FLOPs (Narayanan et al. 2021) -------------------------------------------------------


def test_layer_flops_are_megatron_lm_counting():
    b, s, h = 3, 40, 64
    layer = layer_flops(s, h, 4 * h, b)
    # Their per-layer forward with f = 4h: 24 b s h^2 + 4 b s^2 h.
    assert layer.forward == 24 * b * s * h**2 + 4 * b * s**2 * h
    # A stack of l layers, forward and backward (x3): 72 B s l h^2 (1 + s / 6h).
    layers = 5
    stack = 3 * layers * layer.forward
    assert stack == pytest.approx(72 * b * s * layers * h**2 * (1 + s / (6 * h)))
    # Full recomputation adds one forward (x4): 96 B s l h^2 (1 + s / 6h).
    full = layers * (3 * layer.forward + recompute_flops(layer, "full"))
    assert full == pytest.approx(96 * b * s * layers * h**2 * (1 + s / (6 * h)))
    # Selective recomputation repeats only the attention scores and values: 4 b s^2 h.
    assert recompute_flops(layer, "selective") == 4 * b * s**2 * h


def test_model_flops_of_the_demo_by_hand():
    config = _toy("parallel.tp=1", "parallel.sequence_parallel=false")
    towers = tower_shapes(config, 1)

    # TOY: vision 16 patches + class = 17 tokens, text 16 tokens, both h = 64, f = 256,
    # 2 layers; d = 32; 128 pairs; 4 ranks of 32, 1 micro-batch.
    def per_layer(s):  # 24 s h^2 + 4 s^2 h with h = 64, f = 4h
        return 24 * s * 64 * 64 + 4 * s * s * 64

    towers_fwd = 2 * per_layer(17) + 2 * per_layer(16)
    patch = 2 * 16 * (3 * 8 * 8) * 64  # [16, 192] @ [192, 64] per image
    heads = 2 * (2 * 64 * 32)  # [1, 64] @ [64, 32] per tower
    per_pair = 3 * towers_fwd + 2 * patch + 3 * heads
    # Global negatives: each of 4 ranks computes [32, 32] @ [32, 128] twice, x3 for backward.
    loss = 4 * 3 * 2 * (2 * 32 * 32 * 128)
    got = model_flops_per_step(towers, 32, 128, "global", 32, 1, 4)
    assert got == 128 * per_pair + loss


# --- Memory (Korthikanti et al. 2022, Rajbhandari et al. 2020) ---------------------------


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_activations_are_korthikanti(tp):
    s, b, h, a = 64, 2, 128, 8
    tower = _tower(s, h, a)
    sbh = s * b * h

    def act(sp, recompute):
        return layer_activation_bytes(tower, b, tp, sp, recompute, "math", "bf16", 0.1, 0.1)

    # Their Table 2, with dropout on and the softmax kept ("math" attention).
    assert act(False, "none") == pytest.approx(sbh * (10 + 24 / tp + 5 * a * s / (h * tp)))
    if tp > 1:
        assert act(True, "none") == pytest.approx(sbh * (34 + 5 * a * s / h) / tp)
        assert act(True, "selective") == pytest.approx(34 * sbh / tp)
        assert act(True, "full") == pytest.approx(2 * sbh / tp)
    else:
        assert act(False, "full") == pytest.approx(2 * sbh)


def test_activations_adapted_to_this_model():
    s, b, h, a, tp = 64, 2, 128, 8, 2
    tower = _tower(s, h, a)
    sbh = s * b * h
    flash = layer_activation_bytes(tower, b, tp, True, "none", "flash", "bf16", 0.0, 0.0)
    # No dropout masks (2 bytes) and no softmax: 32 sbh, plus the fp32 log-sum-exp 4 a s b.
    assert flash == pytest.approx((32 * sbh + 4 * a * s * b) / tp)
    fp32 = layer_activation_bytes(tower, b, tp, True, "none", "flash", "fp32", 0.0, 0.0)
    assert fp32 == pytest.approx((64 * sbh + 4 * a * s * b) / tp)


def test_stage_params_at_tp1_equal_param_count():
    config = _toy("parallel.tp=1", "parallel.sequence_parallel=false")
    total, _ = stage_params(tower_shapes(config, 1), 1, 0)
    assert total == count_parameters(config.model, 1, "infonce").total


def _layout(tp=1, dp=4, micro_batch=32, accumulation=2):
    return BatchLayout(tp, 1, dp, micro_batch, accumulation, micro_batch * dp * accumulation)


def test_zero3_state_is_18_bytes_per_parameter_over_dp():
    overrides = ["parallel.tp=1", "parallel.sequence_parallel=false", "optimizer.precision=bf16"]
    config = _toy(*overrides, "parallel.gather=microbatch")
    psi = count_parameters(config.model, 1, "infonce").total
    mem = stage_memory(config, _layout(), 0)
    # ZeRO-3: (2 bf16 + 4 master) weights, 4 fp32 grads, 8 Adam, all over Nd = 4.
    assert mem.weights == pytest.approx(6 * psi / 4)
    assert mem.grads == pytest.approx(4 * psi / 4)
    assert mem.optimizer == pytest.approx(8 * psi / 4)
    # gather: step keeps bf16 parameters (2 psi) and fp32 accumulated gradients (4 psi).
    step = stage_memory(_toy(*overrides, "parallel.gather=step"), _layout(), 0)
    assert step.buffers == pytest.approx(2 * psi)
    assert step.grads == pytest.approx(4 * psi / 4 + 4 * psi)
    # zero 0 replicates everything: 18 psi.
    zero0 = stage_memory(_toy(*overrides, "parallel.zero=0"), _layout(), 0)
    assert zero0.weights + zero0.grads + zero0.optimizer == pytest.approx(18 * psi)


# --- Communication -----------------------------------------------------------------------


def test_ring_times_follow_nccl_tests_bus_factors():
    link = Link(bus_bandwidth_gbps=100.0, latency_us=2.0)
    n, size = 8, 1e9
    # all-gather / reduce-scatter move (n-1)/n of the buffer per rank in n-1 steps.
    assert link.ring_time_s("all_gather", size, n) == pytest.approx(7 * 2e-6 + size * 7 / 8 / 1e11)
    assert link.ring_time_s("reduce_scatter", size, n) == link.ring_time_s("all_gather", size, n)
    # all-reduce = reduce-scatter + all-gather: 2(n-1)/n.
    assert link.ring_time_s("all_reduce", size, n) == pytest.approx(
        14 * 2e-6 + size * 14 / 8 / 1e11
    )
    assert link.ring_time_s("all_gather", size, 1) == 0.0


def test_tp_exposure_by_hand():
    # Per rank at tp=2: qkv 2e8 FLOPs, proj 1e8, fc1 and fc2 4e8; at 1e12 FLOP/s that is
    # 0.2, 0.1, 0.4, 0.4 ms. One collective of a 1e8-byte message over 2 ranks at 100 GB/s
    # moves half of it: 0.5 ms.
    layer = LayerFlops(qkv=4e8, proj=2e8, fc1=8e8, fc2=8e8, attention=0.0)
    link = Link(100.0, 0.0)
    c = 0.5e-3
    r = 0.1

    def hide(g):
        return max(0.0, c - g) + r * min(c, g)

    time = tp_layer_time(layer, 1e8, 2, link, 1e12, True, "none", True, r)
    assert time.forward_s == pytest.approx(4 * c)
    assert time.backward_s == pytest.approx(6 * c)
    assert time.forward_exposed_s == pytest.approx(hide(2e-4) + hide(1e-4) + 2 * hide(4e-4))
    backward = hide(8e-4) + 2 * hide(4e-4) + hide(2e-4) + 2 * hide(2e-4)
    assert time.backward_exposed_s == pytest.approx(backward)
    # Without Transformer Engine overlap only Megatron's asynchronous backward of the two
    # column-parallel layers (re-gather beside dgrad, reduce-scatter beside wgrad) hides.
    plain = tp_layer_time(layer, 1e8, 2, link, 1e12, True, "none", False, r)
    assert plain.forward_exposed_s == pytest.approx(4 * c)
    assert plain.backward_exposed_s == pytest.approx(2 * c + 2 * hide(4e-4) + 2 * hide(2e-4))
    assert time.forward_bytes == 4 * 1e8 and time.backward_bytes == 6 * 1e8


def test_simulated_passes_by_hand():
    # No gathers: compute back to back; each reduction queues when its unit ends (t=1,2,3)
    # and takes 0.5 s, the last one ends at 3.5.
    assert simulate_pass([1, 1, 1], None, [0.5] * 3, 1) == (3.5, 1.5)
    # Gathers of 2 s with no prefetch limit arrive at 2, 4, 6; the last unit ends at 7.
    assert simulate_pass([1, 1, 1], [2, 2, 2], None, None) == (7, 6)
    # Prefetch 1: gathers 0 and 1 start at once (end 1, 2); gather 2 waits for unit 0 to
    # finish (t=4) and ends at 5; units run 1-4, 4-7, 7-10. Only the first gather shows.
    assert simulate_pass([3, 3, 3], [1, 1, 1], None, 1) == (10, 3)
    # Gathers and reductions share the link in issue order: gather 0 [0,1], gather 1
    # [1,2], unit 0 [1,2], reduction 0 queued at 2 runs [2,3] before gather 2 (queued at
    # 2, after it), which runs [3,4]; unit 1 [2,3]; unit 2 [4,5]; its reduction [5,6].
    assert simulate_pass([1, 1, 1], [1, 1, 1], [1, 1, 1], 1) == (6, 6)


def test_bytes_moved_per_step_by_hand():
    config = _toy(
        "optimizer.precision=bf16",
        "parallel.tp=2",
        "data.global_batch=256",
        "parallel.gather=step",
        "parallel.tp_comm_overlap=true",
    )
    cluster = _cluster()  # 8 GPUs: tp 2, dp 4, micro-batch 32, accumulation 2
    plan = plan_layout(config, cluster)
    assert (plan.batch.dp, plan.batch.accumulation) == (4, 2)
    # Tensor parallel: message [s, b, h] bf16 with s padded to a multiple of 2 (17 -> 18
    # vision, 16 text); per layer 4 collectives per forward (two forwards per micro-batch
    # under global negatives) and 6 per backward; 2 layers per tower; 2 micro-batches.
    per_layer_msgs = 2 * 4 + 6
    vision, text = 2 * 18 * 32 * 64, 2 * 16 * 32 * 64
    assert plan.stage.tp_bytes == 2 * per_layer_msgs * 2 * (vision + text)
    # Data parallel, gather once per step: bf16 gather (2 bytes) + fp32 reduce-scatter
    # (4 bytes) of every parameter of a tp rank, plus the loss: gather of the fp32 [B, d]
    # embeddings of both towers (B = 256, d = 32) and reduce-scatter of their gradients.
    towers = tower_shapes(config, 2)
    psi_rank, _ = stage_params(towers, 1, 0)
    loss = 2 * (4 * 2 * 256 * 32)
    assert plan.stage.dp_bytes == (2 + 4) * psi_rank + loss
    # Re-gathering every micro-batch: gathers in 2 forwards and 1 backward, a reduction in
    # every backward, per micro-batch.
    again = plan_layout(
        dataclasses.replace(
            config, parallel=dataclasses.replace(config.parallel, gather="microbatch")
        ),
        cluster,
    )
    assert again.stage.dp_bytes == 2 * (3 * 2 + 4) * psi_rank + loss


def test_step_time_adds_up():
    config = _toy("optimizer.precision=bf16", "data.global_batch=256")
    plan = plan_layout(config, _cluster())
    cost = plan.stage
    parts = cost.compute_s + cost.tp_exposed_s + cost.dp_exposed_s + cost.pp_s + cost.bubble_s
    assert plan.step_time_s == pytest.approx(parts)
    assert 0 < plan.exposed_s < plan.step_time_s
    # Memory reported in GiB is the bytes over 2^30.
    assert plan.memory.gib()["total"] == pytest.approx(plan.memory.total / GIB)
