"""Checkpoints are data, never code, and never trusted: truncated, corrupted, foreign, malicious, newer or
crafted files are refused with one line everywhere, and --resume auto skips damaged ones."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    assert_clean_error,
    run_cli,
    snapshot,
    train_tiny,
)

from fundamentallm.checkpoint import FORMAT_VERSION, _checksum, read_checkpoint

# ---------------------------------------------------------------------------------------------------------
# Checkpoints that are not what they claim


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {Path.cwd() / 'pwned'}",))


def _bad_checkpoints(tmp: Path, good: Path) -> dict[str, tuple[Path, str]]:
    data = good.read_bytes()
    files: dict[str, tuple[Path, str]] = {}
    (tmp / "truncated.pt").write_bytes(data[: len(data) // 2])
    files["truncated"] = (tmp / "truncated.pt", "truncated, corrupted")
    flipped = bytearray(data)
    for i in range(len(data) // 2, len(data) // 2 + 64):
        flipped[i] ^= 0xFF
    (tmp / "flipped.pt").write_bytes(bytes(flipped))
    files["corrupted"] = (tmp / "flipped.pt", "corrupted")
    (tmp / "notes.pt").write_text("these are my notes, not a model\n")
    files["text renamed .pt"] = (tmp / "notes.pt", "not a readable checkpoint")
    torch.save(torch.nn.Linear(4, 4).state_dict(), tmp / "state_dict.pt")
    files["plain state dict"] = (tmp / "state_dict.pt", "plain PyTorch state dict")
    torch.save({"model": _Evil()}, tmp / "evil.pt")
    files["malicious pickle"] = (tmp / "evil.pt", "refusing to load")
    (tmp / "evil.pkl").write_bytes(pickle.dumps(_Evil()))
    files["malicious raw pickle"] = (tmp / "evil.pkl", "not a readable checkpoint")
    crafted = torch.load(good, weights_only=True)
    crafted["progress"] = "step 1"  # the wrong structure, under a checksum that matches it
    crafted["checksum"] = _checksum(crafted)
    torch.save(crafted, tmp / "crafted.pt")
    files["crafted structure"] = (tmp / "crafted.pt", "structure")
    payload = torch.load(good, weights_only=True)
    payload["format_version"] = FORMAT_VERSION + 1
    torch.save(payload, tmp / "future.pt")
    files["newer format"] = (tmp / "future.pt", f"format version {FORMAT_VERSION + 1}")
    files["directory"] = (good.parent, "is a directory")
    files["missing"] = (tmp / "nope.pt", "does not exist")
    return files


def test_bad_checkpoints_are_refused_everywhere(run_dir: Path, tmp_path: Path) -> None:
    for name, (path, needle) in _bad_checkpoints(tmp_path, run_dir / "final_model.pt").items():
        before = snapshot(tmp_path)
        for args in (["generate", path, "-p", "A"], ["evaluate", path],
                     ["train", "--resume", path, "-o", tmp_path / "resumed"]):
            result = run_cli(*args)
            assert_clean_error(result, needle)
            assert str(path.name) in result.stderr, (name, result.stderr)
        assert snapshot(tmp_path) == before, name
    assert not (tmp_path / "pwned").exists(), "loading a checkpoint executed code"


def test_every_checkpoint_loads_with_weights_only(run_dir: Path) -> None:
    for path in run_dir.glob("*.pt"):
        payload = torch.load(path, weights_only=True)  # would raise on anything but tensors and plain data
        assert payload["format_version"] == FORMAT_VERSION
        read_checkpoint(path)


def test_resuming_from_weights_only_checkpoint_says_what_to_use(run_dir: Path, tmp_path: Path) -> None:
    assert_clean_error(run_cli("train", "--resume", run_dir / "best_model.pt", "-o", tmp_path / "r"),
                       "weights only", "checkpoint_epoch_N.pt")


# ---------------------------------------------------------------------------------------------------------
# Crafted checkpoints: a checksum is no signature


def craft(good: Path, out: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    """A copy of a checkpoint with `change` applied to its raw contents and the checksum recomputed."""
    payload = torch.load(good, weights_only=True)
    change(payload)
    payload["checksum"] = _checksum(payload)
    torch.save(payload, out)
    return out


CRAFTED: dict[str, Callable[[dict[str, Any]], None]] = {
    "param groups a string": lambda p: p["training_state"]["optimizer"].update(param_groups="x"),
    "3-byte generator": lambda p: p["training_state"]["sampler"].update(generator=torch.zeros(3, dtype=torch.uint8)),
    "rng of the wrong dtype": lambda p: p["training_state"]["rng"].update(torch=torch.zeros(5056)),
    "step a string": lambda p: p["progress"].update(step="10"),
    "negative step": lambda p: p["progress"].update(step=-5),
    "data files numbers": lambda p: p["data"].update(files=[1, 2]),
    "NaN weights": lambda p: p["model"]["tok_emb.weight"].fill_(float("nan")),
    "absurd model": lambda p: p["config"]["model"].update(d_model=8192, num_heads=64, d_ff=65536),
    "huge context": lambda p: p["config"]["training"].update(sequence_length=10_000_000),
    "scaler a list": lambda p: p["training_state"].update(scaler=[1, 2]),
    "tokenizer of no known type": lambda p: p.update(tokenizer={"type": "word", "json": "{}"}),
    "bpe tokenizer not JSON": lambda p: p.update(tokenizer={"type": "bpe", "json": "not json"}),
}


@pytest.mark.parametrize("name", list(CRAFTED))
def test_crafted_checkpoints_are_refused_everywhere(corpus: Path, tmp_path: Path, name: str) -> None:
    run = tmp_path / "run"
    train_tiny(corpus, run, "--set", "training.max_steps=3")
    bad = craft(run / "final_model.pt", tmp_path / "crafted.pt", CRAFTED[name])
    before = snapshot(tmp_path)
    for args in (["generate", bad, "-p", "A", "--max-tokens", "5"], ["evaluate", bad, corpus],
                 ["train", "--resume", bad, "-o", tmp_path / "branch"]):
        assert_clean_error(run_cli(*args), "crafted.pt")
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------------------
# --resume auto past damaged files


def test_resume_auto_continues_from_the_newest_sound_checkpoint(corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_tiny(corpus, run, "--epochs", "3", "--set", "training.keep_last_n=0")
    for name in ("final_model.pt", "checkpoint_epoch_3.pt", "checkpoint_epoch_2.pt"):
        data = bytearray((run / name).read_bytes())
        data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # the step still reads; the checksum fails
        (run / name).write_bytes(bytes(data))
    result = run_cli("train", "--resume", "auto", "-o", run, "--device", "cpu", "--epochs", "4")
    assert result.exit_code == 0, result.stderr
    assert "continuing from checkpoint_epoch_1.pt, the newest sound checkpoint" in result.stderr
    assert read_checkpoint(run / "final_model.pt").progress.epochs_done == 4
