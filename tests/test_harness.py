"""The test suite itself: Ctrl-C stops it, even while a test trains a model in-process."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import HANG_GUARD, freeze_when, subprocess_env, wait_for

from fundamentallm.metrics import read_metrics

# A test file like the suite's own: training runs, in-process through helpers.run_cli, one after another.
INNER_TEST = '''
import sys
sys.path.insert(0, {tests!r})
from helpers import TINY, run_cli

def test_one_training_run_after_another():
    for i in range(3):
        run_cli("train", {corpus!r}, "-o", {runs!r} + f"/run{{i}}", "--device", "cpu", *TINY, "--epochs", "50")
'''


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_stops_pytest_during_an_in_process_training_run(corpus: Path, tmp_path: Path, presses: int) -> None:
    # The first Ctrl-C lets the run save interrupted.pt and return; the second aborts that save (slowed down here
    # so that it is still going). Either way pytest must stop, not go on to the next run.
    runs = tmp_path / "runs"
    inner = tmp_path / "inner" / "test_inner.py"
    inner.parent.mkdir()
    inner.write_text(INNER_TEST.format(tests=str(Path(__file__).parent), corpus=str(corpus), runs=str(runs)))
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(inner)],
                            cwd=inner.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=subprocess_env(FUNDAMENTALLM_TEST_SLOW_WRITE="0.5"))
    first, second = runs / "run0", runs / "run1"
    try:
        freeze_when(proc, lambda: (first / "metrics.jsonl").exists()
                    and any(r["kind"] == "train" for r in read_metrics(first)), "the first run's first step")
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGCONT)
        if presses == 2:
            freeze_when(proc, lambda: list(first.glob(".fundamentallm-tmp-interrupted.pt*")),
                        "the save of interrupted.pt")
            proc.send_signal(signal.SIGINT)
            proc.send_signal(signal.SIGCONT)
        # Swallowed, the Ctrl-C would only end the first run, and the test would start the second.
        wait_for(lambda: proc.poll() is not None or second.exists(), what="pytest to stop")
        output = proc.communicate(timeout=HANG_GUARD)[0] if proc.poll() is not None else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert not second.exists(), "pytest went on to the next training run after Ctrl-C"
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, output
    assert "KeyboardInterrupt" in output
    # The run itself behaved as the command does: one Ctrl-C saves interrupted.pt, a second one quits without it.
    assert (first / "interrupted.pt").exists() == (presses == 1)
