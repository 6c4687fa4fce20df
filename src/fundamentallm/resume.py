"""What a run directory holds and how a run continues from it: one owner of resuming.

`inspect_run_dir` tells `train --resume auto`, `sweep` and `sweep --search` alike what a directory holds (empty,
finished, pruned, failed, resumable, or a run that stopped before its first checkpoint), from its files alone.
`resolve_resume` turns `--resume PATH|auto` into the checkpoint to continue; `restore_run` puts a checkpoint's
weights and training state into a freshly built run. The checkpoint format itself stays in checkpoint.py.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from fundamentallm import distributed
from fundamentallm.checkpoint import Checkpoint, TrainingProgress, TrainingState, read_checkpoint, recorded_step
from fundamentallm.config import Config
from fundamentallm.console import warn
from fundamentallm.data import trained_as_text
from fundamentallm.errors import UserError
from fundamentallm.metrics import read_metrics
from fundamentallm.records import CSV, TSV, file_format
from fundamentallm.runfiles import FINAL, METRICS, RUN_FILES, live_holder, periodic_checkpoints, resumable_files

if TYPE_CHECKING:  # types only: this module is below run.py
    from fundamentallm.data import BatchSampler, TokenData
    from fundamentallm.model import GPT
    from fundamentallm.optim import Optimizer
    from fundamentallm.run import Run

# ----------------------------------------------------------------------------------------------------------
# What a directory holds

Kind = Literal["empty", "finished", "pruned", "failed", "resumable", "stopped"]


@dataclass
class RunDir:
    """What `directory` holds. `kind`: empty (no run's files), finished or pruned (its end record says so and
    final_model.pt is there), failed (its end record says so), resumable (a checkpoint with a training state
    loads), stopped (a run's files, but nothing to continue from: it stopped before its first checkpoint, or
    every checkpoint is damaged)."""

    directory: Path
    kind: Kind
    end: dict[str, Any] | None  # the run's last record, when it is an end record

    @functools.cached_property
    def checkpoint(self) -> Checkpoint | None:
        """The newest sound checkpoint to continue from (loaded on first use; damaged files warned about)."""
        return find_resumable(self.directory) if self.kind != "empty" else None


def inspect_run_dir(directory: Path) -> RunDir:
    """What a directory holds, from its files alone (no process needs to be alive)."""
    directory = Path(directory)
    if not directory.is_dir() or not (any((directory / name).exists() for name in RUN_FILES)
                                      or periodic_checkpoints(directory)):
        return RunDir(directory, "empty", None)
    end = last_end(directory)
    status = end.get("status") if end else None
    if status in ("finished", "pruned") and (directory / FINAL).exists():
        return RunDir(directory, status, end)
    if status == "failed":
        return RunDir(directory, "failed", end)
    state = RunDir(directory, "resumable", end)
    if state.checkpoint is None:
        state.kind = "stopped"
    return state


def last_end(run_dir: Path) -> dict[str, Any] | None:
    """The run's end record (finished, interrupted, failed, pruned), if its metrics.jsonl ends with one."""
    if not (run_dir / METRICS).exists():
        return None
    records = read_metrics(run_dir, quiet=True)  # the readers of its rows report damage
    return records[-1] if records and records[-1].get("kind") == "end" else None


def refuse_run_dir(directory: Path, what: str) -> None:
    """A sweep keeps one directory per run inside its own: a directory that is itself a training run is refused,
    live or finished, so that the two never mix."""
    holder = live_holder(directory)
    if holder is not None:
        raise UserError(f"{directory} is in use by a running FundamentaLLM process ({holder}); wait for it to "
                        f"finish or stop it first, or choose another -o/--output-dir")
    state = inspect_run_dir(directory)
    if state.kind != "empty":
        raise UserError(f"{directory} holds a training run ({state.kind}); {what} writes one directory per run "
                        f"inside its own directory: choose another -o/--output-dir")


# ----------------------------------------------------------------------------------------------------------
# Continuing a run

def restore_run(run: Run, checkpoint: Checkpoint) -> None:
    """Continue exactly where `checkpoint` stopped: weights, optimizer, scaler, sampler, RNGs and counters."""
    run.progress = restore(checkpoint, run.model, run.optimizer, run.scaler, run.sampler, run.device, run.dist,
                           run.cfg.seed)
    if checkpoint.config.training.time_budget != run.cfg.time_budget:
        run.progress.planned_steps = 0  # a new budget: measure again and plan the rest of the run anew
    if not distributed.same_on_all_ranks(run.dist, run.progress.step):  # e.g. a node without the checkpoint
        if not run.dist.is_main:
            raise distributed.PeerFailed([0], quiet=True)  # rank 0 says what is wrong, once
        raise UserError(f"the processes disagree on where to resume (some start at step {run.progress.step:,}, "
                        f"others elsewhere): with --nnodes, put -o/--output-dir on a filesystem every machine "
                        f"shares, or give --resume PATH to a checkpoint present on every machine")


