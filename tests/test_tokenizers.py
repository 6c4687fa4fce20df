"""The three tokenizers (char, byte, BPE) through the real CLI, bits per character that compare across them,
text with characters a model never saw, and a separate validation file."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, TINY, assert_clean_error, run_cli, run_started_subprocess, subprocess_env, train_tiny

from fundamentallm.checkpoint import Checkpoint, DataInfo, TrainingProgress, read_checkpoint, write_checkpoint
from fundamentallm.config import resolve_config
from fundamentallm.data import prepare_tokens
from fundamentallm.metrics import bits_per_char, read_metrics
from fundamentallm.model import GPT
from fundamentallm.tokenizer import BPETokenizer, ByteTokenizer, CharTokenizer, tokenizer_from_dict

KINDS = ["char", "byte", "bpe"]
BPE = ["--set", "data.vocab_size=320"]


@pytest.fixture
def alice(tmp_path: Path) -> Path:
    """6,000 characters of the sample book, with its curly quotes (three UTF-8 bytes each)."""
    path = tmp_path / "alice.txt"
    path.write_text((ROOT / "examples" / "alice.txt").read_text(encoding="utf-8")[2000:8000], encoding="utf-8")
    return path


def step_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in read_metrics(run) if r["kind"] == "train"}


@pytest.mark.parametrize("kind", KINDS)
def test_train_generate_evaluate_and_resume_exactly(alice: Path, tmp_path: Path, kind: str) -> None:
    options = ["--epochs", "2", "--set", f"data.tokenizer={kind}", *BPE, "--set", "model.dropout=0.1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    output = train_tiny(alice, straight, *options).output
    assert f"{kind} tokenizer, vocabulary" in output
    train_tiny(alice, resumed, *options, "--resume", straight / "checkpoint_epoch_1.pt")
    assert step_losses(straight) == step_losses(resumed)
    a, b = (torch.load(run / "final_model.pt", weights_only=True)["model"] for run in (straight, resumed))
    assert all(torch.equal(a[key], b[key]) for key in a)

    final = straight / "final_model.pt"
    checkpoint = read_checkpoint(final)
    assert checkpoint.tokenizer.kind == kind  # the tokenizer travels in every checkpoint
    # A prompt with characters of several UTF-8 lengths; byte and BPE output decodes safely whatever is sampled.
    gen = run_cli("generate", final, "-p", "‘Alice", "--max-tokens", "60", "--seed", "3", "--temperature", "1.5")
    assert gen.exit_code == 0, gen.stderr
    assert gen.stdout.startswith("‘Alice") and len(gen.stdout) > len("‘Alice")
    if kind == "char":
        assert len(gen.stdout) == len("‘Alice") + 60 + 1

    ev = run_cli("evaluate", final, "--json")
    assert ev.exit_code == 0, ev.stderr
    result = json.loads(ev.stdout)
    last = [r for r in read_metrics(straight) if r["kind"] == "eval"][-1]
    assert result["tokenizer"] == kind and result["characters"] == 600  # the last 10% of the characters
    assert result["tokens"] == checkpoint.data.num_val_tokens
    assert result["loss_per_token"] == pytest.approx(last["val_loss"], rel=1e-5)
    assert result["bits_per_char"] == pytest.approx(last["bits_per_char"], rel=1e-5)
    assert result["bits_per_char"] == pytest.approx(
        result["loss_per_token"] * result["tokens"] / 600 / math.log(2), rel=1e-9)


def _uniform_checkpoint(path: Path, tokenizer: CharTokenizer | ByteTokenizer) -> None:
    """A model whose every weight is zero: its logits are all 0, so every token has probability 1/V."""
    config = resolve_config("small", [("training.sequence_length", 16, "--set")])
    model = GPT.from_config(config, tokenizer.vocab_size)
    zeros = {name: torch.zeros_like(t) for name, t in model.state_dict().items()}
    write_checkpoint(path, Checkpoint(config, tokenizer, zeros, DataInfo(), TrainingProgress()))


def test_bits_per_char_against_hand_computed_values(tmp_path: Path) -> None:
    # 2 nats per token, 300 tokens over 600 characters: 600 nats = 865.6 bits over 600 characters.
    assert bits_per_char(2.0, 300, 600) == pytest.approx(600 / math.log(2) / 600)
    assert bits_per_char(2.0, 300, 600) == pytest.approx(1.4426950408889634)

    # A byte model that gives every byte 1/256: 8 bits per byte. "é" is two bytes: 16 bits per character.
    _uniform_checkpoint(tmp_path / "bytes.pt", ByteTokenizer())
    (tmp_path / "e.txt").write_text("é" * 100, encoding="utf-8")
    result = json.loads(run_cli("evaluate", tmp_path / "bytes.pt", tmp_path / "e.txt", "--json").stdout)
    assert (result["characters"], result["tokens"]) == (100, 200)
    assert result["loss_per_token"] == pytest.approx(math.log(256))
    assert result["bits_per_char"] == pytest.approx(16.0)

    # A char model knowing "a" and "b" (+ unknown: V = 3) that gives each 1/3: log2(3) bits per character. The
    # 'Z' and 'é' it never saw are scored as the unknown token: 2 of the 6 predictions, 2 x log2(3) bits.
    _uniform_checkpoint(tmp_path / "chars.pt", CharTokenizer(["a", "b"], has_unknown=True))
    (tmp_path / "z.txt").write_text("abZabé", encoding="utf-8")
    ev = run_cli("evaluate", tmp_path / "chars.pt", tmp_path / "z.txt", "--json")
    assert ev.exit_code == 0, ev.stderr
    result = json.loads(ev.stdout)
    assert result["bits_per_char"] == pytest.approx(math.log2(3))
    assert result["unknown_characters"] == 2 and result["unknown_bits"] == pytest.approx(2 * math.log2(3))
    text = run_cli("evaluate", tmp_path / "chars.pt", tmp_path / "z.txt").stdout
    assert "2 character(s) the model never saw" in text and "nats/token" in text
    assert_clean_error(run_cli("evaluate", tmp_path / "chars.pt", tmp_path / "z.txt", "--strict"),
                       "never saw", "'Z'", "--strict")


def test_unseen_prompt_characters_warn_once_and_strict_refuses(tmp_path: Path) -> None:
    _uniform_checkpoint(tmp_path / "chars.pt", CharTokenizer(["a", "b", "\n"], has_unknown=True))
    result = run_cli("generate", tmp_path / "chars.pt", "-p", "abZ", "--max-tokens", "5", "--num-samples", "2")
    assert result.exit_code == 0 and result.stderr.count("never saw") == 1 and "'Z'" in result.stderr
    assert result.stdout.count("abZ") == 2
    assert_clean_error(run_cli("generate", tmp_path / "chars.pt", "-p", "abZ", "--strict"), "never saw", "'Z'")
    # A model saved before every char model reserved an unknown token still loads, and refuses what it cannot
    # represent, as before.
    _uniform_checkpoint(tmp_path / "old.pt", CharTokenizer(["a", "b"]))
    assert run_cli("generate", tmp_path / "old.pt", "-p", "ab", "--max-tokens", "3").exit_code == 0
    assert_clean_error(run_cli("generate", tmp_path / "old.pt", "-p", "abZ"), "no unknown token")


def test_stream_decoding_holds_back_partial_characters() -> None:
    tok = ByteTokenizer()
    stream = tok.stream_decoder()
    pieces = [stream.add(b) for b in "é🙂".encode()]
    assert pieces == ["", "é", "", "", "", "🙂"]
    stream = tok.stream_decoder()
    assert [stream.add(b) for b in (0xE2, 0x82, 0x41)] == ["", "", "\ufffdA"]  # an invalid sequence: U+FFFD
    stream.add(0xF0)
    assert stream.flush() == "\ufffd"  # incomplete at the end
    bpe = BPETokenizer.train(["naïve café 🙂 " * 50], 300)
    stream = bpe.stream_decoder()
    ids = bpe.encode("naïve café 🙂")
    assert "".join(stream.add(i) for i in ids) + stream.flush() == "naïve café 🙂"
    assert tokenizer_from_dict(bpe.to_dict()).encode("café") == bpe.encode("café")


def test_bpe_is_fitted_on_the_training_split_and_keyed_by_its_settings(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    train_text, val_text = "the cat sat on the mat. " * 60, "zebras quizzically juxtapose. " * 8
    path.write_text(train_text + val_text, encoding="utf-8")
    split = len(val_text) / len(train_text + val_text)
    data = prepare_tokens([path], split, tokenizer="bpe", vocab_size=300)
    assert data.train_chars == len(train_text) and data.val_chars == len(val_text)
    assert data.tokenizer.to_dict() == BPETokenizer.train([train_text], 300).to_dict()
    assert data.tokenizer.decode(data.train) == train_text and data.tokenizer.decode(data.val) == val_text
    again = prepare_tokens([path], split, tokenizer="bpe", vocab_size=300)
    assert again.from_cache and again.fingerprint == data.fingerprint
    others = {prepare_tokens([path], split, tokenizer=kind, vocab_size=size).fingerprint
              for kind, size in (("bpe", 310), ("byte", 300), ("char", 300))}
    assert len(others | {data.fingerprint}) == 4
    assert data.train.dtype == np.uint16 and prepare_tokens([path], split, tokenizer="byte").train.dtype == np.uint8


def test_bad_tokenizer_settings_are_refused(alice: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert_clean_error(train_tiny_result(alice, tmp_path, "--set", "data.tokenizer=word"), "data.tokenizer")
    assert_clean_error(train_tiny_result(alice, tmp_path, "--set", "data.tokenizer=bpe", "--set",
                                         "data.vocab_size=256"), "data.vocab_size")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if the library were not installed
    assert_clean_error(train_tiny_result(alice, tmp_path, "--set", "data.tokenizer=bpe"), "fundamentallm[bpe]")
    assert not (tmp_path / "run").exists()


def train_tiny_result(data: Path, tmp_path: Path, *extra: str):  # -> click's Result
    return run_cli("train", data, "-o", tmp_path / "run", "--device", "cpu", *TINY, *extra)


def test_val_data_validates_on_its_own_file(alice: Path, tmp_path: Path) -> None:
    val = tmp_path / "val.txt"
    val.write_text("Alice said «hello» to the Queen.\n" * 20, encoding="utf-8")  # « » never occur in training
    run = tmp_path / "run"
    result = train_tiny(alice, run, "--val-data", val, "--epochs", "1")
    assert "(validation: val.txt)" in result.output and "never occur" in result.stderr
    checkpoint = read_checkpoint(run / "final_model.pt")
    assert checkpoint.data.num_train_tokens == 6000 and checkpoint.data.num_val_tokens == len(val.read_text())
    assert "«" not in checkpoint.tokenizer.chars  # fitted on the training data only
    assert checkpoint.data.val_files == [str(val.resolve())]
    ev = json.loads(run_cli("evaluate", run / "final_model.pt", "--json").stdout)
    assert ev["data"] == "val.txt" and ev["characters"] == len(val.read_text())
    # --resume auto takes DATA and --val-data from the checkpoint; other validation data is other data.
    more = run_cli("train", "--resume", "auto", "-o", run, "--epochs", "2")
    assert more.exit_code == 0, more.stderr
    other = run_cli("train", "--resume", "auto", "-o", run, "--epochs", "3", "--val-data", alice)
    assert_clean_error(other, "both as DATA and with --val-data")
    val.write_text("changed", encoding="utf-8")
    assert_clean_error(run_cli("train", "--resume", "auto", "-o", run, "--epochs", "3"), "different data")


def test_sweep_over_tokenizers_ranks_by_bits_per_char_of_each(alice: Path, tmp_path: Path) -> None:
    result = run_cli("sweep", alice, "--grid", "data.tokenizer=char,bpe", "-o", tmp_path / "sweep", "--epochs", "1",
                     "--device", "cpu", *TINY[:-2], *BPE, "--set", "training.batch_size=8",
                     "--set", "training.max_steps=8")
    assert result.exit_code == 0, result.stderr
    for kind in ("char", "bpe"):
        evals = [r for r in read_metrics(tmp_path / "sweep" / f"tokenizer={kind}") if r["kind"] == "eval"]
        assert f"{evals[-1]['bits_per_char']:.4f}" in result.output
    val = tmp_path / "val.txt"
    val.write_text("Some other text to validate on.\n" * 10)
    lr = run_cli("lr-find", alice, "-o", tmp_path / "lr", "--device", "cpu", *TINY[:-2], "--set",
                 "data.tokenizer=byte", "--steps", "12", "--val-data", val)
    assert lr.exit_code == 0, lr.stderr
    assert "Suggested learning rate" in lr.output


def test_checkpoints_written_before_the_new_tokenizers_still_load(tmp_path: Path) -> None:
    from fundamentallm import checkpoint as ckpt

    _uniform_checkpoint(tmp_path / "new.pt", CharTokenizer(["a", "b"]))
    payload = torch.load(tmp_path / "new.pt", weights_only=True)
    for key in ("val_files", "num_train_chars", "num_val_chars"):  # fields DataInfo gained with this change
        del payload["data"][key]
    payload["checksum"] = ckpt._checksum(payload)
    torch.save(payload, tmp_path / "old.pt")
    old = read_checkpoint(tmp_path / "old.pt")
    assert old.data.val_files == [] and old.tokenizer.kind == "char" and not old.tokenizer.has_unknown


def test_without_the_tokenizers_package_a_bpe_run_stops_with_both_ways_out(alice: Path, tmp_path: Path) -> None:
    """fast-cpu trains BPE, which needs an optional package: without it the run stops before training, in one
    line that names the install command and the character alternative, and the alternative works."""
    blocked = tmp_path / "blocked" / "tokenizers"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('not installed, for this test')\n")
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join([str(blocked.parent), env["PYTHONPATH"]])
    common = ["--config", "fast-cpu", "--max-steps", "2", "--device", "cpu", "--set", "training.sample_tokens=0"]
    stopped = run_started_subprocess("train", alice, *common, "-o", tmp_path / "bpe", env=env)
    assert_clean_error(stopped, "needs the tokenizers package", "pip install 'fundamentallm[bpe]'",
                       "--set data.tokenizer=char")
    assert not (tmp_path / "bpe" / "final_model.pt").exists()
    chars = run_started_subprocess("train", alice, *common, "--set", "data.tokenizer=char", "-o", tmp_path / "char",
                                   env=env)
    assert chars.returncode == 0, chars.stderr
    assert read_checkpoint(tmp_path / "char" / "final_model.pt").tokenizer.kind == "char"
