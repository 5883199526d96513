"""Checks of a run's input files before any process group starts.

`megatron-ibxl train` (on every rank, before it joins the process groups) and `--dry-run`
both call `check_inputs`, so a missing shard list, a missing tokenizer or a tokenizer whose
ids do not fit the text tower's vocabulary is reported once, as one line per problem, before
any GPU or peer is waited for. What can only be known by reading the data (a corrupt image,
a shard cut short) is still handled while training, sample by sample.
"""

from __future__ import annotations

import os
from pathlib import Path

from megatron_ibxl.config import RunConfig
from megatron_ibxl.errors import DataError, UserError


def check_inputs(config: RunConfig) -> None:
    """Raise DataError listing every input of `config` that cannot be used.

    Checked: `data.train_shards` names at least one shard, every named shard exists and opens
    as a tar file (its first header reads; what lies further in is checked while training);
    `data.tokenizer` is set, loads, and its ids fit `model.text.vocab_size` (a larger id
    would index past the embedding table); the evaluation's data, classes and templates exist
    when `eval.task` is not `none` and read as the evaluation will; the run folder can be
    made. Reads only small files (the shard list, the tokenizer, the class list) and the
    first block of each shard, and lists the evaluation folder.
    """
    problems = _shard_problems(config) + _tokenizer_problems(config) + _eval_problems(config)
    problems += _run_dir_problems(config)
    if problems:
        raise DataError("\n".join(problems))


def _shard_problems(config: RunConfig) -> list[str]:
    from megatron_ibxl.data.shards import expand_shards, shard_problem

    if not config.data.train_shards.strip():
        return ["data.train_shards is not set; give a brace pattern or a list file of shards"]
    try:
        shards = expand_shards(config.data.train_shards)
    except UserError as exc:
        return [str(exc)]
    folders = [shard for shard in shards if Path(shard).is_dir()]
    if folders:
        return [
            f"data.train_shards={config.data.train_shards}: {folders[0]} is a folder; name "
            "the .tar shards in it, e.g. with a brace pattern such as DIR/train-{0000..0099}.tar"
        ]
    missing = [shard for shard in shards if not Path(shard).is_file()]
    if missing:
        return [
            f"data.train_shards={config.data.train_shards}: {len(missing)} of {len(shards)} "
            f"shards do not exist (first: {missing[0]}); fix the pattern or the list file"
        ]
    unreadable = [problem for problem in map(shard_problem, shards) if problem]
    if unreadable:
        return [
            f"data.train_shards={config.data.train_shards}: {len(unreadable)} of "
            f"{len(shards)} shards are not tar files ({unreadable[0]}); re-create them or "
            "leave them out of the pattern or list file"
        ]
    return []


def _tokenizer_problems(config: RunConfig) -> list[str]:
    from megatron_ibxl.data.tokenizer import load_tokenizer

    if not config.data.tokenizer.strip():
        return [
            "data.tokenizer is not set; give a tokenizer.json or a folder with vocab.json + "
            "merges.txt (`megatron-ibxl train-tokenizer` makes one from shards)"
        ]
    try:
        tokenizer = load_tokenizer(config.data.tokenizer)
    except UserError as exc:
        return [str(exc)]
    vocab = config.model.text.vocab_size
    if tokenizer.vocab_size > vocab:
        return [
            f"data.tokenizer={config.data.tokenizer}: has {tokenizer.vocab_size} ids but "
            f"model.text.vocab_size={vocab}; set model.text.vocab_size to at least "
            f"{tokenizer.vocab_size} or use a smaller tokenizer"
        ]
    return []


def _eval_problems(config: RunConfig) -> list[str]:
    if config.eval.task == "none":
        return []
    problems = []  # an unset eval.data is a config error, reported by validate()
    for key in ("data", "classes", "templates"):
        value = getattr(config.eval, key)
        if value.strip() and not Path(value).exists():
            problems.append(f"eval.{key}={value}: does not exist; fix the path or eval.task=none")
    if problems or not config.eval.data.strip():
        return problems
    # The files exist: read them as the first evaluation will (a folder listing and small
    # files), so a layout problem does not surface only after training up to that step.
    from megatron_ibxl.evaluation import load_eval_data

    try:
        load_eval_data(config.eval)
    except UserError as exc:
        return [f"{exc}; or set eval.task=none"]
    return []


def _run_dir_problems(config: RunConfig) -> list[str]:
    run_dir = Path(config.logging.run_dir)
    existing = next((p for p in (run_dir, *run_dir.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        return [
            f"logging.run_dir={config.logging.run_dir}: {existing} is a file, not a folder; "
            "choose another run folder"
        ]
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        return [
            f"logging.run_dir={config.logging.run_dir}: {existing} is not writable; choose "
            "another run folder"
        ]
    return []
