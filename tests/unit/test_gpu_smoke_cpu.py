"""benchmarks/gpu_smoke.py without a GPU: its FLOP count and defaults by hand, the toy-size
--cpu-check run of the whole code path, and the one-line error when CUDA is absent."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_smoke
from megatron_ibxl.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def test_layer_flops_match_megatron_lm_form_when_mlp_is_4h():
    # With f = 4h the per-layer forward count is Megatron-LM's 24*b*s*h^2 + 4*b*s^2*h.
    b, s, h = 32, 264, 4096
    assert gpu_smoke.layer_forward_flops(b, s, h, 4 * h) == 24 * b * s * h**2 + 4 * b * s**2 * h
    # A non-4h MLP, counted matmul by matmul: QKV 3h^2 and output h^2 per token, MLP 2*h*f,
    # 2 FLOPs per multiply-add; scores and the weighted sum s*h per token each.
    b, s, h, f = 2, 8, 80, 320 + 16
    by_matmul = 2 * b * s * (3 * h * h + h * h + h * f + f * h) + 2 * (2 * b * s * s * h)
    assert gpu_smoke.layer_forward_flops(b, s, h, f) == by_matmul


def test_padding_and_peaks():
    assert gpu_smoke.padded(257, 8) == 264
    assert gpu_smoke.padded(77, 8) == 80
    assert gpu_smoke.padded(80, 8) == 80
    assert gpu_smoke.default_peak_tflops("NVIDIA H200") == 989.0
    assert gpu_smoke.default_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_smoke.default_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_smoke.default_peak_tflops("Some Other GPU") is None


def test_reference_shapes_are_the_30b_config():
    config = load_config(ROOT / "launch" / "configs" / "ibxl-30b-h100x512.yaml")
    ref = gpu_smoke.REFERENCE
    vision, text = config.model.vision, config.model.text
    assert (ref.vision.hidden, ref.vision.heads, ref.vision.mlp_hidden) == (
        vision.hidden,
        vision.num_heads,
        vision.mlp_hidden,
    )
    assert ref.vision.seq == vision.seq_length == 257  # (224 / 14)^2 patches + class token
    assert (ref.text.hidden, ref.text.heads, ref.text.mlp_hidden) == (
        text.hidden,
        text.num_heads,
        text.mlp_hidden,
    )
    assert ref.text.seq == text.context_length == 77
    assert ref.micro_batch == config.data.micro_batch == 32
    # The config built for the benchmark reproduces the vision sequence of 257.
    assert gpu_smoke.run_config(ref).model.vision.seq_length == 257


def test_cpu_check_runs_the_whole_path():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "benchmarks.gpu_smoke", "--cpu-check"]
    cmd += ["--iters", "2", "--warmup", "1", "--fsdp-steps", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # exactly one JSON object on stdout

    assert report["cpu_check"] is True and report["device"] == "cpu"
    assert report["block_source"] == "megatron_ibxl.models.build_dual_encoder"
    assert report["attention"]["backend"] == "torch-sdpa"
    toy = gpu_smoke.TOY_REFERENCE
    for name, tower in (("vision", toy.vision), ("text", toy.text)):
        row = report["blocks"][name]
        seq = math.ceil(tower.seq / 8) * 8  # padded to the default multiple of 8
        b, h, f = toy.micro_batch, tower.hidden, tower.mlp_hidden
        assert row["seq_padded"] == seq
        assert row["forward_flops"] == 2 * b * seq * (4 * h * h + 2 * h * f) + 4 * b * seq**2 * h
        assert row["step_flops"] == 3 * row["forward_flops"]
        assert row["tflops"] == pytest.approx(row["step_flops"] / (row["fwd_bwd_ms"] * 1e9))
        assert "scaled_dot_product" in row["attention_kernel"]
    fsdp = report["fsdp"]
    assert fsdp["steps"] == 2 and len(fsdp["losses"]) == 2
    assert fsdp["losses_finite"] and fsdp["params_are_dtensors"]
    # InfoNCE over b pairs starts near ln(b) with untrained towers: ln 4 ~ 1.39 (loose bound,
    # the initial temperature 1/0.07 sharpens the random logits).
    assert 0 < fsdp["losses"][0] < 3 * math.log(gpu_smoke.TOY_DUAL_ENCODER.micro_batch)


def test_without_cuda_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_smoke.main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a CUDA GPU" in err[0] and "--cpu-check" in err[0]


def test_bad_iteration_counts_are_a_one_line_error(capsys):
    assert gpu_smoke.main(["--cpu-check", "--iters", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--iters 0" in err[0]
