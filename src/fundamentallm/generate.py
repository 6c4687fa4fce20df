"""Text generation: sampling as pure functions over logits, and a streaming decoder with a KV cache.

Each new token runs the model over one position, reusing the cached keys and values of all earlier ones.
A byte or BPE token may end inside a character: the text is
decoded by the tokenizer's stream decoder, which holds incomplete UTF-8 sequences back until they complete.
When the text outgrows the context, the window slides: the cache is rebuilt from the last half-context of
tokens (one batched forward pass every context/2 tokens), so the cost per token stays flat however long the
text gets.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from fundamentallm.errors import UserError
from fundamentallm.model import GPT
from fundamentallm.tokenizer import Tokenizer


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask (to -inf) every logit outside the top-k and outside the smallest set with probability >= top_p."""
    logits = logits.clone()
    if top_k > 0 and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits[logits < kth] = -torch.inf
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p; the most likely token always stays.
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        # A top_p below float32's resolution (1e-300) compares as 0 and would drop even the first token.
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits[drop] = -torch.inf
    return logits


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V); temperature 0 means greedy, and so does any
    temperature too small for float32 (below its smallest normal number, where dividing by it is 0 / 0)."""
    logits = logits.float()
    top = logits.max(dim=-1, keepdim=True).values  # nan if any logit is nan
    if not bool(torch.isfinite(top).all()):
        raise UserError("the model produced NaN or infinite scores for the next character: its weights are "
                        "damaged or overflow (e.g. saved after training diverged); use an earlier checkpoint")
    if temperature < torch.finfo(torch.float32).tiny:
        return logits.argmax(dim=-1)
    # Shift so the largest logit is 0 before dividing: a tiny temperature then sends the others to -inf
    # (greedy in effect) instead of overflowing to inf - inf = nan.
    scaled = (logits - top) / temperature
    probs = filter_logits(scaled, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate_tokens(model: GPT, prompt: list[int], max_new_tokens: int, temperature: float = 1.0,
                    top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None) -> Iterator[int]:
    """Yield `max_new_tokens` token ids continuing `prompt` (which must fit in the context), one at a time."""
    return (token for token, _ in generate_steps(model, prompt, max_new_tokens, temperature, top_k, top_p,
                                                 generator))


@torch.inference_mode()
def generate_steps(model: GPT, prompt: list[int], max_new_tokens: int, temperature: float = 1.0,
                   top_k: int = 0, top_p: float = 1.0,
                   generator: torch.Generator | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """As generate_tokens, each token with the logits (V,) it was sampled from (for its log-probability)."""
    device = next(model.parameters()).device
    context = model.context_length
    keep = max(1, context // 2)  # tokens kept when the window slides
    dtype = next(model.parameters()).dtype
    cache = model.new_cache(1, device, dtype)
    tokens = list(prompt)
    logits, _ = model(torch.tensor([tokens], device=device), cache=cache)
    for i in range(max_new_tokens):
        next_id = int(sample_next(logits[:, -1], temperature, top_k, top_p, generator)[0])
        tokens.append(next_id)
        yield next_id, logits[0, -1]
        if i == max_new_tokens - 1:
            break
        if cache.length == context:  # slide: rebuild the cache from the most recent tokens
            cache.length = 0
            logits, _ = model(torch.tensor([tokens[-keep:]], device=device), cache=cache)
        else:
            logits, _ = model(torch.tensor([[next_id]], device=device), cache=cache)


def encode_prompt(tokenizer: Tokenizer, text: str, context: int, strict: bool = False) -> tuple[list[int], list[str]]:
    """The prompt's token ids, and the characters in it that the model never saw (they become its unknown
    token; `strict` refuses them instead). An empty prompt starts from a line break when the model knows one."""
    unseen = tokenizer.unknown_chars(text)
    ids = tokenizer.encode(text, what="prompt", strict=strict)
    unit = "characters" if tokenizer.kind == "char" else "tokens"
    if len(ids) >= context:
        raise UserError(f"the prompt is {len(ids):,} {unit}, but this model's context holds {context:,}; "
                        f"shorten it to fewer than {context:,} {unit}")
    return ids or start_tokens(tokenizer), unseen


def start_tokens(tokenizer: Tokenizer) -> list[int]:
    """What generation starts from when the prompt is empty: a line break when the model knows one."""
    return [0] if tokenizer.unknown_chars("\n") else tokenizer.encode("\n")
