"""Single-GPU smoke benchmark: one transformer block of each 30B tower, and one FSDP2 step.

Run from the repository root on a machine with one CUDA GPU:

    python -m benchmarks.gpu_smoke [--peak-tflops 989] [--iters 10] [--warmup 3]
    python -m benchmarks.gpu_smoke --cpu-check     # the same code path at toy sizes on CPU

It needs torch, megatron-core (pure Python: a small wheel) and this checkout, and prints one
JSON object with three parts:

1. `blocks`: forward and backward of one full (unsharded, tp=1) transformer block of each
   tower, taken from `megatron_ibxl.models.build_dual_encoder` (each tower built with one
   layer), in bf16 at the reference micro-batch b=32, with the sequence padded to a multiple
   of --pad-multiple (8, the reference tensor-parallel size) and the padding masked as the
   towers mask it: vision h=4096, n=32, MLP 16384, s=257 -> 264, bidirectional; text h=5120,
   n=40, MLP 20480, s=77 -> 80, causal. Activations are [s, b, h].

   FLOPs are counted by the Megatron-LM formula (Narayanan et al., 2021, "Efficient
   Large-Scale Language Model Training on GPU Clusters Using Megatron-LM", section 5.1),
   with the MLP width f kept apart from h, per layer and micro-batch of b sequences of s
   tokens (s padded: the work actually done), two FLOPs per multiply-add:

       forward  = 2*b*s*(4*h^2 + 2*h*f) + 4*b*s^2*h
                  (QKV and output projections 4h^2, the two MLP matmuls 2hf per token;
                   Q K^T and the probabilities times V, 2*b*s^2*h each)
       backward = 2 * forward           (input and weight gradients)
       step     = 3 * forward           (with f = 4h: 3 * (24*b*s*h^2 + 4*b*s^2*h))

   Achieved TFLOP/s is step FLOPs over the median forward+backward time (CUDA events), and
   `peak_fraction` divides it by the GPU's dense bf16 peak (--peak-tflops; by default from
   the device name: H100 SXM and H200 989, H100 PCIe 756, A100 312; none for others).
2. `fsdp`: training steps of a small dual encoder from the same builder, sharded with FSDP2
   (`fully_shard` per transformer layer, then the root) over a one-device mesh: symmetric
   InfoNCE, AdamW, bf16 compute with fp32 gradient reduction. The losses must be finite and
   the sharded parameters DTensors.
3. `attention`: the backend that ran (flash-attn when the towers' core attention imports it
   on CUDA, torch SDPA otherwise), SDPA's enabled-backend flags, and the aten attention op
   that the profiler saw in each block's forward (which SDPA kernel was chosen).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TowerShape:
    """One tower's transformer layer."""

    hidden: int
    """h."""
    heads: int
    """n; h / n is the head width."""
    mlp_hidden: int
    """f, the MLP inner width."""
    seq: int
    """Tokens per sample before padding: patches + class token (a square grid plus one), or
    the text context length."""


@dataclass(frozen=True)
class ModelShape:
    """A dual encoder to build: both towers, their depth, and the micro-batch to run."""

    vision: TowerShape
    text: TowerShape
    layers: int
    """Transformer layers per tower."""
    vocab_size: int
    """Text vocabulary (small here: the embedding is not what is measured)."""
    embed_dim: int
    """d, the shared embedding width."""
    micro_batch: int
    """b, pairs per micro-batch."""


# launch/configs/ibxl-30b-h100x512.yaml: 224 px / 14 px patches = 256 patches + class token,
# context 77, data.micro_batch 32; one layer per tower.
REFERENCE = ModelShape(
    vision=TowerShape(4096, 32, 16384, 257),
    text=TowerShape(5120, 40, 20480, 77),
    layers=1,
    vocab_size=1024,
    embed_dim=1024,
    micro_batch=32,
)
TOY_REFERENCE = ModelShape(TowerShape(64, 4, 256, 17), TowerShape(80, 4, 320, 7), 1, 256, 32, 2)
SMALL_DUAL_ENCODER = ModelShape(
    TowerShape(512, 8, 2048, 65), TowerShape(512, 8, 2048, 32), 4, 4096, 256, 16
)
TOY_DUAL_ENCODER = ModelShape(TowerShape(64, 4, 256, 17), TowerShape(64, 4, 256, 8), 2, 256, 32, 4)
PATCH_SIZE = 14
# Dense bf16 tensor-core peaks from NVIDIA's datasheets, matched in order on the name.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


