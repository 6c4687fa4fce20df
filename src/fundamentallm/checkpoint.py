"""The one owner of the checkpoint format: what is in a .pt file, how it is written, how it is read.

A checkpoint is a single torch.save archive holding only tensors and plain data (dicts, lists, numbers,
strings). It is loaded with torch.load(weights_only=True), which refuses anything else, so opening a checkpoint
never runs code from it. Each file is self-contained: weights, the resolved config and the tokenizer, so that
generate and evaluate need nothing but the file. Training checkpoints also carry everything needed to resume
exactly: optimizer, gradient scaler, data sampler and RNG states, counters.

Files are written atomically (files.atomic_write): a crash mid-save never damages an earlier checkpoint.
"""

from __future__ import annotations

import hashlib
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fundamentallm import __version__
from fundamentallm.config import Config, config_from_dict
from fundamentallm.console import warn
from fundamentallm.errors import UserError
from fundamentallm.files import atomic_write
from fundamentallm.model import GPT
from fundamentallm.tokenizer import CharTokenizer

FORMAT = "fundamentallm-checkpoint"
FORMAT_VERSION = 1

BEST = "best_model.pt"
FINAL = "final_model.pt"
INTERRUPTED = "interrupted.pt"
_PERIODIC = re.compile(r"^checkpoint_epoch_(\d+)\.pt$")


def periodic_name(epoch: int) -> str:
    return f"checkpoint_epoch_{epoch}.pt"


def save_checkpoint(path: Path, *, model: GPT, config: Config, tokenizer: CharTokenizer, data: dict[str, Any],
                    progress: dict[str, Any], training_state: dict[str, Any] | None = None) -> None:
    """Write a checkpoint atomically. `training_state` (optimizer, RNGs, ...) makes it resumable."""
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fundamentallm_version": __version__,
        "config": config.to_dict(),
        "tokenizer": tokenizer.to_dict(),
        "model": model.state_dict(),
        "data": data,
        "progress": progress,
    }
    if training_state is not None:
        payload["training_state"] = training_state
    payload["checksum"] = _checksum(payload)
    atomic_write(Path(path), lambda f: torch.save(payload, f))


