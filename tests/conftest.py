"""Shared fixtures: real corpora from ../shared/data, tiny configs, and the real CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import SHAKESPEARE


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets its own token cache and working directory, and a seeded torch."""
    monkeypatch.setenv("FUNDAMENTALLM_CACHE_DIR", str(tmp_path / "token-cache"))
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shakespeare() -> Path:
    if not SHAKESPEARE.exists():
        pytest.skip(f"{SHAKESPEARE} is missing (the shared corpora live beside the repository)")
    return SHAKESPEARE


@pytest.fixture
def corpus(tmp_path: Path, shakespeare: Path) -> Path:
    """The first 40,000 characters of tinyshakespeare, as a file of the test's own."""
    path = tmp_path / "corpus.txt"
    path.write_text(shakespeare.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    return path
