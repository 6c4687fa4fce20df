"""Training: device and precision set-up, the learning-rate schedule, and the loop itself.

`train()` is the whole loop in one function: sample a batch, forward and backward (accumulating gradients),
clip, step, log every log_interval steps, evaluate every eval_interval steps or at the end of each epoch, save
checkpoints. Everything it needs to continue exactly where it stopped (optimizer, scaler, sampler and RNG states,
counters) goes into each resumable checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from fundamentallm import checkpoint as ckpt
from fundamentallm import distributed
from fundamentallm.config import Config, TrainingConfig, save_config
from fundamentallm.console import Progress, info, is_quiet, set_quiet, warn
from fundamentallm.data import (
    BatchSampler,
    TokenData,
    as_tensor,
    eval_windows,
    gather_windows,
    prepare_tokens,
)
from fundamentallm.errors import TrainingFailed, UserError
from fundamentallm.files import remove_stale_temporaries, why_unwritable
from fundamentallm.metrics import MetricsLog, bits_per_char, perplexity
from fundamentallm.model import GPT
from fundamentallm.plot import plot_finished_run

RUN_FILES = ("config.yaml", "metrics.jsonl", ckpt.BEST, ckpt.FINAL, ckpt.INTERRUPTED, "training.png")
# Corpora whose tokens take up to this much GPU memory live there; larger ones stay memory-mapped on the host.
DEVICE_RESIDENT_MAX_BYTES = 2 << 30


# ----------------------------------------------------------------------------------------------------------
# Device, precision, schedule


def select_device(name: str = "auto") -> torch.device:
    """auto -> the first CUDA GPU, else Apple's MPS, else the CPU. Asking for a missing device is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: PyTorch sees no CUDA GPU on this machine (a CPU-only build, or no "
                            f"driver); use --device cpu, or --device auto to take whatever is there")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s) "
                            f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: Apple's MPS backend is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name}: unsupported device type; use auto, cpu, cuda, cuda:N or mps")
    return device


def autocast_dtype(device: torch.device, setting: bool | str) -> torch.dtype | None:
    """The autocast dtype for training, or None for full fp32.

    GPUs: bf16 where supported, else fp16 (with a gradient scaler), unless the setting is false. CPUs: fp32 unless
    the setting is explicitly true and the CPU has native bf16 instructions (AVX512-BF16 or AMX)."""
    if setting is False:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and setting is True:
        if _cpu_has_native_bf16():
            return torch.bfloat16
        warn("use_mixed_precision: this CPU has no native bf16 instructions; training in fp32")
    return None


def _cpu_has_native_bf16() -> bool:
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # private API: absent in some versions
    return bool(probe()) if probe is not None else False


def lr_at(step: int, total_steps: int, steps_per_epoch: int, cfg: TrainingConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then the configured decay."""
    peak, floor = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.scheduler == "constant":
        return peak
    if cfg.scheduler == "step":  # step_size counts epochs, as in the training guide
        drops = step // (cfg.step_size * steps_per_epoch)
        return max(peak * cfg.gamma**drops, floor)
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    if cfg.scheduler == "linear":
        return peak - (peak - floor) * progress
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: GPT, cfg: TrainingConfig, device: torch.device) -> torch.optim.Optimizer | MuonAdamW:
    """AdamW, or Muon for the blocks' weight matrices plus AdamW for everything else (training.optimizer)."""
    fused = device.type in ("cuda", "cpu")  # fused AdamW kernels exist for both since PyTorch 2.4

    def adamw(params: list[torch.nn.Parameter]) -> torch.optim.AdamW:
        # Weight decay on matrices and embeddings only; biases and norm gains are not decayed.
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused)

    if cfg.optimizer == "adamw":
        return adamw(list(model.parameters()))
    if not hasattr(torch.optim, "Muon"):
        raise UserError(f"training.optimizer=muon needs PyTorch 2.9 or newer (this is {torch.__version__}); "
                        f"upgrade PyTorch or use training.optimizer=adamw")
    matrices = [p for block in model.blocks for p in block.parameters() if p.dim() == 2]
    ids = {id(p) for p in matrices}
    # match_rms_adamw scales Muon's orthogonalised update to AdamW's size, so one learning rate serves both.
    muon = torch.optim.Muon(matrices, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                            adjust_lr_fn="match_rms_adamw")
    return MuonAdamW(muon, adamw([p for p in model.parameters() if id(p) not in ids]))


