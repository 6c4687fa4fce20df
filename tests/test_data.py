"""Reading text, the tokenizer, the split by position, batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fundamentallm.data import BatchSampler, decode_chunk, eval_windows, iter_byte_chunks, prepare_tokens
from fundamentallm.errors import UserError
from fundamentallm.tokenizer import CharTokenizer, count_code_points


def test_invalid_utf8_names_file_and_byte_offset(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"caf" + b"\xe9 au lait" + b"x" * 100)
    with pytest.raises(UserError, match=r"latin1\.txt is not valid UTF-8: byte 0xe9 at byte offset 3\b"):
        prepare_tokens([path], 0.1)


def test_invalid_byte_offset_is_exact_across_chunks(tmp_path: Path) -> None:
    path = tmp_path / "late.txt"
    path.write_bytes("é".encode() * 5000 + b"\xff")  # the bad byte sits at offset 10,000
    chunks = list(iter_byte_chunks(path, chunk_bytes=333))  # odd size: chunks must not split 'é'
    with pytest.raises(UserError, match="offset 10,000"):
        for offset, data in chunks:
            decode_chunk(path, offset, data)


def test_binary_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(b"abc\x00\x01\x02" * 50)
    with pytest.raises(UserError, match="binary"):
        prepare_tokens([path], 0.1)


def test_split_is_by_position_without_leakage(tmp_path: Path) -> None:
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    path = tmp_path / "abc.txt"
    path.write_text(text)
    data = prepare_tokens([path], 0.1)
    assert len(data.train) == 900 and len(data.val) == 100
    assert data.tokenizer.decode(data.train) == text[:900]
    assert data.tokenizer.decode(data.val) == text[900:]


def test_tokenizer_is_fitted_on_training_text_only(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("ab" * 450 + "z" * 100)  # 'z' only in the validation part
    data = prepare_tokens([path], 0.1)
    assert data.tokenizer.chars == ["a", "b"]
    assert data.tokenizer.has_unknown
    assert data.tokenizer.decode(data.val[:3]) == "\ufffd" * 3


def test_several_files_and_directories(tmp_path: Path) -> None:
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "b.txt").write_text("second ")
    (tmp_path / "books" / "a.txt").write_text("first ")
    (tmp_path / "books" / "notes.md").write_text("ignored")
    (tmp_path / "c.txt").write_text("third and last part of it")
    data = prepare_tokens([tmp_path / "books", tmp_path / "c.txt"], 0.2)
    text = data.tokenizer.decode(np.concatenate([data.train, data.val]))
    assert text == "first second third and last part of it"
    assert [f.name for f in data.files] == ["a.txt", "b.txt", "c.txt"]


@pytest.mark.parametrize(("name", "content", "needle"), [
    ("missing.txt", None, "does not exist"),
    ("empty-dir", "dir", "holds no data files"),
    ("e.txt", "", "empty"),
    ("w.txt", " \n\t\n   ", "only whitespace"),
])
def test_unusable_inputs(tmp_path: Path, name: str, content: str | None, needle: str) -> None:
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=needle):
        prepare_tokens([path], 0.1)


def test_tokenizer_round_trip_and_smallest_dtype() -> None:
    text = "Hello, wörld! 你好"
    tok = CharTokenizer.fit(count_code_points(text))
    assert tok.decode(tok.encode(text)) == text
    assert tok.dtype == np.uint8
    big = CharTokenizer([chr(0x4E00 + i) for i in range(1000)])
    assert big.dtype == np.uint16
    assert CharTokenizer.from_dict(tok.to_dict()).chars == tok.chars


def test_unknown_prompt_characters_are_named() -> None:
    tok = CharTokenizer.fit(count_code_points("abc"))
    with pytest.raises(UserError, match="'z'"):
        tok.encode("abz", what="prompt")


def test_batches_are_windows_of_sequence_length_plus_one() -> None:
    tokens = np.arange(1000, dtype=np.int64) % 256
    sampler = BatchSampler(tokens.astype(np.uint8), batch_size=4, sequence_length=16,
                           device=torch.device("cpu"), seed=0)
    x, y = sampler.next()
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    assert torch.equal((y - x) % 256, torch.ones_like(x))  # consecutive tokens of the stream


def test_global_batch_does_not_depend_on_world_size() -> None:
    tokens = np.arange(500, dtype=np.uint16)
    cpu = torch.device("cpu")
    whole = BatchSampler(tokens, 8, 10, cpu, seed=3).next()[0]
    halves = [BatchSampler(tokens, 4, 10, cpu, seed=3, rank=r, world_size=2).next()[0] for r in range(2)]
    assert torch.equal(torch.cat(halves), whole)


def test_eval_windows_cover_every_prediction_once() -> None:
    for stride in (0, 16, 8, 5, 1):  # 0: the context length, windows side by side
        windows = eval_windows(100, 16, stride=stride)
        predicted = [s + i for s, n, skip in windows for i in range(1 + skip, n)]
        assert predicted == list(range(1, 100)), stride
        # every prediction after the first window sees at least context - stride tokens
        assert all(i >= 16 - (stride or 16) for s, n, skip in windows[1:] for i in range(1 + skip, n))
    assert all(skip == 0 for _, _, skip in eval_windows(100, 16))


def test_device_resident_and_memory_mapped_batches_are_identical() -> None:
    # On a GPU the tokens live on the device as a tensor; on CPU they stay a (memory-mapped) array.
    from fundamentallm.data import as_tensor

    tokens = (np.arange(5000) * 7 % 251).astype(np.uint8)
    cpu = torch.device("cpu")
    mapped = BatchSampler(tokens, 6, 32, cpu, seed=11)
    resident = BatchSampler(as_tensor(tokens, cpu), 6, 32, cpu, seed=11)
    for _ in range(3):
        a, b = mapped.next(), resident.next()
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
