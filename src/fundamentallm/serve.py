"""`fundamentallm serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) and a playground page.

Endpoints: POST /v1/completions (plain, or streamed as server-sent events exactly as OpenAI streams them; with
`logprobs` and `echo`, so evaluation tools can score text), POST /v1/chat/completions (messages rendered into
one prompt by a chat template, chat.py), GET /v1/models, POST /tokenize and /detokenize and GET /tokenizer_info
(as vLLM's server has them), GET /health (load, for readiness checks) and GET / (the playground,
static/playground.html). The shapes of requests and answers are in api.py.

Concurrency: the engine (`batching.py`) advances every running request together, one batched forward pass per
token, in a process of its own (`engine_process.py`: the event loop never holds the model up); requests beyond
`slots` wait in a queue. A seeded request served alone gets exactly
what `fundamentallm generate --seed` prints; in company its scores may differ in float rounding.

An echoed prompt is scored by `evaluate.token_logprobs` in the engine's process, beside its decoding (one prompt
at a time): the same
windows and float32 log-softmax as `fundamentallm evaluate`, so its log-probabilities sum to minus evaluate's
nats on the same text. Every error is OpenAI's JSON shape with a 4xx code for the client's mistakes; a client
that goes away cancels its requests, which frees their slots at the next token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import signal
import socket
import time
import traceback
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from fundamentallm.api import (
    MAX_ECHO_TOKENS,
    MAX_TOKENS,
    ApiError,
    ChatRequest,
    ChatShape,
    Choice,
    CompletionRequest,
    CompletionShape,
    DetokenizeRequest,
    SamplingRequest,
    TokenizeRequest,
    check_completion,
    parse_body,
    parse_request,
)
from fundamentallm.chat import ChatTemplate, TemplateFailed, load_chat_template
from fundamentallm.errors import UserError

try:  # the optional extra: without it, `fundamentallm serve` is one clear error
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException
except ImportError:
    raise UserError("fundamentallm serve needs FastAPI and uvicorn: pip install 'fundamentallm[serve]'") from None

from fundamentallm.batching import FinishEvent, Job, TokenEvent
from fundamentallm.engine_process import EngineProcess, QueueFull
from fundamentallm.generate import Sampling, start_tokens
from fundamentallm.logprobs import Logprobs, Tracker, prompt_logprobs

MAX_BODY_BYTES = 1 << 20  # a prompt never needs more: it must fit in the model's context (or be scored alone)
DISCONNECT_CHECK_SECONDS = 0.5  # how often a plain (not streamed) request checks that its client is still there
GRACE_SECONDS = 10  # on Ctrl-C / SIGTERM, in-flight requests get this long to finish before they are cut off


# ----------------------------------------------------------------------------------------------------------
# The HTTP layer


@dataclass
class Served:
    model_id: str
    engine: EngineProcess
    api_key: str | None
    chat_template: ChatTemplate = field(default_factory=lambda: load_chat_template(None))
    created: int = field(default_factory=lambda: int(time.time()))


Shape = type[CompletionShape] | type[ChatShape]


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


def prompt_ids(served: Served, prompt: str | list[int], refuse_long: bool, param: str = "prompt") -> list[int]:
    """A prompt's token ids (given as text, or as ids). With `refuse_long`, it must leave room in the context
    to generate (an echoed prompt may be longer: it is scored in full, and continued from its last tokens)."""
    tokenizer, context = served.engine.tokenizer, served.engine.context_length
    if isinstance(prompt, str):
        try:
            ids = tokenizer.encode(prompt, what="prompt")  # unseen characters: the unknown token, as in generate
        except UserError as exc:
            raise ApiError(400, str(exc), param=param, code="invalid_prompt") from None
    elif not all(0 <= token < tokenizer.vocab_size for token in prompt):
        raise ApiError(400, f"prompt: token ids must be 0 to {tokenizer.vocab_size - 1} (this model's vocabulary)",
                       param="prompt", code="invalid_prompt")
    else:
        ids = list(prompt)
    if refuse_long and len(ids) >= context:
        unit = "characters" if tokenizer.kind == "char" else "tokens"
        what = "the prompt" if param == "prompt" else "the conversation, as the chat template renders it,"
        raise ApiError(400, f"{what} is {len(ids):,} {unit}, but this model's context holds {context:,}; "
                            f"shorten it to fewer than {context:,} {unit}"
                            f"{' (with echo, any length is scored)' if param == 'prompt' else ''}",
                       param=param, code="context_length_exceeded")
    return ids


def _jobs(served: Served, params: SamplingRequest, prompts: list[list[int]], emit: Any) -> list[Job]:
    """One job per (prompt, n); choice i of a seeded request uses seed + i."""
    keep, sampling = served.engine.context_length - 1, Sampling(params.temperature, params.top_k, params.top_p)
    jobs = []
    for index in range(len(prompts) * params.n):
        seed = None if params.seed is None else params.seed + index
        prompt = prompts[index // params.n]
        prompt = prompt[len(prompt) - keep :] or start_tokens(served.engine.tokenizer)  # not [-keep:]: keep may be 0
        jobs.append(Job(index, prompt, params.max_tokens or 0, sampling, seed, params.stops(), emit))
    return jobs


async def _echoes(served: Served, prompts: list[list[int]], top: int | None) -> list[Logprobs | None]:
    """Each prompt's tokens with their log-probabilities (scored in the engine's process)."""
    if top is None:
        return [None] * len(prompts)
    scored = await served.engine.score(prompts, top)
    return [prompt_logprobs(served.engine.tokenizer, ids, one, top) for ids, one in zip(prompts, scored, strict=True)]


def _new_choices(served: Served, params: SamplingRequest, texts: list[str], echoes: list[Logprobs | None],
                 ) -> list[Choice]:
    """Choice i (of prompt i // n) starts with that prompt's echo, when asked for, and counts offsets after it."""
    top = params.alternatives()
    choices = []
    for index in range(len(texts) * params.n):
        echo, text = echoes[index // params.n], texts[index // params.n]
        tracker = None if top is None else Tracker(served.engine.tokenizer, top, len(text))
        logprobs = None if top is None else Logprobs()
        if echo is not None and logprobs is not None:
            logprobs.extend(echo)
        choices.append(Choice(text, "" if params.max_tokens else "length", logprobs, tracker))
    return choices


def _chunk(served: Served, kind: str, cid: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"id": cid, "object": kind, "created": int(time.time()), "model": served.model_id,
            "choices": choices, "system_fingerprint": None, **extra}


async def _respond(served: Served, request: Request, params: SamplingRequest, shape: Shape,
                   prompts: list[list[int]], choices: list[Choice]) -> Any:
    """Run the choices' jobs and answer: one JSON object, or server-sent events when `stream` is set."""
    loop, events = asyncio.get_running_loop(), asyncio.Queue()

    def emit(index: int, event: TokenEvent | FinishEvent) -> None:
        with suppress(RuntimeError):  # the event loop is gone: the server is shutting down
            loop.call_soon_threadsafe(events.put_nowait, (index, event))

    jobs = _jobs(served, params, prompts, emit) if params.max_tokens else []
    served.engine.submit(jobs)
    cid = f"{shape.id_prefix}{secrets.token_hex(12)}"
    if params.stream:
        return StreamingResponse(_stream(served, shape, cid, choices, jobs, events),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        await _collect(request, choices, events)
    finally:
        served.engine.cancel(jobs)
    prompt_tokens = sum(len(ids) for ids in prompts) * params.n
    completion_tokens = sum(job.generated for job in jobs)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    return _chunk(served, shape.object, cid, [shape.choice(i, c) for i, c in enumerate(choices)], usage=usage)


def _take(choice: Choice, event: TokenEvent | FinishEvent) -> Logprobs | None:
    """Add an engine event to its choice; returns the log-probabilities released with its text."""
    if isinstance(event, FinishEvent):
        if event.reason.startswith("error"):
            raise ApiError(500, f"generation failed ({event.reason})", kind="server_error")
        return choice.take(event.text, finish=event.reason)
    return choice.take(event.text, (event.token, event.logprob, event.top))


def create_app(served: Served) -> FastAPI:
    app = FastAPI(title="FundamentaLLM", docs_url=None, redoc_url=None, openapi_url=None)
    page = files("fundamentallm").joinpath("static/playground.html").read_text(encoding="utf-8")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, exc: QueueFull) -> JSONResponse:
        error = ApiError(400, str(exc), param="n") if exc.never else \
            ApiError(503, str(exc), code="overloaded", kind="server_error")
        return JSONResponse(error.body(), status_code=error.status)

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
    async def health() -> Any:
        if served.engine.failure is not None:  # the server is stopping: a load balancer should look elsewhere
            return JSONResponse({"status": "stopping", "reason": served.engine.failure}, status_code=503)
        return {"status": "ok", **served.engine.load()}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        _check_key(served, request.headers.get("authorization"))
        return {"object": "list", "data": [{"id": served.model_id, "object": "model", "created": served.created,
                                            "owned_by": "fundamentallm"}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        _check_key(served, request.headers.get("authorization"))
        return await _completions(served, request, parse_request(await _read_body(request), CompletionRequest))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        _check_key(served, request.headers.get("authorization"))
        return await _chat(served, request, parse_request(await _read_body(request), ChatRequest))

    _tokenizer_routes(app, served)
    return app


def _tokenizer_routes(app: FastAPI, served: Served) -> None:
    """The tokenizer, as vLLM's server offers it (lm-evaluation-harness's remote tokenizer uses these three)."""

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        _check_key(served, request.headers.get("authorization"))
        ids = prompt_ids(served, parse_body(await _read_body(request), TokenizeRequest).prompt, False)
        return {"tokens": ids, "count": len(ids), "max_model_len": served.engine.context_length}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        _check_key(served, request.headers.get("authorization"))
        tokens = parse_body(await _read_body(request), DetokenizeRequest).tokens
        return {"prompt": served.engine.tokenizer.decode(prompt_ids(served, tokens, False))}

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request) -> dict[str, Any]:
        _check_key(served, request.headers.get("authorization"))
        tokenizer = served.engine.tokenizer
        # No token of its own begins or ends a text: the boundary token stands for both, as in an export.
        boundary = None if tokenizer.boundary_id is None else tokenizer.decode([tokenizer.boundary_id])
        return {"tokenizer_class": f"fundamentallm {tokenizer.kind}", "vocab_size": tokenizer.vocab_size,
                "model_max_length": served.engine.context_length, "bos_token": boundary,
                "eos_token": boundary, "pad_token": boundary, "chat_template": served.chat_template.source}


async def _completions(served: Served, request: Request, params: CompletionRequest) -> Any:
    params, given = check_completion(params), params.prompts()
    prompts = [prompt_ids(served, prompt, not params.echo) for prompt in given]
    if params.echo and params.logprobs is not None and sum(map(len, prompts)) > MAX_ECHO_TOKENS:
        raise ApiError(400, f"echo with logprobs scores at most {MAX_ECHO_TOKENS:,} prompt tokens per request; "
                            f"these prompts hold {sum(map(len, prompts)):,}: split them over several requests",
                       param="prompt")
    texts = [""] * len(given)
    if params.echo:
        texts = [p if isinstance(p, str) else served.engine.tokenizer.decode(p) for p in given]
    echoes = await _echoes(served, prompts, params.logprobs if params.echo else None)
    return await _respond(served, request, params, CompletionShape, prompts,
                          _new_choices(served, params, texts, echoes))


async def _chat(served: Served, request: Request, params: ChatRequest) -> Any:
    """The messages rendered by the chat template into one prompt, completed n times. max_tokens (or its newer
    name max_completion_tokens) is by default a context's worth of tokens."""
    params.max_tokens = params.max_completion_tokens or params.max_tokens or \
        min(MAX_TOKENS, served.engine.context_length)
    try:
        prompt = served.chat_template.render([message.as_dict() for message in params.messages])
    except TemplateFailed as exc:
        raise ApiError(400, f"{served.chat_template.name} cannot render these messages: {exc}",
                       param="messages", code="chat_template_error") from None
    return await _respond(served, request, params, ChatShape, [prompt_ids(served, prompt, True, "messages")],
                          _new_choices(served, params, [""], [None]))


async def _collect(request: Request, choices: list[Choice], events: asyncio.Queue) -> None:
    """Fill in every choice; give up (the caller cancels the jobs) if the client disconnects meanwhile."""
    loop = asyncio.get_running_loop()
    next_check = loop.time() + DISCONNECT_CHECK_SECONDS
    while not all(choice.finish for choice in choices):
        try:
            index, event = await asyncio.wait_for(events.get(), timeout=DISCONNECT_CHECK_SECONDS)
        except asyncio.TimeoutError:
            pass
        else:
            _take(choices[index], event)
        if loop.time() >= next_check:  # by the clock: events may never pause long enough for a timeout
            next_check = loop.time() + DISCONNECT_CHECK_SECONDS
            if await request.is_disconnected():
                raise ApiError(499, "client disconnected")


async def _stream(served: Served, shape: Shape, cid: str, choices: list[Choice], jobs: list[Job],
                  events: asyncio.Queue) -> AsyncIterator[str]:
    """Server-sent events as OpenAI sends them: a first chunk per choice (the echoed prompt, or the chat role),
    one chunk per piece of text, a last chunk per choice with its finish_reason, then [DONE]. Cancelled (client
    gone, or shutdown cut short) -> the jobs are cancelled."""
    def event(index: int, text: str, finish: str | None, logprobs: Logprobs | None, first: bool = False) -> str:
        piece = shape.piece(index, text, finish, logprobs, first)
        return f"data: {json.dumps(_chunk(served, shape.chunk_object, cid, [piece]))}\n\n"

    try:
        for index, choice in enumerate(choices):
            yield event(index, choice.text, choice.finish, choice.logprobs, first=True)
        remaining = len(jobs)
        while remaining:
            # Everything that has arrived goes out in one write: a busy server sends fewer, larger writes.
            updates, out = [await events.get()], []
            while not events.empty():
                updates.append(events.get_nowait())
            for index, update in updates:
                try:
                    released = _take(choices[index], update)
                except ApiError as error:
                    yield "".join(out) + f"data: {json.dumps(error.body())}\n\n"
                    return
                if isinstance(update, FinishEvent):
                    remaining -= 1
                    if update.text or released:  # held-back text, then the finish on its own (as OpenAI sends it)
                        out.append(event(index, update.text, None, released))
                    out.append(event(index, "", update.reason, None))
                elif update.text:
                    out.append(event(index, update.text, None, released))
            if out:
                yield "".join(out)
        yield "data: [DONE]\n\n"
    finally:
        served.engine.cancel(jobs)


def _bind(host: str, port: int) -> socket.socket:
    """Bind before uvicorn starts, so that a taken port is one clear error (not a uvicorn log line)."""
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
               device: str = "auto", chat_template: Path | None = None) -> None:
    """Load the checkpoint and serve it until Ctrl-C or SIGTERM (the engine's process gets the torch threads
    the CLI's --threads set)."""
    if api_key is not None and not api_key.strip():
        raise UserError("--api-key is empty; give a key, or leave the option (and FUNDAMENTALLM_API_KEY) out")
    if api_key is not None and not (api_key.isascii() and api_key.isprintable()):
        raise UserError("--api-key holds characters outside printable ASCII, which an HTTP header cannot carry "
                        "reliably; choose a key of ASCII letters, digits and punctuation")
    template = load_chat_template(chat_template)
    log = logging.getLogger("uvicorn.error")
    # The model loads first (in the engine's process), so that a bad checkpoint fails before the port is taken.
    engine = EngineProcess(str(checkpoint), device, torch.get_num_threads(), slots, log=log.info)
    try:
        stopped_by = _serve(Served(str(checkpoint), engine, api_key, template), _bind(host, port), log)
    finally:
        engine.stop()
    if engine.failure is not None:
        raise UserError(f"{engine.failure}; the server stopped", exit_code=1)
    if stopped_by is not None:  # end as that signal ends a process (exit status), now that all is closed
        signal.signal(stopped_by, signal.SIG_DFL)
        signal.raise_signal(stopped_by)


def _serve(served: Served, sock: socket.socket, log: logging.Logger) -> int | None:
    """Run uvicorn until Ctrl-C or SIGTERM; the signal that stopped it."""
    checkpoint, api_key = served.model_id, served.api_key
    shown_host, shown_port = sock.getsockname()[:2]
    shown_host = f"[{shown_host}]" if ":" in shown_host else shown_host
    print(f"Serving {checkpoint} at http://{shown_host}:{shown_port}/ (playground) and "
          f"http://{shown_host}:{shown_port}/v1 (OpenAI API){'; API key required' if api_key else ''}. "
          f"Ctrl-C stops it.", flush=True)
    config = uvicorn.Config(create_app(served), log_level="info", timeout_graceful_shutdown=GRACE_SECONDS)
    log.addFilter(_no_cancelled)
    server = _Server(config)
    # Should the engine end on its own, the server shuts down as on SIGTERM (and run_server says why).
    served.engine.on_failure = lambda: setattr(server, "should_exit", True)
    if served.engine.failure is None:
        server.run(sockets=[sock])
    return server.stopped_by


def _no_cancelled(record: logging.LogRecord) -> bool:
    """Drop uvicorn's tracebacks of requests cancelled at shutdown (a second Ctrl-C, or the grace period over):
    being cut short then is what was asked for, not an error."""
    cancelled = record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError)
    return not (cancelled or record.getMessage().rstrip().endswith("asyncio.exceptions.CancelledError"))


class _Server(uvicorn.Server):
    """uvicorn's server, stopped by Ctrl-C or SIGTERM as uvicorn stops it (in-flight requests get GRACE_SECONDS, a
    second Ctrl-C cuts them short), except that uvicorn re-raises the signal while its event loop still runs,
    where Ctrl-C becomes a KeyboardInterrupt traceback; run_server re-raises it once the loop is gone."""

    stopped_by: int | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.stopped_by = self.stopped_by or sig
        super().handle_exit(sig, frame)

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

