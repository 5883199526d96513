"""One open_clip training run on saved batches, started by benchmarks/throughput.py.

It runs in the interpreter that has open_clip (`.venv-bench`, made by `make bench-deps`),
needs torch and open_clip only, and prints its result as the last stdout line.

The model is open_clip's `CLIP` with the dimensions of the spec that throughput.py wrote from
the engine's config: vision width, layers, heads (as head_width = width / heads), MLP ratio,
patch and image size; text context, vocabulary, width, heads, layers, MLP ratio; the shared
embedding width. Choices that make it the same model as the engine's: no LayerNorm before
the vision transformer (`no_ln_pre`; the engine has none), the text tower pooled at the first
end-of-text token (`pool_type="eos"`, the engine pools at `lengths - 1`, which is that
token). Left as open_clip has them: its text tower has a causal mask but no padding mask (the
engine masks padding too; the cost is the same), and its attention is nn.MultiheadAttention.

One step is open_clip's training loop body without its bookkeeping: forward, ClipLoss,
backward, gradient-norm clipping, AdamW (no weight decay on gains, biases, embeddings of
rank < 2 and the logit scale, as open_clip's main does), then the logit-scale clamp at ln 100.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from benchmarks.bench_worker import load_batches, serve, set_threads, summarize


def build_model(spec: dict):
    """open_clip's CLIP with the spec's dimensions, in fp32 on CPU."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    vision, text = spec["vision"], spec["text"]
    vision_cfg = CLIPVisionCfg(
        layers=vision["layers"],
        width=vision["width"],
        head_width=vision["width"] // vision["heads"],
        mlp_ratio=vision["mlp_hidden"] / vision["width"],
        patch_size=vision["patch_size"],
        image_size=vision["image_size"],
        no_ln_pre=True,
    )
    text_cfg = CLIPTextCfg(
        context_length=text["context_length"],
        vocab_size=text["vocab_size"],
        width=text["width"],
        heads=text["heads"],
        layers=text["layers"],
        mlp_ratio=text["mlp_hidden"] / text["width"],
        pool_type="eos",
        eos_id=text["eos_id"],
    )
    return CLIP(
        embed_dim=spec["embed_dim"],
        vision_cfg=vision_cfg,
        text_cfg=text_cfg,
        init_logit_scale=spec["logit_scale_init"],
    )


def build_optimizer(model, spec: dict) -> torch.optim.AdamW:
    """AdamW with open_clip's split: no decay for parameters of rank < 2, norms, biases and
    the logit scale."""
    opt = spec["optimizer"]

    def no_decay(name: str, param: torch.Tensor) -> bool:
        return (
            param.ndim < 2
            or "bn" in name
            or "ln" in name
            or "bias" in name
            or ("logit_scale" in name)
        )

    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0},
        {
            "params": [p for n, p in named if not no_decay(n, p)],
            "weight_decay": opt["weight_decay"],
        },
    ]
    return torch.optim.AdamW(groups, lr=opt["lr"], betas=tuple(opt["betas"]), eps=opt["eps"])


def main(argv: list[str] | None = None) -> int:
    """Build the model and serve run/profile requests (benchmarks/bench_worker.py)."""
    import open_clip
    from open_clip.loss import ClipLoss

    parser = argparse.ArgumentParser(prog="python -m benchmarks.openclip_runner")
    parser.add_argument("--batches", required=True)
    parser.add_argument("--spec", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    set_threads(args.threads)
    with open(args.spec) as handle:
        spec = json.load(handle)
    if spec["optimizer"]["precision"] != "fp32":
        print("error: open_clip runner compares fp32 only", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    batches = load_batches(args.batches)
    model = build_model(spec).train()
    optimizer = build_optimizer(model, spec)
    loss_fn = ClipLoss()
    clip_grad = spec["optimizer"]["clip_grad"]

    def step(k: int) -> dict:
        import time

        pairs = batches[k % len(batches)]
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        image_features, text_features, logit_scale = model(pairs.images, pairs.tokens)[:3]
        loss = loss_fn(image_features, text_features, logit_scale)
        loss.backward()
        middle = time.perf_counter()
        if clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return {"fwd_bwd": middle - start, "optimizer": time.perf_counter() - middle}

    parameters = sum(p.numel() for p in model.parameters())

    def describe(times: dict[str, list[float]]) -> dict:
        result = summarize(times, spec["global_batch"])
        result.update(
            engine=f"open_clip {open_clip.__version__}",
            torch=torch.__version__,
            threads=torch.get_num_threads(),
            world_size=1,
            parameters=parameters,
        )
        return result

    serve(step, args.steps, args.warmup, describe)
    return 0


if __name__ == "__main__":
    sys.exit(main())
