"""The GPU-side choices (precision, gradient scaling, compilation), exercised on a CPU.

CI has no GPU, so what a GPU would report is faked at the boundary (torch.cuda.is_bf16_supported) and the fp16
path, which only older GPUs take, runs through CPU autocast with a real gradient scaler.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import TINY_MODEL

from fundamentallm import device, optim
from fundamentallm.config import Config, ModelConfig, TrainingConfig
from fundamentallm.data import BatchSampler
from fundamentallm.model import GPT


def test_precision_choice_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert device.autocast_dtype(cuda, "auto") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert device.autocast_dtype(cuda, "auto") == torch.float16  # e.g. a V100 or T4: fp16 with a gradient scaler
    assert device.autocast_dtype(cuda, False) is None
    monkeypatch.setattr(device, "_cpu_has_native_bf16", lambda: True)
    assert device.autocast_dtype(cpu, "auto") == torch.bfloat16  # e.g. AVX512-BF16: measured 1.8x fp32's speed
    assert device.autocast_dtype(cpu, False) is None
    monkeypatch.setattr(device, "_cpu_has_native_bf16", lambda: False)
    assert device.autocast_dtype(cpu, "auto") is None  # no warning: nobody asked for bf16


def test_cpu_bf16_only_where_the_cpu_has_it(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(device, "_cpu_has_native_bf16", lambda: False)
    assert device.autocast_dtype(cpu, True) is None
    assert "no native bf16" in capsys.readouterr().err
    monkeypatch.setattr(device, "_cpu_has_native_bf16", lambda: True)
    assert device.autocast_dtype(cpu, True) == torch.bfloat16


def test_fp16_gradient_scaler_recovers_from_overflow_and_learns() -> None:
    cfg = Config(model=ModelConfig(**TINY_MODEL),
                 training=TrainingConfig(sequence_length=16, batch_size=8, learning_rate=3e-3, warmup_steps=0))
    model = GPT.from_config(cfg, 12)
    tokens = np.tile(np.arange(12, dtype=np.uint8), 50)  # a repeating pattern: easy to learn
    sampler = BatchSampler(tokens, 8, 16, torch.device("cpu"), seed=0)
    optimizer = optim.make_optimizer(model, cfg.training, torch.device("cpu"))
    # A scale far too large: the first fp16 backward passes overflow, and the scaler must skip those steps and
    # lower the scale until training proceeds.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**30)
    losses = [optim.optimizer_step(model, model, optimizer, scaler, sampler, cfg.training, torch.float16)[0].item()
              for _ in range(40)]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.5 * losses[0]
    assert scaler.get_scale() < 2.0**30  # it found the overflows and lowered the scale


def test_compile_falls_back_to_eager_with_a_warning(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no compiler on this machine")

    monkeypatch.setattr(torch, "compile", broken)
    model = torch.nn.Linear(2, 2)
    cfg = TrainingConfig(compile=True)
    assert device.compile_model(model, cfg, torch.device("cpu")) is model
    assert "torch.compile is unavailable here (no compiler on this machine)" in capsys.readouterr().err
    # auto means: only on CUDA
    assert device.compile_model(model, TrainingConfig(), torch.device("cpu")) is model
