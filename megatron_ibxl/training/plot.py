"""`megatron-ibxl plot RUN_DIR`: training curves from metrics.jsonl to RUN_DIR/curves.png."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from megatron_ibxl.errors import UserError
from megatron_ibxl.training.metrics import METRICS_FILE, read_metrics

logger = logging.getLogger(__name__)

CURVES_FILE = "curves.png"
"""The picture written under the run directory."""

# (panel title, y label, metric keys drawn in it)
_PANELS = (
    ("Contrastive loss", "loss", ("loss",)),
    ("Learning rate", "lr", ("lr",)),
    ("In-batch top-1 (pairs of one class look alike)", "accuracy", ("acc_i2t", "acc_t2i")),
    ("Zero-shot accuracy (held out)", "accuracy", ("zero_shot_top1", "zero_shot_top5")),
)


def plot_curves(rows: list[dict[str, Any]], out_path: str | Path, title: str = "") -> Path:
    """Draw loss, learning rate, in-batch and zero-shot accuracy against the step.

    Args:
        rows: metrics lines, one per step (as `read_metrics` returns them).
        out_path: the PNG to write.
        title: a heading for the figure (e.g. the run folder).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (panel, ylabel, keys) in zip(axes.flat, _PANELS, strict=True):
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, marker="o" if len(points) < 20 else None, label=key)
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(loc="best", fontsize="small")
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        if ylabel == "accuracy":
            ax.set_ylim(0.0, 1.02)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return out_path


def run(args) -> int:
    """Read RUN_DIR/metrics.jsonl and write RUN_DIR/curves.png."""
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run folder; pass the logging.run_dir of a run")
    rows = read_metrics(run_dir)
    if not rows:
        raise UserError(
            f"{run_dir / METRICS_FILE}: no metrics lines found; pass the logging.run_dir of a "
            "run that has logged at least one step"
        )
    out = plot_curves(rows, run_dir / CURVES_FILE, title=str(run_dir))
    logger.info("wrote %s (%d steps)", out, len(rows))
    print(out)
    return 0
