"""Training throughput of this engine against open_clip on the same machine, model and data.

    make bench-deps                        # .venv-bench: open_clip on torch 2.14.1 (see Makefile)
    .venv/bin/python -m benchmarks.throughput --out runs/bench/throughput.json [--profile]

What is compared (like with like):

- model: the towers of --config (default launch/configs/demo-cpu.yaml): open_clip's CLIP is
  built from the same widths, depths, heads, MLP widths, patch and image size, context length,
  vocabulary and embedding width, its text tower pooled at the end-of-text token as ours is;
- data: --batches contrastive batches of `data.global_batch` pairs decoded ONCE by this
  engine's loader (augmentation included) and saved; every run trains on those same tensors,
  so data loading is excluded from both;
- step: forward, symmetric InfoNCE, backward, clipped AdamW (same lr, betas, eps, weight
  decay, clip) in fp32; open_clip as a plain loop (its CLIP, its ClipLoss, torch AdamW);
- processes and threads: one process each with --threads intra-op threads (this engine with
  tp=1, dp=1, zero 0, micro-batch = global batch, so one forward per step as open_clip's);
  this engine's own multi-process layout of --config is measured separately (`layout`);
- alternation: each single-process run lives in its own interpreter (open_clip in
  --openclip-python, this engine in --engine-python), started once and kept (start-up takes
  minutes on a loaded machine), and their timed runs alternate for --rounds rounds in a
  rotating order, so drifting load on a shared machine hits all of them.

Throughput is global_batch / median step time, the median over a round's --steps steps after
--warmup, then the median over rounds. --profile adds the top operators by self CPU time of
a few steps of each (torch.profiler).

The engine runs twice per round: with the config's `loss.negatives` (default `global`, whose
gradient caching embeds every batch twice, even with one micro-batch), and with `micro`,
which at one micro-batch trains on exactly the same contrastive batch with one forward.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch

from benchmarks.bench_worker import (
    RESULT_PREFIX,
    WorkerProcess,
    emit_result,
    load_batches,
    serve,
    set_threads,
    summarize,
    time_steps,
    worker_env,
)

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "launch" / "configs" / "demo-cpu.yaml"
DEFAULT_OPENCLIP_PYTHON = ROOT / ".venv-bench" / "bin" / "python"


# ----------------------------------------------------------------------------------------
# The engine worker: one process (tp=1, dp=1, zero 0) or the config's layout under torchrun.


def _single_process_overrides(global_batch: int, negatives: str | None) -> list[str]:
    items = [
        "parallel.tp=1",
        "parallel.pp=1",
        "parallel.sequence_parallel=false",
        "parallel.zero=0",
        f"data.micro_batch={global_batch}",
    ]
    return items + ([f"loss.negatives={negatives}"] if negatives else [])


def _rank_slices(ctx, batch_layout, pairs: SimpleNamespace) -> list[SimpleNamespace]:
    """This rank's micro-batches of one contrastive batch, as the loader lays them out:
    micro-batch m of dp rank r holds positions m*b*dp + r*b + [0, b)."""
    b, dp = batch_layout.micro_batch, batch_layout.dp
    micro_batches = []
    for m in range(batch_layout.accumulation):
        lo = m * b * dp + ctx.dp_rank * b
        micro_batches.append(
            SimpleNamespace(
                images=pairs.images[lo : lo + b],  # [B, c, H, W] -> [b, c, H, W]
                tokens=pairs.tokens[lo : lo + b],  # [B, L] -> [b, L]
                lengths=pairs.lengths[lo : lo + b],  # [B] -> [b]
            )
        )
    return micro_batches


def run_engine_worker(args: argparse.Namespace) -> int:
    """Build the engine from the config (one process, or the launched layout) and train on
    the saved batches: serve run/profile requests (--serve, one process), or time one run
    and print its result from rank 0."""
    import torch.distributed as dist

    from megatron_ibxl.config import load_config, validate
    from megatron_ibxl.errors import UserError
    from megatron_ibxl.logging_setup import setup_logging
    from megatron_ibxl.parallel import detect_launch_env, init_parallel, shutdown_parallel

    set_threads(args.threads)
    launch = detect_launch_env()
    setup_logging(launch.rank, logging.WARNING)
    if args.serve and launch.world_size > 1:
        raise UserError("engine-worker --serve runs one process; drop --serve under torchrun")
    overrides = list(args.overrides)
    if args.layout == "single":
        global_batch = load_config(args.config, overrides).data.global_batch
        overrides += _single_process_overrides(global_batch, args.negatives)
    elif args.negatives:
        overrides.append(f"loss.negatives={args.negatives}")
    config = load_config(args.config, overrides)
    layout = validate(config, launch.world_size)
    init_method = None
    if launch.world_size == 1:  # no launcher: a private file store, no TCP port
        init_method = f"file://{tempfile.mkdtemp(prefix='ibxl-bench-')}/store"
    ctx = init_parallel(
        config.parallel, seed=config.data.seed, launch=launch, init_method=init_method
    )
    try:
        step, params = _engine_step(config, layout, ctx, load_batches(args.batches))

        def describe(times: dict[str, list[float]]) -> dict:
            result = summarize(times, layout.global_batch)
            result.update(
                engine="megatron-ibxl",
                torch=torch.__version__,
                threads=torch.get_num_threads(),
                world_size=ctx.world_size,
                layout={"tp": ctx.tp, "dp": ctx.dp, "zero": config.parallel.zero},
                micro_batch=layout.micro_batch,
                accumulation=layout.accumulation,
                negatives=config.loss.negatives,
                parameters=params,
            )
            return result

        if args.serve:
            serve(step, args.steps, args.warmup, describe)
        else:
            times = time_steps(step, args.steps, args.warmup)
            times = _slowest_rank(times, dist) if ctx.world_size > 1 else times
            if ctx.rank == 0:
                emit_result(describe(times))
    finally:
        shutdown_parallel()
    return 0


def _slowest_rank(times: dict[str, list[float]], dist) -> dict[str, list[float]]:
    """Each step's wall times, the maximum over ranks (the slowest rank sets the pace), and
    its CPU time summed over ranks (the CPU the whole job spent on the step)."""
    wall = sorted(key for key in times if key != "step_cpu_ms")
    table = torch.tensor([times[key] for key in wall], dtype=torch.float64)  # [keys, steps]
    dist.all_reduce(table, op=dist.ReduceOp.MAX)  # [keys, steps], max over ranks
    cpu = torch.tensor(times["step_cpu_ms"], dtype=torch.float64)  # [steps]
    dist.all_reduce(cpu, op=dist.ReduceOp.SUM)  # [steps], summed over ranks
    return {**{key: row.tolist() for key, row in zip(wall, table)}, "step_cpu_ms": cpu.tolist()}


def _engine_step(config, layout, ctx, batches) -> tuple[Callable[[int], dict], int]:
    """The engine's training step on saved batch k % len(batches), and the parameter count
    (full model, tp and dp pieces counted once)."""
    from megatron_ibxl.models import build_dual_encoder
    from megatron_ibxl.models.param_count import count_parameters
    from megatron_ibxl.parallel.sharding import shard_model
    from megatron_ibxl.training.optimizer import build_optimizer, clip_and_step
    from megatron_ibxl.training.schedule import build_scheduler
    from megatron_ibxl.training.step import train_step

    model = build_dual_encoder(config).to(ctx.device)
    grad_sync = shard_model(model, config, ctx)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    slices = [_rank_slices(ctx, layout, pairs) for pairs in batches]

    def step(k: int) -> dict:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        output = train_step(model, slices[k % len(slices)], config, ctx, grad_sync)
        middle = time.perf_counter()
        clip_and_step(model, optimizer, scheduler, config, ctx, loss=output.loss)
        return {"fwd_bwd": middle - start, "optimizer": time.perf_counter() - middle}

    return step, count_parameters(config.model, 1, config.loss.kind).total


# ----------------------------------------------------------------------------------------
# The comparison: prepare the batches, alternate the runs, report.


def prepare_batches(config_path: str, overrides: list[str], count: int, out: Path) -> dict:
    """Decode `count` contrastive batches with the engine's loader (dp 1, one micro-batch of
    the global batch) and save them to `out`; returns the model spec open_clip is built from.
    """
    from megatron_ibxl.config import load_config
    from megatron_ibxl.data.loader import build_train_loader
    from megatron_ibxl.data.tokenizer import load_tokenizer

    global_batch = load_config(config_path, overrides).data.global_batch
    config = load_config(config_path, [*overrides, f"data.micro_batch={global_batch}"])
    loader = build_train_loader(config, 0, 1, load_tokenizer(config.data.tokenizer))
    batches = [next(loader) for _ in range(count)]
    saved = {
        "images": [batch.images.contiguous() for batch in batches],  # count x [B, c, H, W]
        "tokens": [batch.tokens.contiguous() for batch in batches],  # count x [B, L]
        "lengths": [batch.lengths.contiguous() for batch in batches],  # count x [B]
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(saved, out)
    first = batches[0]
    eos_id = int(first.tokens[0, int(first.lengths[0]) - 1])
    return model_spec(config, eos_id)


def model_spec(config, eos_id: int) -> dict:
    """Everything open_clip needs to build and train the same model as `config`."""
    model, opt = config.model, config.optimizer
    return {
        "global_batch": config.data.global_batch,
        "embed_dim": model.embed_dim,
        "logit_scale_init": model.logit_scale_init,
        "vision": {
            "image_size": model.vision.image_size,
            "patch_size": model.vision.patch_size,
            "width": model.vision.hidden,
            "layers": model.vision.num_layers,
            "heads": model.vision.num_heads,
            "mlp_hidden": model.vision.mlp_hidden,
        },
        "text": {
            "context_length": model.text.context_length,
            "vocab_size": model.text.padded_vocab_size(1),
            "width": model.text.hidden,
            "layers": model.text.num_layers,
            "heads": model.text.num_heads,
            "mlp_hidden": model.text.mlp_hidden,
            "eos_id": eos_id,
        },
        "optimizer": {
            "lr": opt.lr,
            "betas": [opt.beta1, opt.beta2],
            "eps": opt.eps,
            "weight_decay": opt.weight_decay,
            "clip_grad": opt.clip_grad,
            "precision": opt.precision,
        },
    }


def run_once(command: list[str], threads: int, timeout_s: float) -> dict:
    """Run a one-shot worker (the torchrun layout); its result, or {"error": why}."""
    logger.info("running %s", " ".join(command))
    try:
        proc = subprocess.run(
            command,
            cwd=ROOT,
            env=worker_env(ROOT, threads),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return {"error": f"{type(error).__name__}: {error}"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        errors = [line.strip() for line in proc.stderr.splitlines() if "Error" in line]
        return {"error": f"exit {proc.returncode}: {(errors or [''])[-1]}"}
    result = json.loads(lines[-1][len(RESULT_PREFIX) :])
    result.pop("step_ms", None)
    return result


def _timing_args(args) -> list[str]:
    return [
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
    ]


def _engine_command(args, batches: Path, layout: str, negatives: str | None) -> list[str]:
    command = [str(args.engine_python), "-m", "benchmarks.throughput", "engine-worker"]
    command += ["--config", str(args.config)]
    for item in args.overrides:
        command += ["--set", item]
    command += ["--batches", str(batches), "--layout", layout, *_timing_args(args)]
    command += ["--serve"] if layout == "single" else []
    return command + (["--negatives", negatives] if negatives else [])


def _openclip_command(args, batches: Path, spec_path: Path) -> list[str]:
    command = [str(args.openclip_python), "-m", "benchmarks.openclip_runner"]
    return command + ["--batches", str(batches), "--spec", str(spec_path), *_timing_args(args)]


def _layout_command(args, batches: Path) -> list[str]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launcher = [str(args.engine_python), "-m", "torch.distributed.run"]
    launcher += ["--nproc_per_node", str(args.layout_procs), "--master_port", str(port)]
    # The worker's `-m benchmarks.throughput ...` after torchrun's options.
    return launcher + _engine_command(args, batches, "config", None)[1:]


def _combine(results: list[dict]) -> dict:
    """Rounds of one kind of run: pairs/s of each round and their median, phase medians."""
    good = [r for r in results if "error" not in r]
    if not good:
        return {"error": results[0]["error"] if results else "not run"}
    combined = {k: v for k, v in good[0].items() if k != "step_ms"}
    for key in ("pairs_per_s", "pairs_per_cpu_s"):
        combined[f"{key}_rounds"] = [r[key] for r in good]
        combined[key] = statistics.median(combined[f"{key}_rounds"])
    combined["median_ms"] = {
        key: statistics.median(r["median_ms"][key] for r in good) for key in good[0]["median_ms"]
    }
    combined["step_ms_rounds"] = [r["step_ms"] for r in good]
    combined["failed_rounds"] = [r["error"] for r in results if "error" in r]
    return combined


def run_compare(args: argparse.Namespace) -> int:
    """Prepare the batches, start the three single-process workers, alternate their runs
    for --rounds rounds, profile them (--profile), then run the config's layout once."""
    from megatron_ibxl.logging_setup import setup_logging

    setup_logging(0)
    work = Path(args.work_dir)
    batches, spec_path = work / "batches.pt", work / "spec.json"
    spec = prepare_batches(args.config, args.overrides, args.batches, batches)
    spec_path.write_text(json.dumps(spec, indent=1) + "\n")

    commands = {
        "engine": _engine_command(args, batches, "single", None),
        "open_clip": _openclip_command(args, batches, spec_path),
        "engine_micro": _engine_command(args, batches, "single", "micro"),
    }
    workers = {name: WorkerProcess(name, cmd, ROOT, args.threads) for name, cmd in commands.items()}
    try:
        for worker in workers.values():
            ready = worker.wait_ready(args.timeout_s)
            logger.info("%s worker: %s", worker.name, "ready" if ready else worker.failure)
        runs, load = _alternate(args, workers)
        report = {name: _combine(results) for name, results in runs.items()}
        if args.profile:
            report["profiles"] = {
                name: worker.request(f"profile {args.profile_steps}", args.timeout_s).get(
                    "profile", worker.failure
                )
                for name, worker in workers.items()
            }
    finally:
        for worker in workers.values():
            worker.close()

    if args.layout_procs > 1:
        report["layout"] = run_once(_layout_command(args, batches), args.threads, args.timeout_s)
    report.update(_context(args, spec, load))
    _print_report(report)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
        logger.info("wrote %s", out)
    return 0