class MuonAdamW:
    """Two optimizers stepped as one: what the loop, the gradient scaler and checkpoints see."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for opt in self.optimizers for group in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for opt, opt_state in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(opt_state)


def seed_everything(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def optimizer_step(step_model: torch.nn.Module, model: GPT, optimizer: torch.optim.Optimizer | MuonAdamW,
                   scaler: torch.amp.GradScaler, sampler: BatchSampler, cfg: TrainingConfig,
                   amp: torch.dtype | None, ddp: DistributedDataParallel | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step: gradient_accumulation_steps micro-batches, unscale, clip, step. Returns the mean loss
    and the gradient norm as device tensors, so the caller decides when to synchronise."""
    accum = cfg.gradient_accumulation_steps
    loss_sum = torch.zeros((), device=sampler.device)
    for micro in range(accum):
        x, y = sampler.next()
        # Under DDP, gradients are all-reduced only on the last micro-batch of the step.
        sync = ddp is None or micro == accum - 1
        with contextlib.nullcontext() if sync else ddp.no_sync(), \
                torch.autocast(sampler.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            _, loss = step_model(x, y)
        scaler.scale(loss / accum).backward()
        loss_sum += loss.detach()
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.gradient_clip_norm or math.inf)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum / accum, norm


# ----------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def estimate_loss(model: GPT, tokens: torch.Tensor | np.ndarray, batch_size: int, device: torch.device,
                  amp: torch.dtype | None = None, max_windows: int = 0,
                  dist: distributed.Dist = distributed.SINGLE) -> float:
    """Mean cross-entropy (nats per token) over `tokens`, every prediction counted once, at the model's context
    length (see data.eval_windows). Under torchrun the windows are shared out and the sums all-reduced."""
    windows = eval_windows(len(tokens), model.context_length, max_windows)[dist.rank :: dist.world_size]
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    by_length: dict[int, list[int]] = {}
    for start, length in windows:
        by_length.setdefault(length, []).append(start)
    for length, starts in by_length.items():
        for i in range(0, len(starts), batch_size):
            batch = gather_windows(tokens, torch.tensor(starts[i : i + batch_size]), length, device)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                _, loss = model(batch[:, :-1], batch[:, 1:])
            count = batch.size(0) * (length - 1)
            totals += torch.stack([loss.double() * count, torch.tensor(float(count), device=device,
                                                                       dtype=torch.float64)])
    model.train(was_training)
    distributed.all_reduce_sum(dist, totals)
    if totals[1] == 0:
        return float("nan")
    return (totals[0] / totals[1]).item()


# ----------------------------------------------------------------------------------------------------------
# Interruption


class Aborted(KeyboardInterrupt):
    """A second SIGINT or SIGTERM: stop at once. `signum` gives the exit code (128 + N: 130 or 143)."""

    def __init__(self, signum: int) -> None:
        super().__init__()
        self.signum = signum


class StopRequest:
    """First SIGINT/SIGTERM: finish the current step, save interrupted.pt, exit. Second: exit at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.aborted: int | None = None  # the second signal, if one came
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            self.aborted = signum
            raise Aborted(signum)
        self.signum = signum
        if is_quiet():  # under torchrun every process gets the signal; rank 0 speaks for all
            return
        print(f"\n{signal.Signals(signum).name} received: saving a checkpoint after this step "
              f"(press Ctrl-C again to quit without saving)", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)


# ----------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    epochs_completed: int
    best_val_loss: float
    last_val_loss: float
    last_train_loss: float
    elapsed_seconds: float
    tokens_per_second: float
    stopped_early: bool = False
    interrupted_by: int | None = None  # the signal that stopped the run, if one did
    checkpoints: list[str] = field(default_factory=list)


@dataclass
class _Progress:
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

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _LogWindow:
    """The steps since the last train record. Their losses and gradient norms stay on the device until the
    record is written: one host-device synchronisation per record, not per step."""

    def __init__(self, carried_losses: list[float], carried_norms: list[float]) -> None:
        self.carried = (list(carried_losses), list(carried_norms))  # read already, before an interruption
        self.losses: list[torch.Tensor] = []
        self.norms: list[torch.Tensor] = []
        self.tokens = 0
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, norm: torch.Tensor, tokens: int) -> None:
        self.losses.append(loss)
        self.norms.append(norm)
        self.tokens += tokens

    def read(self, dist: distributed.Dist) -> tuple[list[float], list[float]]:
        """Every step's loss (the mean over ranks) and gradient norm, oldest first."""
        values, norms = list(self.carried[0]), list(self.carried[1])
        if self.losses:
            losses = torch.stack(self.losses)
            if dist.enabled:  # mean over ranks, so the log shows the global batch's loss
                distributed.all_reduce_sum(dist, losses)
                losses /= dist.world_size
            values += losses.tolist()
            norms += torch.stack(self.norms).tolist()
        return values, norms

    def reset(self) -> None:
        self.carried = ([], [])
        self.losses, self.norms, self.tokens = [], [], 0
        self.start = time.perf_counter()


