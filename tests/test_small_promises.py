"""The smaller promises: --threads beyond the cores is named, --trials is bounded, a locked study is called
locked, --init-from never ignores a changed tokenizer setting and names an overflowing model, a long --val-data
evaluation shows progress, a sweep never mixes with a live run, an unexportable tokenizer names the format that
works."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY, TINY_SETS, assert_clean_error, run_cli, run_subprocess, snapshot, subprocess_env

from fundamentallm.checkpoint import _checksum
from fundamentallm.errors import UserError
from fundamentallm.runfiles import LOCK

SEARCH = ["--search", "random", "--trials", "1", "--space", "training.learning_rate=log:1e-3:1e-2"]


def one_line(result, *needles: str, code: int = 2) -> None:
    assert_clean_error(result, *needles, code=code)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_threads_beyond_the_cores_are_named_in_the_header(tiny_run: Path, tmp_path: Path) -> None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    result = run_subprocess("train", tiny_run.parent / "text.txt", "-o", tmp_path / "run", "--device", "cpu", *TINY,
                            "--max-steps", "1", "--threads", str(cores + 3))
    assert result.returncode == 0, result.stderr
    header = next(line for line in result.stdout.splitlines() if line.startswith("Device:"))
    assert f"{cores + 3} threads, more than the {cores} core" in header and f"--threads {cores}" in header


@pytest.mark.parametrize("trials", ["0", "10001", str(2**64)])
def test_trials_are_bounded(trials: str, tiny_run: Path, tmp_path: Path) -> None:
    result = run_cli("sweep", tiny_run.parent / "text.txt", "--search", "random", "--trials", trials, "--space",
                     "training.learning_rate=log:1e-3:1e-2", "-o", tmp_path / "s")
    one_line(result, "--trials", "1<=x<=10000")
    assert not (tmp_path / "s").exists()


def test_a_study_locked_by_another_program_is_called_locked(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "search"
    out.mkdir()
    sqlite3.connect(out / "study.db").close()
    holder = subprocess.Popen([sys.executable, "-c", "import sqlite3, sys, time\n"
                               f"c = sqlite3.connect({str(out / 'study.db')!r}, isolation_level=None)\n"
                               "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = run_cli("sweep", tiny_run.parent / "text.txt", *TINY_SETS, *SEARCH, "-o", out, "--device", "cpu")
    finally:
        holder.kill()
        holder.wait()
    assert_clean_error(result, "study.db is locked by another program")  # after the data's own warning
    assert "not a readable study" not in result.stderr


def test_a_sweep_never_mixes_with_a_live_run(tiny_run: Path, tmp_path: Path) -> None:
    """A directory a live process holds (a training run starting there) is refused by grid and search alike,
    naming the process."""
    run = tmp_path / "live"
    script = ("import sys, time\nfrom fundamentallm.runfiles import hold\n"
              f"with hold({str(run)!r}):\n    open({str(run / 'config.yaml')!r}, 'w').close()\n"
              "    print('holding', flush=True)\n    time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        assert holder.stdout.readline().strip() == "holding"
        before = snapshot(run)
        for how in (["--grid", "training.learning_rate=1e-3"], SEARCH):
            result = run_cli("sweep", tiny_run.parent / "text.txt", *TINY_SETS, *how, "-o", run, "--device", "cpu")
            one_line(result, "in use by a running FundamentaLLM process", f"pid {holder.pid}")
        assert snapshot(run) == before and (run / LOCK).exists()
    finally:
        holder.kill()
        holder.wait()


def test_init_from_never_ignores_a_changed_tokenizer_setting(tiny_run: Path, tmp_path: Path) -> None:
    text = tiny_run.parent / "text.txt"
    base = ["train", text, "-o", tmp_path / "ft", "--device", "cpu", *TINY, "--max-steps", "1"]
    one_line(run_cli(*base, "--init-from", tiny_run / "final_model.pt", "--set", "data.min_char_frequency=3"),
             "data.min_char_frequency: 1 in", "3 now")
    pytest.importorskip("tokenizers")
    bpe = tmp_path / "bpe"
    result = run_cli("train", text, "-o", bpe, "--device", "cpu", *TINY, "--max-steps", "2",
                     "--set", "data.tokenizer=bpe", "--set", "data.vocab_size=300")
    assert result.exit_code == 0, result.stderr
    one_line(run_cli(*base, "--init-from", bpe / "final_model.pt", "--set", "data.vocab_size=400"),
             "data.vocab_size: 300 in", "400 now")
    assert not (tmp_path / "ft").exists()
    # The same value is no change: the fine-tuning runs.
    same = run_cli(*base, "--init-from", bpe / "final_model.pt", "--set", "data.vocab_size=300")
    assert same.exit_code == 0, same.stderr


def test_an_overflowing_init_from_model_is_named(tiny_run: Path, tmp_path: Path) -> None:
    payload = torch.load(tiny_run / "final_model.pt", weights_only=True)
    payload["model"]["norm_f.weight"].fill_(3e38)  # finite weights whose scores overflow float32
    payload["checksum"] = _checksum(payload)
    torch.save(payload, tmp_path / "overflow.pt")
    result = run_cli("train", tiny_run.parent / "text.txt", "--init-from", tmp_path / "overflow.pt",
                     "-o", tmp_path / "ft", "--device", "cpu", *TINY, "--max-steps", "2")
    one_line(result, "overflow.pt", "overflows", "NaN or infinite")
    assert not (tmp_path / "ft").exists()


def test_a_long_val_data_evaluation_shows_progress(tiny_run: Path, tmp_path: Path) -> None:
    from helpers import ALICE

    val = tmp_path / "val.txt"
    val.write_text(ALICE.read_text(encoding="utf-8")[20_000:60_000], encoding="utf-8")
    result = run_subprocess("train", tiny_run.parent / "text.txt", "--val-data", val, "-o", tmp_path / "run",
                            "--device", "cpu", *TINY, "--max-steps", "2", "--set", "training.eval_batches=0",
                            env=subprocess_env(FUNDAMENTALLM_TEST_PROGRESS_SECONDS="0"))
    assert result.returncode == 0, result.stderr
    assert "Evaluating" in result.stdout


def test_an_unexportable_tokenizer_names_the_format_that_works() -> None:
    from fundamentallm.export import tokenizers_tokenizer

    with pytest.raises(UserError, match="--format safetensors keeps any tokenizer"):
        tokenizers_tokenizer({"type": "future-kind"})




def test_serve_leaves_a_core_to_its_http_layer_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """serve's default torch threads are the cores less one (at least one); --threads and OMP_NUM_THREADS win."""
    from fundamentallm.device import set_threads

    cores = len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        set_threads(None, spare_cores=1)
        assert torch.get_num_threads() == max(1, cores - 1)
        set_threads(3, spare_cores=1)
        assert torch.get_num_threads() == 3
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        set_threads(None, spare_cores=1)
        assert torch.get_num_threads() == 3  # PyTorch follows the variable itself
    finally:
        torch.set_num_threads(before)
    help_text = run_cli("serve", "--help").stdout
    assert "less 1 (at least 1)" in " ".join(help_text.split())
