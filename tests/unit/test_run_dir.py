"""The run folder: one training job at a time, and the record of each configuration kept."""

import json
from types import SimpleNamespace

import pytest

from megatron_ibxl.config import RunConfig
from megatron_ibxl.errors import UserError
from megatron_ibxl.training import entry


def test_a_second_job_on_the_same_folder_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(entry, "_RUN_LOCK", [])
    owner = SimpleNamespace(owns_metrics=True)
    entry._lock_run_dir(tmp_path / "run", owner)  # the first job holds the folder
    first = entry._RUN_LOCK.pop()
    try:
        with pytest.raises(UserError, match="another training job is using this folder"):
            entry._lock_run_dir(tmp_path / "run", owner)
    finally:
        first.close()  # the first job ends
    entry._lock_run_dir(tmp_path / "run", owner)
    entry._RUN_LOCK.pop().close()


def test_config_record_of_an_earlier_configuration_is_kept(tmp_path):
    first, second = RunConfig(), RunConfig()
    second.optimizer.lr = first.optimizer.lr / 2
    entry._write_resolved_config(first, tmp_path, "a.yaml")
    entry._write_resolved_config(first, tmp_path, "a.yaml")  # same config: nothing kept aside
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    entry._write_resolved_config(second, tmp_path, "b.yaml")
    kept = json.loads((tmp_path / f"config.{first.digest()}.json").read_text())
    assert kept["config"]["optimizer"]["lr"] == first.optimizer.lr
    current = json.loads((tmp_path / "config.json").read_text())
    assert current["config_hash"] == second.digest() and current["source"] == "b.yaml"


def test_resume_refuses_a_checkpoint_with_parameters_the_model_lacks():
    import torch

    from megatron_ibxl.training.checkpoint import _check_params

    model = torch.nn.Linear(3, 2)
    meta = {"params": {"weight": [2, 3], "bias": [2], "logit_bias": []}}
    problem = _check_params(meta, model, tp=1, exact=True)
    assert problem is not None and "holds parameter logit_bias that this model lacks" in problem
    # Loading weights only (evaluation, checkpoint.load) may leave it unused.
    assert _check_params(meta, model, tp=1, exact=False) is None
    # A parameter of the model missing from the checkpoint is refused either way.
    del meta["params"]["bias"]
    assert "has no parameter bias" in _check_params(meta, model, tp=1, exact=False)