def padded(seq: int, multiple: int) -> int:
    """seq rounded up to a multiple of `multiple`: 257 -> 264 and 77 -> 80 for 8."""
    return -(-seq // multiple) * multiple


def layer_forward_flops(b: int, s: int, h: int, f: int) -> int:
    """Forward FLOPs of one transformer layer: 2*b*s*(4*h^2 + 2*h*f) + 4*b*s^2*h."""
    return 2 * b * s * (4 * h * h + 2 * h * f) + 4 * b * s * s * h


def default_peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak for a known GPU name, else None."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops
    return None


def run_config(shape: ModelShape):
    """The RunConfig whose dual encoder has `shape` (tp=1, no recompute, InfoNCE)."""
    from megatron_ibxl.config import RunConfig

    config = RunConfig()
    grid = math.isqrt(shape.vision.seq - 1)
    if grid * grid + 1 != shape.vision.seq:
        raise ValueError(f"vision seq {shape.vision.seq} is not a square grid plus one")
    vision, text = config.model.vision, config.model.text
    vision.image_size, vision.patch_size = grid * PATCH_SIZE, PATCH_SIZE
    vision.use_class_token, vision.pool = True, "cls"
    for section, tower in ((vision, shape.vision), (text, shape.text)):
        section.hidden, section.num_heads = tower.hidden, tower.heads
        section.mlp_hidden, section.num_layers = tower.mlp_hidden, shape.layers
    text.context_length, text.vocab_size = shape.text.seq, shape.vocab_size
    config.model.embed_dim = shape.embed_dim
    config.parallel.tp, config.parallel.recompute = 1, "none"
    config.parallel.sequence_parallel, config.parallel.tp_comm_overlap = False, False
    config.loss.kind = "infonce"
    return config


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], iters: int, warmup: int, device: torch.device) -> float:
    """Median milliseconds of `fn` over `iters` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def attention_kernel(forward: Callable[[], object]) -> str:
    """The attention op one forward dispatches to, as the profiler records it."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        forward()
    names = {event.name for event in prof.events()}
    if any("flash_attn" in name for name in names):
        return "flash-attn"
    prefixes = ("aten::_scaled_dot_product", "aten::_flash", "aten::_efficient", "aten::_cudnn")
    specific = sorted(name for name in names if name.startswith(prefixes))
    return ", ".join(specific) if specific else "unknown"


def bench_block(block: nn.Module, tower: TowerShape, args, b: int, device, peak) -> dict:
    """Time forward and forward+backward of one tower's TransformerBlock on [s, b, h]."""
    from megatron_ibxl.models.pooling import key_padding_mask

    seq = padded(tower.seq, args.pad_multiple)
    x = torch.randn(seq, b, tower.hidden, device=device, dtype=args.dtype)
    x.requires_grad_(True)  # [s, b, h]; a layer inside a stack also computes input grads
    grad_out = torch.randn_like(x)
    lengths = torch.full((b,), tower.seq, dtype=torch.long, device=device)
    mask = key_padding_mask(lengths, seq)  # [b, 1, 1, s], True at the padded keys

    def forward_only():
        with torch.no_grad():
            block(x, attention_mask=mask)

    def forward_backward():
        block.zero_grad(set_to_none=True)
        block(x, attention_mask=mask).backward(grad_out)

    fwd_ms = time_ms(forward_only, args.iters, args.warmup, device)
    step_ms = time_ms(forward_backward, args.iters, args.warmup, device)
    forward = layer_forward_flops(b, seq, tower.hidden, tower.mlp_hidden)
    tflops = 3 * forward / (step_ms * 1e-3) / 1e12
    return {
        **asdict(tower),
        "seq_padded": seq,
        "micro_batch": b,
        "forward_flops": forward,
        "step_flops": 3 * forward,
        "fwd_ms": fwd_ms,
        "fwd_bwd_ms": step_ms,
        "fwd_tflops": forward / (fwd_ms * 1e-3) / 1e12,
        "tflops": tflops,
        "peak_fraction": None if peak is None else tflops / peak,
        "attention_kernel": attention_kernel(forward_only),
    }