def resolve_resume(resume: str | None, output_dir: Path, data: list[str]) -> Checkpoint | None:
    """The checkpoint that `train --resume PATH|auto` continues from; None starts a new run."""
    if resume is None:
        return None
    if resume != "auto":
        return resume_checkpoint(resume)
    state = inspect_run_dir(output_dir)
    if state.checkpoint is not None:  # a finished or failed run too: it may go on with more steps or another lr
        return state.checkpoint
    if list(output_dir.glob("*.pt")):
        raise UserError(f"--resume auto: {output_dir} holds no checkpoint that can be resumed (see the "
                        f"warnings above); use --overwrite to start again")
    if state.kind != "empty":
        raise UserError(f"--resume auto: the run in {output_dir} stopped before its first checkpoint; "
                        f"use --overwrite to start it again")
    if not data:
        raise UserError(f"--resume auto: no checkpoint in {output_dir} to continue, and no DATA to start "
                        f"a new run with; give DATA (a text file, several, or a directory)")
    warn(f"--resume auto: no checkpoint in {output_dir} yet; starting a new run")
    return None


def training_state(optimizer: Optimizer, scaler: torch.amp.GradScaler, sampler: BatchSampler,
                   device: torch.device, dist: distributed.Dist) -> TrainingState | None:
    """Everything a resumed run needs besides the weights. Called on every rank (it gathers each rank's RNG
    state); returns None on the ranks that do not write."""
    rng = _rng_state(device)
    per_rank = distributed.all_gather_object(dist, rng) if dist.enabled else None
    if not dist.is_main:
        return None
    return TrainingState(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                         sampler=sampler.state_dict(), rng={**rng, "per_rank": per_rank} if per_rank else rng)


def _rng_state(device: torch.device) -> dict[str, Any]:
    # Only this process's GPU: asking for every GPU's state would open a CUDA context on each of them.
    return {"torch": torch.get_rng_state(),
            "cuda": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else []}


def restore(checkpoint: Checkpoint, model: GPT, optimizer: Optimizer, scaler: torch.amp.GradScaler,
            sampler: BatchSampler, device: torch.device, dist: distributed.Dist, seed: int) -> TrainingProgress:
    """Put a resumable checkpoint's weights and training state into a freshly built run; returns its counters."""
    state = checkpoint.training_state
    assert state is not None, "resume_checkpoint refuses weights-only files"
    model.load_state_dict(checkpoint.model_state)
    # load_state_dict also restores the saved hyperparameters; keep this run's (weight decay and betas may
    # be changed on resume; the learning rate is set every step anyway).
    hyperparameters = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state.optimizer)
    for group, chosen in zip(optimizer.param_groups, hyperparameters, strict=True):
        group.update(chosen)
    if state.scaler:  # empty when the run that saved it needed no gradient scaling (fp32, bf16)
        scaler.load_state_dict(state.scaler)
    sampler.load_state_dict(state.sampler)
    progress = dataclasses.replace(checkpoint.progress)
    per_rank = state.rng.get("per_rank") or []
    exact = len(per_rank) == dist.world_size or (not per_rank and not dist.enabled)
    mine = per_rank[dist.rank] if len(per_rank) == dist.world_size else state.rng
    torch.set_rng_state(mine["torch"])
    if device.type == "cuda" and mine["cuda"]:
        torch.cuda.set_rng_state(mine["cuda"][0], device)
    if not exact and dist.rank > 0:
        # Resumed with another number of processes: rank 0 continues the saved stream, the others get fresh
        # streams of their own (distinct per rank and step, so dropout masks still differ between ranks).
        torch.manual_seed(seed + dist.rank + 1_000_003 * progress.step)
    return progress


def resume_checkpoint(path: Path | str) -> Checkpoint:
    """A checkpoint named by --resume PATH: it must carry a training state."""
    checkpoint = read_checkpoint(path)
    if checkpoint.training_state is None:
        raise UserError(f"{path} holds model weights only (best_model.pt is saved without optimizer "
                        f"state); resume from checkpoint_epoch_N.pt, interrupted.pt or final_model.pt")
    return checkpoint


