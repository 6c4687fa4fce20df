"""torchrun on CPU with the gloo backend: 2 processes, tiny model, a small slice of text.

The 2-process run uses batch_size 4 per process, so its global batch (4 x 2 processes) equals the single-process
run's batch_size 8; with gradient accumulation 2 both take 16 sequences per optimizer step, and the gradient
all-reduce is skipped on the first micro-batch (DDP's no_sync). Every rank draws the same global set of windows
and takes its slice, so the two runs see the same windows, start from the same weights (rank 0 is seeded like a
single process; DDP copies its weights to rank 1), and compute the same mean gradient. Only the order of
floating-point additions differs (two per-rank means averaged by the all-reduce, against one mean over the whole
batch): measured on this configuration (the first 12,000 characters of examples/alice.txt), the curves differ by at
most 5e-7 nats (train) and 2e-7 (validation).

Tolerance: 1e-3 nats on every logged loss. That is ~2000x the rounding drift, leaving room for other CPUs and
BLAS builds, yet well below what a wrong implementation gives on this same configuration: a different global
batch of windows (another seed) moves the curve by up to 4e-2, and losing half the global batch (each rank
training on its own 4 sequences only) by up to 1.1e-1 (measured on tinyshakespeare). Dropout is 0 so that random
masks, which differ between ranks by design, stay out of the comparison.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import HANG_GUARD, TINY_SETS, run_cli

from fundamentallm.checkpoint import read_checkpoint
from fundamentallm.metrics import read_metrics

TOLERANCE = 1e-3

TINY = ["--device", "cpu", *TINY_SETS, "--set", "training.gradient_accumulation_steps=2"]


def torchrun(*args: str | Path, nproc: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=N -m fundamentallm ...`, through the interpreter running the
    tests (torch.distributed.run is what the torchrun script calls). --standalone picks a free port."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "fundamentallm", *map(str, args)]
    scratch = Path.cwd() / "torchrun-tmp"  # torchrun leaves a folder per launch in TMPDIR: keep them in the test's own
    scratch.mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(scratch)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_GUARD, env=env)


def losses(run: Path, kind: str = "train", key: str = "train_loss") -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in read_metrics(run) if r["kind"] == kind]


def assert_curves_match(a: list[tuple[int, float]], b: list[tuple[int, float]], tolerance: float) -> None:
    assert [step for step, _ in a] == [step for step, _ in b]
    worst = max(abs(x - y) for (_, x), (_, y) in zip(a, b, strict=True))
    assert worst <= tolerance, f"loss curves differ by up to {worst:.2e} (tolerance {tolerance:.0e})"


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory, alice: str) -> Path:
    path = tmp_path_factory.mktemp("data") / "slice.txt"
    path.write_text(alice[:12_000], encoding="utf-8")
    return path


def test_two_processes_match_one_with_the_same_global_batch(text: Path, tmp_path: Path) -> None:
    single, double = tmp_path / "single", tmp_path / "double"
    ref = run_cli("train", text, "-o", single, *TINY, "--batch-size", "8", "--epochs", "2",
                  "--set", "model.dropout=0.0")
    assert ref.exit_code == 0, ref.stderr
    result = torchrun("train", text, "-o", double, *TINY, "--batch-size", "4", "--epochs", "2",
                      "--set", "model.dropout=0.0")
    assert result.returncode == 0, result.stderr[-3000:]

    # Only rank 0 speaks: one header, with the effective batch, and one summary.
    out = result.stdout
    assert out.count("Device:") == 1 and out.count("Done:") == 1
    assert "batch 4 x accumulation 2 x 2 processes = 16 sequences" in out
    assert "2 processes" in out.splitlines()[0]
    # One set of checkpoints, written by rank 0 alone; each step logged once.
    files = sorted(p.name for p in double.iterdir())
    assert files == sorted(p.name for p in single.iterdir())
    assert set(files) - {"training.png"} == {  # the plot only where matplotlib is installed
        "best_model.pt", "checkpoint_epoch_1.pt", "checkpoint_epoch_2.pt", "config.yaml", "final_model.pt",
        "metrics.jsonl"}
    steps = [step for step, _ in losses(double)]
    assert steps == sorted(set(steps)) and len(steps) == 2 * math.ceil(10_800 / (16 * 32))
    run_record = next(r for r in read_metrics(double) if r["kind"] == "run")
    assert run_record["world_size"] == 2 and run_record["tokens_per_step"] == 16 * 32

    assert_curves_match(losses(single), losses(double), TOLERANCE)
    assert_curves_match(losses(single, "eval", "val_loss"), losses(double, "eval", "val_loss"), TOLERANCE)

    # The distributed run's checkpoints load in a single process.
    final = double / "final_model.pt"
    gen = run_cli("generate", final, "--prompt", "Alice:", "--max-tokens", "20", "--seed", "1")
    assert gen.exit_code == 0 and gen.stdout.startswith("Alice:"), gen.stderr
    ev = run_cli("evaluate", final, "--json", "--training-precision")  # as the run's own evaluations
    assert ev.exit_code == 0, ev.stderr
    assert json.loads(ev.stdout)["loss_per_token"] == pytest.approx(losses(double, "eval", "val_loss")[-1][1], rel=1e-5)


def test_resuming_a_two_process_run_continues_exactly(text: Path, tmp_path: Path) -> None:
    # Dropout on, so that each rank's own random stream must be saved and restored; a constant learning rate,
    # so that the schedule does not depend on how many epochs the first part was told to run.
    common = [*TINY, "--batch-size", "4", "--set", "model.dropout=0.1", "--set", "training.scheduler=constant"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert torchrun("train", text, "-o", straight, *common, "--epochs", "2").returncode == 0
    first = torchrun("train", text, "-o", resumed, *common, "--epochs", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    second = torchrun("train", text, "-o", resumed, *common, "--epochs", "2", "--resume", "auto")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Resuming from" in second.stdout and "at step 22 (epoch 2)" in second.stdout
    # Same world size, everything restored: the same arithmetic in the same order.
    assert_curves_match(losses(straight), losses(resumed), 1e-6)
    assert_curves_match(losses(straight, "eval", "val_loss"), losses(resumed, "eval", "val_loss"), 1e-6)
    assert sorted(p.name for p in resumed.iterdir()) == sorted(p.name for p in straight.iterdir())

    # A single process can take the run further: an epoch is now 43 steps of 8 sequences instead of 22 of 16.
    more = run_cli("train", "--resume", "auto", "-o", resumed, "--epochs", "3", "--device", "cpu")
    assert more.exit_code == 0, more.stderr
    assert read_checkpoint(resumed / "final_model.pt").progress.step == 44 + 43


def test_a_bad_input_stops_every_process_with_one_message(tmp_path: Path) -> None:
    result = torchrun("train", tmp_path / "missing.txt", "-o", tmp_path / "run", *TINY)
    assert result.returncode != 0
    assert result.stderr.count("error: data file") == 1, result.stderr
    assert "internal error" not in result.stderr and "Connection closed" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_two_processes_train_a_bpe_model_like_one(text: Path, tmp_path: Path) -> None:
    # The first process builds the token cache (training the BPE merges), the other reads it: both train on the
    # same tokens, so the curves match the single process's as in the character test above.
    bpe = ["--set", "data.tokenizer=bpe", "--set", "data.vocab_size=300", "--epochs", "1"]
    single, double = tmp_path / "single", tmp_path / "double"
    ref = run_cli("train", text, "-o", single, *TINY, *bpe, "--batch-size", "8")
    assert ref.exit_code == 0, ref.stderr
    result = torchrun("train", text, "-o", double, *TINY, *bpe, "--batch-size", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bpe tokenizer, vocabulary 300" in result.stdout
    assert_curves_match(losses(single), losses(double), TOLERANCE)
    assert read_checkpoint(double / "final_model.pt").tokenizer.to_dict() == \
        read_checkpoint(single / "final_model.pt").tokenizer.to_dict()
