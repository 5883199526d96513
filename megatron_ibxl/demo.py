"""`make demo`: the digits demo, end to end, on 4 CPU processes.

Steps: build the demo data (`megatron-ibxl make-demo-data runs/demo-data`, skipped when it is
already there), train `launch/configs/demo-cpu.yaml` with `launch/torchrun.sh` on 4 processes
(TP=2 with sequence parallelism times DP=2 with ZeRO-3, global negatives over 2 accumulated
micro-batches), draw the curves and write `runs/demo/summary.json`.

Running it again:

- after a finished run with the same configuration, nothing is trained: the stored summary is
  printed again (`"status": "already complete"`);
- after an interrupted run (Ctrl-C, a killed rank, SIGTERM), training resumes from the last
  complete checkpoint and finishes;
- when `launch/configs/demo-cpu.yaml` changed since the run started (its hash differs), the
  old run folder is moved aside to `runs/demo.<old hash>` (nothing is deleted) and the demo
  starts from step 0; `python -m megatron_ibxl.demo --restart` removes it instead.

Run it from the repository root (the config names its paths relative to it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from megatron_ibxl.config import RunConfig, load_config, validate
from megatron_ibxl.errors import UserError
from megatron_ibxl.logging_setup import setup_logging
from megatron_ibxl.training.metrics import read_metrics
from megatron_ibxl.training.plot import CURVES_FILE, plot_curves

logger = logging.getLogger("megatron_ibxl.demo")

DEMO_CONFIG = Path("launch/configs/demo-cpu.yaml")
"""The demo's run configuration, relative to the repository root."""
DEMO_DATA = Path("runs/demo-data")
"""Where the digits shards, held-out images and tokenizer are written."""
NUM_PROCESSES = 4
"""Processes of the demo: TP=2 times DP=2."""
EXIT_STOPPED = 130
"""Exit code of a demo stopped by Ctrl-C or SIGTERM before its last step (resumable)."""
SUMMARY_FILE = "summary.json"
"""The demo's result file under the run directory."""


def ensure_demo_data(out_dir: Path = DEMO_DATA) -> None:
    """Write the digits demo data unless a complete copy is already in `out_dir`."""
    needed = ("train.txt", "tokenizer.json", "classes.tsv", "templates.txt", "heldout")
    if all((out_dir / name).exists() for name in needed):
        logger.info("demo data present in %s; not rebuilding", out_dir)
        return
    from megatron_ibxl.data.demo import make_demo_data

    logger.info("building the digits demo data in %s", out_dir)
    make_demo_data(out_dir)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_training(config_path: Path, overrides: list[str], nproc: int) -> int:
    """Run `launch/torchrun.sh CONFIG` on `nproc` local processes; return its exit code."""
    env = dict(os.environ)
    env.update(
        NPROC_PER_NODE=str(nproc),
        MASTER_PORT=str(_free_port()),
        PYTHON=sys.executable,
        # Several processes share few cores: one intra-op thread each avoids thrashing.
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
    )
    cmd = ["bash", "launch/torchrun.sh", str(config_path)]
    for item in overrides:
        cmd += ["--set", item]
    logger.info("launching: %s", " ".join(cmd))
    # A terminal's Ctrl-C reaches the launch script as well as this process: the script turns
    # it into a stop with a checkpoint, so this process only waits for it to finish.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return subprocess.run(cmd, env=env, check=False).returncode
    finally:
        signal.signal(signal.SIGINT, previous)


def build_summary(rows: list[dict[str, Any]], config: RunConfig, wall_s: float) -> dict[str, Any]:
    """The demo's result: final loss, held-out zero-shot accuracy, steps, time, throughput."""
    train_rows = [r for r in rows if r.get("loss") is not None]
    eval_rows = [r for r in rows if r.get("zero_shot_top1") is not None]
    if not train_rows:
        raise UserError(f"{config.logging.run_dir}/metrics.jsonl: no training steps logged")
    last = train_rows[-1]
    train_s = float(last.get("train_s") or 0.0)
    summary = {
        "zero_shot_top1": eval_rows[-1]["zero_shot_top1"] if eval_rows else None,
        "zero_shot_top5": eval_rows[-1].get("zero_shot_top5") if eval_rows else None,
        "final_loss": last["loss"],
        "steps": int(last["step"]),
        "wall_s": round(wall_s, 1),
        "train_s": round(train_s, 1),
        "samples_per_s": round(last.get("samples", 0) / train_s, 1) if train_s else None,
        "samples": last.get("samples"),
        "global_batch": config.data.global_batch,
        "processes": NUM_PROCESSES,
        "config_hash": config.digest(),
        "run_dir": config.logging.run_dir,
        "curves": str(Path(config.logging.run_dir) / CURVES_FILE),
    }
    return summary


