"""`sweep --search random|tpe`: Optuna search over ranges and lists, pruning, and resuming, through the real CLI."""

from __future__ import annotations

import csv
import math
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import HANG_GUARD, ROOT, TINY_SETS, assert_clean_error, freeze_when, run_cli, snapshot, subprocess_env

from fundamentallm.metrics import read_metrics

pytest.importorskip("optuna")

ALICE = ROOT / "examples" / "alice.txt"
# Tiny runs (on conftest's corpus, 40,000 characters of alice.txt) with an evaluation every 5 steps, so that a
# trial has intermediate losses to be pruned on, and no text sampled after each evaluation (not searched on).
SEARCHED = ["--set", "training.eval_interval=5", "--set", "training.max_steps=20", "--set", "training.sample_tokens=0"]
BASE = ["--device", "cpu", *TINY_SETS, *SEARCHED]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Models of a few thousand parameters: a second thread only fights other processes for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_sets_without(*keys: str) -> list[str]:
    """TINY_SETS less the keys a test searches over."""
    pairs = zip(TINY_SETS[::2], TINY_SETS[1::2], strict=True)
    return [arg for pair in pairs if pair[1].split("=")[0] not in keys for arg in pair]


def rows_of(out: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((out / "results.csv").open()))


def test_random_search_draws_from_ranges_and_ranks_the_trials(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "search"
    base = ["--device", "cpu", *tiny_sets_without("model.num_layers", "model.dropout"), *SEARCHED]
    args = ["sweep", corpus, *base, "--search", "random", "--trials", "3", "-o", out,
            "--space", "training.learning_rate=log:1e-3:3e-2", "--space", "model.num_layers=int:1:2",
            "--space", "training.batch_size=4,8", "--space", "model.dropout=float:0:0.2"]
    result = run_cli(*args)
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["trial-000", "trial-001", "trial-002"]
    assert (out / "study.db").is_file() and (out / "sweep.png").is_file()
    rows = rows_of(out)
    assert [r["rank"] for r in rows] == ["1", "2", "3"] and sorted(r["trial"] for r in rows) == ["0", "1", "2"]
    losses = [float(r["best_val_loss"]) for r in rows]
    assert losses == sorted(losses) and all(math.isfinite(v) for v in losses)
    for row in rows:
        # Each trial trained the values its row shows, each inside its range.
        config = read_metrics(Path(row["run_dir"]))[0]["config"]
        lr, layers = config["training"]["learning_rate"], config["model"]["num_layers"]
        assert 1e-3 <= lr <= 3e-2 and float(row["learning_rate"]) == pytest.approx(lr, rel=5e-3)
        assert layers in (1, 2) and row["num_layers"] == str(layers)
        assert config["training"]["batch_size"] in (4, 8) and row["batch_size"] == str(config["training"]
                                                                                       ["batch_size"])
        assert 0 <= config["model"]["dropout"] <= 0.2
        assert row["status"] == "finished" and row["steps"] == "20"
    table = result.stdout[result.stdout.index("Sweep results"):].splitlines()
    assert table[1].split()[:6] == ["#", "trial", "learning_rate", "num_layers", "batch_size", "dropout"]

    # A larger --trials extends the finished search by the difference; the trials already there stay as they are.
    before = snapshot(out / "trial-000")
    more = run_cli(*[a if a != "3" else "4" for a in args])
    assert more.exit_code == 0, more.stderr
    assert "(3 in the study already)" in more.stdout and "[trial 4/4] trial-003" in more.stdout
    assert "trial-000" not in more.stdout.split("Sweep results")[0]
    assert snapshot(out / "trial-000") == before and len(rows_of(out)) == 4
    # The same directory with another space, method or configuration is refused, not mixed in.
    changed = [a if a != "training.batch_size=4,8" else "training.batch_size=4,16" for a in args]
    assert_clean_error(run_cli(*changed), "another command", "training.batch_size")
    assert_clean_error(run_cli(*[a if a != "random" else "tpe" for a in args]), "another command", "'tpe' now")
    assert_clean_error(run_cli(*args, "--set", "model.d_ff=32"), "another command", "model.d_ff: 64 there, 32 now")


def test_pruning_stops_hopeless_trials_early(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "search"
    # A rate of 1e-6 barely moves the weights: such a trial is behind every 1e-2 trial at every evaluation, so
    # once the first two trials (which always run to the end) have set a median, the median rule stops it.
    result = run_cli("sweep", corpus, *BASE, "--set", "training.max_steps=30", "--search", "random", "--trials", "6",
                     "--prune", "--space", "training.learning_rate=1e-2,1e-6", "-o", out)
    assert result.exit_code == 0, result.stderr
    rows = rows_of(out)
    pruned = [r for r in rows if r["status"] == "pruned"]
    assert pruned, result.stdout
    for row in pruned:
        records = read_metrics(Path(row["run_dir"]))
        assert row["learning_rate"] == "1e-6" and int(row["steps"]) < 30
        assert records[-1]["kind"] == "end" and records[-1]["status"] == "pruned"
        assert (Path(row["run_dir"]) / "final_model.pt").is_file()  # ended cleanly, like early stopping
    assert all(r["status"] == "finished" and r["steps"] == "30" for r in rows if r["learning_rate"] == "1e-2")
    assert "Pruned: the search stopped this run at step" in result.stdout
    assert rows[0]["learning_rate"] == "1e-2"


def test_an_interrupted_search_resumes_its_trial_and_keeps_the_study(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "search"
    args = ["sweep", corpus, *BASE, "--set", "training.max_steps=30", "--set", "training.batch_size=8",
            "--search", "tpe", "--trials", "3", "--space", "training.learning_rate=log:1e-3:1e-2", "-o", out]
    second = out / "trial-001"
    proc = subprocess.Popen([sys.executable, "-m", "fundamentallm", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=subprocess_env())
    try:  # Ctrl-C, as a user would, once the second trial is training (held there until the signal is sent)
        freeze_when(proc, lambda: (second / "metrics.jsonl").exists()
                    and any(r["kind"] == "train" for r in read_metrics(second)), "the second trial's first step")
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGCONT)
        stdout, stderr = proc.communicate(timeout=HANG_GUARD)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "Search interrupted" in stdout
    assert (second / "interrupted.pt").is_file() and not (out / "trial-002").exists()
    assert {r["status"] for r in rows_of(out)} == {"finished", "interrupted"}
    first = snapshot(out / "trial-000")
    interrupted_at = read_metrics(second)[-1]["step"]
    lr = read_metrics(second)[0]["config"]["training"]["learning_rate"]

    result = run_cli(*args)
    assert result.exit_code == 0, result.stderr
    assert "(2 in the study already)" in result.stdout
    assert "[trial 2/3] trial-001" in result.stdout and "(resuming from interrupted.pt)" in result.stdout
    assert "trial-000" not in result.stdout.split("Sweep results")[0]  # finished: not run again
    assert snapshot(out / "trial-000") == first
    records = read_metrics(second)
    assert records[0]["config"]["training"]["learning_rate"] == lr  # the same trial, with its values
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == list(range(1, 31)) and interrupted_at < 30  # continued: no step twice, none missing
    rows = rows_of(out)
    assert sorted(r["trial"] for r in rows) == ["0", "1", "2"] and {r["status"] for r in rows} == {"finished"}


def test_bad_search_options_are_refused_before_anything_runs(tmp_path: Path) -> None:
    out = tmp_path / "search"
    base = ["sweep", ALICE, *TINY_SETS, "-o", out]
    search = [*base, "--search", "random", "--trials", "2"]
    lr = "training.learning_rate"
    cases = [
        ([*search], "--space"),
        ([*search, "--space", "learning_rate=log:1e-4:1e-2"], "section"),
        ([*search, "--space", f"{lr}"], "KEY=RANGE"),
        ([*search, "--space", f"{lr}=log:1e-4"], "log:LOW:HIGH"),
        ([*search, "--space", f"{lr}=log:0:1e-2"], "LOW > 0"),
        ([*search, "--space", f"{lr}=log:1e-2:1e-4"], "LOW must be below HIGH"),
        ([*search, "--space", f"{lr}=float:a:b"], "must be numbers"),
        ([*search, "--space", f"{lr}=float:0:nan"], "finite"),
        ([*search, "--space", "model.num_layers=int:1.5:3"], "whole numbers"),
        ([*search, "--space", "training.batch_size=8"], "at least two values"),
        ([*search, "--space", "training.batch_size=8,,16"], "empty value"),
        ([*search, "--space", "training.batch_size=8,8"], "listed twice"),
        ([*search, "--space", f"{lr}=log:1e-4:1e-2", "--space", f"{lr}=1e-3,1e-2"], "given twice"),
        ([*search, "--space", "training.batch_size=int:0:8"], "batch_size"),  # a bound the config refuses
        ([*search, "--space", "model.dropout=float:0:2"], "dropout"),
        ([*search, "--space", "training.lerning_rate=1e-3,1e-2"], "learning_rate"),
        ([*search, "--space", f"{lr}=1e-3,1e-2", "--set", f"{lr}=1e-3"], "both by --space"),
        ([*base, "--search", "tpe", "--space", f"{lr}=1e-3,1e-2"], "--trials"),
        ([*search, "--space", f"{lr}=1e-3,1e-2", "--grid", "training.batch_size=4,8"], "--grid and --search"),
        ([*base, "--space", f"{lr}=1e-3,1e-2", "--grid", "training.batch_size=4,8"], "add --search"),
        ([*base, "--prune", "--grid", "training.batch_size=4,8"], "add --search"),
    ]
    for args, needle in cases:
        assert_clean_error(run_cli(*args), needle)
    assert_clean_error(run_cli(*search, "--trials", "0", "--space", f"{lr}=1e-3,1e-2"), "--trials")
    assert not out.exists()
    # A grid's results are not mixed into a search, nor a search's into a grid.
    (out / "grid-run").mkdir(parents=True)
    (out / "results.csv").write_text("rank\n")
    assert_clean_error(run_cli(*search, "--space", f"{lr}=1e-3,1e-2"), "no study.db")
    assert not (out / "study.db").exists()


def test_search_without_optuna_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` now raises ImportError
    result = run_cli("sweep", ALICE, *TINY_SETS, "--search", "tpe", "--trials", "2", "-o", tmp_path / "s",
                     "--space", "training.learning_rate=1e-3,1e-2")
    assert_clean_error(result, "pip install 'fundamentallm[optuna]'")
    assert not (tmp_path / "s").exists()
