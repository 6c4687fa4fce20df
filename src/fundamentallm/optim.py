"""Optimizers, the learning-rate schedule and one optimizer step: what every training run (and the range
test) does to the weights."""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any

import torch

from fundamentallm.config import TrainingConfig
from fundamentallm.device import native_bf16
from fundamentallm.errors import UserError
from fundamentallm.model import GPT

if TYPE_CHECKING:
    from torch.nn.parallel import DistributedDataParallel

    from fundamentallm.data import BatchSampler


def warmup_for(cfg: TrainingConfig, total_steps: int) -> int:
    """Warm-up steps for a run of `total_steps`: at most a tenth of the run, so that a short run (a sweep's,
    a budgeted one) trains at the rates it was given instead of warming up all along."""
    return min(cfg.warmup_steps, total_steps // 10)


def lr_at(step: int, total_steps: int, steps_per_epoch: int, cfg: TrainingConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then the configured decay."""
    peak, floor = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    warmup = warmup_for(cfg, total_steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    if cfg.scheduler == "constant":
        return peak
    if cfg.scheduler == "step":  # step_size counts epochs, as in the training guide
        drops = step // (cfg.step_size * steps_per_epoch)
        return max(peak * cfg.gamma**drops, floor)
    if cfg.scheduler == "wsd":  # stable at the peak, then a straight line down over the last part of the run
        decay_steps = max(1, round(cfg.decay_fraction * (total_steps - warmup)))
        decay_start = total_steps - decay_steps
        return peak if step < decay_start else peak - (peak - floor) * min(1.0, (step - decay_start) / decay_steps)
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if cfg.scheduler == "linear":
        return peak - (peak - floor) * progress
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


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


Optimizer = torch.optim.Optimizer | MuonAdamW


class Muon(torch.optim.Muon):
    """`torch.optim.Muon`, with its Newton-Schulz orthogonalisation in float32 where the hardware has no native
    bf16 (`float32=True`). PyTorch's runs in bf16, which such a CPU emulates: on a 2-core Xeon without bf16
    instructions the optimizer took 81 of fast-cpu's 222 ms per step, 21 ms with this (benchmarks/RESULTS.md,
    "Muon in float32"). The same update otherwise, and the same state, so a checkpoint resumes with either."""

    def __init__(self, params: list[torch.nn.Parameter], *, float32: bool, **options: Any) -> None:
        super().__init__(params, **options)
        self.float32 = float32

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        if not self.float32:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad)
            buffers = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_lerp_(buffers, grads, 1 - group["momentum"])
            updates = [g.lerp(b, group["momentum"]) for g, b in zip(grads, buffers, strict=True)] \
                if group["nesterov"] else buffers
            lr = float(group["lr"])
            for param, update in zip(params, orthogonalise(updates, group["ns_coefficients"], group["ns_steps"],
                                                            group["eps"]), strict=True):
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(update, alpha=-lr * _lr_ratio(group["adjust_lr_fn"], param.shape))
        return loss


def orthogonalise(matrices: list[torch.Tensor], coefficients: tuple[float, float, float], steps: int,
                  eps: float) -> list[torch.Tensor]:
    """Muon's quintic Newton-Schulz iteration, in float32, on each matrix (those of one shape in one batch: fewer,
    larger products)."""
    a, b, c = coefficients
    tall = [m.size(0) > m.size(1) for m in matrices]
    wide = [m.mT if t else m for m, t in zip(matrices, tall, strict=True)]  # iterate on the smaller Gram matrix
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, m in enumerate(wide):
        by_shape.setdefault(tuple(m.shape), []).append(i)
    out: list[torch.Tensor] = [torch.empty(0)] * len(matrices)
    for indices in by_shape.values():
        x = torch.stack([wide[i] for i in indices]).float()
        x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=eps)  # spectral norm at most 1
        for _ in range(steps):
            gram = x @ x.mT
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        for i, result in zip(indices, x, strict=True):
            out[i] = (result.mT if tall[i] else result).to(matrices[i].dtype)
    return out


def _lr_ratio(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """How Muon scales the learning rate for a matrix of this shape (as torch.optim.Muon does)."""
    rows, cols = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1, rows / cols))


def make_optimizer(model: GPT, cfg: TrainingConfig, device: torch.device) -> Optimizer:
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
    muon = Muon(matrices, float32=not native_bf16(device), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                adjust_lr_fn="match_rms_adamw")
    return MuonAdamW(muon, adamw([p for p in model.parameters() if id(p) not in ids]))


def set_lr(optimizer: Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def optimizer_step(step_model: torch.nn.Module, model: GPT, optimizer: Optimizer, scaler: torch.amp.GradScaler,
                   sampler: BatchSampler, cfg: TrainingConfig, amp: torch.dtype | None,
                   ddp: DistributedDataParallel | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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
