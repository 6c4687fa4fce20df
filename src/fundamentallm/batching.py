"""The serving engine: continuous batching of every running request in one worker thread (of the engine's own
process, `engine_process.py`).

Each step advances all running requests together by one token: one forward pass over a `generate.DecodeBatch`,
whose KV cache holds each request in a row of its own length. Requests join (their prompt's forward pass) and
leave (finished, stopped or cancelled) between steps, so a new request starts at the next step and a long one
never holds up a short one. Requests beyond `slots` wait in a queue.

Each request samples with its own generator, made from its `seed` when it joins: served alone it gets exactly the tokens
`fundamentallm generate --seed` prints (the same code path). In company its scores differ from alone only in
float rounding (within 1e-4), which can, rarely, change a sampled token.

For every token the engine reports a `TokenEvent` (the text it releases through the request's `TextStream`, the
token, its log-probability at temperature 1 and the best alternatives), and at the end one `FinishEvent`; after
each step it calls `after_step` (which sends the step's events on, all in one message). Only the worker thread
decodes. How many requests may wait is the caller's to decide (`engine_process.EngineProcess.submit`).
"""

from __future__ import annotations

import threading
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fundamentallm.console import warn
from fundamentallm.generate import OVERFLOW, DecodeBatch, Sampled, Sampling, TextStream
from fundamentallm.model import GPT
from fundamentallm.tokenizer import Tokenizer


@dataclass
class TokenEvent:
    """One generated token, as the engine reports it."""

    text: str  # the decoded text this token releases ('' while held back: an incomplete character, or text
    # that may begin a stop sequence)
    token: int
    logprob: float  # the model's log-softmax at temperature 1 (float32) of this token
    top: list[tuple[int, float]]  # the generate.TOP_LOGPROBS most likely (token, logprob) at temperature 1


@dataclass
class FinishEvent:
    """A choice's last event."""

    reason: str  # "stop", "length", or "error: ..." when generation failed
    text: str = ""  # text held back until now (it could have begun a stop sequence)


Emit = Callable[[int, "TokenEvent | FinishEvent"], None]


@dataclass(eq=False)  # compared by identity: the engine finds a job in its queue
class Job:
    """One choice of one request: its prompt, how it samples, its stop sequences and where its events go."""

    index: int
    prompt: list[int]  # token ids; must leave room in the context for one more
    max_tokens: int
    sampling: Sampling
    seed: int | None  # None: a random one
    stops: list[str]
    emit: Emit  # called as emit(index, event): by the worker thread (in the server, by the engine's reader thread)
    ident: int = -1  # the server's id for it (engine_process.py)
    generated: int = 0
    cancelled: bool = False
    finished: bool = False  # its FinishEvent was sent
    stream: TextStream | None = None  # set when the job starts


class Engine:
    """Runs jobs in one thread, all running ones advanced together by one batched forward pass per step."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, slots: int,
                 after_step: Callable[[], None] = lambda: None) -> None:
        self.model, self.tokenizer, self.slots, self._after_step = model, tokenizer, slots, after_step
        self._waiting: deque[Job] = deque()
        self._active: list[Job] = []  # job i decodes in row i of the batch
        self._batch = DecodeBatch(model, slots)
        self._cond = threading.Condition()
        self._stopping = False
        self.tokens_generated = 0  # since start, for /health (only the worker thread writes it)
        self._thread = threading.Thread(target=self._run, name="fundamentallm-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()

    def load(self) -> dict[str, int]:
        with self._cond:
            return {"active": len(self._active), "waiting": len(self._waiting), "slots": self.slots,
                    "tokens_generated": self.tokens_generated}

    def submit(self, jobs: list[Job]) -> None:
        """Queue a request's jobs."""
        with self._cond:
            self._waiting.extend(jobs)
            self._cond.notify()

    def cancel(self, jobs: list[Job]) -> None:
        """Stop these jobs: waiting ones leave the queue now, running ones at the next step (without events)."""
        with self._cond:
            for job in jobs:
                job.cancelled = True
                if job in self._waiting:
                    self._waiting.remove(job)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._active or self._waiting or self._stopping):
                    self._cond.wait()
                if self._stopping:
                    return
                joining = []
                while self._waiting and len(self._active) + len(joining) < self.slots:
                    joining.append(self._waiting.popleft())
            try:
                self._step(joining)
            except Exception as exc:  # a bug, not a client's fault: end these jobs, keep serving the next ones
                traceback.print_exc()
                self._fail_all(joining, f"error: {type(exc).__name__}: {exc}")
            self._after_step()

    def _step(self, joining: list[Job]) -> None:
        """Admit the joining jobs, sample every running job's next token, report it, drop finished jobs and run
        the forward pass of the next step."""
        for job in joining:
            job.stream = TextStream(self.tokenizer, job.stops)
            generator = torch.Generator(self._batch.device)
            generator.seed() if job.seed is None else generator.manual_seed(job.seed)
            self._batch.add(job.prompt, job.sampling, generator)
            with self._cond:
                self._active.append(job)
        if not self._active:
            return
        finished = [i for i, (job, sampled) in enumerate(zip(self._active, self._batch.sample(), strict=True))
                    if self._report(job, sampled)]
        with self._cond:
            for i in reversed(finished):  # as DecodeBatch.remove moves its last row into the freed one
                self._batch.remove(i)
                self._active[i] = self._active[-1]
                self._active.pop()
        if self._active:
            self._batch.advance()

    def _report(self, job: Job, sampled: Sampled | None) -> bool:
        """Send a job its new token's event (and its finish); True when the job is over."""
        if job.cancelled:
            return True
        if sampled is None:  # this request's scores overflowed: it ends with an error, the others go on
            warn(f"a request failed: {OVERFLOW}")
            self._finish(job, FinishEvent(f"error: {OVERFLOW}"))
            return True
        assert job.stream is not None
        job.generated += 1
        self.tokens_generated += 1
        job.emit(job.index, TokenEvent(job.stream.add(sampled.token), sampled.token, sampled.logprob, sampled.top))
        if job.stream.stopped:
            self._finish(job, FinishEvent("stop"))
        elif job.generated >= job.max_tokens:  # whatever was held back for a stop sequence goes out now
            self._finish(job, FinishEvent("length", job.stream.finish()))
        return job.finished

    @staticmethod
    def _finish(job: Job, event: FinishEvent) -> None:
        job.finished = True
        job.emit(job.index, event)

    def _fail_all(self, joining: list[Job], reason: str) -> None:
        with self._cond:
            jobs = list(dict.fromkeys([*self._active, *joining]))
            self._active = []
        self._batch = DecodeBatch(self.model, self.slots)
        for job in jobs:
            if not job.cancelled:
                self._finish(job, FinishEvent(reason))
