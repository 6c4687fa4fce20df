"""The one owner of the checkpoint format: what is in a .pt file, how it is written, how it is read.

A checkpoint is a single torch.save archive holding only tensors and plain data (dicts, lists, numbers,
strings). It is loaded with torch.load(weights_only=True), which refuses anything else, so opening a checkpoint
never runs code from it. Each file is self-contained: weights, the resolved config and the tokenizer, so that
generate and evaluate need nothing but the file. Training checkpoints also carry everything needed to resume
exactly: optimizer, gradient scaler, data sampler and RNG states, counters.

Outside this module a checkpoint is a `Checkpoint` object; no other module knows the keys inside the file.
Files are written atomically (files.atomic_write): a crash mid-save never damages an earlier checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pickle
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fundamentallm import __version__
from fundamentallm.config import Config, config_from_dict
from fundamentallm.device import check_memory, model_memory
from fundamentallm.errors import UserError
from fundamentallm.files import atomic_write, is_regular, open_regular, read_regular
from fundamentallm.model import GPT
from fundamentallm.tokenizer import Tokenizer, tokenizer_from_dict

if TYPE_CHECKING:  # types only: readers of checkpoints (evaluate, generate) need no training code
    from fundamentallm.data import TokenData

FORMAT = "fundamentallm-checkpoint"
FORMAT_VERSION = 1


@dataclass
class TrainingProgress:
    """Counters that a checkpoint carries so that a resumed run continues exactly."""

    epochs_done: int = 0
    step: int = 0
    step_in_epoch: int = 0
    best_val_loss: float = math.inf
    evals_without_improvement: int = 0
    epoch_loss_sum: float = 0.0
    epoch_loss_steps: int = 0
    elapsed_seconds: float = 0.0
    tokens_seen: int = 0
    train_loss: float = math.nan
    val_loss: float = math.nan
    # Losses and gradient norms of the steps since the last train record, when an interruption cut the log
    # window short: the resumed run writes the record the uninterrupted run would have written.
    pending_losses: list[float] = field(default_factory=list)
    pending_norms: list[float] = field(default_factory=list)
    planned_steps: int = 0  # the run's steps, once a time budget has fixed them (0: not fixed)


@dataclass
class DataInfo:
    """What a run was trained on: resume refuses other data, evaluate finds the validation split again."""

    fingerprint: str = ""  # the token cache key (data.TokenData.fingerprint)
    files: list[str] = field(default_factory=list)
    num_chars: int = 0
    num_train_tokens: int = 0
    num_val_tokens: int = 0
    # Added with the byte and BPE tokenizers; checkpoints written before lack them (and read as these defaults).
    val_files: list[str] = field(default_factory=list)  # --val-data; empty: the end of `files` validates
    num_train_chars: int = 0
    num_val_chars: int = 0

    @classmethod
    def of(cls, data: TokenData) -> DataInfo:
        return cls(data.fingerprint, [str(f.resolve()) for f in data.files], data.num_chars, len(data.train),
                   len(data.val), [str(f.resolve()) for f in data.val_files], data.train_chars, data.val_chars)


@dataclass
class TrainingState:
    """What only a resumable checkpoint holds: the state dicts of the optimizer, gradient scaler and sampler,
    and the RNG states (with `per_rank` under torchrun: every process's dropout stream)."""

    optimizer: dict[str, Any]
    scaler: dict[str, Any]
    sampler: dict[str, Any]
    rng: dict[str, Any]


@dataclass
class Checkpoint:
    config: Config
    tokenizer: Tokenizer
    model_state: dict[str, torch.Tensor]
    data: DataInfo
    progress: TrainingProgress
    training_state: TrainingState | None = None  # None: weights only (best_model.pt)
    path: Path | None = None  # where it was read from


# ----------------------------------------------------------------------------------------------------------
# Writing and reading


def write_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """Write a checkpoint atomically; it is resumable when it has a training state."""
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fundamentallm_version": __version__,
        "config": checkpoint.config.to_dict(),
        "tokenizer": checkpoint.tokenizer.to_dict(),
        "model": checkpoint.model_state,
        "data": dataclasses.asdict(checkpoint.data),
        "progress": dataclasses.asdict(checkpoint.progress),
    }
    if checkpoint.training_state is not None:
        payload["training_state"] = dataclasses.asdict(checkpoint.training_state)
    payload["checksum"] = _checksum(payload)
    atomic_write(Path(path), lambda f: torch.save(payload, f))


