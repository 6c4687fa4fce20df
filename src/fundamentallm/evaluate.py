"""Score a checkpoint on text: loss (nats per character), perplexity and bits per character."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fundamentallm.checkpoint import load_model
from fundamentallm.config import Config
from fundamentallm.data import as_tensor, encode_files, prepare_tokens
from fundamentallm.errors import UserError
from fundamentallm.metrics import bits_per_char, perplexity
from fundamentallm.train import autocast_dtype, estimate_loss, select_device


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
        tokens, described = _validation_split(checkpoint, loaded.payload, loaded.config)
    amp = autocast_dtype(dev, loaded.config.training.use_mixed_precision)
    loss = estimate_loss(loaded.model, as_tensor(tokens, dev), batch_size, dev, amp)
    return Evaluation(checkpoint=str(checkpoint), data=described, tokens=len(tokens),
                      predictions=len(tokens) - 1, loss=loss,
                      perplexity=perplexity(loss), bits_per_char=bits_per_char(loss),
                      context_length=loaded.model.context_length)


def _validation_split(checkpoint: Path, payload: dict, config: Config) -> tuple[np.ndarray, str]:
    info = payload.get("data") or {}
    files = info.get("files") or []
    missing = [f for f in files if not Path(f).exists()]
    if not files or missing:
        raise UserError(f"{checkpoint} was trained on {', '.join(missing or files) or 'unknown files'}, which "
                        f"cannot be found now; pass the text to evaluate on: fundamentallm evaluate {checkpoint} "
                        f"DATA")
    data = prepare_tokens(files, config.training.validation_split, config.data.min_char_frequency)
    if data.fingerprint != info.get("fingerprint"):
        raise UserError(f"the training data of {checkpoint} ({', '.join(files)}) changed since training, so its "
                        f"validation split is no longer known; pass the text to evaluate on as DATA")
    return data.val, f"validation split of {', '.join(Path(f).name for f in files)}"
