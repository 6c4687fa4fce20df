"""A busy machine: PyTorch's CPU threads spin only briefly before they sleep, in every command and in this test
suite, unless the user chose otherwise (the figures are in the benchmark results; benchmarks/busy.py measures)."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import subprocess_env

# What a command's process sees once its torch is loaded: the package is imported first by every entry point
# (`fundamentallm`, `python -m fundamentallm`, torchrun -m fundamentallm), before any torch import.
_PROBE = "import fundamentallm.cli, os, torch; print(os.environ.get('GOMP_SPINCOUNT'))"


def _spin(**env: str) -> str:
    clean = {k: v for k, v in subprocess_env().items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    return subprocess.run([sys.executable, "-c", _PROBE], env={**clean, **env}, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_threads_spin_briefly_unless_the_user_says_otherwise() -> None:
    assert _spin() == "3000"
    assert _spin(GOMP_SPINCOUNT="50") == "50"  # the user's own setting wins
    assert _spin(OMP_WAIT_POLICY="PASSIVE") == "None"  # so does a wait policy
    if "OMP_WAIT_POLICY" not in os.environ:  # this process too (conftest imports fundamentallm before torch)
        assert os.environ.get("GOMP_SPINCOUNT")
