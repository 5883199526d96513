"""Metrics sinks, the curves plot, the stop flag and the watchdog, in one process."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from megatron_ibxl.config import LoggingConfig
from megatron_ibxl.errors import UserError
from megatron_ibxl.training import plot
from megatron_ibxl.training.metrics import (
    MetricsWriter,
    format_line,
    memory_gib,
    read_metrics,
    truncate_after,
)
from megatron_ibxl.training.signals import EXIT_HUNG, StopSignal

ROOT = Path(__file__).resolve().parents[2]


def _row(step, loss, **extra):
    return {
        "step": step,
        "loss": loss,
        "lr": 1e-3,
        "grad_norm": 0.5,
        "samples_per_s": 10.0,
        **extra,
    }


def test_format_line_is_key_value_with_four_digits():
    line = format_line({"step": 3, "loss": 2.302585, "lr": 0.00125, "grad_norm": float("nan")})
    assert line == "step=3 loss=2.303 lr=0.00125 grad_norm=nan"


def test_writer_sends_the_same_values_to_jsonl_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = LoggingConfig(run_dir=str(tmp_path), tensorboard=True, progress="plain")
    writer = MetricsWriter(tmp_path, cfg, enabled=True, start_step=0, total_steps=2)
    writer.log(_row(1, 2.5, acc_i2t=0.25))
    writer.log(_row(2, 2.0, acc_i2t=0.5, grad_norm=float("inf")))
    writer.close()

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[1]["grad_norm"] is None  # JSON has no infinity: written as null
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 2.5), (2, 2.0)]
    assert [e.value for e in events.Scalars("acc_i2t")] == [0.25, 0.5]


def test_disabled_writer_writes_nothing(tmp_path):
    cfg = LoggingConfig(run_dir=str(tmp_path))
    writer = MetricsWriter(tmp_path / "run", cfg, enabled=False, start_step=0, total_steps=5)
    writer.log(_row(1, 1.0))
    writer.progress(1, 1.0, 1e-3, 10.0)
    writer.close()
    assert not (tmp_path / "run").exists()


def test_resume_drops_lines_past_the_checkpoint(tmp_path):
    lines = [_row(s, 3.0 - s / 10) for s in range(1, 7)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    truncate_after(tmp_path, 4)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]


def test_read_metrics_keeps_the_later_line_of_a_repeated_step(tmp_path):
    text = json.dumps(_row(1, 3.0)) + "\n" + json.dumps(_row(1, 2.0)) + "\n" + '{"step": 2, "lo'
    (tmp_path / "metrics.jsonl").write_text(text)
    rows = read_metrics(tmp_path)
    assert len(rows) == 1 and rows[0]["loss"] == 2.0  # the cut-short line is ignored


def test_read_metrics_counts_malformed_lines_in_one_warning(tmp_path, caplog):
    good = [json.dumps(_row(1, 3.0)), json.dumps(_row(2, 2.5))]
    bad = ["not json", "[1, 2]", '{"step": "x", "loss": 1}', '{"loss": 1}']
    (tmp_path / "metrics.jsonl").write_text("\n".join([good[0], *bad, good[1]]) + "\n")
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "skipped 4 malformed line(s) (first: line 2)" in warnings[0]
    truncate_after(tmp_path, 1)  # malformed lines do not break truncation either
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]


def test_memory_reports_resident_set(tmp_path):
    mem = memory_gib(torch.device("cpu"))
    assert 0 < mem["rss_gib"] <= mem["mem_peak_gib"] + 1e-6


def test_plot_writes_png(tmp_path):
    rows = [_row(s, 3.0 / s, acc_i2t=s / 10, acc_t2i=s / 12) for s in range(1, 6)]
    rows[-1]["zero_shot_top1"] = 0.6
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert plot.run(Namespace(run_dir=str(tmp_path))) == 0
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_metrics_names_the_file(tmp_path):
    with pytest.raises(UserError, match="metrics.jsonl"):
        plot.run(Namespace(run_dir=str(tmp_path)))
    with pytest.raises(UserError, match="nope: no such run folder"):
        plot.run(Namespace(run_dir=str(tmp_path / "nope")))


def test_stop_signal_sets_the_flag():
    stop = StopSignal()
    stop.install()
    try:
        assert not stop.should_stop(torch.device("cpu"))
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.should_stop(torch.device("cpu"))
        assert stop.received == "SIGUSR1"
    finally:
        stop.uninstall()


def test_ctrl_c_stops_with_a_checkpoint_and_a_second_one_aborts(monkeypatch):
    from megatron_ibxl.training import signals

    stop = StopSignal()
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: a stop, not an interrupt
        assert stop.received == "SIGINT" and stop.should_stop(torch.device("cpu"))
        os.kill(os.getpid(), signal.SIGINT)  # the same Ctrl-C forwarded by a launcher
        monkeypatch.setattr(signals, "SIGINT_REPEAT_S", 0.0)
        time.sleep(0.01)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # pressed again: abort
            time.sleep(1)  # the handler runs at the next bytecode; never reached
    finally:
        stop.uninstall()


def test_a_signal_during_start_up_is_kept_for_the_loop(monkeypatch):
    from megatron_ibxl import stop_request

    monkeypatch.setattr(stop_request, "received", None)
    previous = {signum: signal.getsignal(signum) for signum in stop_request.STOP_SIGNALS}
    stop = StopSignal()
    try:
        stop_request.catch_early()
        os.kill(os.getpid(), signal.SIGTERM)  # would end the process without catch_early
        stop.install()
        assert stop.received == "SIGTERM" and stop.should_stop(torch.device("cpu"))
    finally:
        stop.uninstall()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_watchdog_ends_a_stuck_phase_naming_the_rank():
    code = textwrap.dedent(
        """
        import logging, time
        from megatron_ibxl.training.signals import Watchdog
        logging.basicConfig(level=logging.INFO)
        dog = Watchdog("rank 7 (tp 1, dp 3, pp 0)", timeout_s=0.5).start()
        with dog.phase("train step 12"):
            time.sleep(30)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == EXIT_HUNG
    assert "rank 7 (tp 1, dp 3, pp 0): train step 12 did not finish" in proc.stderr


def test_wandb_missing_is_a_warning_not_a_failure(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    cfg = LoggingConfig(run_dir=str(tmp_path), tensorboard=False, wandb=True, progress="plain")
    writer = MetricsWriter(tmp_path, cfg, enabled=True, start_step=0, total_steps=1)
    writer.log(_row(1, 1.0))
    writer.close()
    assert "logging.wandb=true but the wandb package is not installed" in caplog.text
    assert len(read_metrics(tmp_path)) == 1


def test_progress_bar_and_lines_together(tmp_path, capsys):
    cfg = LoggingConfig(run_dir=str(tmp_path), tensorboard=False, progress="bar")
    writer = MetricsWriter(tmp_path, cfg, enabled=True, start_step=2, total_steps=5)
    for step in (3, 4, 5):
        writer.progress(step, 1.0 / step, 1e-3, 50.0)
        writer.log(_row(step, 1.0 / step))
    writer.close()
    err = capsys.readouterr().err
    assert "5/5" in err and "loss=0.2000" in err  # the bar reached the last step
    assert [r["step"] for r in read_metrics(tmp_path)] == [3, 4, 5]
