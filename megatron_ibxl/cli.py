"""The `megatron-ibxl` command: argument parsing and dispatch, nothing else.

Each subcommand's work lives in the module named in `_HANDLERS`; user errors (bad config,
data or checkpoint) end as one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from megatron_ibxl.errors import UserError

_HANDLERS = {
    "train": "megatron_ibxl.training.entry:run",
    "eval": "megatron_ibxl.evaluation.entry:run",
    "plan": "megatron_ibxl.planning.entry:run",
    "make-demo-data": "megatron_ibxl.data.demo:run_cli",
    "train-tokenizer": "megatron_ibxl.data.tokenizer:run_cli",
    "plot": "megatron_ibxl.training.plot:run",
}


def _config_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument(
        "--config",
        required=required,
        metavar="FILE",
        help="run YAML (sections model, parallel, data, optimizer, ...)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a dotted key, e.g. parallel.tp=2; repeatable",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="megatron-ibxl",
        description="Train and evaluate dual-tower image-text contrastive models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = sub.add_parser("train", help="train from a run config (torchrun, mpirun or srun)")
    _config_args(train)
    train.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the config, print the layout, parameter counts and "
        "memory estimate, and exit",
    )
    train.add_argument(
        "--world-size",
        type=int,
        default=None,
        metavar="N",
        help="world size for --dry-run (default: from the launcher, else 1)",
    )
    train.add_argument(
        "--check-inputs",
        action="store_true",
        help="with --dry-run: fail (exit 2) when shards, tokenizer or evaluation data cannot "
        "be used, instead of listing them as warnings",
    )

    evaluate = sub.add_parser("eval", help="zero-shot ImageNet-style or COCO retrieval eval")
    _config_args(evaluate)
    evaluate.add_argument(
        "--checkpoint",
        required=True,
        metavar="DIR",
        help="a checkpoint directory (step_N) or a run's checkpoints folder",
    )
    evaluate.add_argument("--task", required=True, choices=["imagenet", "coco"])
    evaluate.add_argument(
        "--data",
        required=True,
        metavar="PATH",
        help="ImageFolder root (imagenet) or COCO folder (coco)",
    )
    evaluate.add_argument(
        "--classes",
        metavar="FILE",
        default=None,
        help="class names for an ImageFolder set other than ImageNet-1K",
    )
    evaluate.add_argument(
        "--templates",
        metavar="FILE",
        default=None,
        help="prompt templates, one a line with {} for the class name",
    )

    plan = sub.add_parser("plan", help="memory, FLOPs and communication of a layout")
    _config_args(plan)
    plan.add_argument("--cluster", required=True, metavar="FILE", help="cluster YAML")
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    plan.add_argument("--search", action="store_true", help="rank valid layouts")
    plan.add_argument(
        "--calibrate",
        metavar="FILE",
        default=None,
        help="collective benchmark JSON whose bandwidths replace the cluster's",
    )

    demo = sub.add_parser("make-demo-data", help="write the digits demo as WebDataset shards")
    demo.add_argument("out_dir", metavar="OUT_DIR")

    tok = sub.add_parser("train-tokenizer", help="train a byte-level BPE on shard captions")
    tok.add_argument("--shards", required=True, help="brace pattern or list file of shards")
    tok.add_argument("--vocab-size", type=int, default=50257)
    tok.add_argument("--out", required=True, metavar="FILE", help="tokenizer.json to write")

    plot = sub.add_parser("plot", help="write RUN_DIR/curves.png from metrics.jsonl")
    plot.add_argument("run_dir", metavar="RUN_DIR")
    return parser


def _handler(command: str):
    module_name, _, func = _HANDLERS[command].partition(":")
    return getattr(importlib.import_module(module_name), func)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the subcommand, map user errors to exit code 2."""
    from megatron_ibxl.logging_setup import quiet_third_party_warnings

    quiet_third_party_warnings()
    args = build_parser().parse_args(argv)
    if args.command == "train" and not args.dry_run:
        from megatron_ibxl.stop_request import catch_early

        catch_early()
    if args.command == "train" and args.dry_run:
        handler = importlib.import_module("megatron_ibxl.training.dry_run").run
    else:
        handler = _handler(args.command)
    try:
        return int(handler(args) or 0)
    except UserError as exc:
        for line in str(exc).splitlines() if exc.report else []:
            print(f"megatron-ibxl {args.command}: error: {line}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        if exc.filename is None:
            raise
        print(
            f"megatron-ibxl {args.command}: error: cannot use {exc.filename}: "
            f"{exc.strerror or exc}; check the path (a folder where a file is expected, a "
            "missing parent, permissions)",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        logging.getLogger(__name__).error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
