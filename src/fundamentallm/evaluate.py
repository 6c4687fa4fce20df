"""Scoring a model on text: loss (nats per token), perplexity (per token) and bits per character.

`score_tokens` is the one place that scores: the training loop's evaluations (through `estimate_loss`) and
`fundamentallm evaluate` both use it. Bits per character are the total bits over the text divided by its
characters, so that char, byte and BPE models can be ranked on the same text.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fundamentallm import distributed
from fundamentallm.checkpoint import Checkpoint, load_model
from fundamentallm.console import Progress
from fundamentallm.data import (
    EncodedText,
    as_tensor,
    encode_files,
    eval_windows,
    gather_windows,
    prepare_data,
    record_format,
    trained_as_text,
)
from fundamentallm.device import PRECISION_NAMES, autocast_dtype, select_device
from fundamentallm.errors import UserError
from fundamentallm.metrics import bits_per_char, perplexity
from fundamentallm.model import GPT

PROGRESS_MIN = 256  # windows: below this an evaluation takes a moment and needs no bar


@dataclass
class Score:
    nats: float  # summed over every prediction
    predictions: int
    unknown_nats: float = 0.0  # the part of `nats` spent predicting the unknown token
    unknown_predictions: int = 0

    @property
    def loss(self) -> float:
        """Mean cross-entropy per predicted token (nats)."""
        return self.nats / self.predictions if self.predictions else math.nan


@torch.inference_mode()
def score_tokens(model: GPT, tokens: torch.Tensor | np.ndarray, batch_size: int, device: torch.device,
                 amp: torch.dtype | None = None, max_windows: int = 0, dist: distributed.Dist = distributed.SINGLE,
                 unknown_id: int = -1, progress: bool = False, stride: int = 0) -> Score:
    """Cross-entropy over `tokens`, every prediction counted once, in windows of the model's context length side
    by side or, with a `stride` shorter than it, sliding (see data.eval_windows); predictions of `unknown_id` are
    also summed apart. Under torchrun the windows are shared out and the sums all-reduced. With `progress`, a bar
    counts the windows (`fundamentallm evaluate` is otherwise silent on long texts)."""
    windows = eval_windows(len(tokens), model.context_length, max_windows, stride)[dist.rank :: dist.world_size]
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    groups: dict[tuple[int, int], list[int]] = {}  # windows of one length and one skip go in one batch
    for start, length, skip in windows:
        groups.setdefault((length, skip), []).append(start)
    bar = Progress(len(windows), "Evaluating", unit="window") if progress and len(windows) > PROGRESS_MIN else None
    for (length, skip), starts in groups.items():
        for i in range(0, len(starts), batch_size):
            batch = gather_windows(tokens, torch.tensor(starts[i : i + batch_size]), length, device)
            targets = batch[:, 1 + skip :].reshape(-1)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                logits, _ = model(batch[:, :-1])
            flat, count = logits[:, skip:].reshape(-1, logits.size(-1)).float(), len(targets)
            # The mean in float32, as the model's own loss: the same numbers as training reports.
            totals[:2] += torch.stack([F.cross_entropy(flat, targets).double() * count,
                                       torch.tensor(float(count), device=device, dtype=torch.float64)])
            if unknown_id >= 0:
                unknown = (targets == unknown_id).double()  # a mask, not an index: no host-device sync
                nats = F.cross_entropy(flat, targets, reduction="none").double()
                totals[2:] += torch.stack([(nats * unknown).sum(), unknown.sum()])
            if bar is not None:
                bar.update(batch.size(0))
    if bar is not None:
        bar.close(final_line=False)
    model.train(was_training)
    distributed.all_reduce_sum(dist, totals)
    nats, predictions, unknown_nats, unknown_predictions = totals.tolist()
    return Score(nats, int(predictions), unknown_nats, int(unknown_predictions))


@dataclass
class TokenLogprobs:
    """Per prediction i (the token at position i + 1 of the text, given those before it): its log-probability and
    the `top` most likely tokens with theirs, best first."""

    logprobs: torch.Tensor  # (n - 1,) float32
    top_ids: torch.Tensor  # (n - 1, top) int64
    top_logprobs: torch.Tensor  # (n - 1, top) float32


@torch.inference_mode()
def token_logprobs(model: GPT, tokens: list[int], top: int = 0, batch_size: int = 32,
                   stride: int = 0) -> TokenLogprobs:
    """Every token's log-probability after the first, in the same windows (and `stride`) and float32
    log-softmax as score_tokens, so their sum is minus its nats on the same tokens; the model must be in eval
    mode (it is not switched here, since a server's other threads use it)."""
    device = next(model.parameters()).device
    ids, top = np.asarray(tokens, dtype=np.int64), min(top, model.vocab_size)
    chosen, top_ids, top_logprobs = [torch.zeros(0)], [torch.zeros(0, top, dtype=torch.long)], [torch.zeros(0, top)]
    windows = eval_windows(len(ids), model.context_length, stride=stride)
    for i in range(0, len(windows), batch_size):
        # Only the first and last windows may differ in length or skip: grouping keeps the text's order.
        for (length, skip), group in itertools.groupby(windows[i : i + batch_size], key=lambda w: (w[1], w[2])):
            batch = gather_windows(ids, torch.tensor([start for start, _, _ in group]), length, device)
            logits, _ = model(batch[:, :-1])
            logp = logits[:, skip:].float().log_softmax(dim=-1).flatten(0, 1)
            chosen.append(logp.gather(-1, batch[:, 1 + skip :].reshape(-1, 1)).squeeze(-1).cpu())
            best = logp.topk(top, dim=-1)
            top_ids.append(best.indices.cpu())
            top_logprobs.append(best.values.cpu())
    return TokenLogprobs(torch.cat(chosen), torch.cat(top_ids), torch.cat(top_logprobs))


def estimate_loss(model: GPT, tokens: torch.Tensor | np.ndarray, batch_size: int, device: torch.device,
                  amp: torch.dtype | None = None, max_windows: int = 0,
                  dist: distributed.Dist = distributed.SINGLE, progress: bool = False) -> float:
    """Mean cross-entropy (nats per token) over `tokens` (see score_tokens)."""
    return score_tokens(model, tokens, batch_size, device, amp, max_windows, dist, progress=progress).loss


@dataclass
class Evaluation:
    checkpoint: str
    data: str
    tokenizer: str  # char, byte or bpe
    characters: int
    tokens: int
    predictions: int  # tokens - 1: the first token has nothing before it to be predicted from
    loss_per_token: float  # nats
    perplexity: float  # per token
    bits_per_char: float  # total bits over the text / its characters
    context_length: int
    stride: int  # tokens between window starts: the context length (side by side) unless --stride
    precision: str  # fp32, or the training's autocast (--training-precision)
    unknown_characters: int = 0  # characters outside a char model's vocabulary, scored as its unknown token
    unknown_bits: float = 0.0  # the bits the model spent on them

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(checkpoint: Path, data_paths: list[str] | None = None, device: str = "auto",
             batch_size: int = 64, strict: bool = False, stride: int | None = None,
             training_precision: bool = False, text_field: str | None = None,
             skip_bad_records: bool = False) -> Evaluation:
    """Loss over every token of DATA (or of the run's own validation split when no DATA is given), in float32
    unless `training_precision` asks for the training's autocast. Windows of the context length side by side,
    or sliding by `stride` tokens so that each prediction has more context. Characters the model never saw
    count as its unknown token, or are refused with `strict`. Record files give their text as the training
    run's config says, or from `text_field`."""
    if not data_paths and (text_field or skip_bad_records):
        raise UserError("--text-field and --skip-bad-records apply to DATA; without DATA the run's validation "
                        "split is read as it was in training")
    dev = select_device(device)
    loaded = load_model(checkpoint, dev)
    tokenizer, context = loaded.tokenizer, loaded.model.context_length
    if stride is not None and not 1 <= stride <= context:
        raise UserError(f"--stride {stride}: windows slide by 1 to {context} tokens (this model's context); "
                        f"leave it out for windows side by side")
    if data_paths:
        fmt = record_format(loaded.config)
        fmt = dataclasses.replace(fmt, text_field=text_field or fmt.text_field, skip_bad=skip_bad_records or
                                  fmt.skip_bad)
        text = encode_files(data_paths, tokenizer, strict, fmt)
        described = ", ".join(data_paths)
    else:
        text, described = _validation_split(loaded.checkpoint)
    amp = autocast_dtype(dev, loaded.config.training.use_mixed_precision) if training_precision else None
    score = score_tokens(loaded.model, as_tensor(text.tokens, dev), batch_size, dev, amp,
                         unknown_id=tokenizer.unknown_id, progress=True, stride=stride or context)
    return Evaluation(checkpoint=str(checkpoint), data=described, tokenizer=tokenizer.kind,
                      characters=text.num_chars, tokens=len(text.tokens), predictions=score.predictions,
                      loss_per_token=score.loss, perplexity=perplexity(score.loss),
                      bits_per_char=bits_per_char(score.loss, len(text.tokens), text.num_chars),
                      context_length=context, stride=stride or context, precision=PRECISION_NAMES[amp],
                      unknown_characters=text.unknown_chars, unknown_bits=score.unknown_nats / math.log(2))


def _check_not_trained_as_text(checkpoint: Checkpoint) -> None:
    """Called when the recorded data no longer gives the run's text: says why when the run trained on a record
    file's raw text, before such files were read as records (one more pass over the files, on this path only)."""
    data = checkpoint.data
    record = trained_as_text(data.fingerprint, checkpoint.config, data.files, data.val_files or None)
    if record is not None:
        raise UserError(f"{checkpoint.path} trained on the raw text of {record} (its syntax and all), and that file "
                        f"is now read as records, so its validation split is not what the file gives now; pass "
                        f"the text to evaluate on as DATA")


def _validation_split(checkpoint: Checkpoint) -> tuple[EncodedText, str]:
    path, files, val_files = checkpoint.path, checkpoint.data.files, checkpoint.data.val_files
    missing = [f for f in files + val_files if not Path(f).exists()]
    if not files or missing:
        raise UserError(f"{path} was trained on {', '.join(missing or files) or 'unknown files'}, which "
                        f"cannot be found now; pass the text to evaluate on: fundamentallm evaluate {path} DATA")
    try:
        data = prepare_data(checkpoint.config, files, val_files or None)
    except UserError:  # its files cannot be read as records now: say so if it trained on their raw text
        _check_not_trained_as_text(checkpoint)
        raise
    if data.fingerprint != checkpoint.data.fingerprint:
        _check_not_trained_as_text(checkpoint)
        raise UserError(f"the training data of {path} ({', '.join(files + val_files)}) changed since training, so "
                        f"its validation split is no longer known; pass the text to evaluate on as DATA")
    unknown = int(np.count_nonzero(data.val == data.tokenizer.unknown_id)) if data.tokenizer.has_unknown else 0
    where = ", ".join(Path(f).name for f in val_files) if val_files else \
        f"validation split of {', '.join(Path(f).name for f in files)}"
    return EncodedText(data.val, data.val_chars, unknown), where
