"""Tuning and watching a run: lr-find, sweep, metric logs, plots and status, through the real CLI."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    HANG_GUARD,
    TINY,
    TINY_SETS,
    assert_clean_error,
    freeze_when,
    run_cli,
    snapshot,
    subprocess_env,
    train_tiny,
)

from fundamentallm.metrics import read_metrics
from fundamentallm.plot import draw_runs, load_curves, lr_label
from fundamentallm.status import run_status

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    """A real PNG that matplotlib reads back as a non-trivial image."""
    import matplotlib.image

    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
    assert image.std() > 0.01  # not a blank canvas


def synthetic_corpus(path: Path) -> Path:
    """40,000 characters of 30 random 'words' over 16 letters: learnable, and unlike any real text."""
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnop"))
    words = ["".join(rng.choice(letters, rng.integers(3, 8))) for _ in range(30)]
    text = " ".join(words[i] for i in rng.integers(0, len(words), 8000))[:40_000]
    path.write_text(text, encoding="utf-8")
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------------------
# lr-find


# The rate known to work on the synthetic corpus with the TINY model, found by training one epoch (141 steps,
# warmup 2, cosine) at each rate: best validation loss 2.750 at 1e-4, 2.623 at 3e-4, 2.385 at 1e-3, 2.167 at
# 3e-3, 1.923 at 1e-2, 2.122 at 3e-2, 2.714 at 1e-1.
KNOWN_GOOD_LR = 1e-2


def test_lr_find_suggests_a_rate_that_works(tmp_path: Path) -> None:
    data = synthetic_corpus(tmp_path / "synthetic.txt")
    result = run_cli("lr-find", data, "--device", "cpu", *TINY, "-o", tmp_path / "lr")
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    suggested = float(out.split("Suggested learning rate: ")[1].split()[0])
    assert KNOWN_GOOD_LR / 3 <= suggested <= KNOWN_GOOD_LR * 3, out
    # The output names the rule that produced the number, and why the test stopped.
    assert "Rule: steepest descent of the smoothed loss" in out or "Rule: minimum of the smoothed loss / 10" in out
    # (here it stops near the end of the range or reaches it, depending on the random start; either is said)
    assert "Stopped after" in out or "did not diverge up to learning rate 1" in result.stderr
    rows = list(csv.DictReader((tmp_path / "lr" / "lr_find.csv").open()))
    lrs = [float(r["learning_rate"]) for r in rows]
    assert 10 <= len(rows) <= 60 and lrs == sorted(lrs) and lrs[0] == pytest.approx(1e-5)
    assert all(math.isfinite(float(r["smoothed_loss"])) for r in rows)
    assert_png(tmp_path / "lr" / "lr_find.png")


def test_train_learning_rate_auto_uses_the_suggestion(tmp_path: Path) -> None:
    data = synthetic_corpus(tmp_path / "synthetic.txt")
    run = tmp_path / "run"
    result = train_tiny(data, run, "--epochs", "1", "--learning-rate", "auto")
    suggested = float(result.stdout.split("Suggested learning rate: ")[1].split()[0])
    config_lr = float(next(line for line in (run / "config.yaml").read_text().splitlines()
                           if line.strip().startswith("learning_rate:")).split(":")[1])
    assert config_lr == pytest.approx(suggested, rel=0.01)
    assert read_metrics(run)[0]["config"]["training"]["learning_rate"] == config_lr
    assert_png(run / "lr_find.png")
    assert (run / "final_model.pt").is_file()


def test_lr_find_and_auto_refuse_bad_input(tmp_path: Path, corpus: Path) -> None:
    assert_clean_error(run_cli("lr-find", corpus, "--start-lr", "1", "--end-lr", "0.1"), "--start-lr")
    assert_clean_error(run_cli("lr-find", tmp_path / "missing.txt"), "does not exist")
    assert_clean_error(run_cli("lr-find", corpus, "--config", "nope"), "not a preset")
    (tmp_path / "afile").write_text("x")
    assert_clean_error(run_cli("lr-find", corpus, *TINY, "-o", tmp_path / "afile"), "is a file")
    # A start rate so high that the loss is gone at once: no suggestion, a clear message instead.
    assert_clean_error(run_cli("lr-find", corpus, *TINY, "--start-lr", "1e3", "--end-lr", "1e6",
                               "--set", "training.gradient_clip_norm=null"), "--start-lr")
    # An occupied run directory is refused before the range test spends its time; nothing in it changes.
    run = tmp_path / "run"
    train_tiny(corpus, run, "--set", "training.max_steps=5")
    before = snapshot(run)
    result = run_cli("train", corpus, "-o", run, *TINY, "--learning-rate", "auto")
    assert_clean_error(result, "already holds a run")
    assert "LR range test" not in result.stdout
    assert snapshot(run) == before
    assert_clean_error(run_cli("train", "-o", run, "--resume", "auto", "--learning-rate", "auto"), "auto")


# ----------------------------------------------------------------------------------------------------------
# sweep


def test_sweep_runs_every_combination_and_ranks_them(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    result = run_cli("sweep", corpus, "--device", "cpu", *TINY_SETS, "--epochs", "1",
                     "--set", "training.max_steps=40", "--grid", "training.learning_rate=1e-4,1e-2",
                     "--grid", "training.batch_size=4,8", "-o", out)
    assert result.exit_code == 0, result.stderr
    names = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert names == ["learning_rate=1e-2,batch_size=4", "learning_rate=1e-2,batch_size=8",
                     "learning_rate=1e-4,batch_size=4", "learning_rate=1e-4,batch_size=8"]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4"]
    losses = [float(r["best_val_loss"]) for r in rows]
    assert losses == sorted(losses)
    for row in rows:
        run = Path(row["run_dir"])
        evals = [r["val_loss"] for r in read_metrics(run) if r["kind"] == "eval"]
        assert float(row["best_val_loss"]) == pytest.approx(min(evals), rel=1e-5)
        assert run.name == f"learning_rate={row['learning_rate']},batch_size={row['batch_size']}"
        assert float(row["time_s"]) > 0 and float(row["tokens_per_sec"]) > 0 and row["steps"] == "40"
        assert row["status"] == "finished"
        assert (run / "final_model.pt").is_file()
    # 40 steps at 1e-4 barely move the loss: both high-rate runs must rank first.
    assert {r["learning_rate"] for r in rows[:2]} == {"1e-2"}
    # The printed table: a header with time and tokens/s, then the four runs in the same order.
    table = result.stdout[result.stdout.index("Sweep results"):].splitlines()
    assert "time" in table[1] and "tokens/s" in table[1] and "best_val_loss" in table[1]
    for line, row in zip(table[2:6], rows, strict=True):
        assert line.split()[:3] == [row["rank"], row["learning_rate"], row["batch_size"]]
    assert_png(out / "sweep.png")


def test_sweep_refuses_bad_grids_before_running_anything(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    base = ["sweep", corpus, *TINY_SETS, "-o", out]
    assert_clean_error(run_cli(*base), "--grid")
    assert_clean_error(run_cli(*base, "--grid", "learning_rate=1e-3"), "section")
    assert_clean_error(run_cli(*base, "--grid", "training.learning_rate="), "KEY=V1,V2")
    assert_clean_error(run_cli(*base, "--grid", "training.learning_rate=1e-3,,1e-2"), "empty value")
    assert_clean_error(run_cli(*base, "--grid", "training.lerning_rate=1e-3"), "learning_rate")
    # One bad value among good ones: refused before the first run starts.
    assert_clean_error(run_cli(*base, "--grid", "training.batch_size=8,-1"), "batch_size")
    assert_clean_error(run_cli(*base, "--grid", "training.epochs=1,2", "--epochs", "1"), "both")
    assert not out.exists()


def test_a_sweep_never_mixes_with_a_training_run(corpus: Path, tmp_path: Path) -> None:
    """A sweep (grid or search) into a directory that holds a training run, finished or stopped before its first
    checkpoint, is refused like train into another run's directory, and the run's files stay as they were."""
    finished, stopped = tmp_path / "finished", tmp_path / "stopped"
    train_tiny(corpus, finished, "--max-steps", "3")
    stopped.mkdir()
    (stopped / "config.yaml").write_text((finished / "config.yaml").read_text())
    before = {p.name: sha(p) for p in finished.iterdir() if p.is_file()}
    grid = ["--grid", "training.learning_rate=1e-3,1e-2"]
    search = ["--search", "random", "--trials", "1", "--space", "training.learning_rate=log:1e-3:1e-2"]
    for run_dir, kind in ((finished, "finished"), (stopped, "stopped")):
        for how in (grid, search):
            result = run_cli("sweep", corpus, *TINY_SETS, *how, "-o", run_dir)
            assert_clean_error(result, f"{run_dir} holds a training run ({kind})", "choose another -o")
    assert {p.name: sha(p) for p in finished.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in stopped.iterdir()) == ["config.yaml"]


def test_sweep_records_a_failed_run_and_refuses_a_changed_command(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    # At a learning rate of 1e30 the weights overflow on the second step and the loss is NaN: that run fails,
    # the sweep records it and goes on.
    args = ["sweep", corpus, "--device", "cpu", *TINY_SETS, "--set", "training.batch_size=8", "--epochs", "1",
            "--set", "training.max_steps=10", "--grid", "training.learning_rate=1e30,1e-3", "-o", out]
    result = run_cli(*args)
    assert result.exit_code == 0, result.stderr
    assert "learning_rate=1e30 failed: the training loss became nan" in result.stderr
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["learning_rate"], r["status"][:32]) for r in rows] == \
        [("1e-3", "finished"), ("1e30", "failed: the training loss became")]
    assert rows[1]["best_val_loss"] == "nan"
    before = snapshot(out)
    again = run_cli(*args)  # nothing left to do: the failure would only repeat
    assert "[1/2] learning_rate=1e30: failed earlier" in again.stdout
    assert "[2/2] learning_rate=1e-3: finished earlier, skipping" in again.stdout
    summaries = ("results.csv", "sweep.png")  # rewritten from the same runs; every run's own files stay as they were
    assert {k: v for k, v in snapshot(out).items() if k not in summaries} == \
        {k: v for k, v in before.items() if k not in summaries}
    # The same directory with another configuration is refused, not mixed in.
    before = snapshot(out)
    assert_clean_error(run_cli(*args, "--set", "training.max_steps=20"), "another configuration",
                       "training.max_steps: 10 there, 20 now")
    assert snapshot(out) == before


def test_sweep_goes_on_past_a_combination_the_data_cannot_serve(corpus: Path, tmp_path: Path) -> None:
    # TINY_SETS without its sequence length, which is the grid axis here
    sets = [arg for pair in zip(TINY_SETS[::2], TINY_SETS[1::2], strict=True)
            if pair[1] != "training.sequence_length=32" for arg in pair]
    args = ["sweep", corpus, "--device", "cpu", *sets, "--set", "training.batch_size=8", "--epochs", "1",
            "--set", "training.max_steps=5"]
    result = run_cli(*args, "--grid", "training.sequence_length=100000,32", "-o", tmp_path / "a")
    assert result.exit_code == 0, result.stderr
    assert "sequence_length=100000 failed" in result.stderr
    rows = {r["sequence_length"]: r["status"] for r in csv.DictReader((tmp_path / "a" / "results.csv").open())}
    assert rows["32"] == "finished" and rows["100000"].startswith("failed")
    # When nothing could run, the sweep says so with a non-zero exit code.
    none = run_cli(*args, "--grid", "training.sequence_length=100000,200000", "-o", tmp_path / "b")
    assert_clean_error(none, "every run of the sweep failed", code=1)


def test_sweep_resumes_after_an_interruption_without_rerunning_finished_runs(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    # 120 steps per run, less than an epoch (141 steps): the interrupted run resumes from interrupted.pt.
    args = ["sweep", corpus, "--device", "cpu", *TINY_SETS, "--set", "training.batch_size=8", "--epochs", "1",
            "--set", "training.max_steps=120", "--grid", "training.learning_rate=1e-3,3e-3,1e-2", "-o", out]
    first, second, third = (out / f"learning_rate={lr}" for lr in ("1e-3", "3e-3", "1e-2"))
    proc = subprocess.Popen([sys.executable, "-m", "fundamentallm", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=subprocess_env(TERM="xterm"))
    try:
        # Interrupt as a user would with Ctrl-C, once the second run is training.
        freeze_when(proc, lambda: (second / "metrics.jsonl").exists()
                    and any(r["kind"] == "train" for r in read_metrics(second)), "the second run's first step")
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGCONT)
        stdout, stderr = proc.communicate(timeout=HANG_GUARD)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "Sweep interrupted during run 2/3" in stdout
    assert (first / "final_model.pt").is_file() and not (second / "final_model.pt").exists()
    assert (second / "interrupted.pt").is_file() and not third.exists()
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {r["status"] for r in rows} == {"finished", "interrupted"}
    finished_files = {p.name: (sha(p), p.stat().st_mtime_ns) for p in first.iterdir()}
    interrupted_at = read_metrics(second)[-1]["step"]

    result = run_cli(*args)
    assert result.exit_code == 0, result.stderr
    assert "[1/3] learning_rate=1e-3: finished earlier, skipping" in result.stdout
    assert "[2/3] learning_rate=3e-3: resuming from interrupted.pt" in result.stdout
    assert {p.name: (sha(p), p.stat().st_mtime_ns) for p in first.iterdir()} == finished_files
    steps = [r["step"] for r in read_metrics(second) if r["kind"] == "train"]
    assert steps == list(range(1, 121)) and interrupted_at < 120  # continued, no step twice or missing
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert sorted(r["status"] for r in rows) == ["finished", "finished earlier", "resumed"]
    assert all((d / "final_model.pt").is_file() for d in (first, second, third))


# ----------------------------------------------------------------------------------------------------------
# Metric logs and plots


def test_metrics_jsonl_is_valid_json_with_every_field_and_tensorboard(corpus: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    train_tiny(corpus, run, "--epochs", "2", "--set", "training.log_interval=20",
               "--tensorboard")
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]  # every line on its own is one JSON object
    assert records[0]["kind"] == "run" and records[0]["total_steps"] == 2 * 141
    assert records[-1] == {"kind": "end", "step": 282, "elapsed": records[-1]["elapsed"], "status": "finished",
                           "time": records[-1]["time"]}
    trains = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in trains] == [20, 40, 60, 80, 100, 120, 140, 141, 160, 180, 200, 220, 240, 260, 280,
                                          282]
    for r in trains:
        assert set(r) == {"kind", "step", "epoch", "total_steps", "train_loss", "lr", "grad_norm", "tokens_per_sec",
                          "elapsed", "time"}
        assert r["lr"] > 0 and r["grad_norm"] > 0 and r["tokens_per_sec"] > 0 and math.isfinite(r["train_loss"])
    assert [r["step"] for r in evals] == [141, 282] and [r["epoch"] for r in evals] == [1, 2]
    for r in evals:
        assert set(r) >= {"step", "epoch", "train_loss", "val_loss", "perplexity", "bits_per_char", "elapsed"}
        assert r["perplexity"] == pytest.approx(math.exp(r["val_loss"]))
        assert r["bits_per_char"] == pytest.approx(r["val_loss"] / math.log(2))
    elapsed = [r["elapsed"] for r in records[1:]]
    assert elapsed == sorted(elapsed)
    times = [r["time"] for r in records]
    assert times == sorted(times) and abs(times[-1] - time.time()) < 600  # wall-clock Unix time

    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    accumulator = EventAccumulator(str(run / "tensorboard")).Reload()
    scalars = set(accumulator.Tags()["scalars"])
    assert {"train/train_loss", "train/lr", "train/grad_norm", "eval/val_loss", "eval/bits_per_char"} <= scalars
    assert [e.step for e in accumulator.Scalars("eval/val_loss")] == [141, 282]
    assert_png(run / "training.png")


def test_plot_overlays_runs_and_marks_overfitting(alice: str, tmp_path: Path) -> None:
    # 1,500 training characters and a model of 105k parameters at a constant rate: it memorises the training
    # text and validation loss turns up after a few dozen steps.
    small = tmp_path / "small.txt"
    small.write_text(alice[:3000], encoding="utf-8")
    over = tmp_path / "over"
    train_tiny(small, over, "--set", "model.d_model=64", "--set", "model.d_ff=256", "--set", "model.num_layers=2",
               "--set", "training.validation_split=0.5", "--epochs", "50", "--set", "training.max_steps=300",
               "--learning-rate", "3e-3", "--set", "training.scheduler=constant", "--set", "training.save_best=false",
               "--set", "training.save_every_n_epochs=1000")
    curves = load_curves(over)
    best = curves.best_index
    assert curves.turn_index == best and curves.val_loss[-1] > curves.val_loss[best] * 1.01
    assert_png(over / "training.png")

    steady = tmp_path / "steady"
    train_tiny(small, steady, "--epochs", "3")
    assert load_curves(steady).turn_index is None  # still improving: nothing marked
    result = run_cli("plot", over, steady, "-o", tmp_path / "figs" / "both.png")
    assert result.exit_code == 0, result.stderr
    assert_png(tmp_path / "figs" / "both.png")
    (steady / "training.png").unlink()
    assert run_cli("plot", steady).exit_code == 0
    assert_png(steady / "training.png")


def marks(run: Path, gid: str) -> list[float]:
    """Steps of the marks of one kind (resumed, interrupted, failed) on the loss panel of the run's figure."""
    ax_loss = draw_runs([load_curves(run)]).axes[0]
    return [float(line.get_xdata()[0]) for line in ax_loss.lines if line.get_gid() == gid]


