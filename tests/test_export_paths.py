"""export's file-system failures are one line, and nothing is lost: an output under a file, a read-only file
system, `.` or `..`, a full disk, a training run's directory or the directory holding the source under
--overwrite, a symlinked -o and SIGTERM mid-export. The old export (or nothing) stays; no hidden directory is
left behind."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import assert_clean_error, in_private_tmpfs_or_none, run_cli, snapshot, subprocess_env, wait_for

pytest.importorskip("safetensors")


def assert_one_line(result, *needles: str, code: int = 2) -> None:
    assert_clean_error(result, *needles, code=code)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr


def hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.fixture
def model(tiny_run: Path, tmp_path: Path) -> Path:
    path = tmp_path / "model.pt"
    shutil.copy(tiny_run / "final_model.pt", path)
    return path


def export(model: Path, out: Path | str, *extra: str):
    return run_cli("export", model, "-o", out, "--format", "safetensors", *extra)


def test_an_output_under_a_file_or_in_proc_is_one_line(model: Path, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine\n")
    before = snapshot(tmp_path)
    assert_one_line(export(model, tmp_path / "notes.txt" / "out"), "notes.txt is a file, not a directory")
    assert_one_line(export(model, tmp_path / "notes.txt"), "is a file")
    assert_one_line(export(model, "/proc/no-such-dir/out"), "cannot write to")
    (tmp_path / "loop-a").symlink_to(tmp_path / "loop-b")
    (tmp_path / "loop-b").symlink_to(tmp_path / "loop-a")
    assert_one_line(export(model, tmp_path / "loop-a" / "out"), "cannot be resolved")
    assert snapshot(tmp_path) == before and hidden(tmp_path) == []


@pytest.mark.parametrize("where", [".", "..", "./", "/"])
def test_the_current_directory_and_those_above_are_never_replaced(where: str, model: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("mine\n")
    os.chdir(work)
    before = snapshot(tmp_path)
    for extra in ([], ["--overwrite"]):
        assert_one_line(export(model, where, *extra), "current directory or one above it")
    assert snapshot(tmp_path) == before and hidden(tmp_path) == [] and hidden(work) == []


def test_overwrite_never_deletes_a_run_or_the_source(model: Path, tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = snapshot(tmp_path)
    # A run directory, exporting a checkpoint from elsewhere ...
    assert_one_line(export(model, run, "--overwrite"), "training run's directory", "would delete the run")
    # ... the run's own checkpoint into its own directory ...
    assert_one_line(run_cli("export", run / "final_model.pt", "-o", run, "--overwrite"), "checkpoint being exported")
    # ... and a directory that merely holds the source somewhere below it.
    nested = tmp_path / "mine" / "deep"
    nested.mkdir(parents=True)
    shutil.copy(model, nested / "m.pt")
    assert_one_line(run_cli("export", nested / "m.pt", "-o", tmp_path / "mine", "--overwrite",
                            "--format", "safetensors"), "m.pt, the checkpoint being exported")
    after = snapshot(tmp_path)
    assert after.pop("mine/deep/m.pt") and after == before and hidden(tmp_path) == []
    # An earlier export is what --overwrite is for.
    assert export(model, tmp_path / "exported").exit_code == 0
    assert export(model, tmp_path / "exported", "--overwrite").exit_code == 0


def test_a_symlinked_output_exports_into_its_target(model: Path, tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    for extra in ([], ["--overwrite"]):
        result = export(model, tmp_path / "link", *extra)
        assert result.exit_code == 0, result.stderr
        assert (tmp_path / "link").is_symlink() and (real / "model.safetensors").is_file()
        assert hidden(tmp_path) == []
    assert sorted(p.name for p in real.iterdir()) == ["fundamentallm.json", "model.safetensors"]


def test_a_full_disk_is_one_line_and_keeps_the_old_export(model: Path, tmp_path: Path) -> None:
    """60 KB hold a first safetensors export (about 50 KB), not a second beside it, nor the hf or ONNX export."""
    export_ = f'"$PY" -m fundamentallm export {model} -o "$FS/out"'
    script = (f'{export_} --format safetensors || exit 3\n'
              f'for f in safetensors hf onnx; do {export_} --format $f --overwrite 2>>"$FS/../err.txt"; '
              f'echo $? >>"$FS/../rc.txt"; done\n'
              f'ls -A "$FS" >"$FS/../left.txt"; ls -A "$FS/out" >"$FS/../kept.txt"')
    result = in_private_tmpfs_or_none(script, "size=60k", tmp_path)
    if result is None:
        pytest.skip("this machine lets no test mount a tmpfs")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "rc.txt").read_text().split() == ["1", "1", "1"]
    errors = (tmp_path / "err.txt").read_text().strip().splitlines()
    assert len(errors) == 3 and all(e.startswith("error: the disk is full while writing") for e in errors), errors
    # The advice is an export's: the earlier export stays, free space or choose another -o (no --resume).
    assert all(e.endswith("/out is kept as it was. Free some space or choose another -o, and export again")
               for e in errors), errors
    assert (tmp_path / "left.txt").read_text().split() == ["out"]  # no hidden directory
    assert (tmp_path / "kept.txt").read_text().split() == ["fundamentallm.json", "model.safetensors"]


def test_a_read_only_file_system_is_named(model: Path, tmp_path: Path) -> None:
    script = (f'"$PY" -m fundamentallm export {model} -o "$FS/out" --format safetensors 2>/dev/null; '
              f'echo $? >"$FS/../rc.txt"; "$PY" -m fundamentallm export {model} -o "$FS/a/b" --format hf')
    result = in_private_tmpfs_or_none(script, "ro,size=1m", tmp_path)
    if result is None:
        pytest.skip("this machine lets no test mount a tmpfs")
    assert (tmp_path / "rc.txt").read_text().strip() == "2"
    assert_one_line(result, "read-only file system", "choose another -o")


def test_sigterm_mid_export_leaves_the_old_export_and_no_hidden_directory(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert export(model, out).exit_code == 0
    before = snapshot(out)
    # A slow disk (test hook) keeps the export writing when the signal comes.
    proc = subprocess.Popen([sys.executable, "-m", "fundamentallm", "export", str(model), "-o", str(out),
                             "--format", "safetensors", "--overwrite"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=subprocess_env(FUNDAMENTALLM_TEST_SLOW_WRITE="30"))
    try:
        wait_for(lambda: any(n.startswith(".out.export-") for n in hidden(tmp_path)), proc, "the export to start")
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143 and "Traceback" not in stderr, stderr
    assert hidden(tmp_path) == [] and snapshot(out) == before


def test_hidden_directories_of_a_killed_export_are_removed_next_time(model: Path, tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has ended
    for kind in ("export", "replaced"):
        (tmp_path / f".out.{kind}-{pid}").mkdir()
        (tmp_path / f".out.{kind}-{pid}" / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".out.export-1").mkdir()  # pid 1 is alive: another export may be writing it
    assert export(model, tmp_path / "out").exit_code == 0
    assert hidden(tmp_path) == [".out.export-1"]
