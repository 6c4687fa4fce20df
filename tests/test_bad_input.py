"""Bad input, through the real command line: one line on stderr naming the problem and the fix,
exit code 2, no traceback, nothing that exists changed."""

from __future__ import annotations

import gzip
import os
import pty
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    HANG_GUARD,
    TINY,
    assert_clean_error,
    assert_one_line,
    in_private_tmpfs_or_none,
    run_cli,
    run_subprocess,
    snapshot,
    subprocess_env,
    train_tiny,
)

from fundamentallm.checkpoint import _checksum
from fundamentallm.errors import UserError
from fundamentallm.generate import sample_next

# ---------------------------------------------------------------------------------------------------------
# Unusable data and configuration


def _write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def _corrupt_gzip(path: Path) -> Path:
    packed = bytearray(gzip.compress(b"To be, or not to be, that is the question. " * 200))
    packed[20:40] = b"\xff" * 20  # damage the deflate stream, not the header
    path.write_bytes(bytes(packed))
    return path


@pytest.mark.parametrize(("setup", "args", "needles"), [
    (lambda d: d / "missing.txt", [], ["missing.txt", "does not exist"]),
    (lambda d: _corrupt_gzip(d / "damaged.txt.gz"), [], ["damaged.txt.gz", "cannot read"]),
    (lambda d: (d / "empty_dir").mkdir() or d / "empty_dir", [], ["empty_dir", "no data files"]),
    (lambda d: _write(d / "empty.txt", ""), [], ["empty.txt", "empty"]),
    (lambda d: _write(d / "blank.txt", "   \n\n\t \n"), [], ["blank.txt", "whitespace"]),
    (lambda d: _write(d / "short.txt", "To be or not to be"), [], ["fewer than one training window",
                                                                   "--sequence-length"]),
    (lambda d: _write(d / "image.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 20), [], ["image.png", "UTF-8"]),
    (lambda d: _write(d / "nul.txt", b"abc\x00def" * 100), [], ["nul.txt", "binary"]),
    (lambda d: _write(d / "latin1.txt", "na\xefve caf\xe9 " * 50).write_bytes(("na\xefve " * 50).encode("latin-1"))
     and d / "latin1.txt", [], ["latin1.txt", "byte 0xef at byte offset 2"]),
])
def test_unusable_data(tmp_path: Path, corpus: Path, setup, args: list[str], needles: list[str]) -> None:
    data = setup(tmp_path)
    before = snapshot(tmp_path)
    result = run_cli("train", data, "-o", tmp_path / "run", *TINY, *args)
    assert_clean_error(result, *needles)
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()


@pytest.mark.parametrize(("yaml_text", "args", "needles"), [
    ("model:\n  d_model: [64\n", [], ["not valid YAML", "line 2"]),
    ("model:\n  d_model: 64\n  num_head: 4\n", [], ["model.num_head", "num_heads"]),
    ("training:\n  batch_size: lots\n", [], ["training.batch_size", "lots", "integer"]),
    ("- just\n- a list\n", [], ["mapping"]),
    ("", ["--learning-rate", "0"], ["training.learning_rate", "greater than 0"]),
    ("", ["--learning-rate", "fast"], ["--learning-rate", "fast"]),
    ("", ["--batch-size", "0"], ["training.batch_size"]),
    ("", ["--set", "model.dropout=1.0"], ["model.dropout", "less than 1"]),
    ("", ["--set", "model.num_heads=3"], ["divisible by model.num_heads (3)"]),
    ("", ["--set", "training.validation_split=0"], ["training.validation_split"]),
])
def test_bad_configuration(tmp_path: Path, corpus: Path, yaml_text: str, args: list[str], needles: list[str]) -> None:
    config = _write(tmp_path / "my.yaml", yaml_text)
    before = snapshot(tmp_path)
    result = run_cli("train", corpus, "--config", config, "-o", tmp_path / "run", *args)
    assert_clean_error(result, *needles)
    assert snapshot(tmp_path) == before


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


def test_a_device_that_is_not_there(corpus: Path, tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        assert_clean_error(run_cli("train", corpus, "-o", tmp_path / "run", "--device", "cuda", *TINY),
                           "--device cuda", "no CUDA GPU")
    assert_clean_error(run_cli("train", corpus, "-o", tmp_path / "run", "--device", "cuda:99", *TINY),
                       "--device cuda:99")
    assert_clean_error(run_cli("train", corpus, "-o", tmp_path / "run", "--device", "tpu", *TINY), "--device tpu")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------
# Output directories that hold something else


def test_existing_run_is_not_overwritten_without_asking(run_dir: Path, corpus: Path) -> None:
    before = snapshot(run_dir)
    result = run_cli("train", corpus, "-o", run_dir, *TINY)
    assert_clean_error(result, "already holds a run", "--resume auto", "--overwrite")
    assert snapshot(run_dir) == before


def test_overwrite_replaces_a_run_only_once_the_new_one_starts(corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_tiny(corpus, run, "--epochs", "2")
    before = snapshot(run)
    bad = run_cli("train", tmp_path / "missing.txt", "-o", run, "--overwrite", *TINY)
    assert_clean_error(bad, "does not exist")
    assert snapshot(run) == before  # a failed --overwrite run must not have deleted anything
    train_tiny(corpus, run, "--epochs", "1", "--overwrite")
    assert not (run / "checkpoint_epoch_2.pt").exists()


def test_output_dir_that_is_a_file(corpus: Path, tmp_path: Path) -> None:
    target = _write(tmp_path / "taken", "a file")
    assert_clean_error(run_cli("train", corpus, "-o", target, *TINY), "is a file")
    assert target.read_text() == "a file"


def test_training_into_a_folder_of_ones_own_files_keeps_them(corpus: Path, tmp_path: Path) -> None:
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / ".tmp-notes.md").write_text("keep me")
    (mine / "notes.txt").write_text("mine too")
    train_tiny(corpus, mine, "--epochs", "1")
    assert (mine / ".tmp-notes.md").read_text() == "keep me" and (mine / "notes.txt").read_text() == "mine too"


# ---------------------------------------------------------------------------------------------------------
# Generation and evaluation input


@pytest.mark.parametrize(("args", "needles"), [
    (["-p", "§ 12", "--strict"], ["prompt", "'§'", "never saw"]),  # alice.txt has no '§'
    (["-p", "a" * 40], ["prompt is 40 characters", "context holds 32"]),
    (["-p", "A", "--max-tokens", "0"], ["--max-tokens"]),
    (["-p", "A", "--top-p", "0"], ["--top-p"]),
    (["-p", "A", "--top-p", "1.5"], ["--top-p"]),
    (["-p", "A", "--top-k", "-1"], ["--top-k"]),
    (["-p", "A", "--temperature", "-1"], ["--temperature"]),
    (["-p", "A", "--temperature", "nan"], ["--temperature", "not a finite number"]),
    (["-p", "A", "--top-p", "nan"], ["--top-p", "not a finite number"]),
    (["-p", "A", "--device", "cuda:99"], ["--device cuda:99"]),
])
def test_bad_generation_input(run_dir: Path, args: list[str], needles: list[str]) -> None:
    assert_clean_error(run_cli("generate", run_dir / "final_model.pt", *args), *needles)


def test_tiny_temperature_is_greedy_not_a_crash(run_dir: Path) -> None:
    args = ["generate", run_dir / "final_model.pt", "-p", "Alice:", "--max-tokens", "30"]
    cold = run_cli(*args, "--temperature", "1e-40", "--seed", "3")
    assert cold.exit_code == 0, cold.stderr
    assert cold.stdout == run_cli(*args, "--temperature", "0").stdout


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


def test_evaluate_missing_data(run_dir: Path, tmp_path: Path) -> None:
    assert_clean_error(run_cli("evaluate", run_dir / "final_model.pt", tmp_path / "gone.txt"), "does not exist")


def test_interactive_generation_ends_cleanly_at_eof(run_dir: Path) -> None:
    controller, terminal = pty.openpty()  # a real terminal for stdin, as a person at a keyboard has
    proc = subprocess.Popen([sys.executable, "-m", "fundamentallm", "generate", str(run_dir / "final_model.pt"),
                             "--max-tokens", "20", "--seed", "0"], stdin=terminal, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=subprocess_env())
    os.close(terminal)
    # The terminal hands the program one line per read, and Ctrl-D at the start of a line as the end, so all
    # three can be typed ahead: the program reads them in order whenever it gets to them.
    os.write(controller, b"a" * 40 + b"\n")  # a bad prompt (longer than the context): reported, the session goes on
    os.write(controller, b"First\n")
    os.write(controller, b"\x04")  # Ctrl-D
    stdout, stderr = proc.communicate(timeout=HANG_GUARD)
    os.close(controller)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "context holds 32" in stderr
    assert stdout.count("First") == 1 and len(stdout.split("First", 1)[1].rstrip("\n")) >= 20


# ---------------------------------------------------------------------------------------------------------
# Usage errors, torchrun processes that disagree, and the smaller promises


def test_help_and_missing_arguments_are_usage_errors() -> None:
    result = run_subprocess("train")
    assert result.returncode == 2 and "missing DATA" in result.stderr and "Traceback" not in result.stderr
    assert run_subprocess("generate").returncode == 2


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
    result = in_private_tmpfs_or_none(script, "ro,size=1m", tmp_path)
    if result is not None:
        assert_one_line(result, "read-only file system")