def bench_blocks(shape: ModelShape, args, device: torch.device, peak) -> dict:
    """One block per tower from build_dual_encoder, timed in bf16 on `device`."""
    from megatron_ibxl.models import build_dual_encoder

    model = build_dual_encoder(run_config(shape))
    results = {"layer_backend": model.backend}
    towers = (("vision", model.image_tower, shape.vision), ("text", model.text_tower, shape.text))
    for name, tower_module, tower in towers:
        # The block alone: its layer(s) and final LayerNorm, without embeddings or pooling.
        block = tower_module.block.to(device=device, dtype=args.dtype)
        results[name] = bench_block(block, tower, args, shape.micro_batch, device, peak)
        logger.info("%s block: %.1f TFLOP/s", name, results[name]["tflops"])
    return results


def _fake_batch(shape: ModelShape, config, device: torch.device):
    """Random images [b, 3, H, W], tokens [b, s] and caption lengths [b]."""
    b, image_size = shape.micro_batch, config.model.vision.image_size
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(b, 3, image_size, image_size, generator=generator)
    tokens = torch.randint(0, shape.vocab_size, (b, shape.text.seq), generator=generator)
    lengths = torch.randint(1, shape.text.seq + 1, (b,), generator=generator)
    return images.to(device), tokens.to(device), lengths.to(device)


def fsdp_step(shape: ModelShape, args, ctx) -> dict:
    """Train `args.fsdp_steps` steps of a small dual encoder under FSDP2 on one device."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    from megatron_ibxl.models import build_dual_encoder

    config = run_config(shape)
    model = build_dual_encoder(config).to(ctx.device)
    policy = MixedPrecisionPolicy(param_dtype=args.dtype, reduce_dtype=torch.float32)
    # Inside out: one all-gather unit per layer, the root holds the rest. fully_shard refuses
    # 0-d parameters, so the temperature (and the sigmoid bias) stay plain and replicated.
    for tower in (model.image_tower, model.text_tower):
        for layer in tower.block.layers:
            fully_shard(layer, mesh=ctx.mesh["dp"], mp_policy=policy)
    scalars = {param for param in model.parameters() if param.dim() == 0}
    fully_shard(model, mesh=ctx.mesh["dp"], mp_policy=policy, ignored_params=scalars)
    sharded = [param for param in model.parameters() if param.dim() > 0]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    images, tokens, lengths = _fake_batch(shape, config, ctx.device)

    losses, step_ms = [], 0.0
    for _ in range(args.fsdp_steps):
        _sync(ctx.device)
        begin = time.perf_counter()
        image_emb, text_emb = model(images, tokens, lengths)  # [b, d] each
        logits_i2t = model.scale() * image_emb.float() @ text_emb.float().T  # [b, d]@[d, b]
        labels = torch.arange(logits_i2t.shape[0], device=ctx.device)
        loss = (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_i2t.T, labels)) / 2
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step_ms = (time.perf_counter() - begin) * 1e3
    return {
        **asdict(shape),
        "steps": args.fsdp_steps,
        "losses": losses,
        "losses_finite": all(math.isfinite(value) for value in losses),
        "last_step_ms": step_ms,
        "params_are_dtensors": all(isinstance(param, DTensor) for param in sharded),
    }


def attention_report(device: torch.device) -> dict:
    """Which attention backend the towers use here, and SDPA's enabled backends."""
    from megatron_ibxl.models import attention

    flash = bool(attention.HAVE_FLASH_ATTN) and device.type == "cuda"
    flags = {}
    for name in ("flash", "mem_efficient", "math", "cudnn"):
        query = getattr(torch.backends.cuda, f"{name}_sdp_enabled", None)
        flags[name] = None if query is None else bool(query())
    return {
        "backend": "flash-attn" if flash else "torch-sdpa",
        "flash_attn_importable": bool(attention.HAVE_FLASH_ATTN),
        "sdpa_enabled": flags,
    }


