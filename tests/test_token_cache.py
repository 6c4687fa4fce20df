"""The token cache: several files (plain and compressed) decode back exactly, edits invalidate it, large
alphabets and rare characters work."""

from __future__ import annotations

import gzip
import lzma
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY, run_cli, train_tiny

from fundamentallm import data as data_module
from fundamentallm.data import as_tensor, prepare_tokens
from fundamentallm.tokenizer import UNKNOWN

# Multi-byte characters of every UTF-8 length: 2 (é, ß), 3 (你, 好, €) and 4 bytes (🙂, 𝄞).
PARTS = {
    "a.txt": "Café au lait, straße. " * 40,
    "b.txt.gz": "你好，世界。价格 12 € ! " * 40,
    "c.txt.xz": "Smile 🙂 and sing 𝄞 along.\n" * 40,
}


def write_corpus(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in PARTS.items():
        path = directory / name
        raw = text.encode("utf-8")
        path.write_bytes(gzip.compress(raw) if name.endswith(".gz") else
                         lzma.compress(raw) if name.endswith(".xz") else raw)
        paths.append(path)
    return paths


def all_tokens(data: data_module.TokenData) -> np.ndarray:
    return np.concatenate([data.train, data.val])


def test_cache_of_several_files_decodes_back_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 7-byte reads: chunk boundaries fall inside multi-byte characters again and again.
    monkeypatch.setattr(data_module, "CHUNK_BYTES", 7)
    files = write_corpus(tmp_path / "corpus")
    data = prepare_tokens(files, 0.1)
    assert not data.from_cache
    assert isinstance(data.train, np.memmap) and isinstance(data.val, np.memmap)
    assert data.train.dtype == np.uint8  # fewer than 256 distinct characters
    text = "".join(PARTS.values())
    assert data.num_chars == len(text) == len(all_tokens(data))
    assert data.text_bytes == len(text.encode("utf-8"))
    assert data.tokenizer.decode(all_tokens(data)) == text

    again = prepare_tokens(files, 0.1)  # the second run reads the cache
    assert again.from_cache and again.fingerprint == data.fingerprint
    assert again.tokenizer.decode(all_tokens(again)) == text
    # The directory gives the same files in the same (sorted) order, hence the same cache entry.
    assert prepare_tokens([tmp_path / "corpus"], 0.1).fingerprint == data.fingerprint


@pytest.mark.parametrize("name", list(PARTS))
def test_editing_one_file_invalidates_the_cache(tmp_path: Path, name: str) -> None:
    files = write_corpus(tmp_path / "corpus")
    before = prepare_tokens(files, 0.1)
    old = PARTS[name]
    new = old[1] + old[1:]  # one character changed into another one the tokenizer knows
    path = tmp_path / "corpus" / name
    raw = new.encode("utf-8")
    path.write_bytes(gzip.compress(raw) if name.endswith(".gz") else
                     lzma.compress(raw) if name.endswith(".xz") else raw)
    after = prepare_tokens(files, 0.1)
    assert not after.from_cache and after.fingerprint != before.fingerprint
    expected = "".join(new if key == name else text for key, text in PARTS.items())
    assert after.tokenizer.decode(all_tokens(after)) == expected


def test_settings_that_change_the_tokens_change_the_key(tmp_path: Path) -> None:
    files = write_corpus(tmp_path / "corpus")
    keys = {prepare_tokens(files, split, freq).fingerprint for split, freq in ((0.1, 1), (0.2, 1), (0.1, 3))}
    assert len(keys) == 3


def test_large_alphabet(tmp_path: Path) -> None:
    # 10,000 distinct CJK characters, each three times, shuffled: a uint16 cache, decoded back exactly.
    rng = np.random.default_rng(0)
    code_points = np.repeat(np.arange(0x4E00, 0x4E00 + 10_000, dtype=np.uint32), 3)
    rng.shuffle(code_points)
    text = code_points.tobytes().decode("utf-32-le")
    path = tmp_path / "cjk.txt"
    path.write_text(text, encoding="utf-8")
    data = prepare_tokens([path], 0.1)
    assert data.train.dtype == np.uint16
    assert 9_000 < len(data.tokenizer.chars) <= 10_000  # fitted on the training 90% only
    assert data.tokenizer.decode(data.train) == text[: len(data.train)]
    # ...and a model trains on it and generates from it.
    run = tmp_path / "run"
    train_tiny(path, run, "--epochs", "1", "--set", "training.max_steps=3", "--set", "training.eval_batches=1")
    prompt = text[:5]
    result = run_cli("generate", run / "final_model.pt", "--prompt", prompt, "--max-tokens", "10", "--seed", "0")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith(prompt) and len(result.stdout) == 5 + 10 + 1


def test_min_char_frequency_maps_rare_characters_to_unknown(tmp_path: Path) -> None:
    path = tmp_path / "rare.txt"
    text = "abab" * 200 + "x" * 2 + "abab" * 200 + "y" * 3 + "ab" * 200
    path.write_text(text)
    data = prepare_tokens([path], 0.1, min_char_frequency=3)
    assert data.tokenizer.chars == ["a", "b", "y"]  # 'x' occurs twice: rare
    assert data.tokenizer.has_unknown
    assert data.tokenizer.decode(all_tokens(data)) == text.replace("x", UNKNOWN)
    plain = prepare_tokens([path], 0.1)  # the default keeps every character of the training text
    assert plain.tokenizer.chars == ["a", "b", "x", "y"]
    assert plain.tokenizer.has_unknown  # reserved in every new character model, for text it never saw
    # Through the CLI: the run's tokenizer has the unknown token, and evaluation on text with a rare char works.
    run = tmp_path / "run"
    result = train_tiny(path, run, "--epochs", "1", "--set", "data.min_char_frequency=3")
    assert "vocabulary 4" in result.output  # a, b, y and the unknown token
    assert run_cli("evaluate", run / "final_model.pt", path).exit_code == 0


def test_tokens_reach_a_device_in_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data_module, "_COPY_TOKENS", 1000)
    tokens = (np.arange(25_000) % 60_000).astype(np.uint16)
    copied = as_tensor(tokens, torch.device("cpu"))
    assert copied.dtype == torch.int32 and torch.equal(copied, torch.from_numpy(tokens.astype(np.int32)))
    small = (np.arange(2_500) % 256).astype(np.uint8)
    assert torch.equal(as_tensor(small, torch.device("cpu")), torch.from_numpy(small))


def test_truncated_compressed_file_is_a_clean_error(tmp_path: Path) -> None:
    path = tmp_path / "cut.txt.xz"
    path.write_bytes(lzma.compress(("some text " * 5000).encode())[:-40])
    result = run_cli("train", path, "-o", tmp_path / "run", "--device", "cpu", *TINY)
    assert result.exit_code == 2 and "cut.txt.xz" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()
