"""`fundamentallm serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) and a playground page.

Endpoints: POST /v1/completions (plain, or streamed as server-sent events exactly as OpenAI streams them),
GET /v1/models, GET /health (load, for readiness checks) and GET / (the playground, static/playground.html).

Concurrency: one worker thread owns the model and advances every active request by one token in turn, each
request with its own KV cache (a `generate.generate_tokens` iterator), so tokens reach all clients at once.
Requests beyond `slots` wait in a queue. Batched decoding (one forward pass for many requests) would give more
tokens per second, but on a CPU a row's logits in a batch differ from the same row alone in the last bits, so a
seeded request's text would depend on what else the server is doing; this way it never does, and it is exactly
what `fundamentallm generate --seed` prints. The README gives the measurements behind this choice.

Every error is OpenAI's JSON shape {"error": {"message", "type", "param", "code"}} with a 4xx code for the
client's mistakes; a client that goes away cancels its requests, which frees their slots at the next token.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import threading
import time
import traceback
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fundamentallm.errors import UserError

try:  # the optional extra: without it, `fundamentallm serve` is one clear error
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException
except ImportError:
    raise UserError("fundamentallm serve needs FastAPI and uvicorn: pip install 'fundamentallm[serve]'") from None

from fundamentallm.generate import encode_prompt, generate_tokens
from fundamentallm.model import GPT
from fundamentallm.tokenizer import CharTokenizer

MAX_BODY_BYTES = 1 << 20  # a prompt never needs more: it must fit in the model's context
MAX_TOKENS = 4096  # per choice; generation slides its window, so this bounds time, not memory
MAX_CHOICES = 16  # prompts x n in one request
MAX_STOPS = 4
QUEUE_PER_SLOT = 4  # waiting requests allowed per slot before the server answers 503
DISCONNECT_CHECK_SECONDS = 0.5  # how often a plain (not streamed) request checks that its client is still there
GRACE_SECONDS = 10  # on Ctrl-C / SIGTERM, in-flight requests get this long to finish before they are cut off
UNSUPPORTED = {  # OpenAI parameters this server does not implement, and the values that mean "not used"
    "echo": (None, False), "logprobs": (None,), "best_of": (None, 1), "suffix": (None, ""),
    "logit_bias": (None, {}), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
}


class ApiError(Exception):
    """An error answered as OpenAI's JSON error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class CompletionRequest(BaseModel):
    """The body of POST /v1/completions; `top_k` is an extension (OpenAI has none). Unknown keys are ignored."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    model: str | None = None
    prompt: str | list[str] = ""
    max_tokens: int = Field(16, ge=1, le=MAX_TOKENS)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stream: bool = False


# ----------------------------------------------------------------------------------------------------------
# The engine: one worker thread, one KV cache per request


@dataclass(eq=False)  # compared by identity: the engine finds a job in its queue
class Job:
    """One choice of one request: its token stream, its stop sequences and where its events go."""

    index: int
    tokens: Iterator[int]
    stops: list[str]
    emit: Any  # callable(index, text, finish_reason): called from the worker thread
    text: str = ""
    sent: int = 0  # characters of `text` already emitted
    generated: int = 0
    cancelled: bool = False
    done: bool = False


def pending_text(text: str, sent: int, stops: list[str]) -> tuple[str, bool]:
    """What of text[sent:] can be sent now, and whether a stop sequence ended it. Text that could be the start of
    a stop sequence is held back until it is known not to be one; the stop sequence itself is never sent."""
    found = [i for i in (text.find(s, sent) for s in stops) if i >= 0]
    if found:
        return text[sent:min(found)], True
    hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[sent:len(text) - hold], False


class Engine:
    """Runs jobs round-robin in one thread: each turn advances every active job by one token."""

    def __init__(self, model: GPT, tokenizer: CharTokenizer, slots: int) -> None:
        self.model, self.tokenizer, self.slots = model, tokenizer, slots
        self._waiting: deque[Job] = deque()
        self._active: list[Job] = []
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
        with self._cond:
            if len(self._waiting) + len(jobs) > QUEUE_PER_SLOT * self.slots:
                raise ApiError(503, "the server is busy: too many requests are waiting; retry later",
                               code="overloaded", kind="server_error")
            self._waiting.extend(jobs)
            self._cond.notify()

    def cancel(self, jobs: list[Job]) -> None:
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
                while self._waiting and len(self._active) < self.slots:
                    self._active.append(self._waiting.popleft())
                turn = list(self._active)
            for job in turn:
                self._step(job)
            with self._cond:
                self._active = [job for job in self._active if not job.done]

    def _step(self, job: Job) -> None:
        if job.cancelled:
            job.done = True
            return
        try:
            token = next(job.tokens, None)
        except Exception as exc:  # a bug, not the client's fault: end this job, keep serving the others
            traceback.print_exc()
            job.done = True
            job.emit(job.index, None, f"error: {type(exc).__name__}: {exc}")
            return
        if token is None:  # max_tokens reached: whatever was held back for a stop sequence goes out now
            job.done = True
            job.emit(job.index, job.text[job.sent:], "length")
            return
        job.generated += 1
        self.tokens_generated += 1
        job.text += self.tokenizer.decode([token])
        ready, stopped = pending_text(job.text, job.sent, job.stops)
        job.sent += len(ready)
        job.done = stopped
        job.emit(job.index, ready, "stop" if stopped else None)


# ----------------------------------------------------------------------------------------------------------
# The HTTP layer


@dataclass
class Served:
    model_id: str
    engine: Engine
    api_key: str | None
    created: int = field(default_factory=lambda: int(time.time()))


def _check_key(served: Served, authorization: str | None) -> None:
    if served.api_key is None:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), served.api_key.encode()):
        raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY' with the key "
                            "the server was started with", code="invalid_api_key")


async def _read_body(request: Request) -> bytes:
    """The request body, refusing more than MAX_BODY_BYTES whether or not Content-Length says so."""
    too_big = ApiError(413, f"the request body is larger than {MAX_BODY_BYTES:,} bytes", code="body_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise too_big
    return bytes(body)


def parse_request(body: bytes) -> CompletionRequest:
    """Validate a completions body; every problem becomes a 400 naming the parameter."""
    try:
        params = CompletionRequest.model_validate_json(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = ".".join(str(part) for part in error["loc"]) or None
        if error["type"] == "json_invalid":
            raise ApiError(400, f"the body is not valid JSON ({error['msg']})") from None
        if error["type"] == "model_type":
            raise ApiError(400, "the body must be a JSON object") from None
        raise ApiError(400, f"{param}: {error['msg']}" if param else error["msg"], param=param) from None
    for name, neutral in UNSUPPORTED.items():
        if (params.model_extra or {}).get(name) not in neutral:
            raise ApiError(400, f"{name} is not supported by this server; leave it out", param=name)
    stops = [params.stop] if isinstance(params.stop, str) else params.stop or []
    if len(stops) > MAX_STOPS or not all(stops):
        raise ApiError(400, f"stop: give at most {MAX_STOPS} non-empty strings", param="stop")
    prompts = [params.prompt] if isinstance(params.prompt, str) else params.prompt
    if not prompts or len(prompts) * params.n > MAX_CHOICES:
        raise ApiError(400, f"give 1 to {MAX_CHOICES} completions per request (prompts x n)", param="prompt")
    return params


def _jobs(served: Served, params: CompletionRequest, emit: Any) -> tuple[list[Job], int]:
    """One job per (prompt, n); choice i of a seeded request uses seed + i. Also returns the prompt tokens."""
    engine, prompts = served.engine, [params.prompt] if isinstance(params.prompt, str) else params.prompt
    context, device = engine.model.context_length, next(engine.model.parameters()).device
    stops = [params.stop] if isinstance(params.stop, str) else params.stop or []
    try:
        encoded = [encode_prompt(engine.tokenizer, text, context, strict=True)[0] for text in prompts]
    except UserError as exc:
        raise ApiError(400, str(exc), param="prompt", code="invalid_prompt") from None
    jobs = []
    for index in range(len(prompts) * params.n):
        generator = torch.Generator(device)
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(params.seed + index)
        tokens = generate_tokens(engine.model, encoded[index // params.n], params.max_tokens, params.temperature,
                                 params.top_k, params.top_p, generator)
        jobs.append(Job(index, tokens, stops, emit))
    return jobs, sum(len(ids) for ids in encoded) * params.n


def _chunk(served: Served, cid: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": served.model_id,
            "choices": choices, "system_fingerprint": None, **extra}


def _choice(index: int, text: str, finish: str | None) -> dict[str, Any]:
    return {"text": text, "index": index, "logprobs": None, "finish_reason": finish}


def create_app(served: Served) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        served.engine.start()
        yield
        served.engine.stop()

    app = FastAPI(title="FundamentaLLM", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    page = files("fundamentallm").joinpath("static/playground.html").read_text(encoding="utf-8")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:  # 404, 405 from routing
        return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        traceback.print_exception(exc)
        return JSONResponse(ApiError(500, f"internal error: {type(exc).__name__}", kind="server_error").body(),
                            status_code=500)

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> str:
        return page

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", **served.engine.load()}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        _check_key(served, request.headers.get("authorization"))
        return {"object": "list", "data": [{"id": served.model_id, "object": "model", "created": served.created,
                                            "owned_by": "fundamentallm"}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        _check_key(served, request.headers.get("authorization"))
        params = parse_request(await _read_body(request))
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(index: int, text: str | None, finish: str | None) -> None:
            with suppress(RuntimeError):  # the event loop is gone: the server is shutting down
                loop.call_soon_threadsafe(events.put_nowait, (index, text, finish))

        jobs, prompt_tokens = _jobs(served, params, emit)
        served.engine.submit(jobs)
        cid = f"cmpl-{secrets.token_hex(12)}"
        if params.stream:
            return StreamingResponse(_stream(served, cid, jobs, events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            texts, finishes = await _collect(request, jobs, events)
        finally:
            served.engine.cancel(jobs)
        completion_tokens = sum(job.generated for job in jobs)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        return _chunk(served, cid, [_choice(i, texts[i], finishes[i]) for i in range(len(jobs))], usage=usage)

    return app


async def _collect(request: Request, jobs: list[Job], events: asyncio.Queue) -> tuple[list[str], list[str]]:
    """Gather every choice's text; give up (the caller cancels the jobs) if the client disconnects meanwhile."""
    texts, finishes = [""] * len(jobs), [""] * len(jobs)
    loop = asyncio.get_running_loop()
    next_check = loop.time() + DISCONNECT_CHECK_SECONDS
    while not all(finishes):
        try:
            index, text, finish = await asyncio.wait_for(events.get(), timeout=DISCONNECT_CHECK_SECONDS)
        except asyncio.TimeoutError:
            pass
        else:
            texts[index] += text or ""
            if finish and finish.startswith("error"):
                raise ApiError(500, f"generation failed ({finish})", kind="server_error")
            finishes[index] = finish or ""
        if loop.time() >= next_check:  # by the clock: events may never pause long enough for a timeout
            next_check = loop.time() + DISCONNECT_CHECK_SECONDS
            if await request.is_disconnected():
                raise ApiError(499, "client disconnected")
    return texts, finishes


