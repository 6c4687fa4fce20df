"""`evaluate` as a figure to quote: float32 unless asked otherwise, sliding windows with --stride."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from helpers import assert_clean_error, run_cli, train_tiny

from fundamentallm.device import PRECISION_NAMES, autocast_dtype


@pytest.fixture(scope="module")
def repetitive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A model trained briefly on a text that repeats a 50-character pattern, and the text: its next character
    is predictable from the characters before it, so a prediction with more context is a better one. Trained
    once for this file's tests (with a token cache of its own, as every test has)."""
    tmp_path = tmp_path_factory.mktemp("repetitive")
    rng = random.Random(0)
    pattern = "".join(rng.choice("abcdefghijklmnopqrst") for _ in range(50))
    text = tmp_path / "repeats.txt"
    text.write_text(pattern * 400, encoding="utf-8")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("FUNDAMENTALLM_CACHE_DIR", str(tmp_path / "token-cache"))
        env.setenv("OMP_NUM_THREADS", "1")
        train_tiny(text, tmp_path / "run", "--max-steps", "150", "--learning-rate", "1e-2")
    return tmp_path / "run" / "final_model.pt", text


def evaluate(*args: str | Path) -> dict:
    result = run_cli("evaluate", *args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_float32_by_default_training_precision_on_request(repetitive: tuple[Path, Path]) -> None:
    model, text = repetitive
    plain, trained = evaluate(model, text), evaluate(model, text, "--training-precision")
    assert plain["precision"] == "fp32"
    training = autocast_dtype(torch.device("cpu"), True)  # the tiny runs keep use_mixed_precision's default
    assert trained["precision"] == PRECISION_NAMES[training]
    if training is None:  # no native bf16 on this CPU: both are the same float32 figure
        assert trained["loss_per_token"] == plain["loss_per_token"]
    else:
        assert trained["loss_per_token"] == pytest.approx(plain["loss_per_token"], abs=0.02)


def test_stride_scores_with_more_context(repetitive: tuple[Path, Path]) -> None:
    model, text = repetitive
    plain = evaluate(model, text)
    assert plain["stride"] == plain["context_length"] == 32
    same = evaluate(model, text, "--stride", "32")  # the context length: windows side by side, as the default
    assert same["loss_per_token"] == plain["loss_per_token"] and same["stride"] == 32
    sliding = evaluate(model, text, "--stride", "8")
    assert sliding["predictions"] == plain["predictions"] == 20_000 - 1  # every prediction once, either way
    assert sliding["loss_per_token"] <= plain["loss_per_token"], (sliding, plain)
    assert sliding["stride"] == 8
    shown = run_cli("evaluate", model, text, "--stride", "8")
    assert "context 32 (sliding by 8), fp32" in shown.stdout, shown.stdout


def test_bad_stride_values_are_refused(repetitive: tuple[Path, Path]) -> None:
    model, text = repetitive
    for bad in ("0", "-4", "two"):
        assert_clean_error(run_cli("evaluate", model, text, "--stride", bad), "--stride")
    assert_clean_error(run_cli("evaluate", model, text, "--stride", "33"), "--stride 33", "1 to 32")