def _stored_hash(run_dir: Path) -> str | None:
    """The configuration hash the run in `run_dir` was started with, if any."""
    path = run_dir / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("config_hash")
    except (json.JSONDecodeError, AttributeError):
        return None


def _free_name(path: Path) -> Path:
    """`path`, or `path.2`, `path.3`, ... : the first that does not exist yet."""
    candidate, number = path, 1
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.name}.{number}")
    return candidate


def _finished(run_dir: Path, config: RunConfig) -> dict[str, Any] | None:
    path = run_dir / SUMMARY_FILE
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    done = summary.get("steps") == config.schedule.total_steps
    return summary if done and summary.get("config_hash") == config.digest() else None


def _report(summary: dict[str, Any]) -> None:
    top1 = summary["zero_shot_top1"]
    top1_text = "n/a" if top1 is None else f"{top1:.3f}"
    lines = [
        "",
        "digits demo summary",
        f"  held-out zero-shot top-1 : {top1_text}   (chance 0.100)",
        f"  final loss               : {summary['final_loss']:.4f}",
        f"  optimizer steps          : {summary['steps']}",
        f"  training launch wall time: {summary['wall_s']:.1f} s",
        f"  training time, all runs  : {summary['train_s']:.1f} s",
        f"  throughput               : {summary['samples_per_s']} samples/s",
        f"  curves                   : {summary['curves']}",
        f"  summary                  : {summary['run_dir']}/{SUMMARY_FILE}",
    ]
    if summary.get("status"):
        lines.insert(2, f"  status                   : {summary['status']}")
    print("\n".join(lines))  # the demo's final report, like the CLI's JSON output


def run_demo(restart: bool = False, overrides: list[str] | None = None) -> int:
    """Build the data, train (or resume), plot, summarise. Returns the exit code."""
    if not DEMO_CONFIG.is_file():
        raise UserError(f"{DEMO_CONFIG}: not found; run the demo from the repository root")
    config = load_config(DEMO_CONFIG, overrides)
    validate(config, NUM_PROCESSES)
    run_dir = Path(config.logging.run_dir)

    stored = _stored_hash(run_dir)
    if restart:
        logger.info("--restart: removing %s and starting from step 0", run_dir)
        shutil.rmtree(run_dir, ignore_errors=True)
    elif stored is not None and stored != config.digest():
        aside = _free_name(run_dir.with_name(f"{run_dir.name}.{stored}"))
        logger.warning(
            "the demo configuration changed since %s was started: moved it to %s, starting "
            "from step 0",
            run_dir,
            aside,
        )
        run_dir.rename(aside)
    previous = _finished(run_dir, config)
    if previous is not None:
        previous["status"] = "already complete; nothing to train (use --restart to retrain)"
        _report(previous)
        return 0

    ensure_demo_data()
    start = time.perf_counter()
    code = launch_training(DEMO_CONFIG, overrides or [], NUM_PROCESSES)
    wall_s = time.perf_counter() - start
    if code != 0:
        logger.error("training exited with code %d; rerun `make demo` to resume", code)
        return code

    rows = read_metrics(run_dir)
    summary = build_summary(rows, config, wall_s)
    if summary["steps"] < config.schedule.total_steps:
        logger.warning(
            "stopped by a signal at step %d of %d with its checkpoint written; run `make demo` "
            "again to resume",
            summary["steps"],
            config.schedule.total_steps,
        )
        return EXIT_STOPPED
    plot_curves(rows, run_dir / CURVES_FILE, title="digits demo (4 CPU processes)")
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    _report(summary)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line of `python -m megatron_ibxl.demo`."""
    parser = argparse.ArgumentParser(prog="python -m megatron_ibxl.demo", description=__doc__)
    parser.add_argument("--restart", action="store_true", help="discard runs/demo and retrain")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    setup_logging(0)
    try:
        return run_demo(args.restart, args.overrides)
    except UserError as exc:
        print(f"make demo: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