def check_resume_compatible(payload: dict[str, Any], config: Config, data: TokenData, path: Path) -> None:
    """Refuse to resume a checkpoint into a different model or onto a different corpus; say what differs."""
    saved_model = payload["config"]["model"]
    now = config.model.model_dump(mode="json")
    regularisation = ("dropout", "attention_dropout")  # not part of the weights: may change on resume
    diffs = [f"model.{k}: {saved_model.get(k)!r} in the checkpoint, {v!r} now" for k, v in now.items()
             if saved_model.get(k) != v and k not in regularisation]
    saved_optimizer = payload["config"]["training"].get("optimizer", "adamw")
    if saved_optimizer != config.training.optimizer:
        diffs.append(f"training.optimizer: {saved_optimizer} in the checkpoint, {config.training.optimizer} now "
                     f"(its saved state fits only the same optimizer)")
    saved_len = payload["config"]["training"]["sequence_length"]
    if saved_len != config.training.sequence_length:
        diffs.append(f"training.sequence_length: {saved_len} in the checkpoint, "
                     f"{config.training.sequence_length} now")
    if diffs:
        raise UserError(f"cannot resume from {path}: the model or optimizer differs ({'; '.join(diffs)}). "
                        f"Resume with the run's own config (omit --config) or start a new run in another directory")
    saved_data = payload.get("data", {})
    if saved_data.get("fingerprint") != data.fingerprint:
        files = ", ".join(map(str, saved_data.get("files", []))) or "unknown files"
        saved_chars = saved_data.get("num_chars")
        saved_chars = f"{saved_chars:,}" if isinstance(saved_chars, int) else "?"
        raise UserError(f"cannot resume from {path}: it was trained on different data ({files}, "
                        f"{saved_chars} characters; now {data.num_chars:,} characters from "
                        f"{', '.join(str(f) for f in data.files)}), or the text was edited since, or "
                        f"validation_split/min_char_frequency changed")


