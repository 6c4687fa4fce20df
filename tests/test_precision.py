"""The GPU-side choices (precision, gradient scaling, compilation), exercised on a CPU.

CI has no GPU, so what a GPU would report is faked at the boundary (torch.cuda.is_bf16_supported) and the fp16
path, which only older GPUs take, runs through CPU autocast with a real gradient scaler.
"""

from __future__ import annotations

import copy
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


def _newton_schulz_float64(matrix: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Muon's iteration written plainly, one matrix at a time in float64: the reference."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = matrix.double().mT if matrix.size(0) > matrix.size(1) else matrix.double()
    x = x / x.norm()
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if matrix.size(0) > matrix.size(1) else x


def test_muon_orthogonalises_in_float32_as_the_plain_iteration_does() -> None:
    torch.manual_seed(0)
    # Shapes as in a block (tall, square, wide), two of one shape (batched together) and an odd one.
    matrices = [torch.randn(shape) for shape in [(96, 32), (32, 32), (32, 86), (96, 32), (5, 7)]]
    result = optim.orthogonalise(matrices, (3.4445, -4.7750, 2.0315), 5, 1e-7)
    for matrix, got in zip(matrices, result, strict=True):
        assert got.shape == matrix.shape and got.dtype == torch.float32
        assert torch.allclose(got.double(), _newton_schulz_float64(matrix), atol=1e-4)
        singular = torch.linalg.svdvals(got)  # near-orthogonal: Muon's iteration leaves them in about (0.5, 1.5)
        assert singular.min() > 0.4 and singular.max() < 1.6


def test_muon_in_float32_steps_as_pytorchs_and_shares_its_state() -> None:
    shapes = [(96, 32), (32, 32), (32, 86)]

    def weights() -> list[torch.nn.Parameter]:
        torch.manual_seed(0)
        return [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]

    ours, theirs = weights(), weights()
    options = {"lr": 0.01, "weight_decay": 0.1, "adjust_lr_fn": "match_rms_adamw"}
    ours_opt, theirs_opt = optim.Muon(ours, float32=True, **options), torch.optim.Muon(theirs, **options)
    for step in range(3):
        torch.manual_seed(step + 1)
        for mine, other, shape in zip(ours, theirs, shapes, strict=True):
            mine.grad = torch.randn(shape)
            other.grad = mine.grad.clone()
        ours_opt.step()
        theirs_opt.step()
    for mine, other, start in zip(ours, theirs, weights(), strict=True):
        # PyTorch orthogonalises in bf16 (about 3 significant digits): the same steps up to that rounding (about
        # 1% of the distance moved here; a missed term, such as the weight decay, is tens of percent).
        assert (mine - other).norm().item() < 0.03 * (mine - start).norm().item()
    # One state: PyTorch's optimizer's checkpoint resumes with ours and takes the same next step (with the
    # momentum it carries; started afresh, the step would differ by far more).
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in theirs]
    resumed_opt = optim.Muon(resumed, float32=True, **options)
    resumed_opt.load_state_dict(copy.deepcopy(theirs_opt.state_dict()))  # as from a checkpoint: tensors of its own
    torch.manual_seed(9)
    for mine, other, shape in zip(resumed, theirs, shapes, strict=True):
        mine.grad = torch.randn(shape)
        other.grad = mine.grad.clone()
    before = [p.detach().clone() for p in theirs]
    resumed_opt.step()
    theirs_opt.step()
    for mine, other, start in zip(resumed, theirs, before, strict=True):
        assert (mine - other).norm().item() < 0.03 * (other - start).norm().item()


def test_muon_orthogonalises_in_float32_only_without_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    model = GPT.from_config(Config(model=ModelConfig(**TINY_MODEL)), 12)
    cfg, cpu = TrainingConfig(optimizer="muon"), torch.device("cpu")
    for native in (False, True):
        monkeypatch.setattr(device, "_cpu_has_native_bf16", lambda native=native: native)
        muon = optim.make_optimizer(model, cfg, cpu).optimizers[0]
        assert isinstance(muon, optim.Muon) and muon.float32 is not native