def read_checkpoint(path: Path | str) -> dict[str, Any]:
    """Load and check a checkpoint's raw contents; every way it can be wrong becomes one clear UserError."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    if path.is_dir():
        candidates = sorted(p.name for p in path.glob("*.pt"))
        hint = f" (it holds {', '.join(candidates)})" if candidates else ""
        raise UserError(f"{path} is a directory; give a checkpoint file such as {path / FINAL}{hint}")
    try:
        with warnings.catch_warnings():  # torch's advice about foreign pickles is noise next to our error
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "global" in str(exc).lower():  # the pickle names a Python callable or class: never run it
            raise UserError(f"{path} holds Python objects other than tensors and plain data; refusing to load "
                            f"it, because that could run code. FundamentaLLM checkpoints never contain such "
                            f"objects") from None
        raise UserError(f"{path} is not a readable checkpoint: it is corrupted or not a PyTorch file") from None
    except Exception as exc:  # torch.load fails in many ways on foreign bytes (IndexError, KeyError, ...)
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path} is not a readable checkpoint: it is truncated, corrupted or not a PyTorch "
                        f"file ({detail})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        looks = "a plain PyTorch state dict" if isinstance(payload, dict) and payload and all(
            isinstance(v, torch.Tensor) for v in payload.values()) else "some other PyTorch file"
        raise UserError(f"{path} is {looks}, not a FundamentaLLM checkpoint (no '{FORMAT}' marker); "
                        f"only files written by 'fundamentallm train' can be loaded")
    version = payload.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION or version < 1:
        raise UserError(f"{path} has checkpoint format version {version!r}, but this FundamentaLLM "
                        f"({__version__}) reads version {FORMAT_VERSION}; upgrade FundamentaLLM to load it")
    for key in ("config", "tokenizer", "model", "progress", "data", "checksum"):
        if key not in payload:
            raise UserError(f"{path} is damaged: its '{key}' entry is missing")
    if not _well_formed(payload):
        raise UserError(f"{path} is damaged: its entries do not have the structure FundamentaLLM writes")
    if payload["checksum"] != _checksum(payload):
        raise UserError(f"{path} is corrupted: its contents do not match the checksum written with them; use "
                        f"another checkpoint (e.g. an earlier checkpoint_epoch_N.pt)")
    return payload


def _well_formed(payload: dict[str, Any]) -> bool:
    """The shapes the rest of the program relies on, so that a crafted file fails here with one clear error."""
    config, progress, state = payload["config"], payload["progress"], payload.get("training_state")
    return (isinstance(config, dict) and isinstance(config.get("model"), dict)
            and isinstance(config.get("training"), dict) and isinstance(payload["tokenizer"], dict)
            and isinstance(payload["model"], dict)
            and all(isinstance(v, torch.Tensor) for v in payload["model"].values())
            and isinstance(progress, dict) and isinstance(progress.get("step"), int)
            and isinstance(payload["data"], dict) and isinstance(payload["data"].get("files", []), list)
            and (state is None or (isinstance(state, dict)
                                   and {"optimizer", "scaler", "sampler", "rng"} <= state.keys())))


def _checksum(payload: dict[str, Any]) -> str:
    """SHA-256 (hardware-accelerated on most CPUs) over every tensor's bytes and every plain value, in a fixed
    order; catches bit rot and partial overwrites that the zip container itself does not notice."""
    digest = hashlib.sha256()

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"T{t.dtype}{tuple(value.shape)}".encode())
            if t.numel():
                digest.update(memoryview(t.view(torch.uint8).numpy()))
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                if key != "checksum":
                    digest.update(f"K{key!r}".encode())
                    visit(value[key])
        elif isinstance(value, (list, tuple)):
            digest.update(f"L{len(value)}".encode())
            for item in value:
                visit(item)
        else:
            digest.update(f"V{value!r}".encode())

    visit(payload)
    return digest.hexdigest()


@dataclass
class LoadedModel:
    model: GPT
    tokenizer: CharTokenizer
    config: Config
    payload: dict[str, Any]


def load_model(path: Path | str, device: torch.device | str = "cpu") -> LoadedModel:
    """Rebuild the model (and tokenizer, config) stored in a checkpoint, in eval mode on `device`."""
    payload = read_checkpoint(path)
    config = config_from_dict(payload["config"], f"checkpoint {path}")
    try:
        tokenizer = CharTokenizer.from_dict(payload["tokenizer"])
    except (ValueError, TypeError, AttributeError) as exc:
        raise UserError(f"{path} is damaged: its tokenizer is unreadable ({exc})") from None
    model = GPT.from_config(config, tokenizer.vocab_size)
    try:
        model.load_state_dict(payload["model"])
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = str(exc).splitlines()[0]
        raise UserError(f"{path} is damaged: its weights do not match its model config ({first})") from None
    model.to(device).eval()
    return LoadedModel(model, tokenizer, config, payload)


# ----------------------------------------------------------------------------------------------------------
# Files in a run directory


def periodic_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    found = []
    for p in Path(directory).glob("checkpoint_epoch_*.pt"):
        match = _PERIODIC.match(p.name)
        if match:
            found.append((int(match.group(1)), p))
    return sorted(found)


def prune_periodic(directory: Path, keep_last_n: int) -> None:
    """Keep the newest `keep_last_n` checkpoint_epoch_N.pt files (0 keeps all)."""
    if keep_last_n <= 0:
        return
    for _, path in periodic_checkpoints(directory)[:-keep_last_n]:
        path.unlink(missing_ok=True)


def recorded_step(path: Path) -> int | None:
    """The step a checkpoint was saved at, read cheaply (memory-mapped, no checksum); None if unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(payload["progress"]["step"])
    except Exception:  # damaged or foreign: not a checkpoint that could be mixed up with this run
        return None


def later_checkpoints(directory: Path, step: int) -> list[Path]:
    """Checkpoints in `directory` saved after `step`: what resuming there from an earlier one would orphan."""
    candidates = [p for _, p in periodic_checkpoints(directory)]
    candidates += [p for p in (Path(directory) / INTERRUPTED, Path(directory) / FINAL) if p.exists()]
    return [p for p in candidates if (recorded_step(p) or 0) > step]


def find_resumable(directory: Path) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint in `directory` that is furthest along and loads; damaged files are skipped with a warning.

    Candidates are ranked by the step they record (read cheaply), and only then fully loaded and verified, best
    first: for a large model that reads one checkpoint instead of all of them."""
    directory = Path(directory)
    candidates = [p for _, p in periodic_checkpoints(directory)]
    candidates += [p for p in (directory / INTERRUPTED, directory / FINAL) if p.exists()]
    ranked = []
    for path in candidates:
        step = recorded_step(path)
        if step is None:  # not even the step can be read: say what is wrong with it
            try:
                step = int(read_checkpoint(path)["progress"]["step"])
            except UserError as exc:
                warn(f"skipping {path.name}: {exc}")
                continue
        ranked.append((step, path.stat().st_mtime, path))
    for _, _, path in sorted(ranked, reverse=True):
        try:
            payload = read_checkpoint(path)
        except UserError as exc:
            warn(f"skipping {path.name}: {exc}")
            continue
        if "training_state" in payload:
            return path, payload
    return None
