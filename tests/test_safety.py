"""Safe loading and bad input: one clear message, the right exit code, no traceback, nothing existing changed."""

from __future__ import annotations

import gzip
import os
import pickle
import pty
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import HANG_GUARD, TINY, assert_clean_error, run_cli, run_subprocess, snapshot, subprocess_env, train_tiny

from fundamentallm.checkpoint import FORMAT_VERSION, _checksum, read_checkpoint


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, alice: str) -> Path:
    """One finished tiny run (context 32), shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("shared-run")
    corpus = root / "corpus.txt"
    corpus.write_text(alice[:40_000])
    os.environ["FUNDAMENTALLM_CACHE_DIR"] = str(root / "cache")
    train_tiny(corpus, root / "run", "--epochs", "1")
    return root / "run"


# ---------------------------------------------------------------------------------------------------------
# Checkpoints that are not what they claim


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {Path.cwd() / 'pwned'}",))


def _bad_checkpoints(tmp: Path, good: Path) -> dict[str, tuple[Path, str]]:
    data = good.read_bytes()
    files: dict[str, tuple[Path, str]] = {}
    (tmp / "truncated.pt").write_bytes(data[: len(data) // 2])
    files["truncated"] = (tmp / "truncated.pt", "truncated, corrupted")
    flipped = bytearray(data)
    for i in range(len(data) // 2, len(data) // 2 + 64):
        flipped[i] ^= 0xFF
    (tmp / "flipped.pt").write_bytes(bytes(flipped))
    files["corrupted"] = (tmp / "flipped.pt", "corrupted")
    (tmp / "notes.pt").write_text("these are my notes, not a model\n")
    files["text renamed .pt"] = (tmp / "notes.pt", "not a readable checkpoint")
    torch.save(torch.nn.Linear(4, 4).state_dict(), tmp / "state_dict.pt")
    files["plain state dict"] = (tmp / "state_dict.pt", "plain PyTorch state dict")
    torch.save({"model": _Evil()}, tmp / "evil.pt")
    files["malicious pickle"] = (tmp / "evil.pt", "refusing to load")
    (tmp / "evil.pkl").write_bytes(pickle.dumps(_Evil()))
    files["malicious raw pickle"] = (tmp / "evil.pkl", "not a readable checkpoint")
    crafted = torch.load(good, weights_only=True)
    crafted["progress"] = "step 1"  # the wrong structure, under a checksum that matches it
    crafted["checksum"] = _checksum(crafted)
    torch.save(crafted, tmp / "crafted.pt")
    files["crafted structure"] = (tmp / "crafted.pt", "structure")
    payload = torch.load(good, weights_only=True)
    payload["format_version"] = FORMAT_VERSION + 1
    torch.save(payload, tmp / "future.pt")
    files["newer format"] = (tmp / "future.pt", f"format version {FORMAT_VERSION + 1}")
    files["directory"] = (good.parent, "is a directory")
    files["missing"] = (tmp / "nope.pt", "does not exist")
    return files


def test_bad_checkpoints_are_refused_everywhere(run_dir: Path, tmp_path: Path) -> None:
    for name, (path, needle) in _bad_checkpoints(tmp_path, run_dir / "final_model.pt").items():
        before = snapshot(tmp_path)
        for args in (["generate", path, "-p", "A"], ["evaluate", path],
                     ["train", "--resume", path, "-o", tmp_path / "resumed"]):
            result = run_cli(*args)
            assert_clean_error(result, needle)
            assert str(path.name) in result.stderr, (name, result.stderr)
        assert snapshot(tmp_path) == before, name
    assert not (tmp_path / "pwned").exists(), "loading a checkpoint executed code"


def test_every_checkpoint_loads_with_weights_only(run_dir: Path) -> None:
    for path in run_dir.glob("*.pt"):
        payload = torch.load(path, weights_only=True)  # would raise on anything but tensors and plain data
        assert payload["format_version"] == FORMAT_VERSION
        read_checkpoint(path)


def test_resuming_from_weights_only_checkpoint_says_what_to_use(run_dir: Path, tmp_path: Path) -> None:
    assert_clean_error(run_cli("train", "--resume", run_dir / "best_model.pt", "-o", tmp_path / "r"),
                       "weights only", "checkpoint_epoch_N.pt")


# ---------------------------------------------------------------------------------------------------------
# Bad training input


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


def _in_private_tmpfs(script: str, mount_options: str, tmp: Path) -> subprocess.CompletedProcess:
    """Run a shell script in a private mount namespace with a tmpfs at $FS (gone when the script ends)."""
    # What this needs is part of the test: without it the test fails (saying what is missing), it never skips.
    assert shutil.which("unshare"), "this test needs unshare(1) (util-linux) to mount a private tmpfs"
    fs = tmp / "fs"
    fs.mkdir()
    wrapper = f'mount -t tmpfs -o {mount_options} tmpfs "$FS" || exit 77\n{script}'
    cmd = ["unshare", "--mount"] + (["--map-root-user"] if os.geteuid() != 0 else []) + ["sh", "-c", wrapper]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_GUARD,
                            env=subprocess_env(FS=str(fs), PY=sys.executable))
    assert result.returncode != 77, (f"cannot mount a private tmpfs here ({result.stderr.strip()}); this test needs "
                                     f"unprivileged user namespaces (or root)")
    return result


def test_training_into_a_folder_of_ones_own_files_keeps_them(corpus: Path, tmp_path: Path) -> None:
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / ".tmp-notes.md").write_text("keep me")
    (mine / "notes.txt").write_text("mine too")
    train_tiny(corpus, mine, "--epochs", "1")
    assert (mine / ".tmp-notes.md").read_text() == "keep me" and (mine / "notes.txt").read_text() == "mine too"


def test_unwritable_output_directory(corpus: Path, tmp_path: Path) -> None:
    result = _in_private_tmpfs(f'"$PY" -m fundamentallm train {corpus} -o "$FS/run" {" ".join(TINY)}',
                               "ro,size=1m", tmp_path)
    assert_clean_error(result, "cannot write")


def test_full_disk_while_saving_keeps_earlier_checkpoints(corpus: Path, tmp_path: Path) -> None:
    keep = tmp_path / "survivors"
    # 600 KB holds the first epochs' checkpoints (~170 KB each with optimizer state), not all five.
    script = (f'"$PY" -m fundamentallm train {corpus} -o "$FS/run" {" ".join(TINY)} --epochs 5 '
              f'--set training.keep_last_n=0 >"$FS/../out.txt" 2>"$FS/../err.txt"; echo $? >"$FS/../rc.txt"; '
              f'cp -r "$FS/run" {keep}')
    _in_private_tmpfs(script, "size=600k", tmp_path)
    rc, err = int((tmp_path / "rc.txt").read_text()), (tmp_path / "err.txt").read_text()
    assert rc == 1 and "Traceback" not in err and "disk is full" in err and "--resume auto" in err, err
    saved = sorted(keep.glob("*.pt"))
    assert saved, "no checkpoint was saved before the disk filled up"
    for path in saved:
        read_checkpoint(path)
    assert not list(keep.glob(".fundamentallm-tmp-*"))


def test_a_device_that_is_not_there(corpus: Path, tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        assert_clean_error(run_cli("train", corpus, "-o", tmp_path / "run", "--device", "cuda", *TINY),
                           "--device cuda", "no CUDA GPU")
    assert_clean_error(run_cli("train", corpus, "-o", tmp_path / "run", "--device", "cuda:99", *TINY),
                       "--device cuda:99")
    assert_clean_error(run_cli("train", corpus, "-o", tmp_path / "run", "--device", "tpu", *TINY), "--device tpu")
    assert not (tmp_path / "run").exists()


def test_nan_loss_stops_with_remedies_and_keeps_checkpoints(corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_tiny(corpus, run, "--epochs", "1")
    checkpoints = {p.name: p.read_bytes() for p in run.glob("*.pt")}
    result = run_cli("train", "--resume", "auto", "-o", run, "--epochs", "2", "--learning-rate", "1e30",
                     "--set", "training.gradient_clip_norm=null", "--set", "training.scheduler=constant")
    assert_clean_error(result, "loss became", "at step", "Lower the learning rate", "gradient clipping", code=1)
    assert {p.name: p.read_bytes() for p in run.glob("*.pt")} == checkpoints


def test_out_of_memory_names_the_remedies_in_order(corpus: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # The GPU is what is outside the program here: simulate the allocator's failure on the first forward pass.
    from fundamentallm.model import GPT

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.34 GiB")

    monkeypatch.setattr(GPT, "forward", oom)
    result = run_cli("train", corpus, "-o", tmp_path / "run", *TINY)
    assert_clean_error(result, "out of memory", code=1)
    message = result.stderr
    assert message.index("--batch-size 4") < message.index("--config small") < message.index("--sequence-length 16")
    assert "gradient_accumulation_steps=2" in message


# ---------------------------------------------------------------------------------------------------------
# Bad generation input


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


def test_help_and_missing_arguments_are_usage_errors() -> None:
    result = run_subprocess("train")
    assert result.returncode == 2 and "missing DATA" in result.stderr and "Traceback" not in result.stderr
    assert run_subprocess("generate").returncode == 2
