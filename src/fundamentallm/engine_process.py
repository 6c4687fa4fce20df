"""The serving engine in a process of its own, so that the HTTP layer never holds the model up.

In one process the event loop and the engine's thread share Python's interpreter lock: PyTorch lets go of it
for every operation of a forward pass, and the loop takes it for every token it sends, so the model waited for
the loop several times per token (on 2 cores one streamed client got about three quarters of `generate`'s
tokens per second). Here the engine (`batching.Engine`) runs in a child process started with `spawn` (safe with
CUDA and with PyTorch's thread pools), and the two talk over a pipe: requests, cancellations and prompts to score
go in; each step's events come back in one message, with the engine's load.

The child loads the model itself (the server keeps only the tokenizer) and checks that its scores are finite
before it says it is ready, so a bad checkpoint is one clear error before the port is taken. It ignores Ctrl-C and
SIGTERM (the server decides when it stops, after in-flight requests had their grace period) and ends when asked, or when
the pipe closes because the server is gone. Should it end unexpectedly, its requests end with an error and the
server stops (exit status 1), so that whatever supervises it can start it again.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import pickle
import signal
import threading
import traceback
from collections.abc import Callable
from contextlib import suppress
from multiprocessing.connection import Connection
from typing import Any

from fundamentallm.batching import Engine, FinishEvent, Job, TokenEvent
from fundamentallm.errors import UserError
from fundamentallm.evaluate import TokenLogprobs
from fundamentallm.tokenizer import Tokenizer, tokenizer_from_dict

QUEUE_PER_SLOT = 4  # waiting requests allowed per slot before the server answers 503
READY = "ready"


class QueueFull(Exception):
    """A request the queue cannot take: now (`never` False: retry later), or ever (`never` True)."""

    def __init__(self, message: str, never: bool) -> None:
        super().__init__(message)
        self.never = never


def _send(conn: Connection, lock: threading.Lock, message: tuple) -> None:
    # Plain pickle, not multiprocessing's: that one would hand tensors over through shared memory.
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    with lock:
        conn.send_bytes(data)


def _receive(conn: Connection) -> tuple:
    return pickle.loads(conn.recv_bytes())


class EngineProcess:
    """The server's side: starts the engine's process, queues requests in it and hands each job its events
    (`Job.emit`, called from a reader thread). The tokenizer and context length are the loaded model's."""

    def __init__(self, checkpoint: str, device: str, threads: int, slots: int,
                 log: Callable[[str], None] = print) -> None:
        self.slots, self.queue_limit, self._log = slots, QUEUE_PER_SLOT * slots, log
        self._jobs: dict[int, Job] = {}  # submitted, neither finished nor cancelled, by id
        self._scores: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()  # _jobs, _scores and _load: the reader thread updates them
        self._send_lock = threading.Lock()
        self._load = {"active": 0, "waiting": 0, "tokens_generated": 0}
        self._stopping = False
        self.failure: str | None = None  # why the engine's process ended, when nobody asked it to
        self.on_failure: Callable[[], None] = lambda: None  # then called (from the reader thread)
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(target=_child_main, args=(child_conn, checkpoint, device, threads, slots),
                                        name="fundamentallm-engine", daemon=True)
        # Inherited: Ctrl-C and a SIGTERM sent to the whole process group are the server's to handle (it lets
        # requests in flight finish first, then stops the engine).
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._process.start()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        child_conn.close()  # so that the child's end closing is seen here
        self.tokenizer, self.context_length = self._wait_ready()
        self._reader = threading.Thread(target=self._read, name="fundamentallm-engine-reader", daemon=True)
        self._reader.start()

    def _wait_ready(self) -> tuple[Tokenizer, int]:
        try:
            message = _receive(self._conn)
        except (EOFError, OSError):
            self._close()
            raise UserError(f"{_ended(self._process.exitcode)} while loading the model", exit_code=1) from None
        if message[0] != READY:
            self._close()
            raise UserError(message[1], exit_code=message[2])
        return tokenizer_from_dict(message[1]), message[2]

    def _close(self) -> None:
        self._process.join()
        self._conn.close()
        self._process.close()

    def _tell(self, message: tuple) -> None:
        """Send the engine a message; if it has just ended (the reader has not seen it yet), the request is told
        to retry (another instance may be up by then)."""
        try:
            _send(self._conn, self._send_lock, message)
        except OSError:
            raise QueueFull("the server is stopping: its engine has ended", never=False) from None

    def load(self) -> dict[str, int]:
        with self._lock:
            return {**self._load, "slots": self.slots}

    def submit(self, jobs: list[Job]) -> None:
        """Queue a request's jobs, all or none."""
        with self._lock:
            if self._stopping:
                raise QueueFull("the server is stopping", never=False)
            if len(jobs) > self.queue_limit:
                raise QueueFull(f"n: this request asks for {len(jobs)} completions, but this server queues at most "
                                f"{self.queue_limit} ({QUEUE_PER_SLOT} per slot, --slots {self.slots}); ask for "
                                f"fewer (prompts x n), or start the server with more --slots", never=True)
            if max(0, len(self._jobs) - self.slots) + len(jobs) > self.queue_limit:
                raise QueueFull("the server is busy: too many requests are waiting; retry later", never=False)
            for job in jobs:
                job.ident = next(self._ids)
                self._jobs[job.ident] = job
        specs = [(job.ident, job.prompt, job.max_tokens, job.sampling, job.seed, job.stops) for job in jobs]
        try:
            self._tell(("submit", specs))
        except QueueFull:
            with self._lock:
                for job in jobs:
                    self._jobs.pop(job.ident, None)
            raise

    def cancel(self, jobs: list[Job]) -> None:
        """Stop these jobs (a request's, when it ends). A request cut short (its client went away, or shutdown did
        not wait) is one line in the log."""
        with self._lock:
            unfinished = [job for job in jobs if not job.finished]
            for job in jobs:
                job.cancelled = True
                self._jobs.pop(job.ident, None)
        if not unfinished:
            return
        if not self._stopping:
            with suppress(QueueFull):  # the engine has ended: nothing left to cancel
                self._tell(("cancel", [job.ident for job in unfinished]))
        self._log(f"a request was cancelled before its end (its client went away): {len(unfinished)} of its "
                  f"{len(jobs)} completions unfinished, {sum(job.generated for job in jobs)} tokens generated")

    async def score(self, prompts: list[list[int]], top: int) -> list[TokenLogprobs]:
        """Each prompt's `evaluate.token_logprobs`, computed in the engine's process (beside its decoding)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            ident = next(self._ids)
            self._scores[ident] = (loop, future)
        try:
            self._tell(("score", ident, prompts, top))
            return await future
        finally:
            with self._lock:
                self._scores.pop(ident, None)

    def stop(self) -> None:
        """End the engine's process (requests still running are cut off); once is enough."""
        if self._conn.closed:
            return
        with self._lock:
            self._stopping = True
        with suppress(OSError):  # it has gone already
            _send(self._conn, self._send_lock, ("stop",))
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()
        self._reader.join(timeout=30)
        if not self._conn.closed:
            self._close()

    def _read(self) -> None:
        while True:
            try:
                message = _receive(self._conn)
            except (EOFError, OSError):
                break
            if message[0] == "events":
                self._dispatch(message[1], message[2])
            elif message[0] == "load":
                with self._lock:
                    self._load = message[1]
            elif message[0] == "scored":
                self._scored(*message[1:])
        self._process.join()
        if not self._stopping:
            self._engine_gone()

    def _dispatch(self, events: list[tuple[int, TokenEvent | FinishEvent]], load: dict[str, int]) -> None:
        delivered = []
        with self._lock:
            self._load = load
            for ident, event in events:
                job = self._jobs.get(ident)
                if job is None:  # cancelled meanwhile
                    continue
                if isinstance(event, FinishEvent):
                    job.finished = True
                    del self._jobs[ident]
                else:
                    job.generated += 1
                delivered.append((job, event))
        for job, event in delivered:
            job.emit(job.index, event)

    def _scored(self, ident: int, result: list[TokenLogprobs] | None, error: str | None) -> None:
        with self._lock:
            loop, future = self._scores.get(ident, (None, None))
        if loop is None or future is None:
            return

        def resolve() -> None:
            if future.done():  # its request was cancelled meanwhile
                return
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(RuntimeError(f"scoring the prompt failed: {error}"))

        with suppress(RuntimeError):  # the event loop is gone: the server is shutting down
            loop.call_soon_threadsafe(resolve)

    def _engine_gone(self) -> None:
        """The child ended without being asked: fail what it was doing, and stop the server."""
        reason = _ended(self._process.exitcode)
        self._log(f"{reason}; the server stops")
        with self._lock:
            self.failure = reason
            self._stopping = True
            jobs, self._jobs = list(self._jobs.values()), {}
            scores = list(self._scores)
        for job in jobs:
            job.finished = True
            job.emit(job.index, FinishEvent(f"error: {reason}"))
        for ident in scores:
            self._scored(ident, None, reason)
        self.on_failure()


