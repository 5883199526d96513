"""Training-data throughput: DALI and the PyTorch/PIL fallback on the digits demo shards.

Each loader runs the whole training input path of one rank (read the sample bytes from the
shards, decode, random resized crop, RandAugment, normalise, tokenize) at --image-size
pixels, in the calling thread (data.prefetch 0) so that all of its work is measured. After
--warmup micro-batches (which include building the DALI pipeline), --batches micro-batches
are timed on the wall clock and in process CPU time, which counts every thread of the
process, DALI's included:

    images_per_s           images / wall seconds
    images_per_cpu_s       images / CPU seconds = images per second per fully used core

Run from the repository root (it builds the demo data in a temporary folder unless --data
names a folder made by `megatron-ibxl make-demo-data`):

    python -m benchmarks.data_pipeline --image-size 224 --threads 1

On a GPU machine DALI decodes with nvJPEG and augments on the GPU; CPU time then no longer
measures its cost, and the wall-clock rate is the number to read.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

from megatron_ibxl.config import RunConfig
from megatron_ibxl.data.demo import make_demo_data
from megatron_ibxl.data.loader import build_train_loader
from megatron_ibxl.data.tokenizer import load_tokenizer


def _config(args: argparse.Namespace, data_dir: Path, loader: str) -> RunConfig:
    config = RunConfig()
    config.model.vision.image_size = args.image_size
    config.model.text.context_length = 16
    config.data.train_shards = str(data_dir / "train.txt")
    config.data.micro_batch = args.micro_batch
    config.data.loader = loader
    config.data.num_threads = args.threads
    config.data.prefetch = 0
    config.data.randaugment_n, config.data.randaugment_m = args.randaugment_n, args.randaugment_m
    return config


def measure(args: argparse.Namespace, data_dir: Path, loader_name: str) -> dict:
    """Throughput of one loader over --batches timed micro-batches."""
    tokenizer = load_tokenizer(data_dir / "tokenizer.json")
    loader = build_train_loader(_config(args, data_dir, loader_name), 0, 1, tokenizer)
    for _ in range(args.warmup):
        next(loader)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(args.batches):
        batch = next(loader)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    loader.close()
    images = args.batches * args.micro_batch
    return {
        "loader": loader_name,
        "device": str(batch.images.device),
        "image_size": args.image_size,
        "threads": args.threads,
        "images": images,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "images_per_s": round(images / wall, 1),
        "images_per_cpu_s": round(images / cpu, 1),
    }


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="demo data folder")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--micro-batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=20, help="timed micro-batches")
    parser.add_argument("--warmup", type=int, default=3, help="untimed micro-batches first")
    parser.add_argument("--threads", type=int, default=1, help="data.num_threads")
    parser.add_argument("--randaugment-n", type=int, default=2)
    parser.add_argument("--randaugment-m", type=int, default=9)
    parser.add_argument("--loaders", nargs="+", default=["dali", "torch"])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Measure each loader and print a table (or JSON)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = args.data
        if data_dir is None or not (data_dir / "train.txt").is_file():
            data_dir = Path(scratch) if data_dir is None else data_dir
            make_demo_data(data_dir)
        results = [measure(args, data_dir, name) for name in args.loaders]
    if args.json:
        print(json.dumps({"results": results}))
        return 0
    header = f"{'loader':8} {'device':8} {'px':>4} {'thr':>3} {'img/s':>8} {'img/cpu-s':>10}"
    print(header)
    for r in results:
        print(
            f"{r['loader']:8} {r['device']:8} {r['image_size']:>4} {r['threads']:>3} "
            f"{r['images_per_s']:>8.1f} {r['images_per_cpu_s']:>10.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
