"""Exported directories (export --format safetensors, which generate, evaluate, serve and train --init-from
read) are read with the bounds of a config file: a size cap, a nesting cap, strict types, a known format
version; integer or boolean weights are named as such; no message points at a file that is not there."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import TINY, assert_clean_error, run_cli, snapshot

pytest.importorskip("safetensors")

RECORD = "fundamentallm.json"


@pytest.fixture(scope="module")
def exported(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("exported") / "model"
    result = run_cli("export", tiny_run / "final_model.pt", "-o", out, "--format", "safetensors")
    assert result.exit_code == 0, result.stderr
    return out


@pytest.fixture
def copy(exported: Path, tmp_path: Path) -> Path:
    out = tmp_path / "model"
    shutil.copytree(exported, out)
    return out


def edit(directory: Path, change: Callable[[dict[str, Any]], None]) -> None:
    record = json.loads((directory / RECORD).read_text(encoding="utf-8"))
    change(record)
    (directory / RECORD).write_text(json.dumps(record), encoding="utf-8")


def assert_refused(directory: Path, *needles: str) -> None:
    before = snapshot(directory.parent)
    result = run_cli("generate", directory, "-p", "The", "--max-tokens", "3")
    assert_clean_error(result, *needles)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert snapshot(directory.parent) == before


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(record: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target = record
        for key in parents:
            target = target[key]
        target[last] = value
    return change


@pytest.mark.parametrize(("change", "needles"), [
    (_set("config.model.d_model", "32"), ["model.d_model", "integer"]),
    (_set("config.model.bias", "false"), ["model.bias", "boolean"]),
    (_set("config.training.learning_rate", "0.001"), ["training.learning_rate"]),
    (_set("tokenizer.has_unknown", "true"), ["tokenizer"]),
    (_set("progress.step", "4"), ["progress.step"]),
    (_set("format_version", 0), ["export format version 0"]),
    (_set("format_version", True), ["export format version True"]),
    (_set("format_version", 2), ["export format version 2", "reads version 1"]),
    (_set("format", "something-else"), ["not a FundamentaLLM export"]),
    (_set("config.model", [1, 2]), ["model = [1, 2] is not allowed"]),
    (_set("config", "small"), ["damaged"]),
    (_set("tokenizer.chars", "ab\ud800c"), ["lone surrogate", "U+D800"]),
    (_set("weights_sha256", "0" * 64), ["model.safetensors", "does not match the checksum"]),
])
def test_wrong_types_and_versions_are_refused(change, needles: list[str], copy: Path) -> None:
    edit(copy, change)
    assert_refused(copy, *needles)


def test_nesting_and_size_are_capped(copy: Path) -> None:
    text = (copy / RECORD).read_text(encoding="utf-8")
    for nested in ("[" * 100_000 + "]" * 100_000, "[" * 20 + "]" * 20):  # past json's recursion, past the cap
        (copy / RECORD).write_text(text.replace('"progress"', f'"deep": {nested}, "progress"', 1))
        assert_refused(copy, RECORD, "nested deeper than 16 levels")
    with open(copy / RECORD, "r+b") as f:
        f.truncate(65 << 20)  # sparse: 65 MiB without writing them
    assert_refused(copy, RECORD, "larger than 64 MiB")
    (copy / RECORD).write_bytes(b'{"format": "\xff"}')
    assert_refused(copy, RECORD, "not valid UTF-8 JSON")


@pytest.mark.parametrize(("dtype", "named"), [("int64", "integers (torch.int64)"), ("bool", "booleans")])
def test_integer_and_boolean_weights_are_named(dtype: str, named: str, copy: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(str(copy / "model.safetensors"))
    name = sorted(weights)[0]
    weights[name] = weights[name].to(getattr(torch, dtype))
    save_file(weights, str(copy / "model.safetensors"))
    digest = hashlib.sha256((copy / "model.safetensors").read_bytes()).hexdigest()
    edit(copy, _set("weights_sha256", digest))
    assert_refused(copy, f"weights {name} are {named}, not floating-point numbers")


def test_messages_never_point_at_a_missing_file(copy: Path, tiny_run: Path, tmp_path: Path) -> None:
    (copy / "model.safetensors").unlink()
    result = run_cli("generate", copy, "-p", "The")
    assert_clean_error(result, "has no model.safetensors", "export the model again")
    assert str(copy / "model.safetensors") not in result.stderr
    # A transformers export is not ours to read: say what it is, name no checkpoint file that is not there.
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    result = run_cli("evaluate", hf)
    assert_clean_error(result, "transformers or ONNX export", "export --format safetensors")
    assert ".pt" not in result.stderr.replace("a .pt checkpoint", "")


def test_init_from_reads_with_the_same_bounds(copy: Path, tiny_run: Path, tmp_path: Path) -> None:
    edit(copy, _set("config.model.num_layers", "1"))
    result = run_cli("train", tiny_run.parent / "text.txt", "--init-from", copy, "-o", tmp_path / "run", *TINY,
                     "--max-steps", "1")
    assert_clean_error(result, "model.num_layers")
    assert not (tmp_path / "run").exists()


def test_a_good_export_still_reads(exported: Path) -> None:
    result = run_cli("generate", exported, "-p", "The", "--max-tokens", "5", "--seed", "1")
    assert result.exit_code == 0, result.stderr
    assert os.path.isfile(exported / RECORD)