def _ended(code: int | None) -> str:
    return f"the engine process ended unexpectedly (exit code {code}" + \
        (": killed, perhaps for want of memory)" if code == -signal.SIGKILL else ")")


# ----------------------------------------------------------------------------------------------------------
# The engine's process


def _child_main(conn: Connection, checkpoint: str, device: str, threads: int, slots: int) -> None:
    """Load the model, say so, then run the engine and answer commands until told to stop or the pipe closes."""
    import torch

    from fundamentallm.checkpoint import load_model
    from fundamentallm.device import select_device
    from fundamentallm.generate import OVERFLOW, scores_are_finite, start_tokens

    send_lock = threading.Lock()
    torch.set_num_threads(threads)
    try:
        loaded = load_model(checkpoint, select_device(device))
        if not scores_are_finite(loaded.model, start_tokens(loaded.tokenizer)):
            raise UserError(f"{OVERFLOW}; the server does not start with it")
        _check_cache_fits(loaded.model, slots)
        host = _Host(conn, send_lock, loaded.model, loaded.tokenizer, slots)
    except UserError as exc:
        _send(conn, send_lock, ("failed", str(exc), exc.exit_code))
        return
    except Exception as exc:  # e.g. out of memory for the cache: say so before the port is taken
        traceback.print_exc()
        _send(conn, send_lock, ("failed", f"the engine could not start: {type(exc).__name__}: {exc}", 1))
        return
    _send(conn, send_lock, (READY, loaded.tokenizer.to_dict(), loaded.model.context_length))
    host.serve()


