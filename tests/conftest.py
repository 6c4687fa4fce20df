"""Shared fixtures: a real corpus kept in the repository (examples/alice.txt), isolation, one CPU thread."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

# fundamentallm before torch, as in every command: importing it settles how PyTorch's CPU threads wait (a short
# spin, see fundamentallm/__init__.py), which its OpenMP runtime reads once, when torch is first imported. Child
# processes inherit the setting through os.environ.
# isort: off
import fundamentallm  # noqa: F401
import torch
# isort: on
import pytest
from helpers import ALICE


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets its own token cache and working directory, and a seeded torch."""
    monkeypatch.setenv("FUNDAMENTALLM_CACHE_DIR", str(tmp_path / "token-cache"))
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test trains models of a few thousand parameters, where a second thread buys nothing; on a shared
    2-core machine it costs a lot (OpenMP threads spinning against other processes made one test 60x slower).
    Child processes get the same through helpers.subprocess_env (OMP_NUM_THREADS=1); the in-process CLI keeps
    the one thread because OMP_NUM_THREADS is set (device.set_threads)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def alice() -> str:
    """The text of examples/alice.txt (Alice's Adventures in Wonderland, 144,437 characters, public domain).
    Part of the repository: a test that cannot read it fails rather than skips."""
    return ALICE.read_text(encoding="utf-8")


@pytest.fixture
def corpus(tmp_path: Path, alice: str) -> Path:
    """The first 40,000 characters of alice.txt, as a file of the test's own (36,000 training characters: 141
    optimizer steps of 8 x 32 tokens per epoch with the TINY model)."""
    path = tmp_path / "corpus.txt"
    path.write_text(alice[:40_000], encoding="utf-8")
    return path
