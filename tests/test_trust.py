"""Hostile and careless input: configs that would eat the machine, damaged run records, a full disk
whatever the writer reports, sampling values at the edge of float32, and the smaller promises. Every case goes
through the real CLI: one line on stderr, the promised exit code, no traceback, nothing existing changed."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY, TINY_SETS, assert_clean_error, run_cli, run_subprocess, snapshot, train_tiny

from fundamentallm.checkpoint import _checksum, read_checkpoint
from fundamentallm.errors import UserError
from fundamentallm.generate import sample_next
from fundamentallm.metrics import read_metrics

WORDS = ["the", "of", "and", "to", "a", "in", "that", "is", "was", "he", "for", "it", "with", "as", "his", "on",
         "be", "at", "by", "this", "had", "not", "are", "but", "from", "or", "have", "they", "which", "one", "you",
         "were", "her", "all", "she", "there", "would", "their", "we", "him", "been", "has", "when", "who", "will",
         "more", "no", "if", "out", "so", "said", "what", "up", "about", "into", "than", "them", "can", "only"]


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 10,000 characters of made-up sentences: about 30 training steps per epoch with TINY."""
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "." for _ in range(220)]
    path = tmp_path_factory.mktemp("text") / "sentences.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, text: Path) -> Path:
    """One finished tiny run (one epoch), shared by the tests that copy or only read it."""
    root = tmp_path_factory.mktemp("trained")
    os.environ["FUNDAMENTALLM_CACHE_DIR"] = str(root / "cache")
    train_tiny(text, root / "run", "--epochs", "1")
    return root / "run"


def assert_one_line(result, *needles: str, code: int = 2) -> None:
    assert_clean_error(result, *needles, code=code)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert len(lines[0]) < 1000, f"the message is {len(lines[0])} characters long"


def _in_private_tmpfs(script: str, mount_options: str, tmp: Path) -> subprocess.CompletedProcess | None:
    """Run a shell script with a fresh tmpfs mounted at $FS in a private mount namespace; None where mounting is
    impossible here (no unshare, no privileges)."""
    if shutil.which("unshare") is None:
        return None
    fs = tmp / "fs"
    fs.mkdir()
    wrapper = f'mount -t tmpfs -o {mount_options} tmpfs "$FS" || exit 77\n{script}'
    cmd = ["unshare", "--mount"] + (["--map-root-user"] if os.geteuid() != 0 else []) + ["sh", "-c", wrapper]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "FS": str(fs), "PY": sys.executable})
    return None if result.returncode == 77 else result


# ---------------------------------------------------------------------------------------------------------
# Kind 2: configuration that eats the machine


def _alias_bomb() -> str:
    levels = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 9):
        levels.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    return "\n".join(levels) + "\ntraining:\n  batch_size: [" + ", ".join(["*a8"] * 9) + "]\n"


@pytest.mark.parametrize(("make", "args", "needles"), [
    (lambda d: (d / "bomb.yaml").write_text(_alias_bomb()) and d / "bomb.yaml", [],
     ["bomb.yaml", "more than 10,000 values"]),
    (lambda d: (d / "deep.yaml").write_text("model: " + "[" * 5000 + "]" * 5000) and d / "deep.yaml", [],
     ["deep.yaml", "nested deeper"]),
    (lambda d: "small", ["--set", "model.d_model=" + "[" * 5000 + "]" * 5000], ["--set", "nested deeper"]),
    (lambda d: (d / "huge.yaml").write_bytes(b"# " + b"x" * (2 << 20)) and d / "huge.yaml", [],
     ["huge.yaml", "larger than 1 MiB"]),
    (lambda d: d, [], ["is a directory"]),
    (lambda d: (d / "long.yaml").write_text("training:\n  batch_size: " + "x" * 100_000 + "\n") and
     d / "long.yaml", [], ["training.batch_size", "integer"]),
    (lambda d: (d / "keys.yaml").write_text("".join(f"k{i}: 1\n" for i in range(2000))) and d / "keys.yaml", [],
     ["unknown config key", "more problem"]),
    (lambda d: "small", ["--seed", str(2**64)], ["training.seed", "less than or equal to 9223372036854775807"]),
    (lambda d: "small", ["--set", "model.d_model=1000000000000"], ["model.d_model", "less than or equal"]),
    (lambda d: "small", ["--set", f"training.max_steps={10**30}"], ["training.max_steps"]),
    (lambda d: "small", ["--set", "training.seed=" + "9" * 5000], ["training.seed"]),
    (lambda d: (d / "digits.yaml").write_text("training:\n  seed: " + "9" * 5000 + "\n") and d / "digits.yaml",
     [], ["digits.yaml", "cannot be read"]),
])
def test_hostile_configuration_is_refused_in_one_short_line(text: Path, tmp_path: Path, make, args: list[str],
                                                            needles: list[str]) -> None:
    config = make(tmp_path)
    before = snapshot(tmp_path)
    result = run_cli("train", text, "--config", config, "-o", tmp_path / "run", "--device", "cpu", *args)
    assert_one_line(result, *needles)
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()