def check_resume_compatible(checkpoint: Checkpoint, config: Config, data: TokenData) -> None:
    """Refuse to resume a checkpoint into a different model or onto a different corpus; say what differs."""
    path, saved = checkpoint.path, checkpoint.config
    regularisation = ("dropout", "attention_dropout")  # not part of the weights: may change on resume
    now_model, saved_model = config.model.model_dump(), saved.model.model_dump()
    diffs = [f"model.{k}: {saved_model[k]!r} in the checkpoint, {v!r} now" for k, v in now_model.items()
             if saved_model[k] != v and k not in regularisation]
    if saved.training.optimizer != config.training.optimizer:
        diffs.append(f"training.optimizer: {saved.training.optimizer} in the checkpoint, "
                     f"{config.training.optimizer} now (its saved state fits only the same optimizer)")
    if saved.training.sequence_length != config.training.sequence_length:
        diffs.append(f"training.sequence_length: {saved.training.sequence_length} in the checkpoint, "
                     f"{config.training.sequence_length} now")
    if diffs:
        raise UserError(f"cannot resume from {path}: the model or optimizer differs ({'; '.join(diffs)}). "
                        f"Resume with the run's own config (omit --config) or start a new run in another directory")
    if checkpoint.data.fingerprint != data.fingerprint:
        check_not_trained_as_text(checkpoint, config, data.files, data.val_files)
        files = ", ".join(checkpoint.data.files) or "unknown files"
        raise UserError(f"cannot resume from {path}: it was trained on different data ({files}, "
                        f"{checkpoint.data.num_chars:,} characters; now {data.num_chars:,} characters from "
                        f"{', '.join(str(f) for f in data.files)}), or the text was edited since, or "
                        f"validation_split, --val-data, the data.tokenizer settings or how records give their text "
                        f"(data.text_field, data.record_separator, data.skip_bad_records) changed")
    _check_same_tokenizer(checkpoint, data)


def check_not_trained_as_text(checkpoint: Checkpoint, config: Config, paths: list[str | Path],
                              val_paths: list[str | Path] | None) -> None:
    """Say why a run cannot continue on record files that it trained on as their raw text (JSON or CSV syntax
    and all), which happened before .jsonl, .json, .csv and .tsv files were read as records: the text it trained
    on is no longer what DATA gives. Called when resuming fails (its data gives other text, or cannot be read as
    records); otherwise returns, and the error at hand stands."""
    record = trained_as_text(checkpoint.data.fingerprint, config, paths, val_paths)
    if record is not None:
        syntax = "CSV" if file_format(record) in (CSV, TSV) else "JSON"
        raise UserError(f"cannot resume from {checkpoint.path}: it trained on the raw text of {record} (its "
                        f"{syntax} syntax and all), and that file is now read as records, "
                        f"one field each; the run cannot continue on other text. Start a new run in another "
                        f"directory (-o), choosing the field with --text-field")


def _check_same_tokenizer(checkpoint: Checkpoint, data: TokenData) -> None:
    """The token cache must hold the ids the checkpoint's model was trained on. A character model saved before
    every character model reserved an unknown token has the same characters (and ids) without it: the data
    then holds no unknown id, since the unknown token was reserved before whenever the data needed one."""
    saved, now = checkpoint.tokenizer.to_dict(), data.tokenizer.to_dict()
    older_char = saved["type"] == now["type"] == "char" and saved["chars"] == now["chars"] and not saved["has_unknown"]
    if saved != now and not older_char:
        raise UserError(f"cannot resume from {checkpoint.path}: the tokenizer fitted on its data now "
                        f"({data.tokenizer.describe()}) differs from the one it was trained with "
                        f"({checkpoint.tokenizer.describe()}), e.g. because another version of the tokenizers "
                        f"library learned other BPE merges; start a new run")


def check_resume_in_place(checkpoint: Checkpoint, output_dir: Path) -> None:
    """Continuing a run in its own directory from a checkpoint older than others there would mix two histories."""
    assert checkpoint.path is not None
    if checkpoint.path.resolve().parent != output_dir.resolve():
        return  # a branch into another directory
    later = [p for p in resumable_files(output_dir) if (recorded_step(p) or 0) > checkpoint.progress.step
             and _sound(p)]  # a damaged file holds no history to mix: --resume auto skipped it already
    if later:
        raise UserError(f"{output_dir} holds checkpoints saved after {checkpoint.path.name} "
                        f"({', '.join(p.name for p in later)}); continuing from it here would mix two histories. "
                        f"Branch off it into a new directory (-o), or use --resume auto to continue from the "
                        f"newest")


def _sound(path: Path) -> bool:
    try:
        read_checkpoint(path)
    except UserError:
        return False
    return True


def find_resumable(directory: Path) -> Checkpoint | None:
    """The checkpoint in `directory` that is furthest along and loads; damaged files are skipped with a warning.

    Candidates are ranked by the step they record (read cheaply), and only then fully loaded and verified, best
    first: for a large model that reads one checkpoint instead of all of them."""
    ranked = []
    for path in resumable_files(Path(directory)):
        step = recorded_step(path)
        if step is None:  # not even the step can be read: say what is wrong with it
            try:
                step = read_checkpoint(path).progress.step
            except UserError as exc:
                warn(f"skipping {path.name}: {exc}")
                continue
        ranked.append((step, path.stat().st_mtime, path))
    skipped = len(resumable_files(Path(directory))) - len(ranked)
    for _, _, path in sorted(ranked, reverse=True):
        try:
            checkpoint = read_checkpoint(path)
        except UserError as exc:
            warn(f"skipping {path.name}: {exc}")
            skipped += 1
            continue
        if checkpoint.training_state is not None:
            if skipped:
                warn(f"continuing from {path.name}, the newest sound checkpoint")
            return checkpoint
    return None