def check_output_dir(output_dir: Path, resume_from: tuple[Path, dict[str, Any]] | None, overwrite: bool
                     ) -> list[str]:
    """Refuse to mix two runs in one directory unless --resume or --overwrite says what to do; returns the
    files of an earlier run there. Nothing is created or removed yet, so a later error leaves all as it was.

    Resuming from a checkpoint inside the directory continues that run there; resuming from one elsewhere
    branches a new run off it, which needs a directory without a run of its own."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"-o {output_dir} is a file, not a directory")
    existing = [name for name in RUN_FILES if (output_dir / name).exists()]
    existing += [p.name for _, p in ckpt.periodic_checkpoints(output_dir)]
    in_place = resume_from is not None and resume_from[0].resolve().parent == output_dir.resolve()
    if existing and resume_from is not None and not in_place:
        raise UserError(f"{output_dir} already holds another run ({', '.join(sorted(existing)[:4])}); to branch "
                        f"off {resume_from[0]}, give an -o/--output-dir without a run in it")
    if in_place:
        later = ckpt.later_checkpoints(output_dir, int(resume_from[1]["progress"]["step"]))
        if later:
            raise UserError(f"{output_dir} holds checkpoints saved after {resume_from[0].name} "
                            f"({', '.join(p.name for p in later)}); continuing from it here would mix two histories. "
                            f"Branch off it into a new directory (-o), or use --resume auto to continue from the "
                            f"newest")
    if existing and resume_from is None and not overwrite:
        raise UserError(f"{output_dir} already holds a run ({', '.join(sorted(existing)[:4])}); continue it "
                        f"with --resume auto, replace it with --overwrite, or choose another -o/--output-dir")
    parent = output_dir
    while not parent.exists():
        parent = parent.parent
    reason = why_unwritable(parent)
    if reason is not None:
        raise UserError(f"cannot write to {parent}: {reason}; choose another -o/--output-dir")
    return existing


def _start_output_dir(output_dir: Path, earlier_run: list[str], resume: bool) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output directory {output_dir}: {exc.strerror}") from None
    remove_stale_temporaries(output_dir)  # left by a process killed while saving
    if not resume:  # --overwrite: the earlier run's files go only now that the new run is ready to start
        for name in earlier_run:
            (output_dir / name).unlink(missing_ok=True)
        shutil.rmtree(output_dir / "tensorboard", ignore_errors=True)


def train(config: Config, data_paths: list[str], output_dir: Path, *, device: str = "auto",
          resume_from: tuple[Path, dict[str, Any]] | None = None, overwrite: bool = False,
          tensorboard: bool = False, config_origin: str = "") -> TrainResult:
    """Train a model on DATA as `config` says, writing checkpoints and metrics into `output_dir`."""
    cfg = config.training
    output_dir = Path(output_dir)
    dist, dev = distributed.init(select_device(device))  # under torchrun: this process's GPU, cuda:LOCAL_RANK
    set_quiet(not dist.is_main)
    try:
        return _train(config, cfg, data_paths, output_dir, dev, dist, resume_from, overwrite, tensorboard,
                      config_origin)
    finally:
        distributed.shutdown(dist)


def _train(config: Config, cfg: TrainingConfig, data_paths: list[str], output_dir: Path, dev: torch.device,
           dist: distributed.Dist, resume_from: tuple[Path, dict[str, Any]] | None, overwrite: bool,
           tensorboard: bool, config_origin: str) -> TrainResult:
    # Under torchrun, a set-up error on any rank stops every rank cleanly (distributed.collectively).
    # Data: the first process on each machine builds that machine's token cache, the others then read it.
    with distributed.collectively(dist):
        earlier_run = check_output_dir(output_dir, resume_from, overwrite) if dist.is_main else []
        if dist.is_local_main:
            data = prepare_tokens(data_paths, cfg.validation_split, config.data.min_char_frequency)
    with distributed.collectively(dist):
        if not dist.is_local_main:
            data = prepare_tokens(data_paths, cfg.validation_split, config.data.min_char_frequency)
        check_data_size(data, cfg)
        if resume_from is not None:
            check_resume_compatible(resume_from[1], config, data, resume_from[0])
    # Each rank its own seed, so that dropout masks differ between ranks; rank 0's is the single-process seed,
    # so it initialises the same model (DDP then copies rank 0's weights to the others).
    seed_everything(cfg.seed + dist.rank, cfg.deterministic)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 tensor cores for fp32 matmuls
        torch.backends.cudnn.allow_tf32 = True
    on_device_bytes = (len(data.train) + len(data.val)) * (1 if data.train.dtype == np.uint8 else 4)  # as_tensor
    resident = dev.type != "cpu" and on_device_bytes <= DEVICE_RESIDENT_MAX_BYTES
    train_tokens = as_tensor(data.train, dev) if resident else data.train
    val_tokens = as_tensor(data.val, dev) if resident else data.val

    # Model, optimizer, precision.
    model = GPT.from_config(config, data.tokenizer.vocab_size).to(dev)
    optimizer = make_optimizer(model, cfg, dev)
    amp = autocast_dtype(dev, cfg.use_mixed_precision)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp == torch.float16)
    sampler = BatchSampler(train_tokens, cfg.batch_size, cfg.sequence_length, dev, seed=cfg.seed,
                           rank=dist.rank, world_size=dist.world_size)
    state = _Progress()
    if resume_from is not None:
        state = _restore(resume_from[1], model, optimizer, scaler, sampler, dev, dist, cfg.seed)
    if not distributed.same_on_all_ranks(dist, state.step):  # e.g. --resume auto found no checkpoint on a node
        if not dist.is_main:
            raise distributed.PeerFailed([0], quiet=True)  # rank 0 says what is wrong, once
        raise UserError(f"the processes disagree on where to resume (some start at step {state.step:,}, others "
                        f"elsewhere): with --nnodes, put -o/--output-dir on a filesystem every machine shares, or "
                        f"give --resume PATH to a checkpoint present on every machine")
    # DDP wraps the model first and torch.compile wraps DDP: the order PyTorch documents for compiled DDP.
    ddp = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None) \
        if dist.enabled else None
    step_model = _compile(ddp or model, cfg, dev)

    tokens_per_step = cfg.batch_size * cfg.gradient_accumulation_steps * cfg.sequence_length * dist.world_size
    steps_per_epoch = max(1, math.ceil(len(data.train) / tokens_per_step))
    # Counted from where the run stands, not as epochs x steps_per_epoch: a resumed run may take other steps
    # per epoch than the run that wrote the checkpoint (another batch size or number of processes), and a
    # max_steps run ends its last epoch early.
    state.step_in_epoch = min(state.step_in_epoch, steps_per_epoch)
    planned = state.step + (cfg.epochs - state.epochs_done) * steps_per_epoch - state.step_in_epoch
    total_steps = planned if cfg.max_steps is None else min(cfg.max_steps, planned)
    patience = cfg.early_stopping_patience
    if resume_from is not None and patience and state.evals_without_improvement >= patience:
        raise UserError(f"the run in {output_dir} stopped early at step {state.step:,}: validation loss had not "
                        f"improved for {state.evals_without_improvement} evaluation(s). To train on anyway, resume "
                        f"with a larger --set training.early_stopping_patience (or 0 to switch it off)")
    if state.step >= total_steps:
        limit = (f"training.max_steps={cfg.max_steps}; to train further, resume with a larger "
                 f"--set training.max_steps (or =null)" if total_steps == cfg.max_steps
                 else f"{cfg.epochs} epochs; to train further, resume with a larger --epochs")
        raise UserError(f"the run in {output_dir} already finished its {total_steps:,} steps ({limit})")
    with distributed.collectively(dist):
        if dist.is_main:
            _start_output_dir(output_dir, earlier_run, resume=resume_from is not None)
            save_config(config, output_dir / "config.yaml")
    _print_header(config, data, model, dev, amp, dist, steps_per_epoch, total_steps, tokens_per_step,
                  output_dir, resume_from, config_origin, step_model is not (ddp or model))

    data_info = {"fingerprint": data.fingerprint, "files": [str(f.resolve()) for f in data.files],
                 "num_chars": data.num_chars, "num_train_tokens": len(data.train),
                 "num_val_tokens": len(data.val)}

    def save(path: Path, with_training_state: bool = True) -> None:
        """Called on every rank at the same points; only rank 0 writes."""
        rng = _rng_state(dev)
        # Each rank's RNG state (its dropout stream), so a resumed distributed run continues exactly.
        per_rank = distributed.all_gather_object(dist, rng) if with_training_state and dist.enabled else None
        if not dist.is_main:
            return
        training_state = None
        if with_training_state:
            training_state = {
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "sampler": sampler.state_dict(),
                "rng": {**rng, "per_rank": per_rank} if per_rank else rng,
            }
        ckpt.save_checkpoint(path, model=model, config=config, tokenizer=data.tokenizer, data=data_info,
                             progress=state.to_dict(), training_state=training_state)

    log = None
    if dist.is_main:
        run_record = {"kind": "run", "parameters": model.num_parameters(), "flops_per_token": model.flops_per_token(),
                      "vocab_size": data.tokenizer.vocab_size,
                      "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
                      "tokens_per_step": tokens_per_step, "device": str(dev), "world_size": dist.world_size,
                      "config": config.to_dict()}
        log = MetricsLog(output_dir, run_record, resume_step=state.step if resume_from else None,
                         history_from=resume_from[0].parent if resume_from else None, tensorboard=tensorboard)

    result = TrainResult(output_dir=output_dir, steps=state.step, epochs_completed=state.epochs_done,
                         best_val_loss=state.best_val_loss, last_val_loss=state.val_loss,
                         last_train_loss=state.train_loss, elapsed_seconds=state.elapsed_seconds,
                         tokens_per_second=0.0)
    stop = StopRequest()
    run_start = time.perf_counter() - state.elapsed_seconds
    window = _LogWindow(state.pending_losses, state.pending_norms)
    state.pending_losses, state.pending_norms = [], []

    def write_train_record(epoch: int, lr: float, bar: Progress) -> None:
        values, norms = window.read(dist)
        _check_finite(values, state.step - len(values) + 1, output_dir)
        now = time.perf_counter()
        tps = window.tokens / max(now - window.start, 1e-9)
        state.epoch_loss_sum += sum(values)
        state.epoch_loss_steps += len(values)
        state.train_loss = values[-1]
        bar.set_postfix(loss=f"{values[-1]:.4f}", lr=f"{lr:.2e}")
        if log is not None:
            log.write({"kind": "train", "step": state.step, "epoch": epoch,
                       "train_loss": sum(values) / len(values), "lr": lr,
                       "grad_norm": sum(norms) / len(norms), "tokens_per_sec": tps,
                       "elapsed": now - run_start, **_memory_stats(dev)})
        result.tokens_per_second = tps
        window.reset()
    step_model.train()

    def evaluate_now() -> bool:
        """Evaluate, log, keep best_model.pt; returns True when early stopping says to stop."""
        val_loss = estimate_loss(model, val_tokens, cfg.batch_size, dev, amp, cfg.eval_batches * cfg.batch_size,
                                 dist)
        state.val_loss = val_loss
        improved = val_loss < state.best_val_loss
        if improved:
            state.best_val_loss, state.evals_without_improvement = val_loss, 0
        else:
            state.evals_without_improvement += 1
        if log is not None:
            log.write({"kind": "eval", "step": state.step, "epoch": state.epochs_done + 1,
                       "train_loss": state.train_loss, "val_loss": val_loss, "perplexity": perplexity(val_loss),
                       "bits_per_char": bits_per_char(val_loss),
                       "elapsed": time.perf_counter() - run_start})
        if improved and cfg.save_best:
            save(output_dir / ckpt.BEST, with_training_state=False)
            result.checkpoints.append(ckpt.BEST)
        patience = cfg.early_stopping_patience
        return bool(patience) and state.evals_without_improvement >= patience

    try:
        with stop.installed():
            while state.step < total_steps and not result.stopped_early:
                epoch = state.epochs_done + 1
                epoch_steps = min(steps_per_epoch, state.step_in_epoch + total_steps - state.step)
                bar = Progress(epoch_steps, f"Epoch {epoch}/{cfg.epochs}", unit="it", initial=state.step_in_epoch)
                while state.step_in_epoch < epoch_steps:
                    lr = lr_at(state.step, total_steps, steps_per_epoch, cfg)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    loss, norm = optimizer_step(step_model, model, optimizer, scaler, sampler, cfg, amp, ddp)
                    state.step += 1
                    state.step_in_epoch += 1
                    state.tokens_seen += tokens_per_step
                    window.add(loss, norm, tokens_per_step)
                    bar.update()

                    last_in_epoch = state.step_in_epoch == epoch_steps
                    eval_due = bool(cfg.eval_interval) and state.step % cfg.eval_interval == 0 and not last_in_epoch
                    if state.step % cfg.log_interval == 0 or last_in_epoch or eval_due:
                        write_train_record(epoch, lr, bar)
                    if eval_due:
                        result.stopped_early = evaluate_now()
                        window.start = time.perf_counter()
                        if result.stopped_early:
                            break

                    if distributed.any_rank(dist, stop.signum is not None):
                        # The steps since the last record go into the checkpoint (checked: a NaN is never
                        # saved), so the resumed run's records match an uninterrupted run's.
                        state.pending_losses, state.pending_norms = window.read(dist)
                        _check_finite(state.pending_losses, state.step - len(state.pending_losses) + 1,
                                      output_dir)
                        state.elapsed_seconds = time.perf_counter() - run_start
                        bar.close(final_line=False)
                        return _interrupted(stop, save, state, output_dir, result)

                # End of epoch (or of training, when max_steps or early stopping ends it mid-epoch).
                bar.close()
                state.train_loss = state.epoch_loss_sum / max(1, state.epoch_loss_steps)
                if not result.stopped_early:
                    result.stopped_early = evaluate_now()
                # An epoch that max_steps or early stopping cut short stays open: a resumed run finishes it.
                epoch_complete = state.step_in_epoch == steps_per_epoch
                if epoch_complete:
                    state.epochs_done += 1
                    state.step_in_epoch, state.epoch_loss_sum, state.epoch_loss_steps = 0, 0.0, 0
                state.elapsed_seconds = time.perf_counter() - run_start
                info(f"  train_loss={state.train_loss:.4f}, val_loss={state.val_loss:.4f}, "
                     f"perplexity={perplexity(state.val_loss):.2f}, bpc={bits_per_char(state.val_loss):.3f}"
                     + ("  (best)" if state.evals_without_improvement == 0 else ""))  # a new low, not a tie
                if epoch_complete and state.epochs_done % cfg.save_every_n_epochs == 0:
                    save(output_dir / ckpt.periodic_name(epoch))
                    if dist.is_main:
                        ckpt.prune_periodic(output_dir, cfg.keep_last_n)
                    result.checkpoints.append(ckpt.periodic_name(epoch))
                if result.stopped_early:
                    info(f"Early stopping: validation loss has not improved for {cfg.early_stopping_patience} "
                         f"evaluation(s); best {state.best_val_loss:.4f}")
                distributed.barrier(dist)
                window.start = time.perf_counter()  # tokens/s measures training, not evaluation and saving

            state.elapsed_seconds = time.perf_counter() - run_start
            save(output_dir / ckpt.FINAL)
            result.checkpoints.append(ckpt.FINAL)
            if dist.is_main:  # a finished run has nothing left to resume from an interruption
                (output_dir / ckpt.INTERRUPTED).unlink(missing_ok=True)
    except torch.OutOfMemoryError:
        raise TrainingFailed(_oom_message(cfg, dev)) from None
    except RuntimeError as exc:
        if stop.aborted:  # the second Ctrl-C landed inside torch.save, which reports it as a RuntimeError
            raise Aborted(stop.aborted) from None
        if "can't allocate memory" not in str(exc):  # the CPU allocator's out-of-memory error
            raise
        raise TrainingFailed(_oom_message(cfg, dev)) from None
    finally:
        if log is not None:
            log.end(state.step, time.perf_counter() - run_start, result.interrupted_by is not None, sys.exc_info()[1])
            log.close()

    result.steps, result.epochs_completed = state.step, state.epochs_done
    result.best_val_loss, result.last_val_loss = state.best_val_loss, state.val_loss
    result.last_train_loss, result.elapsed_seconds = state.train_loss, state.elapsed_seconds
    info(f"Done: {state.step:,} steps in {_duration(state.elapsed_seconds)}; best val_loss "
         f"{state.best_val_loss:.4f} ({bits_per_char(state.best_val_loss):.3f} bits/char). "
         f"Checkpoints in {output_dir}/")
    if dist.is_main:
        plot_finished_run(output_dir)  # training.png; skipped without matplotlib, never fails the run
    return result


# ----------------------------------------------------------------------------------------------------------
# Helpers of the loop


def _compile(model: torch.nn.Module, cfg: TrainingConfig, dev: torch.device) -> torch.nn.Module:
    wanted = cfg.compile if cfg.compile != "auto" else dev.type == "cuda"
    if not wanted:
        return model
    try:
        import torch._dynamo

        torch._dynamo.config.suppress_errors = True  # a graph that fails to compile runs eagerly instead
        return torch.compile(model)
    except Exception as exc:  # compile is an optimisation: never fail a run for it
        warn(f"torch.compile is unavailable here ({exc}); training without it")
        return model


def _rng_state(dev: torch.device) -> dict[str, Any]:
    # Only this process's GPU: asking for every GPU's state would open a CUDA context on each of them.
    return {"torch": torch.get_rng_state(), "cuda": [torch.cuda.get_rng_state(dev)] if dev.type == "cuda" else []}


def _restore(payload: dict[str, Any], model: GPT, optimizer: torch.optim.Optimizer | MuonAdamW,
             scaler: torch.amp.GradScaler, sampler: BatchSampler, dev: torch.device, dist: distributed.Dist,
             seed: int) -> _Progress:
    training_state = payload["training_state"]
    model.load_state_dict(payload["model"])
    # load_state_dict also restores the saved hyperparameters; keep this run's (weight decay and betas may
    # be changed on resume; the learning rate is set every step anyway).
    hyperparameters = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(training_state["optimizer"])
    for group, chosen in zip(optimizer.param_groups, hyperparameters, strict=True):
        group.update(chosen)
    if training_state["scaler"]:  # empty when the run that saved it needed no gradient scaling (fp32, bf16)
        scaler.load_state_dict(training_state["scaler"])
    sampler.load_state_dict(training_state["sampler"])
    known = _Progress.__dataclass_fields__
    progress = _Progress(**{k: v for k, v in payload["progress"].items() if k in known})
    rng = training_state["rng"]
    per_rank = rng.get("per_rank") or []
    exact = len(per_rank) == dist.world_size or (not per_rank and not dist.enabled)
    mine = per_rank[dist.rank] if len(per_rank) == dist.world_size else rng
    torch.set_rng_state(mine["torch"])
    if dev.type == "cuda" and mine["cuda"]:
        torch.cuda.set_rng_state(mine["cuda"][0], dev)
    if not exact and dist.rank > 0:
        # Resumed with another number of processes: rank 0 continues the saved stream, the others get fresh
        # streams of their own (distinct per rank and step, so dropout masks still differ between ranks).
        torch.manual_seed(seed + dist.rank + 1_000_003 * progress.step)
    return progress


def check_data_size(data: TokenData, cfg: TrainingConfig) -> None:
    need = cfg.sequence_length + 1
    if len(data.train) < need:
        raise UserError(
            f"the training part of the data holds {len(data.train):,} characters, fewer than one training window "
            f"(sequence_length {cfg.sequence_length} + 1); use more text"
            + (f" or a smaller --sequence-length (at most {len(data.train) - 1})" if len(data.train) > 2 else ""))
    if len(data.val) < 2:
        raise UserError(f"the validation part of the data holds {len(data.val)} character(s); raise "
                        f"training.validation_split or use more text")


def _check_finite(values: list[float], first_step: int, output_dir: Path) -> None:
    for offset, value in enumerate(values):
        if not math.isfinite(value):
            raise TrainingFailed(
                f"the training loss became {value} at step {first_step + offset}. Lower the learning rate "
                f"(--learning-rate) or enable gradient clipping (--set training.gradient_clip_norm=1.0). "
                f"Checkpoints already in {output_dir} are untouched")


def _interrupted(stop: StopRequest, save: Callable[[Path], None], state: _Progress, output_dir: Path,
                 result: TrainResult) -> TrainResult:
    save(output_dir / ckpt.INTERRUPTED)
    result.interrupted_by = stop.signum
    result.steps, result.epochs_completed = state.step, state.epochs_done
    result.checkpoints.append(ckpt.INTERRUPTED)
    info(f"Interrupted at step {state.step:,}; saved {output_dir / ckpt.INTERRUPTED}. Resume with: "
         f"fundamentallm train --resume auto -o {shlex.quote(str(output_dir))}")
    result.elapsed_seconds = state.elapsed_seconds
    return result


def _oom_message(cfg: TrainingConfig, dev: torch.device) -> str:
    half = max(1, cfg.batch_size // 2)
    return (f"out of memory on {dev} with batch_size {cfg.batch_size} and sequence_length "
            f"{cfg.sequence_length}. In order: 1) a smaller batch with gradient accumulation, e.g. --batch-size "
            f"{half} --set training.gradient_accumulation_steps={cfg.gradient_accumulation_steps * 2}; 2) a smaller "
            f"preset, e.g. --config small; 3) a shorter context, e.g. --sequence-length "
            f"{max(1, cfg.sequence_length // 2)}")


def _tokenized(data: TokenData) -> str:
    if data.build_seconds < 0.5:  # nothing worth reporting for small inputs
        return ""
    rate = data.text_bytes / data.build_seconds / 1e6
    return f" (tokenized in {data.build_seconds:.1f}s, {rate:.0f} MB/s, into the token cache)"


def _memory_stats(dev: torch.device) -> dict[str, float]:
    if dev.type != "cuda":
        return {}
    return {"peak_memory_mb": torch.cuda.max_memory_allocated(dev) / 2**20}


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _print_header(config: Config, data: TokenData, model: GPT, dev: torch.device, amp: torch.dtype | None,
                  dist: distributed.Dist, steps_per_epoch: int, total_steps: int, tokens_per_step: int,
                  output_dir: Path, resume_from: tuple[Path, dict[str, Any]] | None, config_origin: str,
                  compiled: bool) -> None:
    m, t = config.model, config.training
    files = ", ".join(f.name for f in data.files[:3]) + (f" (+{len(data.files) - 3} files)"
                                                         if len(data.files) > 3 else "")
    precision = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[amp]
    threads = f" ({torch.get_num_threads()} threads)" if dev.type == "cpu" else ""
    info(f"Device: {dev}{threads}, {precision}, torch.compile {'on' if compiled else 'off'}"
         + (f", {dist.world_size} processes" if dist.enabled else ""))
    info(f"Data: {files}: {data.num_chars:,} characters, vocabulary {data.tokenizer.vocab_size}; "
         f"train {len(data.train):,} / validation {len(data.val):,} tokens"
         + (" (token cache)" if data.from_cache else _tokenized(data)))
    info(f"Model: {config_origin or 'config'}: {m.num_layers} layers, d_model {m.d_model}, {m.num_heads} heads, "
         f"d_ff {m.d_ff}, context {t.sequence_length}: {model.num_parameters():,} parameters")
    effective = t.batch_size * t.gradient_accumulation_steps * dist.world_size
    info(f"Training: {t.epochs} epoch(s) x {steps_per_epoch:,} optimizer steps = {total_steps:,} steps; batch "
         f"{t.batch_size} x accumulation {t.gradient_accumulation_steps}"
         + (f" x {dist.world_size} processes" if dist.enabled else "")
         + f" = {effective} sequences ({tokens_per_step:,} tokens) per step; lr {t.learning_rate:g} {t.scheduler}, "
         f"warmup {t.warmup_steps}")
    if resume_from is not None:
        p = resume_from[1]["progress"]
        info(f"Resuming from {resume_from[0]} at step {p['step']:,} (epoch {p['epochs_done'] + 1})")
    info(f"Output: {output_dir}/")
