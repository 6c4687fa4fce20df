"""Log-probabilities in the OpenAI completions format: `tokens`, `token_logprobs`, `top_logprobs`, `text_offset`.

A token is shown as its text; a byte or BPE token that holds only part of a character is shown as its bytes,
"bytes:\\xe2\\x80", as OpenAI shows such tokens. `text_offset` is where the token's text starts in the returned
text (the prompt's characters first when it is echoed); a token that completes a character started by the one
before it has that character's offset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fundamentallm.evaluate import TokenLogprobs
from fundamentallm.tokenizer import Tokenizer


def token_text(tokenizer: Tokenizer, token: int) -> str:
    """How one token is shown: its text, or "bytes:" and its bytes escaped when they are not whole characters."""
    raw = tokenizer.token_bytes(token)
    if raw is None:
        return tokenizer.decode([token])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _shown_bytes(shown: str) -> bytes:
    """The bytes of a token as token_text shows it."""
    if shown.startswith("bytes:\\x"):
        return bytes(int(h, 16) for h in shown[len("bytes:"):].split("\\x")[1:])
    return shown.encode("utf-8")


@dataclass
class Logprobs:
    """The `logprobs` object of one choice (or of one streamed piece of it)."""

    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, other: Logprobs) -> None:
        self.tokens += other.tokens
        self.token_logprobs += other.token_logprobs
        self.top_logprobs += other.top_logprobs
        self.text_offset += other.text_offset

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
                "text_offset": self.text_offset}

    def to_chat(self) -> dict[str, Any]:
        """The chat API's shape: one entry per token, each with its bytes and its alternatives."""
        def entry(token: str, logprob: float | None) -> dict[str, Any]:
            return {"token": token, "logprob": logprob, "bytes": list(_shown_bytes(token))}

        rows = zip(self.tokens, self.token_logprobs, self.top_logprobs, strict=True)
        return {"content": [{**entry(token, logprob), "top_logprobs": [entry(t, p) for t, p in (top or {}).items()]}
                            for token, logprob, top in rows]}


class Tracker:
    """Builds a choice's Logprobs token by token. A token waits until the text it begins in is released (text
    held back for a stop sequence may never be): `release(through)` hands over the waiting tokens that begin
    before character `through` of the returned text, `drop` forgets the rest."""

    def __init__(self, tokenizer: Tokenizer, top: int, offset: int = 0) -> None:
        self.tokenizer, self.top = tokenizer, top
        self._decoder = tokenizer.stream_decoder()
        self._offset = offset  # characters of the returned text before the next token
        self._waiting = Logprobs()

    def add(self, token: int, logprob: float | None, top: list[tuple[int, float]] | None) -> None:
        waiting = self._waiting
        waiting.tokens.append(token_text(self.tokenizer, token))
        waiting.token_logprobs.append(logprob)
        waiting.top_logprobs.append(None if top is None else
                                    {token_text(self.tokenizer, t): p for t, p in top[: self.top]})
        waiting.text_offset.append(self._offset)
        self._offset += len(self._decoder.add(token))

    def release(self, through: float = float("inf")) -> Logprobs:
        waiting = self._waiting
        k = sum(1 for offset in waiting.text_offset if offset < through)
        released = Logprobs(waiting.tokens[:k], waiting.token_logprobs[:k], waiting.top_logprobs[:k],
                            waiting.text_offset[:k])
        self._waiting = Logprobs(waiting.tokens[k:], waiting.token_logprobs[k:], waiting.top_logprobs[k:],
                                 waiting.text_offset[k:])
        return released

    def drop(self) -> None:
        self._waiting = Logprobs()


def prompt_logprobs(tokenizer: Tokenizer, ids: list[int], scored: TokenLogprobs, top: int) -> Logprobs:
    """An echoed prompt's Logprobs: the first token has nothing before it, so its log-probability is null."""
    tracker = Tracker(tokenizer, top)
    for i, token in enumerate(ids):
        if i == 0:
            tracker.add(token, None, None)
        else:
            tracker.add(token, float(scored.logprobs[i - 1]),
                        list(zip(scored.top_ids[i - 1].tolist(), scored.top_logprobs[i - 1].tolist(), strict=True)))
    return tracker.release()
