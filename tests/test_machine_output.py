"""Machine output is machine-readable, always: whenever stdout carries data (evaluate, status --json, the text
of generate), progress lines and reports go to stderr, however long the work takes.

The plain progress lines (what a log or a pipe gets instead of a live bar) come every 30 seconds; the test hook
FUNDAMENTALLM_TEST_PROGRESS_SECONDS=0 makes them come at every update, so a small text shows them all."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import ALICE, run_subprocess, subprocess_env

EVERY_UPDATE = subprocess_env(FUNDAMENTALLM_TEST_PROGRESS_SECONDS="0")


@pytest.fixture
def long_text(tmp_path: Path) -> Path:
    """About 1,200 evaluation windows for the tiny model: long enough for a progress display."""
    path = tmp_path / "long.txt"
    path.write_text(ALICE.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    return path


def test_evaluate_json_is_json_on_a_long_text(tiny_run: Path, long_text: Path) -> None:
    result = run_subprocess("evaluate", "--json", tiny_run / "final_model.pt", long_text, env=EVERY_UPDATE)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)  # nothing but the JSON
    assert record["characters"] == 40_000 and record["bits_per_char"] > 0
    assert "Evaluating" in result.stderr  # the progress is shown, on stderr


def test_evaluate_report_keeps_progress_off_stdout(tiny_run: Path, long_text: Path) -> None:
    result = run_subprocess("evaluate", tiny_run / "final_model.pt", long_text, env=EVERY_UPDATE)
    assert result.returncode == 0, result.stderr
    assert "Evaluating" not in result.stdout and "Evaluating" in result.stderr
    assert result.stdout.splitlines()[1].strip().startswith("loss=")


def test_evaluate_json_on_the_validation_split(tiny_run: Path, tmp_path: Path) -> None:
    """Without DATA, evaluate rebuilds the run's split (reading and tokenizing its data): still JSON alone."""
    env = {**EVERY_UPDATE, "FUNDAMENTALLM_CACHE_DIR": str(tmp_path / "fresh-cache")}
    result = run_subprocess("evaluate", "--json", tiny_run / "final_model.pt", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["data"].startswith("validation split")


def test_status_json_is_json_even_with_damaged_records(tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b"not json\n")
    result = run_subprocess("status", "--json", run, env=EVERY_UPDATE)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["step"] == 4
    assert "skipped 1 damaged record" in result.stderr


def test_generate_prints_the_text_alone(tiny_run: Path) -> None:
    """The prompt and its continuation on stdout; the warning about unseen characters on stderr."""
    result = run_subprocess("generate", tiny_run / "final_model.pt", "-p", "Alice \u2603", "--max-tokens", "40",
                            "--seed", "3", env=EVERY_UPDATE)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Alice \u2603") and len(result.stdout) >= len("Alice \u2603") + 1
    assert "never saw" in result.stderr and "never saw" not in result.stdout
    several = run_subprocess("generate", tiny_run / "final_model.pt", "-p", "Alice", "--max-tokens", "10",
                             "--num-samples", "2", "--seed", "3", env=EVERY_UPDATE)
    assert several.returncode == 0 and several.stdout.count("--- sample") == 2 and not several.stderr, several.stderr
