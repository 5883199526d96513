"""Where a run's numbers go: metrics.jsonl, TensorBoard, Weights & Biases and the console.

One dictionary per logged step goes, unchanged, to every sink, so the console and the files
never disagree. Only the rank that owns the values (`ParallelContext.owns_metrics`) writes;
the others hold a disabled writer whose calls do nothing.

Keys carry their unit: `step_time_ms`, `samples_per_s`, `mem_peak_gib`, `eta_s`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from megatron_ibxl.config import LoggingConfig

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
"""The per-step JSON lines file under the run directory (a contract for outside tools)."""


def memory_gib(device: torch.device) -> dict[str, float]:
    """Peak memory of this process: accelerator peak allocation on CUDA, peak resident set
    size on the host, and the current resident set size, in GiB."""
    out: dict[str, float] = {}
    if device.type == "cuda":
        out["mem_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    rss_gib = 0.0
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        rss_gib = pages * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError, IndexError):
        pass
    # ru_maxrss is in KiB on Linux; it is sampled by the kernel, so never below the current.
    peak_rss_gib = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, rss_gib)
    out.setdefault("mem_peak_gib", peak_rss_gib)
    out["rss_peak_gib"] = peak_rss_gib
    if rss_gib:
        out["rss_gib"] = rss_gib
    return out


def format_line(metrics: dict[str, Any]) -> str:
    """`step=10 loss=2.303 lr=0.0012 ...`: the console form of a metrics dictionary."""
    parts = []
    for key, value in metrics.items():
        if isinstance(value, float):
            text = f"{value:.4g}" if math.isfinite(value) else str(value)
        else:
            text = str(value)
        parts.append(f"{key}={text}")
    return " ".join(parts)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The lines of RUN_DIR/metrics.jsonl, one per step: when a resumed run logged a step
    again, the later line wins. Lines that are not a JSON object with an integer `step` (a
    write cut short, a hand edit, bytes that are not UTF-8) are skipped with one warning that
    counts them."""
    path = Path(run_dir) / METRICS_FILE
    by_step: dict[int, dict[str, Any]] = {}
    if not path.is_file():
        return []
    skipped = []
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        row = _parse_line(line)
        if row is None:
            if line.strip():
                skipped.append(number)
            continue
        by_step[row["step"]] = row
    if skipped:
        logger.warning(
            "%s: skipped %d malformed line(s) (first: line %d); each line must be one JSON "
            "object with an integer `step`",
            path,
            len(skipped),
            skipped[0],
        )
    return [by_step[s] for s in sorted(by_step)]


def _parse_line(line: bytes) -> dict[str, Any] | None:
    """One metrics line as a dict with an int `step`, or None when it is not one."""
    try:
        row = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(row, dict) or isinstance(row.get("step"), bool):
        return None
    try:
        row["step"] = int(row["step"])
    except (KeyError, TypeError, ValueError):
        return None
    return row


def truncate_after(run_dir: str | Path, step: int) -> None:
    """Drop metrics lines past `step`, so a run resumed from a checkpoint at `step` does not
    leave the lines of the steps it repeats. Atomic: written aside, then renamed."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return
    kept = []
    for line in path.read_bytes().splitlines():
        row = _parse_line(line)
        if row is not None and row["step"] <= step:
            kept.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_bytes(b"".join(line + b"\n" for line in kept))
    os.replace(tmp, path)


class MetricsWriter:
    """Write each logged step to metrics.jsonl, TensorBoard, W&B and the console.

    Args:
        run_dir: the run folder (`logging.run_dir`).
        cfg: the logging section (TensorBoard, W&B, progress style).
        enabled: True only on the rank that owns the metrics.
        start_step: the step the run resumes after (0 for a fresh run).
        total_steps: the last step, for the progress bar and the ETA.
        run_config: the resolved configuration, recorded by W&B.
    """

    def __init__(
        self,
        run_dir: str | Path,
        cfg: LoggingConfig,
        enabled: bool,
        start_step: int,
        total_steps: int,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self._jsonl = None
        self._tb = None
        self._wandb = None
        self._bar = None
        self._redirect = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        truncate_after(self.run_dir, start_step)
        self._jsonl = open(self.run_dir / METRICS_FILE, "a", buffering=1)  # noqa: SIM115
        if cfg.tensorboard:
            self._tb = _open_tensorboard(self.run_dir / "tb", start_step)
        if cfg.wandb:
            self._wandb = _open_wandb(cfg, self.run_dir, run_config)
        use_bar = cfg.progress == "bar" or (cfg.progress == "auto" and sys.stderr.isatty())
        if use_bar and start_step < total_steps:
            self._open_bar(start_step)

    def _open_bar(self, start_step: int) -> None:
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        # Log lines go through tqdm.write while the bar is shown, so they do not tear it.
        self._redirect = logging_redirect_tqdm()
        self._redirect.__enter__()
        self._bar = tqdm(
            total=self.total_steps, initial=start_step, unit="step", dynamic_ncols=True
        )

    def progress(self, step: int, loss: float, lr: float, samples_per_s: float) -> None:
        """Advance the progress bar to `step` (every step; a no-op without a bar)."""
        if self._bar is None:
            return
        self._bar.update(step - self._bar.n)
        self._bar.set_postfix(
            loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_per_s=f"{samples_per_s:.1f}", refresh=False
        )

    def log(self, metrics: dict[str, Any]) -> None:
        """Write one step's metrics (must contain `step`) to every sink."""
        if not self.enabled:
            return
        step = int(metrics["step"])
        self._jsonl.write(json.dumps(_plain(metrics)) + "\n")
        numbers = {k: v for k, v in metrics.items() if k != "step" and _is_number(v)}
        if self._tb is not None:
            for key, value in numbers.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)
        logger.info(format_line(metrics))

    def close(self) -> None:
        """Flush and close every sink."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    """JSON cannot hold NaN or infinity: write them as null."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        out[key] = value
    return out


def _open_tensorboard(tb_dir: Path, start_step: int):
    from torch.utils.tensorboard import SummaryWriter

    # purge_step drops events a previous attempt wrote past the checkpoint we resume from.
    return SummaryWriter(str(tb_dir), purge_step=start_step + 1 if start_step else None)


def _open_wandb(cfg: LoggingConfig, run_dir: Path, run_config: dict[str, Any] | None):
    try:
        import wandb
    except ImportError:
        logger.warning(
            "logging.wandb=true but the wandb package is not installed; continuing without "
            "it (pip install wandb, or set logging.wandb=false)"
        )
        return None
    # One W&B run per run folder: the id is kept beside the metrics, so a resume continues it.
    id_file = run_dir / "wandb_id.txt"
    if not id_file.is_file():
        id_file.write_text(f"{run_dir.name}-{int(time.time())}\n")
    return wandb.init(
        project=cfg.wandb_project,
        name=run_dir.name,
        dir=str(run_dir),
        config=run_config,
        resume="allow",
        id=id_file.read_text().strip(),
    )
