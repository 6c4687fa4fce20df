"""The CUDA path end to end: bf16 autocast, torch.compile, device-resident data, generation on the GPU.

Marked `gpu`; skipped where PyTorch sees no CUDA device (CI has none).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import TINY, run_cli

from fundamentallm.metrics import read_metrics

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_trains_generates_and_evaluates_on_cuda(corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = run_cli("train", corpus, "-o", run, "--device", "cuda", *TINY, "--epochs", "2",
                     "--set", "training.compile=true")
    assert result.exit_code == 0, result.stderr
    assert "bf16 autocast" in result.output or "fp16 autocast" in result.output
    records = read_metrics(run)
    assert all(r["peak_memory_mb"] > 0 for r in records if r["kind"] == "train")
    evals = [r["val_loss"] for r in records if r["kind"] == "eval"]
    assert evals[-1] < evals[0]
    gen = run_cli("generate", run / "final_model.pt", "-p", "King", "--max-tokens", "100", "--device", "cuda")
    assert gen.exit_code == 0 and len(gen.stdout) == 4 + 100 + 1
    ev = json.loads(run_cli("evaluate", run / "final_model.pt", "--json", "--device", "cuda").stdout)
    assert ev["loss_per_token"] == pytest.approx(evals[-1], rel=2e-2)  # float32 against the run's bf16 ones
    same = json.loads(run_cli("evaluate", run / "final_model.pt", "--json", "--device", "cuda",
                              "--training-precision").stdout)
    assert same["precision"] != "fp32" and same["loss_per_token"] == pytest.approx(evals[-1], rel=1e-2)


def test_cuda_checkpoint_loads_on_cpu(corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert run_cli("train", corpus, "-o", run, "--device", "cuda", *TINY, "--epochs", "1").exit_code == 0
    gen = run_cli("generate", run / "final_model.pt", "-p", "King", "--max-tokens", "20", "--device", "cpu")
    assert gen.exit_code == 0, gen.stderr