def read_checkpoint(path: Path | str) -> Checkpoint:
    """Load and check a checkpoint (a .pt file, or a directory written by `export --format safetensors`); every
    way it can be wrong becomes one clear UserError."""
    path = Path(path)
    if os.path.lexists(path / WEIGHTS_DIR_JSON):  # a FIFO in its place is refused there, not taken for a .pt
        return _read_weights_dir(path)
    payload = _load_payload(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        looks = "a plain PyTorch state dict" if isinstance(payload, dict) and payload and all(
            isinstance(v, torch.Tensor) for v in payload.values()) else "some other PyTorch file"
        raise UserError(f"{path} is {looks}, not a FundamentaLLM checkpoint (no '{FORMAT}' marker); "
                        f"only files written by 'fundamentallm train' can be loaded")
    version = payload.get("format_version")
    if type(version) is not int or version > FORMAT_VERSION or version < 1:
        raise UserError(f"{path} has checkpoint format version {version!r}, but this FundamentaLLM "
                        f"({__version__}) reads version {FORMAT_VERSION}; upgrade FundamentaLLM to load it")
    for key in ("config", "tokenizer", "model", "progress", "data", "checksum"):
        if key not in payload:
            raise UserError(f"{path} is damaged: its '{key}' entry is missing")
    if payload["checksum"] != _checksum(payload):
        raise UserError(f"{path} is corrupted: its contents do not match the checksum written with them; use "
                        f"another checkpoint (e.g. an earlier checkpoint_epoch_N.pt)")
    return _parse(payload, path)


def _load_payload(path: Path) -> Any:
    if not os.path.lexists(path):
        raise UserError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise UserError(_directory_hint(path))
    f = open_regular(path, "checkpoint")  # a FIFO or device would block torch.load forever
    try:
        with warnings.catch_warnings():  # torch's advice about foreign pickles is noise next to our error
            warnings.simplefilter("ignore")
            with f:
                return torch.load(f, map_location="cpu", weights_only=True)
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


# ----------------------------------------------------------------------------------------------------------
# The same model without pickle: a directory of safetensors weights and a JSON record (export --format safetensors)


WEIGHTS_DIR_JSON = "fundamentallm.json"  # marks such a directory
WEIGHTS_DIR_FORMAT = "fundamentallm-safetensors"
WEIGHTS_DIR_VERSION = 1
WEIGHTS_FILE = "model.safetensors"


def write_weights_dir(checkpoint: Checkpoint, model: GPT, out: Path) -> None:
    """Weights as safetensors, config, tokenizer, data and progress as JSON (no training state)."""
    from safetensors.torch import save_model

    save_model(model, str(out / WEIGHTS_FILE))  # writes a tied embedding once
    record = {"format": WEIGHTS_DIR_FORMAT, "format_version": WEIGHTS_DIR_VERSION,
              "fundamentallm_version": __version__, "config": checkpoint.config.to_dict(),
              "tokenizer": checkpoint.tokenizer.to_dict(), "data": dataclasses.asdict(checkpoint.data),
              "progress": dataclasses.asdict(checkpoint.progress), "weights_sha256": _file_sha256(out / WEIGHTS_FILE)}
    (out / WEIGHTS_DIR_JSON).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


MAX_RECORD_BYTES = 64 << 20  # fundamentallm.json: a BPE vocabulary of 100,000 merges is a few MB
MAX_RECORD_DEPTH = 16  # its deepest entry (a tokenizer's) is 4 levels down


def _read_weights_dir(path: Path) -> Checkpoint:
    """A directory written by `export --format safetensors`, read with the bounds of a config file: regular files
    only, a size cap, a nesting cap, and every entry of the type FundamentaLLM writes."""
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise UserError(f"reading {path} needs safetensors: pip install 'fundamentallm[export]'") from None
    record = _read_record(path / WEIGHTS_DIR_JSON)
    version = record.get("format_version")
    if type(version) is not int or not 1 <= version <= WEIGHTS_DIR_VERSION:
        raise UserError(f"{path} has export format version {version!r}, but this FundamentaLLM ({__version__}) "
                        f"reads version {WEIGHTS_DIR_VERSION}; export the model again with this version")
    weights_path = path / WEIGHTS_FILE
    if not os.path.lexists(weights_path):
        raise UserError(f"{path} has no {WEIGHTS_FILE} beside its {WEIGHTS_DIR_JSON}; export the model again")
    if _file_sha256(weights_path) != record.get("weights_sha256"):
        raise UserError(f"{weights_path} does not match the checksum in {WEIGHTS_DIR_JSON}: it is damaged or "
                        f"was changed; export the model again")
    try:
        weights = load_file(str(weights_path))
    except (OSError, SafetensorError) as exc:
        raise UserError(f"{weights_path} is unreadable ({str(exc).splitlines()[0]})") from None
    config = record.get("config")
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict) or model.get("tie_embeddings", True) is True:
        for a, b in (("lm_head.weight", "tok_emb.weight"), ("tok_emb.weight", "lm_head.weight")):
            if a not in weights and b in weights:
                weights[a] = weights[b]  # the tied matrix is stored once
    payload = {"config": config, "tokenizer": record.get("tokenizer"), "model": weights,
               "data": record.get("data"), "progress": record.get("progress")}
    return _parse(payload, path, strict=True)