def test_plots_of_short_runs_are_readable(corpus: Path, tmp_path: Path) -> None:
    # Eight steps logged every ten: one training record, one evaluation, as in a quick sweep.
    for lr in ("1e-3", "1e-2"):
        train_tiny(corpus, tmp_path / lr, "--set", "training.max_steps=8", "--set", "training.log_interval=10",
                   "--learning-rate", lr)
    fig = draw_runs([load_curves(tmp_path / "1e-3")])
    fig.canvas.draw()
    ax_loss, ax_lr = fig.axes
    # Every curve shows its points (a lone point drawn as a line is invisible).
    assert ax_loss.lines and all(line.get_marker() not in (None, "", "None") for line in ax_loss.lines + ax_lr.lines)
    ticks = [t for t in ax_lr.get_xticks() if ax_lr.get_xlim()[0] <= t <= ax_lr.get_xlim()[1]]
    assert ax_lr.get_xlim()[0] == 0 and 8 in ticks and all(t == int(t) for t in ticks)  # whole steps, from 0
    # Learning rates written out on each tick, with no offset or multiplier printed apart from them.
    labels = [label.get_text() for label in ax_lr.get_yticklabels() if label.get_text()]
    assert labels and all(label == "0" or "e-" in label for label in labels), labels
    assert ax_lr.yaxis.get_offset_text().get_text() == ""
    assert [lr_label(v) for v in (1e-3, 3e-4, 2.5e-4, 0.0)] == ["1e-3", "3e-4", "2.5e-4", "0"]
    # Runs whose rates differ tenfold (a sweep over rates) share a log scale, where both can be read.
    assert draw_runs([load_curves(tmp_path / lr) for lr in ("1e-3", "1e-2")]).axes[1].get_yscale() == "log"
    assert draw_runs([load_curves(tmp_path / "1e-3")]).axes[1].get_yscale() == "linear"


