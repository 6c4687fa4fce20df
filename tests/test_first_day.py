"""What a new user reads in the first minutes: the header agrees with its warnings, `status` with the progress bar,
evaluations within an epoch show their loss, and piped prompts are taken one per line."""

from __future__ import annotations

import json
import re
from pathlib import Path

from helpers import run_cli, train_tiny


def test_header_warmup_agrees_with_the_clamp_warning(corpus: Path, tmp_path: Path) -> None:
    result = train_tiny(corpus, tmp_path / "run", "--max-steps", "30", "--set", "training.warmup_steps=100")
    assert "warming up over 3 steps instead" in result.stderr
    assert "wsd, warmup 3\n" in result.output or "cosine, warmup 3\n" in result.output, result.output


def test_status_counts_epochs_and_steps_as_the_bar_does(corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = train_tiny(corpus, run, "--max-steps", "5", "--epochs", "3")
    assert "Epoch 1/1: 100%|" in result.output
    status = json.loads(run_cli("status", run, "--json").stdout)
    assert (status["epoch"], status["epochs"], status["step"], status["total_steps"]) == (1, 1, 5, 5)
    assert "epoch 1/1, step 5/5 (100%)" in run_cli("status", run).stdout

    # A time budget fixes the steps after the run record was written: status follows the plan, as the bar does.
    budgeted = tmp_path / "budgeted"
    result = train_tiny(corpus, budgeted, "--time-budget", "2s", "--epochs", "50")
    bars = re.findall(r"^Epoch (\d+)/(\d+): 100%\|.*?\| (\d+)/\d+", result.output, re.MULTILINE)
    status = json.loads(run_cli("status", budgeted, "--json").stdout)
    assert bars and (status["epoch"], status["epochs"]) == (int(bars[-1][0]), int(bars[-1][1])), result.output
    assert status["total_steps"] == status["step"] < 50 * 141


def test_evaluations_within_an_epoch_print_their_loss(corpus: Path, tmp_path: Path) -> None:
    result = train_tiny(corpus, tmp_path / "run", "--max-steps", "40", "--set", "training.eval_interval=15")
    for step in (15, 30):
        assert re.search(rf"^  step {step}: val_loss=\d+\.\d{{4}}, perplexity=[\d.]+, bpc=[\d.]+", result.output,
                         re.MULTILINE), result.output
    assert result.output.count("epoch_train_loss=") == 1  # the end of the (cut) epoch reports as before


def test_piped_prompts_are_read_one_per_line(corpus: Path, tmp_path: Path) -> None:
    train_tiny(corpus, tmp_path / "run", "--max-steps", "3")
    final = tmp_path / "run" / "final_model.pt"
    args = ("generate", final, "--max-tokens", "8", "--temperature", "0")
    one_by_one = "".join(run_cli(*args, "--prompt", p).stdout for p in ("Alice", "the Queen", ""))
    piped = run_cli(*args, input="Alice\nthe Queen\n\n")
    assert piped.exit_code == 0 and piped.stdout == one_by_one