def test_configs_are_read_from_regular_files_only(text: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)  # nothing ever writes to it: reading it would block forever
    before = snapshot(tmp_path)
    for config in ("/dev/zero", str(fifo)):
        # A real process with a timeout: a hang fails the test instead of blocking the suite.
        result = run_subprocess("train", text, "--config", config, "-o", tmp_path / "run")
        assert_one_line(result, config, "not a regular file")
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------
# Kind 5: damaged run records

DAMAGE = [
    b'{"kind": "train", "step": 3, "train_loss": 1.0, "note": "\xff\xfe not UTF-8"}\n',
    b"[1, 2, 3]\n",
    b'{"kind": "eval", "step": "four", "val_loss": 1.0}\n',
    b'{"kind": "train", "step": 2, "train_loss": 1.0, "elapsed": 1e999}\n',
    b'{"kind": "run", "config": {"training": {"epochs": "ten"}}}\n',
    b'{"kind": "train", "step": 10000000000000000000000000, "train_loss": 0.5}\n',
    b"[" * 100_000 + b"]" * 100_000 + b"\n",
]


def _damage(metrics: Path) -> None:
    lines = metrics.read_bytes().splitlines(keepends=True)
    metrics.write_bytes(b"".join(lines[:3] + DAMAGE + lines[3:]))


