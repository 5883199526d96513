"""Which folder `megatron-ibxl eval --checkpoint PATH` loads, and what it says when none."""

import pytest

from megatron_ibxl.errors import CheckpointError
from megatron_ibxl.evaluation.entry import resolve_checkpoint


def _complete(folder):
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text("{}")
    return folder


def test_a_copy_under_another_name_is_loaded_as_given(tmp_path):
    """A folder holding meta.json is a checkpoint whatever its name; load_checkpoint then
    checks its format and the files meta.json lists."""
    copy = _complete(tmp_path / "run" / "checkpoints" / "mycopy")
    assert resolve_checkpoint(str(copy)) == copy


def test_a_renamed_checkpoint_in_a_checkpoints_folder_is_named(tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    _complete(checkpoints / "mycopy")
    for given in (checkpoints, tmp_path / "run"):
        with pytest.raises(CheckpointError) as caught:
            resolve_checkpoint(str(given))
        message = str(caught.value)
        assert "\n" not in message and message.startswith(f"{given}: no complete checkpoint")
        # What the engine looks for, and the folder that would do after a rename.
        assert "step_<N>" in message and "meta.json" in message and "`latest`" in message
        assert f"{checkpoints / 'mycopy'} holds meta.json but is not named step_<N>" in message


def test_nothing_like_a_checkpoint(tmp_path):
    (tmp_path / "checkpoints" / "notes").mkdir(parents=True)
    with pytest.raises(CheckpointError) as caught:
        resolve_checkpoint(str(tmp_path / "checkpoints"))
    message = str(caught.value)
    assert "expected a checkpoint folder holding meta.json" in message
    assert "not named step_<N>" not in message
