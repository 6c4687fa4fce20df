"""Set-up of a training run: from a Config (and, when resuming, a checkpoint) to everything the loop needs.

`train` and the learning-rate range test both start here, so they train the same model on the same batches
with the same device, precision, optimizer and compilation.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from fundamentallm import checkpoint as ckpt
from fundamentallm import distributed
from fundamentallm.config import Config, TrainingConfig
from fundamentallm.console import info, warn
from fundamentallm.data import BatchSampler, TokenData, as_tensor, characters_in, prepare_data, record_format
from fundamentallm.device import (
    autocast_dtype,
    check_memory,
    compile_model,
    enable_tf32,
    fits_on_device,
    model_memory,
    oom_remedies,
)
from fundamentallm.errors import UserError
from fundamentallm.model import GPT
from fundamentallm.optim import Optimizer, make_optimizer
from fundamentallm.resume import check_not_trained_as_text, check_resume_compatible, restore_run
from fundamentallm.tokenizer import CharTokenizer, Tokenizer

EVAL_BATCHES = 4  # on a CPU, an evaluation pass takes up to this many training batches of windows ...
EVAL_LOGITS_BYTES = 256 << 20  # ... while their float32 logits stay under this


@dataclass
class Run:
    """Everything one training run works with, built once by `setup_run`."""

    config: Config
    data: TokenData
    device: torch.device
    dist: distributed.Dist
    amp: torch.dtype | None  # autocast dtype; None: fp32
    model: GPT  # the plain model: what is saved and evaluated
    step_model: torch.nn.Module  # what a training step runs: the model, wrapped by DDP and/or torch.compile
    ddp: DistributedDataParallel | None
    optimizer: Optimizer
    scaler: torch.amp.GradScaler
    sampler: BatchSampler
    val_tokens: torch.Tensor | np.ndarray
    progress: ckpt.TrainingProgress
    started_at: float = 0.0  # perf_counter() when the run (first session included) would have started
    on_eval: Callable[[int, float], bool] | None = None  # told (step, val_loss) after each evaluation; True: stop
    pruned: bool = False  # on_eval stopped the run

    @property
    def cfg(self) -> TrainingConfig:
        return self.config.training

    @property
    def tokens_per_step(self) -> int:
        cfg = self.cfg
        return cfg.batch_size * cfg.gradient_accumulation_steps * cfg.sequence_length * self.dist.world_size

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(len(self.data.train) / self.tokens_per_step))

    @property
    def eval_batch_size(self) -> int:
        """Windows per evaluation pass. On a CPU, EVAL_BATCHES training batches at once while their logits stay
        under EVAL_LOGITS_BYTES: a forward pass keeps no activations for a backward one, and fewer, larger passes
        are faster, several times so on a busy machine (fewer points where every thread must meet). On a GPU the
        training batch, which its memory was sized for."""
        cfg = self.cfg
        if self.device.type != "cpu":
            return cfg.batch_size
        per_window = cfg.sequence_length * self.data.tokenizer.vocab_size * 4
        return cfg.batch_size * max(1, min(EVAL_BATCHES, EVAL_LOGITS_BYTES // (per_window * cfg.batch_size)))

    @property
    def compiled(self) -> bool:
        return self.step_model is not (self.ddp or self.model)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started_at


def seed_everything(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def load_data(config: Config, data_paths: list[str], dist: distributed.Dist = distributed.SINGLE,
              val_paths: list[str] | None = None, given: Tokenizer | None = None) -> TokenData:
    """The tokenized corpus. Under torchrun the first process on each machine builds that machine's token cache,
    the others then read it; an error on any rank stops every rank cleanly (distributed.collectively)."""
    cfg = config.training

    def prepare() -> TokenData:
        data = prepare_data(config, data_paths, val_paths, given=given)
        check_data_size(data, cfg)
        return data

    with distributed.collectively(dist):
        if dist.is_local_main:
            data = prepare()
    with distributed.collectively(dist):
        if not dist.is_local_main:
            data = prepare()
    return data


def check_data_size(data: TokenData, cfg: TrainingConfig) -> None:
    need = cfg.sequence_length + 1
    if len(data.train) < need:
        raise UserError(
            f"the training part of the data holds {len(data.train):,} tokens, fewer than one training window "
            f"(sequence_length {cfg.sequence_length} + 1); use more text"
            + (f" or a smaller --sequence-length (at most {len(data.train) - 1})" if len(data.train) > 2 else ""))
    if len(data.val) < 2:
        raise UserError(f"the validation part of the data holds {len(data.val)} token(s); raise "
                        f"training.validation_split or use more text")


def setup_run(config: Config, data_paths: list[str], device: torch.device,
              dist: distributed.Dist = distributed.SINGLE, resume: ckpt.Checkpoint | None = None,
              val_paths: list[str] | None = None, init: FineTune | None = None) -> Run:
    """Data, model, optimizer, precision, gradient scaler and sampler on `device`; restored from `resume`, or
    starting from the weights of `init`, when given; wrapped for DDP and torch.compile last."""
    cfg = config.training
    try:
        data = load_data(config, data_paths, dist, val_paths, init.tokenizer if init else None)
    except UserError as exc:
        if resume is not None and not isinstance(exc, distributed.PeerFailed):
            check_not_trained_as_text(resume, config, data_paths, val_paths)  # record files it trained on as text
        raise
    with distributed.collectively(dist):
        if resume is not None:
            check_resume_compatible(resume, config, data)
            data.tokenizer = resume.tokenizer  # the model's own (see check_resume_compatible)
        check_fits(config, data.tokenizer.vocab_size, device)
    check_same_everywhere(config, data, dist)
    # Each rank its own seed, so that dropout masks differ between ranks; rank 0's is the single-process seed,
    # so it initialises the same model (DDP then copies rank 0's weights to the others).
    seed_everything(cfg.seed + dist.rank, cfg.deterministic)
    enable_tf32(device)
    resident = fits_on_device(len(data.train) + len(data.val), data.train.dtype, device)
    train_tokens = as_tensor(data.train, device) if resident else data.train
    model = GPT.from_config(config, data.tokenizer.vocab_size).to(device)
    amp = autocast_dtype(device, cfg.use_mixed_precision)
    run = Run(config=config, data=data, device=device, dist=dist, amp=amp, model=model, step_model=model,
              ddp=None, optimizer=make_optimizer(model, cfg, device),
              scaler=torch.amp.GradScaler(device.type, enabled=amp == torch.float16),
              sampler=BatchSampler(train_tokens, cfg.batch_size, cfg.sequence_length, device, seed=cfg.seed,
                                   rank=dist.rank, world_size=dist.world_size),
              val_tokens=as_tensor(data.val, device) if resident else data.val,
              progress=ckpt.TrainingProgress())
    if resume is not None:
        restore_run(run, resume)
    if init is not None:
        init.load_into(model, data)
    # DDP wraps the model first and torch.compile wraps DDP: the order PyTorch documents for compiled DDP.
    if dist.enabled:
        run.ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    run.step_model = compile_model(run.ddp or model, cfg, device)
    return run


class FineTune:
    """`train --init-from`: a new run (fresh optimizer, schedule and data) that starts from a trained model's
    weights and keeps its tokenizer. Characters of the new text that a char tokenizer lacks map to its unknown
    token, or, with `extend_vocab`, become new tokens whose embedding rows start fresh."""

    def __init__(self, checkpoint: ckpt.Checkpoint, config: Config, data_paths: list[str], extend_vocab: bool) -> None:
        self.checkpoint = checkpoint
        old = checkpoint.tokenizer
        diffs = [f"model.{k}: {v!r} in {checkpoint.path}, {getattr(config.model, k)!r} now"
                 for k, v in checkpoint.config.model.model_dump().items()
                 if k not in ("dropout", "attention_dropout") and getattr(config.model, k) != v]
        if config.data.tokenizer != old.kind:
            diffs.append(f"data.tokenizer: {old.kind} in {checkpoint.path}, {config.data.tokenizer} now")
        # The keys that shaped the tokenizer it keeps: a new value would be recorded in config.yaml, not used.
        shaping = {"bpe": "vocab_size", "char": "min_char_frequency"}.get(old.kind)
        was, now = (getattr(c.data, shaping) for c in (checkpoint.config, config)) if shaping else (None, None)
        if was != now:
            diffs.append(f"data.{shaping}: {was!r} in {checkpoint.path}, {now!r} now")
        if diffs:
            raise UserError(f"--init-from keeps the model's shape and tokenizer, but they differ "
                            f"({'; '.join(diffs[:3])}); leave out --config, or use one with the same model")
        self.tokenizer: Tokenizer = old
        if isinstance(old, CharTokenizer):
            added = sorted(characters_in(data_paths, record_format(config)) - set(old.chars)) if extend_vocab else []
            # Always an unknown token: older char models had none, and new text may hold characters they lack.
            self.tokenizer = CharTokenizer(old.chars + added, has_unknown=True)
        elif extend_vocab:
            raise UserError(f"--extend-vocab grows a char tokenizer; the {old.kind} tokenizer of "
                            f"{checkpoint.path} already encodes any text")

    def load_into(self, model: GPT, data: TokenData) -> None:
        """The checkpoint's weights into `model`: old tokens keep their embedding rows (the unknown token moves
        to the end, after any new characters), new rows keep their fresh initialisation."""
        old, new = self.checkpoint.tokenizer, self.tokenizer
        rows = list(range(len(old.chars))) + ([new.unknown_id] if getattr(old, "has_unknown", False) else []) \
            if isinstance(old, CharTokenizer) else list(range(old.vocab_size))
        state = model.state_dict()
        with torch.no_grad():
            for name, value in self.checkpoint.model_state.items():
                target = state[name]
                if name in ("tok_emb.weight", "lm_head.weight"):
                    target[rows] = value.to(target)
                elif value.shape != target.shape:
                    raise UserError(f"--init-from {self.checkpoint.path}: its {name} has shape {tuple(value.shape)}, "
                                    f"this run's model {tuple(target.shape)}; keep the model's sequence_length")
                else:
                    target.copy_(value)
        self._check_finite(model, data)
        unknown = new.unknown_id if isinstance(new, CharTokenizer) else -1
        count = sum(int(np.count_nonzero(data.train[i : i + (1 << 24)] == unknown))  # in slices: bounded memory
                    for i in range(0, len(data.train), 1 << 24)) if unknown >= 0 else 0
        added = new.vocab_size - old.vocab_size
        info(f"Fine-tuning from {self.checkpoint.path} (step {self.checkpoint.progress.step:,})"
             + (f"; {added} new token(s) for characters it had not seen" if added > 0 else ""))
        if count:
            warn(f"{count:,} character(s) of the training text are not in the model's vocabulary and count as its "
                 f"unknown token; --extend-vocab gives them tokens of their own")


    def _check_finite(self, model: GPT, data: TokenData) -> None:
        """Finite weights can still overflow float32 on the way to the scores; then every step would be NaN."""
        ids = torch.from_numpy(np.array(data.train[: model.context_length], dtype=np.int64))
        ids = ids.to(next(model.parameters()).device)
        with torch.no_grad():
            logits = model(ids[None])[0]
        if not torch.isfinite(logits).all():
            raise UserError(f"--init-from {self.checkpoint.path}: the model overflows: its scores on the training "
                            f"text are NaN or infinite, so no step could learn from them; start from an earlier "
                            f"checkpoint")


def init_base(checkpoint: ckpt.Checkpoint) -> tuple[dict, str]:
    """The config a fine-tuning run starts from: the checkpoint's, less the length of the run that made it."""
    base = checkpoint.config.to_dict()
    base["training"].update(max_steps=None, time_budget=None)
    return base, f"checkpoint {checkpoint.path}"


def check_fits(config: Config, vocab_size: int, device: torch.device) -> None:
    """Refuse a model, batch and context that cannot fit in the device's memory, before allocating any of it."""
    cfg = config.training
    with torch.device("meta"):
        shape = GPT.from_config(config, vocab_size)
    needed = model_memory(shape, cfg.batch_size, cfg.sequence_length, training=True, optimizer=cfg.optimizer)
    check_memory(needed, device, f"training this model ({shape.num_parameters():,} parameters, batch "
                 f"{cfg.batch_size} x {cfg.sequence_length} tokens)", oom_remedies(cfg))


def check_same_everywhere(config: Config, data: TokenData, dist: distributed.Dist) -> None:
    """Under torchrun, every process must train the same config on the same data: processes started with
    different flags or files would fall out of step in their collectives."""
    key = hashlib.sha256(json.dumps([config.to_dict(), data.fingerprint], sort_keys=True).encode()).digest()
    if distributed.same_on_all_ranks(dist, int.from_bytes(key[:7], "big")):
        return
    if not dist.is_main:
        raise distributed.PeerFailed([0], quiet=True)  # rank 0 says what is wrong, once
    raise UserError("the processes of this torchrun were started with different configurations or different "
                    "data; start every process with the same command, config file and DATA")
