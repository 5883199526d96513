"""The whole run configuration: YAML loading, typed coercion and `--set` overrides."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from megatron_ibxl.config.data import DataConfig
from megatron_ibxl.config.errors import ConfigError
from megatron_ibxl.config.model import ModelConfig
from megatron_ibxl.config.parallel import ParallelConfig
from megatron_ibxl.config.run import CheckpointConfig, EvalConfig, LoggingConfig
from megatron_ibxl.config.training import LossConfig, OptimizerConfig, ScheduleConfig


@dataclass
class RunConfig:
    """Everything one training or evaluation run needs, one dataclass per YAML section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The towers, heads and temperature."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor, pipeline and data parallel layout."""
    data: DataConfig = field(default_factory=DataConfig)
    """Shards, batch sizes, augmentation, tokenizer."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """AdamW and precision."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Warmup and cosine decay."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Contrastive objective and negatives."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Zero-shot evaluation."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Run folder and reporting."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint cadence and retention."""

    def to_dict(self) -> dict[str, Any]:
        """The configuration as plain YAML-able data."""
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """A short hash of the resolved configuration, for logs and run folders."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run file, apply `dotted.key=value` overrides, and return typed config.

    Raises ConfigError (every problem, one line each) for a missing, unreadable, non-UTF-8
    or unparsable file, a key written twice in one mapping of the file, unknown keys, values
    of the wrong type and malformed overrides. Cross-field checks that
    need the world size live in `validate`.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    problems: list[str] = []
    for item in overrides or []:
        _apply_override(raw, item, problems)
    config = _build(RunConfig, raw, "", problems)
    if problems:
        raise ConfigError(problems)
    return config


def _read_yaml(path: Path) -> dict[str, Any]:
    """The top-level mapping of the YAML file at `path`; ConfigError for any unusable file."""
    text = _read_text(path)
    try:
        loader = _StrictLoader(text)  # checks for control characters already
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except _DuplicateKeys as exc:
        raise ConfigError(
            [
                f"{path}: {key} is given twice ({_lines(first, again)}); keep one, YAML "
                "would silently use the last"
                for key, first, again in exc.duplicates
            ]
        ) from None
    except yaml.YAMLError as exc:
        where = _yaml_problem(exc, text)
        raise ConfigError(f"{path}: not valid YAML{where}; fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: top level is {type(data).__name__}, expected a mapping of "
            "sections (model, parallel, data, ...)"
        )
    return data


def _read_text(path: Path) -> str:
    """The file's text as UTF-8; ConfigError for a missing, unreadable or binary file."""
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a config file; pass a YAML file to --config")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; pass an existing YAML file to --config")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot read the config file ({exc.strerror or exc}); check its permissions"
        ) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "pass a YAML file saved as UTF-8"
        ) from None


def _lines(first: int, again: int) -> str:
    return f"both on line {first}" if first == again else f"line {first} and line {again}"


def _yaml_problem(exc: yaml.YAMLError, text: str) -> str:
    """Where and why PyYAML rejected `text`, as a clause starting with a space."""
    if isinstance(exc, yaml.reader.ReaderError):  # a control character; it has no line mark
        line = text.count("\n", 0, exc.position) + 1
        return f" at line {line}: {exc.reason} (#x{exc.character:04x})"
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{where}: {getattr(exc, 'problem', None) or 'invalid YAML'}"


class _DuplicateKeys(yaml.YAMLError):
    """Keys given twice in one mapping: (dotted key, first line, repeated line), 1-based."""

    def __init__(self, duplicates: list[tuple[str, int, int]]):
        self.duplicates = duplicates
        super().__init__(f"{len(duplicates)} duplicate key(s)")


class _StrictLoader(yaml.SafeLoader):
    """A safe loader that refuses a key given twice in one mapping, at any depth.

    The check runs over the composed node tree before anything is constructed: merge keys
    (`<<: *anchor`) are expanded in place during construction, and a key that overrides a
    merged one is legitimate, so only the keys written in each mapping are compared.
    """

    def construct_document(self, node: yaml.Node) -> Any:
        duplicates: list[tuple[str, int, int]] = []
        _find_duplicates(node, "", duplicates, set())
        if duplicates:
            raise _DuplicateKeys(duplicates)
        return super().construct_document(node)


def _find_duplicates(node: yaml.Node, prefix: str, found: list, seen: set[int]) -> None:
    """Append (dotted key, first line, repeated line) for each repeated key under `node`."""
    if id(node) in seen:  # an alias to a node already walked (or a recursive anchor)
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _find_duplicates(item, f"{prefix.rstrip('.')}[{index}].", found, seen)
        return
    if not isinstance(node, yaml.MappingNode):
        return
    first_line: dict[tuple[str, str], int] = {}
    for key_node, value_node in node.value:
        is_scalar = isinstance(key_node, yaml.ScalarNode)
        if not is_scalar or key_node.tag == "tag:yaml.org,2002:merge":
            continue
        ident, line = (key_node.tag, key_node.value), key_node.start_mark.line + 1
        if ident in first_line:
            found.append((f"{prefix}{key_node.value}", first_line[ident], line))
        else:
            first_line[ident] = line
        _find_duplicates(value_node, f"{prefix}{key_node.value}.", found, seen)


def _apply_override(raw: dict[str, Any], item: str, problems: list[str]) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        problems.append(f"--set {item!r}: expected dotted.key=value, e.g. parallel.tp=2")
        return
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            problems.append(f"--set {item!r}: {part} is not a section")
            return
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    """Instantiate dataclass `cls` from a mapping, collecting type problems by dotted key."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        problems.append(f"{where}={raw!r}: expected a mapping of keys")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            choices = ", ".join(sorted(fields))
            problems.append(f"{prefix}{key}: unknown key; valid keys here are: {choices}")
    kwargs = {}
    for name in fields:
        if name not in raw:
            continue
        kwargs[name] = _coerce(hints[name], raw[name], f"{prefix}{name}", problems)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str, problems: list[str]) -> Any:
    """Check `value` against a type hint; return it converted or record a problem."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".", problems)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)]
        return _coerce(inner[0], value, key, problems)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value in allowed and type(value) is type(allowed[0]):
            return value
        shown = ", ".join(repr(a) for a in allowed)
        problems.append(f"{key}={value!r}: must be one of {shown}")
        return allowed[0]
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, list):
            problems.append(f"{key}={value!r}: expected a list of {item_type.__name__}")
            return []
        return [_coerce(item_type, v, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    return _coerce_scalar(hint, value, key, problems)


def _coerce_scalar(hint: type, value: Any, key: str, problems: list[str]) -> Any:
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML reads 1e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    problems.append(f"{key}={value!r}: expected {hint.__name__}, got {type(value).__name__}")
    return hint()