def test_damaged_run_records_are_skipped_with_one_warning(text: Path, trained: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    good = read_metrics(run)
    _damage(run / "metrics.jsonl")
    for args in (["status", run], ["status", "--json", run], ["plot", run, "-o", tmp_path / "plot.png"]):
        result = run_cli(*args)
        assert result.exit_code == 0, result.stderr
        assert "Traceback" not in result.stderr
        assert result.stderr.count(f"skipped {len(DAMAGE)} damaged record(s)") == 1, result.stderr
    assert read_metrics(run) == good

    # --resume auto carries the run's history over, without the damaged lines.
    steps = max(r["step"] for r in good if r["kind"] == "train")
    resumed = run_cli("train", "--resume", "auto", "-o", run, "--device", "cpu", "--epochs", "2")
    assert resumed.exit_code == 0, resumed.stderr
    assert f"skipped {len(DAMAGE)} damaged record(s)" in resumed.stderr
    records = read_metrics(run)
    assert [r for r in records if r["kind"] == "train" and r["step"] <= steps] == \
        [r for r in good if r["kind"] == "train"]
    assert max(r["step"] for r in records if r["kind"] == "train") == 2 * steps


def test_sweep_summary_reads_past_damaged_records(text: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    args = ["sweep", text, "--device", "cpu", "--epochs", "1", "--set", "training.max_steps=6", *TINY_SETS,
            "--set", "training.batch_size=8", "--grid", "training.learning_rate=1e-3", "-o", out]
    assert run_cli(*args).exit_code == 0
    _damage(out / "learning_rate=1e-3" / "metrics.jsonl")
    again = run_cli(*args)  # the run is finished: only the summary reads the damaged file
    assert again.exit_code == 0, again.stderr
    assert f"skipped {len(DAMAGE)} damaged record(s)" in again.stderr
    assert "learning_rate=1e-3" in (out / "results.csv").read_text()


# ---------------------------------------------------------------------------------------------------------
# Kind 6: a full disk, whatever the writer says

FULL_DISK = {"FUNDAMENTALLM_TEST_FULL_DISK_AFTER": "1000",
             "FUNDAMENTALLM_TEST_FULL_DISK_FILES": "checkpoint_epoch_2.pt"}


def test_a_full_disk_stops_the_run_and_keeps_earlier_files(text: Path, trained: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    kept = {name: (run / name).read_bytes() for name in ("checkpoint_epoch_1.pt", "final_model.pt")}
    # The OS says "no space left" in the middle of torch.save, which reports it as RuntimeError "unexpected pos".
    result = run_subprocess("train", "--resume", "auto", "-o", run, "--device", "cpu", "--epochs", "3",
                            env={**os.environ, **FULL_DISK})
    assert_one_line(result, "disk is full", "checkpoint_epoch_2.pt", "free on that file system", "--resume auto",
                    code=1)
    assert {name: (run / name).read_bytes() for name in kept} == kept
    assert not (run / "checkpoint_epoch_2.pt").exists() and not list(run.glob(".fundamentallm-tmp-*"))

    # And on a real file system that fills up (where this machine lets a test mount one): 600 KB hold the first
    # checkpoints of a tiny run (~170 KB each with optimizer state), not all of them.
    keep = tmp_path / "survivors"
    script = (f'"$PY" -m fundamentallm train {text} -o "$FS/run" --device cpu {" ".join(TINY)} --epochs 6 '
              f'--set training.keep_last_n=0 >"$FS/../out.txt" 2>"$FS/../err.txt"; echo $? >"$FS/../rc.txt"; '
              f'cp -r "$FS/run" {keep}')
    if _in_private_tmpfs(script, "size=600k", tmp_path) is None:
        return  # no tmpfs here: the simulated failure above is the test
    rc, err = int((tmp_path / "rc.txt").read_text()), (tmp_path / "err.txt").read_text()
    assert rc == 1 and "Traceback" not in err and "disk is full" in err and "free on that file system" in err, err
    assert err.strip().splitlines()[-1].startswith("error: ")
    saved = sorted(keep.glob("*.pt"))
    assert saved, "no checkpoint was saved before the disk filled up"
    for path in saved:
        read_checkpoint(path)  # whole and loadable
    assert not list(keep.glob(".fundamentallm-tmp-*"))


# ---------------------------------------------------------------------------------------------------------
# Kind 9: sampling values at the edge of float32


def test_sampling_at_the_edge_of_float32(trained: Path, tmp_path: Path) -> None:
    base = ["generate", trained / "final_model.pt", "-p", "The", "--max-tokens", "30", "--seed", "1"]
    greedy = run_cli(*base, "--temperature", "0")
    assert greedy.exit_code == 0, greedy.stderr
    for extreme in (["--top-p", "1e-300"], ["--temperature", "1e-320"], ["--temperature", "5e-324", "--top-p",
                                                                          "5e-324"]):
        result = run_cli(*base, *extreme)
        assert result.exit_code == 0 and "Traceback" not in result.stderr, (extreme, result.stderr)
        assert result.stdout == greedy.stdout, extreme

    # Finite weights whose scores overflow float32: a checkpoint with a valid checksum that yields inf/NaN logits.
    payload = torch.load(trained / "final_model.pt", weights_only=True)
    payload["model"]["norm_f.weight"].fill_(3e38)
    payload["checksum"] = _checksum(payload)
    torch.save(payload, tmp_path / "overflow.pt")
    before = snapshot(tmp_path)
    for temperature in ("0", "0.8"):
        result = run_cli("generate", tmp_path / "overflow.pt", "-p", "The", "--temperature", temperature)
        assert_one_line(result, "NaN or infinite scores", "earlier checkpoint")
    assert snapshot(tmp_path) == before

    # The sampling function itself, on the values the CLI cannot produce directly.
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.9]])
    for temperature, top_p in ((1e-320, 1.0), (1.0, 1e-300), (5e-324, 5e-324), (1e-46, 0.5)):
        assert sample_next(logits, temperature, top_p=top_p).tolist() == [1]
    for bad in (float("nan"), float("inf")):
        with pytest.raises(UserError, match="NaN or infinite"):
            sample_next(torch.tensor([[0.5, bad, 1.0]]), 0.8)


