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
from dataclasses import dataclass

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
    temperature too small for float32 (below its smallest normal number, where dividing by it is 0 / 0).
    Logits shifted so the largest is 0 before dividing: a tiny temperature then sends the others to -inf
    (greedy in effect) instead of overflowing to inf - inf = nan."""
    logits = logits.float()
    if not bool(torch.isfinite(logits.max(dim=-1).values).all()):  # nan if any logit is nan
        raise UserError(OVERFLOW)
    row = _Row([], Sampling(temperature, top_k, top_p), generator)
    return torch.tensor(_sample_rows(logits, [row] * len(logits), [True] * len(logits)), device=logits.device)


@dataclass(frozen=True)
class Sampling:
    """How one sequence picks its tokens (see `sample_next`)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


@dataclass(frozen=True)
class Sampled:
    """One sequence's new token, with the model's log-probabilities at temperature 1 (float32): the token's own
    and the TOP_LOGPROBS best (token, log-probability) pairs, best first."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


TOP_LOGPROBS = 5
OVERFLOW = ("the model produced NaN or infinite scores for the next token: its weights are damaged or overflow "
            "(e.g. saved after training diverged); use an earlier checkpoint")


@dataclass(eq=False)
class _Row:
    tokens: list[int]  # the prompt and every token sampled since (the window slides over them)
    sampling: Sampling
    generator: torch.Generator | None
    length: int = 0  # positions of the row's cache filled


class DecodeBatch:
    """Sequences decoded together: one forward pass per step advances them all, over one KV cache whose row i
    holds sequence i at its own length. Sequences join (`add`: their prompt's forward pass fills their row) and
    leave (`remove`) between steps; the rows stay packed, so a step computes nothing for absent ones.

    A step is `sample()` (each sequence's next token, drawn with its own generator) then `advance()` (the forward
    pass over those tokens). One sequence alone takes exactly `generate`'s path; in company its logits may differ
    from alone in float rounding (a batched matrix product sums in another order), well within 1e-4."""

    def __init__(self, model: GPT, capacity: int) -> None:
        self.model, self.capacity = model, capacity
        self.device = next(model.parameters()).device
        self.cache = model.new_cache(capacity, self.device, next(model.parameters()).dtype)
        self.rows: list[_Row] = []
        self._logits: torch.Tensor | None = None  # (rows, V): each row's scores for its next token
        self._keep = max(1, model.context_length // 2)  # tokens kept when a row's window slides

    def __len__(self) -> int:
        return len(self.rows)

    @torch.inference_mode()
    def add(self, prompt: list[int], sampling: Sampling, generator: torch.Generator | None) -> None:
        """A new sequence, in the last row; `prompt` must fit in the context (and hold a token)."""
        if len(self.rows) == self.capacity:
            raise ValueError(f"the batch is full ({self.capacity} sequences)")
        row = _Row(list(prompt), sampling, generator)
        self.rows.append(row)
        logits = self._fill(len(self.rows) - 1, row.tokens)
        self._logits = logits if self._logits is None else torch.cat([self._logits, logits])

    @torch.inference_mode()
    def remove(self, index: int) -> None:
        """Sequence `index` leaves; the last sequence moves into its row (so indices change: remove from the
        highest index down)."""
        last = len(self.rows) - 1
        if index != last:
            self.cache.move_row(last, index)
            self.rows[index] = self.rows[last]
            if self._logits is not None:
                self._logits[index] = self._logits[last]
        self.rows.pop()
        self._logits = self._logits[:last] if self.rows and self._logits is not None else None

    @torch.inference_mode()
    def sample(self) -> list[Sampled | None]:
        """Each sequence's next token (None for one whose scores are not finite: it cannot go on)."""
        assert self._logits is not None, "sample() needs a sequence"
        logits = self._logits.float()
        finite = torch.isfinite(logits.max(dim=-1).values).tolist()  # nan if any logit is nan
        logprobs = logits.log_softmax(dim=-1)
        best = logprobs.topk(min(TOP_LOGPROBS, logits.size(-1)), dim=-1)
        tokens = _sample_rows(logits, self.rows, finite)
        chosen = logprobs.gather(1, torch.tensor(tokens, device=logits.device).clamp(min=0)[:, None])[:, 0]
        out: list[Sampled | None] = []
        for i, (token, logprob, ids, values) in enumerate(zip(tokens, chosen.tolist(), best.indices.tolist(),
                                                              best.values.tolist(), strict=True)):
            if token < 0:
                out.append(None)
                continue
            self.rows[i].tokens.append(token)
            out.append(Sampled(token, logprob, list(zip(ids, values, strict=True))))
        return out

    @torch.inference_mode()
    def advance(self) -> None:
        """One forward pass over every sequence's last sampled token. A sequence whose window is full slides
        first: its row is rebuilt from its most recent tokens but that last one (a pass of its own, as `generate`
        does), so that every row still takes the step together."""
        for i, row in enumerate(self.rows):
            if row.length == self.model.context_length:
                window = row.tokens[-self._keep : -1]
                if window:
                    self._fill(i, window)
                else:  # a window of one token (a context of 1, 2 or 3): the step itself fills it
                    row.length = 0
        ids = torch.tensor([[row.tokens[-1]] for row in self.rows], device=self.device)
        lengths = [row.length for row in self.rows]
        if min(lengths) == max(lengths):  # rows alike (one alone, say): plain slices, the same numbers
            self.cache.length = lengths[0]
            out, _ = self.model(ids, cache=self.cache)
        else:
            out, _ = self.model(ids, cache=self.cache, positions=lengths)
        for row in self.rows:
            row.length += 1
        self._logits = out[:, -1]

    def _fill(self, index: int, tokens: list[int]) -> torch.Tensor:
        """Row `index` rebuilt from `tokens` (a prompt, or the window after a slide): its next scores (1, V)."""
        row = self.rows[index]
        logits, _ = self.model(torch.tensor([tokens], device=self.device), cache=self.cache.row(index))
        row.length = len(tokens)
        return logits[:, -1]


@torch.inference_mode()
def scores_are_finite(model: GPT, prompt: list[int]) -> bool:
    """Whether the model's scores after `prompt` are finite (damaged or overflowing weights give NaN or inf)."""
    logits, _ = model(torch.tensor([prompt], device=next(model.parameters()).device))
    return bool(torch.isfinite(logits[:, -1].float()).all())


def _sample_rows(logits: torch.Tensor, rows: list[_Row], finite: list[bool]) -> list[int]:
    """`sample_next` for every row of logits (B, V) at once, each row with its own settings and generator; -1 for
    a row whose scores are not finite. The arithmetic is batched; only the draws go row by row."""
    tokens = [token if ok else -1 for token, ok in zip(logits.argmax(dim=-1).tolist(), finite, strict=True)]
    # A temperature below float32's smallest normal number is greedy (dividing by it would give 0 / 0).
    tiny = torch.finfo(torch.float32).tiny
    drawn = [i for i, row in enumerate(rows) if finite[i] and row.sampling.temperature >= tiny]
    if not drawn:
        return tokens  # greedy rows keep the argmax
    index = torch.tensor(drawn, device=logits.device)
    chosen = logits[index]
    temperatures = torch.tensor([rows[i].sampling.temperature for i in drawn], device=logits.device)
    scaled = (chosen - chosen.max(dim=-1, keepdim=True).values) / temperatures[:, None]
    for j, i in enumerate(drawn):
        sampling = rows[i].sampling
        if sampling.top_k > 0 or sampling.top_p < 1.0:
            scaled[j] = filter_logits(scaled[j : j + 1], sampling.top_k, sampling.top_p)[0]
    probs = scaled.softmax(dim=-1)
    for j, i in enumerate(drawn):
        tokens[i] = int(torch.multinomial(probs[j : j + 1], 1, generator=rows[i].generator)[0, 0])
    return tokens


def generate_tokens(model: GPT, prompt: list[int], max_new_tokens: int, temperature: float = 1.0,
                    top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None) -> Iterator[int]:
    """Yield `max_new_tokens` token ids continuing `prompt` (which must fit in the context), one at a time: a
    `DecodeBatch` of one sequence, the path every served request takes too."""
    batch = DecodeBatch(model, 1)
    batch.add(prompt, Sampling(temperature, top_k, top_p), generator)
    for i in range(max_new_tokens):
        sampled = batch.sample()[0]
        if sampled is None:
            raise UserError(OVERFLOW)
        yield sampled.token
        if i < max_new_tokens - 1:
            batch.advance()


class TextStream:
    """Tokens in, text out: the tokenizer's stream decoder (a byte or BPE token may end inside a character),
    and the stop sequences, matched on the decoded text. Text that could begin a stop sequence is held back
    until it is known not to; the stop sequence itself is never released.

    Matching costs a constant per character and stop sequence (each keeps the length of its longest prefix that
    ends the text, advanced with its KMP failure table), so a long stop sequence costs nothing per token."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str] = ()) -> None:  # type: ignore[assignment]
        self._decoder = tokenizer.stream_decoder()
        self._stops = [s for s in stops if s]
        self._fail = [_failure_table(s) for s in self._stops]
        self._matched = [0] * len(self._stops)  # per stop: its longest prefix that ends the text
        self._held = ""  # decoded text not released yet (it may begin a stop sequence)
        self.stopped = False

    def add(self, token: int) -> str:
        """The text that token releases ('' while held back; nothing once a stop sequence is found)."""
        return "" if self.stopped else self._take(self._decoder.add(token))

    def finish(self) -> str:
        """At the end of generation: whatever was still held back (an incomplete character becomes U+FFFD)."""
        if self.stopped:
            return ""
        text = self._take(self._decoder.flush())
        text, self._held = text + self._held, ""
        return text

    def _take(self, text: str) -> str:
        self._held += text
        start = len(self._held) - len(text)
        for offset, ch in enumerate(text):
            found = 0  # the longest stop sequence that ends at this character
            for j, stop in enumerate(self._stops):
                k, fail = self._matched[j], self._fail[j]
                while k and stop[k] != ch:
                    k = fail[k - 1]
                k += stop[k] == ch
                self._matched[j] = k
                if k == len(stop):
                    found = max(found, k)
            if found:  # release what precedes the stop sequence; drop the rest
                self.stopped = True
                released, self._held = self._held[: start + offset + 1 - found], ""
                return released
        hold = max(self._matched, default=0)
        released, self._held = self._held[: len(self._held) - hold], self._held[len(self._held) - hold :]
        return released


def _failure_table(pattern: str) -> list[int]:
    """fail[i]: the length of the longest proper prefix of pattern[: i + 1] that is also its suffix (KMP)."""
    fail, k = [0] * len(pattern), 0
    for i in range(1, len(pattern)):
        while k and pattern[k] != pattern[i]:
            k = fail[k - 1]
        k += pattern[k] == pattern[i]
        fail[i] = k
    return fail


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