def _read_record(path: Path) -> dict[str, Any]:
    """fundamentallm.json: UTF-8 JSON of bounded size and depth, with the export's marker."""
    data = read_regular(path, MAX_RECORD_BYTES, hint="export the model again")
    try:
        record = json.loads(data.decode("utf-8"))
    except RecursionError:
        record = None  # nested past what json can read: far past the cap below
    except (UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{path} is not valid UTF-8 JSON ({str(exc)[:200]}); export the model again") from None
    if record is None or _depth(record, MAX_RECORD_DEPTH) > MAX_RECORD_DEPTH:
        raise UserError(f"{path} is refused: its values are nested deeper than {MAX_RECORD_DEPTH} levels, which "
                        f"no export writes; export the model again")
    if not isinstance(record, dict) or record.get("format") != WEIGHTS_DIR_FORMAT:
        raise UserError(f"{path} is not a FundamentaLLM export (no '{WEIGHTS_DIR_FORMAT}' marker)")
    return record


def _depth(value: Any, limit: int) -> int:
    """How deeply lists and objects nest in `value`, counted up to just past `limit`."""
    if limit < 0 or not isinstance(value, (dict, list)):
        return 0
    children = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(v, limit - 1) for v in children), default=0)


def _directory_hint(path: Path) -> str:
    """What to give instead of directory `path`, naming only files that are there."""
    candidates = sorted(p.name for p in path.glob("*.pt") if is_regular(p))
    if candidates:
        return (f"{path} is a directory; give a checkpoint file in it, such as {path / candidates[-1]} (it holds "
                f"{', '.join(candidates[:6])})")
    if (path / "config.json").exists() or (path / "model.onnx").exists():
        return (f"{path} is a transformers or ONNX export, which other programs read; FundamentaLLM reads a .pt "
                f"checkpoint or a directory written by export --format safetensors")
    return (f"{path} is a directory without a checkpoint; give a .pt checkpoint or a directory written by export "
            f"--format safetensors")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open_regular(path, hint="export the model again") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _Malformed(Exception):
    """An entry of the wrong type or shape; the message names it."""


def _parse(payload: dict[str, Any], path: Path, strict: bool = False) -> Checkpoint:
    """The typed checkpoint, checking every entry against the types of the dataclasses above (with `strict`, the
    config's too: no "32" for 32 or "true" for true, as JSON written by hand might have)."""
    try:
        return _parse_fields(payload, path, strict)
    except _Malformed as exc:
        raise UserError(f"{path} is damaged: its entries do not have the structure FundamentaLLM writes "
                        f"({exc})") from None


def _parse_fields(payload: dict[str, Any], path: Path, strict: bool) -> Checkpoint:
    if not isinstance(payload["config"], dict):
        raise _Malformed("config")
    config = config_from_dict(payload["config"], f"checkpoint {path}", strict=strict)
    try:
        tokenizer = tokenizer_from_dict(payload["tokenizer"])
    except (ValueError, TypeError, AttributeError) as exc:
        raise _Malformed(f"tokenizer: {exc}") from None
    with torch.device("meta"):  # the model the config describes, without allocating it
        shape = GPT.from_config(config, tokenizer.vocab_size)
    weights = _check_weights(payload["model"], shape)
    progress = _typed(TrainingProgress, payload["progress"], "progress")
    if min(progress.step, progress.epochs_done, progress.step_in_epoch, progress.tokens_seen,
           progress.planned_steps) < 0:
        raise _Malformed("progress: a negative counter")
    state = payload.get("training_state")
    if state is not None:
        state = _typed(TrainingState, state, "training_state")
        _check_training_state(state, [tuple(p.shape) for p in shape.parameters()], config.training.optimizer)
    return Checkpoint(config=config, tokenizer=tokenizer, model_state=weights,
                      data=_typed(DataInfo, payload["data"], "data"), progress=progress, training_state=state,
                      path=path)