def _alternate(args, workers: dict) -> tuple[dict[str, list[dict]], list[float]]:
    """--rounds rounds of one run per worker, the order rotated each round so that no kind
    always runs first; the 1-minute load average before and after each round."""
    names = list(workers)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    load = [os.getloadavg()[0]]
    for round_index in range(args.rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            runs[name].append(workers[name].request("run", args.timeout_s))
            logger.info("round %d %s: %s", round_index, name, _short(runs[name][-1]))
        load.append(os.getloadavg()[0])
    return runs, load


def _short(result: dict) -> str:
    if "error" in result:
        return result["error"]
    return f"{result['pairs_per_s']:.1f} pairs/s"


def _context(args, spec: dict, load: list[float]) -> dict:
    return {
        "config": str(args.config),
        "overrides": list(args.overrides),
        "global_batch": spec["global_batch"],
        "threads": args.threads,
        "rounds": args.rounds,
        "steps": args.steps,
        "warmup": args.warmup,
        "saved_batches": args.batches,
        "data": "pre-decoded by the engine's loader once; loading excluded from every run",
        "precision": spec["optimizer"]["precision"],
        "load_avg_1m": load,
        "cpu_count": os.cpu_count(),
    }


def _print_report(report: dict) -> None:
    """The human summary on stdout."""
    print(
        f"# throughput config={report['config']} global_batch={report['global_batch']} "
        f"threads={report['threads']} rounds={report['rounds']} steps={report['steps']} "
        f"warmup={report['warmup']} precision={report['precision']}; data pre-decoded "
        f"(excluded); load_avg_1m {' '.join(f'{x:.1f}' for x in report['load_avg_1m'])} on "
        f"{report['cpu_count']} CPUs"
    )
    header = f"{'run':<40}{'torch':<15}{'pairs/s':>9}{'pairs/cpu_s':>12}{'fwd+bwd_ms':>12}"
    header += f"{'optim_ms':>10}  pairs/s by round"
    print(header)
    labels = {
        "engine": "megatron-ibxl 1 proc (global)",
        "engine_micro": "megatron-ibxl 1 proc (micro)",
        "open_clip": "open_clip 1 proc",
        "layout": "megatron-ibxl config layout",
    }
    for key, label in labels.items():
        row = report.get(key)
        if row is None:
            continue
        if "error" in row:
            print(f"{label:<40}failed: {row['error']}")
            continue
        if key == "layout":
            label = f"megatron-ibxl tp{row['layout']['tp']} dp{row['layout']['dp']} " + (
                f"zero{row['layout']['zero']} ({row['world_size']} procs)"
            )
        phases = row["median_ms"]
        rounds = " ".join(f"{x:.1f}" for x in row.get("pairs_per_s_rounds", []))
        print(
            f"{label:<40}{row['torch']:<15}{row['pairs_per_s']:>9.1f}"
            f"{row['pairs_per_cpu_s']:>12.1f}"
            f"{phases.get('fwd_bwd_ms', float('nan')):>12.1f}"
            f"{phases.get('optimizer_ms', float('nan')):>10.1f}  {rounds}"
        )
    for key in ("engine", "engine_micro"):
        engine, other = report.get(key, {}), report.get("open_clip", {})
        if "pairs_per_s" in engine and "pairs_per_s" in other:
            ratio = engine["pairs_per_s"] / other["pairs_per_s"]
            ratio_cpu = engine["pairs_per_cpu_s"] / other["pairs_per_cpu_s"]
            report[f"ratio_{key}_to_open_clip"] = ratio
            report[f"ratio_cpu_{key}_to_open_clip"] = ratio_cpu
            print(
                f"ratio {labels[key]} / open_clip: {ratio:.2f} (wall), {ratio_cpu:.2f} (CPU time)"
            )
    for name, table in report.get("profiles", {}).items():
        print(f"\n## profile: {name} (top operators by self CPU time)\n{table}")


def build_parser() -> argparse.ArgumentParser:
    """`compare` (the default) and the `engine-worker` it starts."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.throughput",
        description="Training pairs per second of megatron-ibxl and of open_clip.",
    )
    sub = parser.add_subparsers(dest="mode", metavar="MODE", required=True)
    compare = sub.add_parser("compare", help="alternate both engines and report (default)")
    _common_args(compare)
    compare.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    compare.add_argument("--batches", type=int, default=4, help="saved batches, cycled")
    compare.add_argument("--engine-python", default=sys.executable, help="engine interpreter")
    compare.add_argument(
        "--openclip-python",
        default=str(DEFAULT_OPENCLIP_PYTHON),
        help="interpreter with open_clip (make bench-deps builds .venv-bench)",
    )
    compare.add_argument(
        "--layout-procs",
        type=int,
        default=4,
        help="processes for the config's own layout run (0 or 1: skip it)",
    )
    compare.add_argument("--profile", action="store_true", help="add operator profiles")
    compare.add_argument("--profile-steps", type=int, default=3, help="steps profiled")
    compare.add_argument("--work-dir", default=str(ROOT / "runs" / "bench" / "throughput"))
    compare.add_argument("--timeout-s", type=float, default=1800.0, help="per worker run")
    compare.add_argument("--out", default=None, metavar="FILE", help="write the JSON report")
    compare.set_defaults(handler=run_compare)

    worker = sub.add_parser("engine-worker", help="one engine run (started by compare)")
    _common_args(worker)
    worker.add_argument("--batches", required=True, help="the saved batches file")
    worker.add_argument("--layout", choices=["single", "config"], default="single")
    worker.add_argument("--negatives", choices=["global", "micro"], default=None)
    worker.add_argument("--serve", action="store_true", help="answer requests on stdin")
    worker.set_defaults(handler=run_engine_worker)
    return parser


def _common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), metavar="FILE")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=10, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments (no mode means `compare`) and run; user errors exit 2."""
    from megatron_ibxl.errors import UserError

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        argv.insert(0, "compare")
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
