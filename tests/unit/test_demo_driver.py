"""The `make demo` driver: what a first, a repeated and a changed-config run do.

Training itself is replaced by a stand-in that writes metrics lines, so these tests check the
driver's decisions (train, resume, re-report, restart) and its summary, not the model.
"""

import json
from pathlib import Path

import pytest
import yaml

from megatron_ibxl import demo
from megatron_ibxl.config import load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def stop_after():
    """Steps the fake training reaches; a test lowers it to stand for a run stopped by a
    signal."""
    return {"steps": 3}


@pytest.fixture
def demo_setup(tmp_path, monkeypatch, stop_after):
    """A copy of the demo config writing to tmp_path/run, no data build, fake training."""
    raw = yaml.safe_load((ROOT / "launch" / "configs" / "demo-cpu.yaml").read_text())
    raw["logging"]["run_dir"] = str(tmp_path / "run")
    raw["schedule"]["total_steps"] = 3
    raw["schedule"]["warmup_steps"] = 1
    config_path = tmp_path / "demo.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    monkeypatch.setattr(demo, "DEMO_CONFIG", config_path)
    monkeypatch.setattr(demo, "ensure_demo_data", lambda: None)
    launches = []

    def fake_launch(path, overrides, nproc):
        config = load_config(path, overrides)
        run_dir = Path(config.logging.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps({"config_hash": config.digest()}))
        lines = [
            {"step": s, "loss": 3.0 - s, "lr": 1e-3, "samples": 128 * s, "train_s": 2.0 * s}
            for s in range(1, stop_after["steps"] + 1)
        ]
        lines[-1]["zero_shot_top1"] = 0.9
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        launches.append(nproc)
        return 0

    monkeypatch.setattr(demo, "launch_training", fake_launch)
    return config_path, tmp_path / "run", launches


def test_first_run_trains_and_summarises(demo_setup, capsys):
    _, run_dir, launches = demo_setup
    assert demo.run_demo() == 0
    assert launches == [4]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["zero_shot_top1"] == 0.9 and summary["steps"] == 3
    assert summary["final_loss"] == 0.0
    # 3 steps of 128 pairs in 6 s of step time.
    assert summary["samples_per_s"] == pytest.approx(384 / 6.0, abs=0.1)
    assert (run_dir / "curves.png").is_file()
    assert "held-out zero-shot top-1 : 0.900" in capsys.readouterr().out


def test_second_run_re_reports_without_training(demo_setup, capsys):
    _, _, launches = demo_setup
    demo.run_demo()
    capsys.readouterr()
    assert demo.run_demo() == 0
    assert launches == [4]  # no second launch
    assert "already complete; nothing to train" in capsys.readouterr().out


def test_changed_config_or_restart_starts_over(demo_setup):
    config_path, run_dir, launches = demo_setup
    demo.run_demo()
    (run_dir / "stale-file").write_text("from the old run")
    raw = yaml.safe_load(config_path.read_text())
    raw["optimizer"]["lr"] = 1e-3
    config_path.write_text(yaml.safe_dump(raw))
    assert demo.run_demo() == 0
    assert launches == [4, 4] and not (run_dir / "stale-file").exists()
    # The old run is kept beside the new one, under its configuration's hash.
    (aside,) = run_dir.parent.glob("run.*")
    assert (aside / "stale-file").read_text() == "from the old run"
    assert demo.run_demo(restart=True) == 0
    assert launches == [4, 4, 4]


def test_interrupted_run_is_resumed_in_place(demo_setup):
    _, run_dir, launches = demo_setup
    demo.run_demo()
    (run_dir / "summary.json").unlink()  # as if training had been cut short
    (run_dir / "kept-file").write_text("resume keeps the run folder")
    assert demo.run_demo() == 0
    assert launches == [4, 4] and (run_dir / "kept-file").exists()


def test_a_run_stopped_by_a_signal_is_reported_and_resumed(demo_setup, stop_after, caplog):
    # Ctrl-C or SIGTERM: the training launch checkpoints and exits 0 before the last step.
    _, run_dir, launches = demo_setup
    stop_after["steps"] = 2
    assert demo.run_demo() == demo.EXIT_STOPPED
    assert "stopped by a signal at step 2 of 3" in caplog.text
    assert not (run_dir / "summary.json").exists()  # so the next run resumes, not re-reports
    stop_after["steps"] = 3
    assert demo.run_demo() == 0
    assert launches == [4, 4]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 3
