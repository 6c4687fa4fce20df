"""train --init-from: a new run from a trained model's weights, keeping its tokenizer (and growing it with
--extend-vocab)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import TINY, assert_clean_error, run_cli, train_tiny

from fundamentallm.checkpoint import read_checkpoint

FROZEN = ["--learning-rate", "1e-30", "--max-steps", "1"]  # one step that changes nothing: weights as loaded


@pytest.fixture
def pretrained(corpus: Path, tmp_path: Path) -> Path:
    train_tiny(corpus, tmp_path / "pre", "--max-steps", "30")
    return tmp_path / "pre" / "final_model.pt"


@pytest.fixture
def new_text(tmp_path: Path, alice: str) -> Path:
    path = tmp_path / "new.txt"
    path.write_text(alice[60_000:80_000].replace("Alice", "Alice §"), encoding="utf-8")  # '§': never seen before
    return path


def _loss(checkpoint: Path, text: Path) -> float:
    result = run_cli("evaluate", checkpoint, text, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)["loss_per_token"]


def test_init_from_keeps_weights_and_tokenizer(pretrained: Path, new_text: Path, tmp_path: Path) -> None:
    result = train_tiny(new_text, tmp_path / "ft", "--init-from", pretrained, *FROZEN)
    assert f"Fine-tuning from {pretrained}" in result.output
    assert "count as its unknown token; --extend-vocab" in result.stderr
    tuned = read_checkpoint(tmp_path / "ft" / "final_model.pt")
    assert tuned.tokenizer.chars == read_checkpoint(pretrained).tokenizer.chars
    assert tuned.progress.step == 1  # a new run: its own steps, optimizer and schedule
    assert _loss(tmp_path / "ft" / "final_model.pt", new_text) == pytest.approx(_loss(pretrained, new_text), abs=1e-5)
    fresh = train_tiny(new_text, tmp_path / "fresh", *FROZEN)
    assert fresh.exit_code == 0
    assert _loss(tmp_path / "ft" / "final_model.pt", new_text) < _loss(tmp_path / "fresh" / "final_model.pt",
                                                                      new_text) - 0.1  # it starts trained


def test_extend_vocab_adds_fresh_rows_and_keeps_the_old_ones(pretrained: Path, new_text: Path,
                                                             tmp_path: Path) -> None:
    train_tiny(new_text, tmp_path / "ft", "--init-from", pretrained, "--extend-vocab", *FROZEN)
    old, new = read_checkpoint(pretrained), read_checkpoint(tmp_path / "ft" / "final_model.pt")
    assert new.tokenizer.chars == [*old.tokenizer.chars, "§"]
    assert new.tokenizer.vocab_size == old.tokenizer.vocab_size + 1
    rows_old, rows_new = old.model_state["tok_emb.weight"], new.model_state["tok_emb.weight"]
    n = len(old.tokenizer.chars)
    assert torch.allclose(rows_new[:n], rows_old[:n])  # every known character keeps its embedding
    assert torch.allclose(rows_new[-1], rows_old[-1])  # the unknown token moves to the end, with its row
    generated = run_cli("generate", tmp_path / "ft" / "final_model.pt", "-p", "§", "--max-tokens", "5")
    assert generated.exit_code == 0 and "never saw" not in generated.stderr


def test_init_from_an_exported_directory(pretrained: Path, new_text: Path, tmp_path: Path) -> None:
    assert run_cli("export", pretrained, "-o", tmp_path / "exported", "--format", "safetensors").exit_code == 0
    train_tiny(new_text, tmp_path / "ft", "--init-from", tmp_path / "exported", *FROZEN)
    assert _loss(tmp_path / "ft" / "final_model.pt", new_text) == pytest.approx(_loss(pretrained, new_text), abs=1e-5)


def test_init_from_mistakes_are_clean_errors(pretrained: Path, new_text: Path, tmp_path: Path) -> None:
    out = tmp_path / "ft"
    assert_clean_error(run_cli("train", new_text, "-o", out, *TINY, "--extend-vocab"), "--init-from")
    assert_clean_error(run_cli("train", new_text, "-o", out, "--init-from", pretrained, "--resume", "auto"),
                       "use one")
    assert_clean_error(run_cli("train", new_text, "-o", out, "--init-from", pretrained, "--config", "small"),
                       "model.d_model")
    assert_clean_error(run_cli("train", new_text, "-o", out, "--init-from", tmp_path / "nope.pt"), "does not exist")
    assert not out.exists()