def _start(device: torch.device, store_dir: str):
    """A one-process job: default group (nccl on CUDA, gloo on CPU), Megatron-core state."""
    from megatron_ibxl.config import ParallelConfig
    from megatron_ibxl.parallel import LaunchEnv, init_parallel

    backend = "nccl" if device.type == "cuda" else "gloo"
    launch = LaunchEnv(0, 1, 0, "127.0.0.1", 0, "none")
    store = f"file://{Path(store_dir) / 'store'}"
    return init_parallel(ParallelConfig(tp=1, backend=backend), launch=launch, init_method=store)


def run(args: argparse.Namespace) -> dict:
    """Every part of the smoke benchmark; returns the JSON object.

    Raises UserError when CUDA is absent and --cpu-check is not given, or when megatron-core
    is not installed.
    """
    from megatron_ibxl.errors import UserError

    if not args.cpu_check and not torch.cuda.is_available():
        raise UserError(
            f"gpu_smoke needs a CUDA GPU and torch {torch.__version__} sees none; "
            "run it on a GPU machine, or pass --cpu-check for the toy-size CPU run"
        )
    if min(args.iters, args.fsdp_steps, args.pad_multiple) < 1 or args.warmup < 0:
        raise UserError(
            f"--iters {args.iters}, --fsdp-steps {args.fsdp_steps}, --pad-multiple "
            f"{args.pad_multiple} must be >= 1 and --warmup {args.warmup} >= 0"
        )
    try:
        from megatron_ibxl.parallel import shutdown_parallel
    except ImportError as error:
        raise UserError(f"gpu_smoke needs megatron-core ({error}); pip install it") from None

    device = torch.device("cpu") if args.cpu_check else torch.device("cuda", 0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops if args.peak_tflops is not None else default_peak_tflops(name)
    if peak is None and device.type == "cuda":
        logger.warning("no known bf16 peak for %r; pass --peak-tflops for peak_fraction", name)

    with tempfile.TemporaryDirectory() as store_dir:
        ctx = _start(device, store_dir)
        try:
            blocks = bench_blocks(
                TOY_REFERENCE if args.cpu_check else REFERENCE, args, device, peak
            )
            if device.type == "cuda":
                torch.cuda.empty_cache()
            dual = TOY_DUAL_ENCODER if args.cpu_check else SMALL_DUAL_ENCODER
            fsdp = fsdp_step(dual, args, ctx)
        finally:
            shutdown_parallel()
    return {
        "device": name,
        "cpu_check": args.cpu_check,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dtype": str(args.dtype).removeprefix("torch."),
        "peak_tflops": peak,
        "block_source": "megatron_ibxl.models.build_dual_encoder",
        "attention": attention_report(device),
        "blocks": blocks,
        "fsdp": fsdp,
        "mem_peak_gib": (
            torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        ),
    }


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_smoke",
        description="One transformer block per 30B tower and one FSDP2 step on one GPU.",
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="GPU dense bf16 peak (default: by name)"
    )
    parser.add_argument("--iters", type=int, default=10, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    parser.add_argument(
        "--pad-multiple", type=int, default=8, help="pad sequences to a multiple (reference tp)"
    )
    parser.add_argument("--fsdp-steps", type=int, default=3, help="FSDP2 training steps")
    parser.add_argument(
        "--cpu-check", action="store_true", help="run the same code path at toy sizes on CPU"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run and print one JSON object; a user error is one stderr line and exit 2."""
    from megatron_ibxl.errors import UserError
    from megatron_ibxl.logging_setup import setup_logging

    setup_logging(0)
    args = build_parser().parse_args(argv)
    args.dtype = torch.bfloat16
    try:
        report = run(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
