"""Promises under hostile use: one live run per directory, models that cannot fit, crafted checkpoints that pass
the checksum, --resume auto past damaged files, and torchrun processes that disagree."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    TINY,
    TINY_SETS,
    assert_clean_error,
    run_cli,
    snapshot,
    subprocess_env,
    train_tiny,
    wait_for,
)

from fundamentallm.checkpoint import _checksum, read_checkpoint

# ---------------------------------------------------------------------------------------------------------
# One live run per directory


def test_a_live_run_holds_its_directory(corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "fundamentallm", "train", str(corpus), "-o", str(run), "--device", "cpu", *TINY,
           "--epochs", "1000"]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        wait_for(lambda: (run / "metrics.jsonl").exists(), first, "the first run to start")
        for args in (["train", corpus, "-o", run, *TINY], ["train", corpus, "-o", run, *TINY, "--overwrite"],
                     ["train", "--resume", "auto", "-o", run],
                     ["sweep", corpus, *TINY_SETS, "--grid", "training.batch_size=8", "-o", run]):
            result = run_cli(*args)
            assert_clean_error(result, "in use by a running FundamentaLLM process", f"pid {first.pid}")
        status = run_cli("status", run)
        assert status.exit_code == 0 and f"running (pid {first.pid}" in status.stdout, status.stdout
        assert first.poll() is None, "the first run must not be disturbed"
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    # The lock died with the process: the directory is free again, and status says nobody is running it.
    assert json.loads(run_cli("status", run, "--json").stdout)["state"] == "stopped"
    train_tiny(corpus, run, "--overwrite", "--set", "training.max_steps=3")


# ---------------------------------------------------------------------------------------------------------
# Models that cannot fit


def test_a_model_that_cannot_fit_is_refused_before_allocating(corpus: Path, tmp_path: Path) -> None:
    huge = ["--set", "model.d_model=8192", "--set", "model.num_heads=64", "--set", "model.num_layers=48",
            "--set", "model.d_ff=32768", "--device", "cpu"]
    for args in (["train", corpus, "-o", tmp_path / "run", *huge], ["lr-find", corpus, "-o", tmp_path / "lr", *huge],
                 ["sweep", corpus, *huge, "--grid", "training.batch_size=8", "-o", tmp_path / "sweep"]):
        result = run_cli(*args)
        if args[0] == "sweep":  # the sweep reports the failed combination and fails as a whole
            assert result.exit_code == 1 and "needs about" in result.stderr, result.stderr
            continue
        assert_clean_error(result, "needs about", "memory", "--batch-size")
    assert not (tmp_path / "run").exists() and not (tmp_path / "lr").exists()


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


# ---------------------------------------------------------------------------------------------------------
# torchrun processes that disagree


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_processes_with_different_configs_stop_clearly(corpus: Path, tmp_path: Path) -> None:
    """Two 'machines' (two torchrun launchers on loopback), each started with its own --set: the kind of mistake
    that once made the collectives fall out of step."""
    port = _free_port()
    env = subprocess_env(TMPDIR=str(tmp_path))
    procs = []
    for node, lr in ((0, "1e-3"), (1, "2e-3")):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               f"--node_rank={node}", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
               "-m", "fundamentallm", "train", str(corpus), "-o", str(tmp_path / "run"), "--device", "cpu", *TINY,
               "--learning-rate", lr]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode != 0 for p in procs)
    errors = "".join(err for _, err in outputs)
    assert errors.count("different configurations or different data") == 1, errors
    assert "internal error" not in errors
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
