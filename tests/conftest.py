"""Shared fixtures: a real corpus kept in the repository (examples/alice.txt), isolation, one CPU thread."""

from __future__ import annotations

import os
import random
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
from helpers import ALICE, train_tiny


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


# Finished tiny runs and texts, one per test module that asks (module scope), shared by its tests that only read
# or copy them.


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, alice: str) -> Path:
    """One finished tiny run (context 32), shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("shared-run")
    corpus = root / "corpus.txt"
    corpus.write_text(alice[:40_000])
    os.environ["FUNDAMENTALLM_CACHE_DIR"] = str(root / "cache")
    train_tiny(corpus, root / "run", "--epochs", "1")
    return root / "run"


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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished tiny run (4 steps on 8,000 characters of alice.txt) shared by the tests that only read it or
    copy it: its directory, with final_model.pt, best_model.pt, config.yaml and metrics.jsonl."""
    from helpers import train_tiny

    root = tmp_path_factory.mktemp("tiny-run")
    text = root / "text.txt"
    text.write_text(ALICE.read_text(encoding="utf-8")[:8_000], encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FUNDAMENTALLM_CACHE_DIR", str(root / "token-cache"))
        mp.chdir(root)
        train_tiny(text, root / "run", "--max-steps", "4")
    return root / "run"