def test_plot_refuses_bad_input(corpus: Path, tmp_path: Path) -> None:
    assert_clean_error(run_cli("plot", tmp_path / "nope"), "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_clean_error(run_cli("plot", empty), "metrics.jsonl")
    run = tmp_path / "run"
    train_tiny(corpus, run, "--set", "training.max_steps=3")
    before = snapshot(tmp_path)
    assert_clean_error(run_cli("plot", run, "-o", tmp_path / "plot.pdf"), ".png")
    assert snapshot(tmp_path) == before


def test_without_matplotlib_commands_say_how_to_install_it(corpus: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    run = tmp_path / "run"
    result = train_tiny(corpus, run, "--set", "training.max_steps=3")  # a run never fails for want of a plot
    assert "pip install 'fundamentallm[plot]'" in result.stdout
    assert (run / "final_model.pt").is_file() and not (run / "training.png").exists()
    assert_clean_error(run_cli("plot", run), "pip install 'fundamentallm[plot]'")
    assert not (run / "training.png").exists()
    result = run_cli("lr-find", corpus, *TINY, "-o", tmp_path / "lr")
    assert result.exit_code == 0 and "Suggested learning rate" in result.stdout
    assert "pip install 'fundamentallm[plot]'" in result.stderr
    assert (tmp_path / "lr" / "lr_find.csv").is_file() and not (tmp_path / "lr" / "lr_find.png").exists()


# ----------------------------------------------------------------------------------------------------------
# Remote watching: a log file and `status`


def test_status_follows_a_run_from_its_files(corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    log = tmp_path / "training.log"
    cmd = [sys.executable, "-m", "fundamentallm", "train", corpus, "-o", run, "--device", "cpu", *TINY,
           "--epochs", "20"]
    with log.open("w") as log_file:  # what `| tee training.log` sees: a pipe, not a terminal
        proc = subprocess.Popen(list(map(str, cmd)), stdout=log_file, stderr=subprocess.STDOUT,
                                env=subprocess_env(TERM="xterm"))
        try:
            freeze_when(proc, lambda: (run / "metrics.jsonl").exists()
                        and any(r["kind"] == "eval" for r in read_metrics(run)), "the run's first evaluation")
            running = run_cli("status", run)  # the process is stopped, mid-run, while status reads its files
            proc.send_signal(signal.SIGINT)
            proc.send_signal(signal.SIGCONT)
            proc.wait(timeout=HANG_GUARD)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert running.exit_code == 0, running.stderr
    lines = running.stdout.splitlines()
    assert lines[0].startswith(f"{run}: running (pid ")  # the process holding the run directory
    assert "/20, step " in lines[1] and "/2,820 (" in lines[1]
    assert "train_loss " in lines[2] and "val_loss " in lines[2] and "best val_loss" in lines[2]
    assert "tokens/s" in lines[3] and "ETA " in lines[3]

    text = log.read_text()
    assert "\r" not in text and "\x1b" not in text  # one line per update, no control characters
    assert "Epoch 1/20: 100%|" in text

    stopped = json.loads(run_cli("status", run, "--json").stdout)
    assert stopped["state"] == "interrupted" and stopped["eta_seconds"] is None
    assert marks(run, "interrupted") == [stopped["step"]]  # an X where the run stopped
    assert 0 < stopped["step"] < 2820 and stopped["total_steps"] == 2820 and stopped["epochs"] == 20
    assert "--resume auto" in run_cli("status", run).stdout
    # A run whose process vanished without a word (kill -9): no end record, and the file stops changing.
    records = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(records[:-1]) + "\n")
    assert run_status(run).state == "running"
    assert run_status(run, now=time.time() + 3600).state == "stopped"

    # Resumed (to a few steps further, to stay quick), it finishes, and status says so.
    end = stopped["step"] + 5
    train_tiny(corpus, run, "--resume", "auto", "--set", f"training.max_steps={end}")
    finished = json.loads(run_cli("status", run, "--json").stdout)
    assert finished["state"] == "finished" and finished["step"] == finished["total_steps"] == end
    assert marks(run, "resumed") == [stopped["step"]] and marks(run, "interrupted") == []


def test_status_refuses_what_is_not_a_run(tmp_path: Path) -> None:
    assert_clean_error(run_cli("status", tmp_path / "nope"), "does not exist")
    assert_clean_error(run_cli("status", tmp_path), "metrics.jsonl")


def test_metrics_readers_skip_lines_that_are_not_records(corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_tiny(corpus, run, "--epochs", "1")
    with (run / "metrics.jsonl").open("a") as f:
        f.write('3\n["not", "a", "record"]\n{"kind": "tr')  # stray values and a half-written last line
    assert all(isinstance(r, dict) for r in read_metrics(run))
    assert json.loads(run_cli("status", run, "--json").stdout)["state"] == "finished"


def test_bench_refuses_bad_input_before_measuring(corpus: Path, tmp_path: Path) -> None:
    bench = ["bench", corpus, "--device", "cpu", "--no-generation"]
    assert_clean_error(run_cli(*bench, "--rows", "small:abc"), "--rows 'small:abc'", "positive whole number")
    assert_clean_error(run_cli(*bench, "--rows", "tiny:8"), "unknown preset 'tiny'", "small")
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_clean_error(run_cli(*bench, "-o", blocker / "bench.json"), "cannot create", str(blocker))
