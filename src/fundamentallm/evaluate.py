"""Scoring a model on text: loss (nats per character), perplexity and bits per character.

`estimate_loss` is the one place that scores: the training loop's evaluations and `fundamentallm evaluate` both
use it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from fundamentallm import distributed
from fundamentallm.checkpoint import Checkpoint, load_model
from fundamentallm.console import Progress
from fundamentallm.data import as_tensor, encode_files, eval_windows, gather_windows, prepare_tokens
from fundamentallm.device import autocast_dtype, select_device
from fundamentallm.errors import UserError
from fundamentallm.metrics import bits_per_char, perplexity
from fundamentallm.model import GPT

PROGRESS_MIN = 256  # windows: below this an evaluation takes a moment and needs no bar


@torch.no_grad()
def estimate_loss(model: GPT, tokens: torch.Tensor | np.ndarray, batch_size: int, device: torch.device,
                  amp: torch.dtype | None = None, max_windows: int = 0,
                  dist: distributed.Dist = distributed.SINGLE, progress: bool = False) -> float:
    """Mean cross-entropy (nats per token) over `tokens`, every prediction counted once, at the model's context
    length (see data.eval_windows). Under torchrun the windows are shared out and the sums all-reduced. With
    `progress`, a bar counts the windows (for long texts: `fundamentallm evaluate` is otherwise silent)."""
    windows = eval_windows(len(tokens), model.context_length, max_windows)[dist.rank :: dist.world_size]
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    by_length: dict[int, list[int]] = {}
    for start, length in windows:
        by_length.setdefault(length, []).append(start)
    bar = Progress(len(windows), "Evaluating", unit="window") if progress and len(windows) > PROGRESS_MIN else None
    for length, starts in by_length.items():
        for i in range(0, len(starts), batch_size):
            batch = gather_windows(tokens, torch.tensor(starts[i : i + batch_size]), length, device)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                _, loss = model(batch[:, :-1], batch[:, 1:])
            count = batch.size(0) * (length - 1)
            totals += torch.stack([loss.double() * count, torch.tensor(float(count), device=device,
                                                                       dtype=torch.float64)])
            if bar is not None:
                bar.update(batch.size(0))
    if bar is not None:
        bar.close(final_line=False)
    model.train(was_training)
    distributed.all_reduce_sum(dist, totals)
    if totals[1] == 0:
        return float("nan")
    return (totals[0] / totals[1]).item()


@dataclass
class Evaluation:
    checkpoint: str
    data: str
    tokens: int
    predictions: int  # tokens - 1: the first character has nothing before it to be predicted from
    loss: float
    perplexity: float
    bits_per_char: float
    context_length: int

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(checkpoint: Path, data_paths: list[str] | None = None, device: str = "auto",
             batch_size: int = 32) -> Evaluation:
    """Loss over every character of DATA (or of the run's own validation split when no DATA is given)."""
    dev = select_device(device)
    loaded = load_model(checkpoint, dev)
    if data_paths:
        tokens = encode_files(data_paths, loaded.tokenizer)
        described = ", ".join(data_paths)
    else:
        tokens, described = _validation_split(loaded.checkpoint)
    amp = autocast_dtype(dev, loaded.config.training.use_mixed_precision)
    loss = estimate_loss(loaded.model, as_tensor(tokens, dev), batch_size, dev, amp, progress=True)
    return Evaluation(checkpoint=str(checkpoint), data=described, tokens=len(tokens),
                      predictions=len(tokens) - 1, loss=loss,
                      perplexity=perplexity(loss), bits_per_char=bits_per_char(loss),
                      context_length=loaded.model.context_length)


def _validation_split(checkpoint: Checkpoint) -> tuple[np.ndarray, str]:
    path, files = checkpoint.path, checkpoint.data.files
    missing = [f for f in files if not Path(f).exists()]
    if not files or missing:
        raise UserError(f"{path} was trained on {', '.join(missing or files) or 'unknown files'}, which "
                        f"cannot be found now; pass the text to evaluate on: fundamentallm evaluate {path} DATA")
    training = checkpoint.config.training
    data = prepare_tokens(files, training.validation_split, checkpoint.config.data.min_char_frequency)
    if data.fingerprint != checkpoint.data.fingerprint:
        raise UserError(f"the training data of {path} ({', '.join(files)}) changed since training, so its "
                        f"validation split is no longer known; pass the text to evaluate on as DATA")
    return data.val, f"validation split of {', '.join(Path(f).name for f in files)}"