async def _stream(served: Served, cid: str, jobs: list[Job], events: asyncio.Queue) -> AsyncIterator[str]:
    """Server-sent events as OpenAI sends them: one chunk per piece of text, a last chunk per choice with its
    finish_reason, then [DONE]. Cancelled (client gone, or shutdown cut short) -> the jobs are cancelled."""
    try:
        remaining = len(jobs)
        while remaining:
            index, text, finish = await events.get()
            if finish and finish.startswith("error"):
                error = ApiError(500, f"generation failed ({finish})", kind="server_error")
                yield f"data: {json.dumps(error.body())}\n\n"
                return
            if text:
                yield f"data: {json.dumps(_chunk(served, cid, [_choice(index, text, None)]))}\n\n"
            if finish:
                remaining -= 1
                yield f"data: {json.dumps(_chunk(served, cid, [_choice(index, '', finish)]))}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        served.engine.cancel(jobs)


def _bind(host: str, port: int) -> socket.socket:
    """Bind before loading the model, so that a taken port is one clear error at once (not a uvicorn log line)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port, or "
                        f"stop what is using it") from None
    return sock


def run_server(checkpoint: Path, host: str, port: int, api_key: str | None, slots: int,
               device: str = "auto") -> None:
    """Load the checkpoint and serve it until Ctrl-C or SIGTERM (the CLI's --threads sets torch's threads)."""
    from fundamentallm.checkpoint import load_model
    from fundamentallm.device import select_device

    if api_key is not None and not api_key.strip():
        raise UserError("--api-key is empty; give a key, or leave the option (and FUNDAMENTALLM_API_KEY) out")
    sock = _bind(host, port)
    loaded = load_model(checkpoint, select_device(device))
    served = Served(str(checkpoint), Engine(loaded.model, loaded.tokenizer, slots), api_key)
    shown_host, shown_port = sock.getsockname()[:2]
    shown_host = f"[{shown_host}]" if ":" in shown_host else shown_host
    print(f"Serving {checkpoint} at http://{shown_host}:{shown_port}/ (playground) and "
          f"http://{shown_host}:{shown_port}/v1 (OpenAI API){'; API key required' if api_key else ''}. "
          f"Ctrl-C stops it.", flush=True)
    config = uvicorn.Config(create_app(served), log_level="info", timeout_graceful_shutdown=GRACE_SECONDS)
    uvicorn.Server(config).run(sockets=[sock])