def _check_cache_fits(model: Any, slots: int) -> None:
    """The KV cache holds a whole context for every slot: refuse a --slots the device cannot hold, in one line."""
    from fundamentallm.device import check_memory

    weight, cfg = next(model.parameters()), model.cfg
    needed = 2 * cfg.num_layers * slots * cfg.num_heads * model.context_length * cfg.head_dim * weight.element_size()
    check_memory(needed, weight.device, f"--slots {slots:,} (a KV cache of the whole context for each slot)",
                 "Use fewer --slots.")


class _Host:
    """The child's side: the engine, its jobs by id, and the events of each step, sent in one message."""

    def __init__(self, conn: Connection, send_lock: threading.Lock, model: Any, tokenizer: Tokenizer,
                 slots: int) -> None:
        self.conn, self.send_lock, self.model = conn, send_lock, model
        self.jobs: dict[int, Job] = {}
        self.outbox: list[tuple[int, TokenEvent | FinishEvent]] = []  # only the engine's thread touches it
        self.engine = Engine(model, tokenizer, slots, after_step=self._after_step)
        self.scoring = threading.Lock()  # one prompt scored at a time, beside the engine

    def _emit(self, ident: int, event: TokenEvent | FinishEvent) -> None:
        self.outbox.append((ident, event))
        if isinstance(event, FinishEvent):
            self.jobs.pop(ident, None)

    def _after_step(self) -> None:
        events, self.outbox = self.outbox, []
        self._tell_load("events", events)

    def _tell(self, message: tuple) -> None:
        with suppress(OSError):  # the server is gone: the main thread sees the pipe closed, and ends
            _send(self.conn, self.send_lock, message)

    def _tell_load(self, *message: Any) -> None:
        """Send a message that ends with the engine's load. The load is read under the send lock, so that loads
        arrive in the order they were read: one read before a step but sent after it would leave the server
        believing, until the next message, that a job this step cancelled is still running."""
        with suppress(OSError), self.send_lock:
            self.conn.send_bytes(pickle.dumps((*message, self._load()), protocol=pickle.HIGHEST_PROTOCOL))

    def _load(self) -> dict[str, int]:
        load = self.engine.load()
        return {name: load[name] for name in ("active", "waiting", "tokens_generated")}

    def serve(self) -> None:
        self.engine.start()
        try:
            while True:
                try:
                    message = _receive(self.conn)
                except (EOFError, OSError):  # the server is gone
                    return
                if message[0] == "stop":
                    return
                self._handle(message)
        finally:
            self.engine.stop()

    def _handle(self, message: tuple) -> None:
        if message[0] == "submit":
            jobs = [Job(ident, prompt, max_tokens, sampling, seed, stops, self._emit)
                    for ident, prompt, max_tokens, sampling, seed, stops in message[1]]
            self.jobs.update((job.index, job) for job in jobs)
            self.engine.submit(jobs)
        elif message[0] == "cancel":
            self.engine.cancel([job for job in (self.jobs.pop(ident, None) for ident in message[1]) if job])
        elif message[0] == "score":
            threading.Thread(target=self._score, args=message[1:], daemon=True).start()
            return
        self._tell_load("load")

    def _score(self, ident: int, prompts: list[list[int]], top: int) -> None:
        from fundamentallm.evaluate import token_logprobs

        try:
            with self.scoring:
                result = [token_logprobs(self.model, ids, top) for ids in prompts]
        except Exception as exc:  # a bug: the request gets a 500, the server goes on
            traceback.print_exc()
            self._tell(("scored", ident, None, f"{type(exc).__name__}: {exc}"))
            return
        self._tell(("scored", ident, result, None))