# ---------------------------------------------------------------------------------------------------------
# Kind 10: the smaller ones


@pytest.mark.parametrize("args", [
    ["train", "--no-such-flag"],
    ["--no-such-flag"],
    ["no-such-command"],
    ["generate"],
    ["train", "x.txt", "--seed", "9" * 5000],
    ["generate", "x.pt", "--max-tokens", "many"],
    ["lr-find", "x.txt", "--diverge-factor", "nan"],
    ["lr-find", "x.txt", "--end-lr", "inf"],
    ["train"],
])
def test_usage_errors_are_one_line(args: list[str]) -> None:
    assert_one_line(run_subprocess(*args))


def test_the_smaller_promises(text: Path, trained: Path, tmp_path: Path) -> None:
    before = snapshot(tmp_path)
    # Something that looks like a path must be a file, even when its name is a preset's.
    assert_one_line(run_cli("train", text, "--config", "/no/such/dir/small.yaml", "-o", tmp_path / "r"),
                    "/no/such/dir/small.yaml", "no such file")
    # A vocabulary with no character in it would train a one-token model.
    assert_one_line(run_cli("train", text, "-o", tmp_path / "r", *TINY, "--set", "data.min_char_frequency=10000000"),
                    "data.min_char_frequency", "lower it")
    assert snapshot(tmp_path) == before and not (tmp_path / "r").exists()
    # bool is an int in Python; a format version of true is not 1.
    payload = torch.load(trained / "final_model.pt", weights_only=True)
    payload["format_version"] = True
    torch.save(payload, tmp_path / "bool.pt")
    before = snapshot(tmp_path)
    assert_one_line(run_cli("generate", tmp_path / "bool.pt", "-p", "The"), "format version True")
    assert snapshot(tmp_path) == before

    # A run directory whose name is not valid UTF-8 plots and reports like any other.
    odd = tmp_path / os.fsdecode(b"run-\xff")
    shutil.copytree(trained, odd)
    for command in ("plot", "status"):
        result = run_subprocess(command, odd, errors="surrogateescape")  # the output names the directory
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
        assert os.fsdecode(b"run-\xff") in result.stdout
    assert (odd / "training.png").read_bytes().startswith(b"\x89PNG")

    # A read-only file system is called that, not "permission denied" (where a test may mount one).
    script = f'"$PY" -m fundamentallm train {text} -o "$FS/run" --device cpu {" ".join(TINY)}'
    result = _in_private_tmpfs(script, "ro,size=1m", tmp_path)
    if result is not None:
        assert_one_line(result, "read-only file system")


def test_second_sigterm_exits_143_at_once(text: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    # Slow checkpoint writes keep the process saving interrupted.pt when the second SIGTERM arrives.
    proc = subprocess.Popen([sys.executable, "-m", "fundamentallm", "train", str(text), "-o", str(run), "--device",
                             "cpu", *TINY, "--epochs", "50"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "FUNDAMENTALLM_TEST_SLOW_WRITE": "0.5"})
    try:
        _wait_for(lambda: (run / "metrics.jsonl").exists() and len(read_metrics(run)) > 5)
        proc.send_signal(signal.SIGTERM)
        _wait_for(lambda: list(run.glob(".fundamentallm-tmp-interrupted.pt*")))
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr and "Aborted" in stderr
    assert not (run / "interrupted.pt").exists() and not list(run.glob(".fundamentallm-tmp-*"))


def _wait_for(condition, timeout: float = 120.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the training process")
        time.sleep(0.05)