def _check_weights(weights: Any, shape: GPT) -> dict[str, torch.Tensor]:
    """Exactly the tensors the config's model has, of the same shapes, all finite."""
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise _Malformed("model weights")
    expected = {name: tuple(t.shape) for name, t in shape.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in weights.items()}
    if found != expected:
        wrong = sorted(set(found.items()) ^ set(expected.items()), key=str)[:2]
        raise _Malformed(f"the weights do not match the model its config describes, e.g. {wrong}")
    for name, t in weights.items():
        if not t.is_floating_point():
            kind = "booleans" if t.dtype == torch.bool else f"integers ({t.dtype})"
            raise _Malformed(f"weights {name} are {kind}, not floating-point numbers")
        if not torch.isfinite(t).all():
            raise _Malformed(f"weights {name} hold NaN or infinite values")
    return weights


def _check_training_state(state: TrainingState, param_shapes: list[tuple[int, ...]], optimizer: str) -> None:
    """The optimizer, sampler and RNG states have the structure that PyTorch will accept without surprises."""
    states = state.optimizer.get("optimizers") if optimizer == "muon" else [state.optimizer]
    if not isinstance(states, list) or not states:
        raise _Malformed("training_state.optimizer")
    shapes = set(param_shapes) | {()}
    for opt in states:
        groups, per_param = (opt.get("param_groups"), opt.get("state")) if isinstance(opt, dict) else (None, None)
        if not isinstance(groups, list) or not isinstance(per_param, dict) or not all(
                isinstance(g, dict) and isinstance(g.get("params"), list)
                and all(type(i) is int and 0 <= i < len(param_shapes) for i in g["params"]) for g in groups):
            raise _Malformed("training_state.optimizer: param_groups")
        for values in per_param.values():
            if not isinstance(values, dict) or not all(
                    isinstance(v, torch.Tensor) and tuple(v.shape) in shapes and torch.isfinite(v).all()
                    for v in values.values()):
                raise _Malformed("training_state.optimizer: state")
    if not isinstance(state.scaler, dict) or not all(isinstance(v, (int, float)) and math.isfinite(v)
                                                     for v in state.scaler.values()):
        raise _Malformed("training_state.scaler")
    generator_size = torch.Generator().get_state().numel()
    _check_generator(state.sampler.get("generator"), generator_size, "training_state.sampler")
    for rng in [state.rng, *(state.rng.get("per_rank") or [])]:
        if not isinstance(rng, dict) or not isinstance(rng.get("cuda"), list):
            raise _Malformed("training_state.rng")
        _check_generator(rng.get("torch"), generator_size, "training_state.rng")
        for cuda in rng["cuda"]:
            _check_generator(cuda, None, "training_state.rng")


def _check_generator(value: Any, size: int | None, what: str) -> None:
    if not (isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1
            and (size is None or value.numel() == size)):
        raise _Malformed(f"{what}: not a random generator state")


_T = typing.TypeVar("_T")
_ADDED_LATER = {"val_files", "num_train_chars", "num_val_chars", "planned_steps"}  # fields older files may lack


def _typed(cls: type[_T], raw: Any, what: str) -> _T:
    """An instance of dataclass `cls` from a dict, every field of its declared type. Fields added in later
    versions (those with a default) may be absent from older files."""
    if not isinstance(raw, dict):
        raise _Malformed(what)
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in raw and f.name in _ADDED_LATER:
            continue  # a checkpoint from before the field existed
        if f.name not in raw or not _is_instance(raw[f.name], hints[f.name]):
            raise _Malformed(f"{what}.{f.name}")
        values[f.name] = raw[f.name]
    return cls(**values)




def _is_instance(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list) and all(_is_instance(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, hint)


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
    tokenizer: Tokenizer
    config: Config
    checkpoint: Checkpoint


def load_model(path: Path | str, device: torch.device | str = "cpu") -> LoadedModel:
    """Rebuild the model (and tokenizer, config) stored in a checkpoint, in eval mode on `device`."""
    checkpoint = read_checkpoint(path)
    device = torch.device(device)
    with torch.device("meta"):
        shape = GPT.from_config(checkpoint.config, checkpoint.tokenizer.vocab_size)
    check_memory(model_memory(shape, 1, shape.context_length, training=False), device,
                 f"the model in {path} ({shape.num_parameters():,} parameters)",
                 "Use a machine or device with more memory (--device)")
    model = GPT.from_config(checkpoint.config, checkpoint.tokenizer.vocab_size)
    model.load_state_dict(checkpoint.model_state)  # read_checkpoint checked the names and shapes
    model.to(device).eval()
    return LoadedModel(model, checkpoint.tokenizer, checkpoint.config, checkpoint)


def recorded_step(path: Path) -> int | None:
    """The step a checkpoint was saved at, read cheaply (memory-mapped, no checksum); None if unreadable."""
    if not is_regular(path):  # opening a FIFO would block
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(payload["progress"]["step"])
    except Exception:  # damaged or foreign: not a checkpoint that could be mixed up with this run
        return None
