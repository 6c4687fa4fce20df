"""The OpenAI API's shapes: request bodies and their checks, errors, and the JSON of choices and chunks, for
/v1/completions and /v1/chat/completions. No HTTP here (serve.py) and no model: plain data in and out.

Every error is OpenAI's JSON shape {"error": {"message", "type", "param", "code"}}, with a 4xx code for the
client's mistakes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fundamentallm.logprobs import Logprobs, Tracker

MAX_TOKENS = 4096  # per choice; generation slides its window, so this bounds time, not memory
MAX_CHOICES = 16  # prompts x n in one request
MAX_STOPS = 4
MAX_STOP_CHARS = 1000  # all of a request's stop sequences together (matching costs their length, once)
MAX_ECHO_TOKENS = 65_536  # prompt tokens scored per request: each costs an entry of the answer (~100 bytes)
MAX_LOGPROBS = 5  # the most likely alternatives reported per token, as OpenAI's completions API allows
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
UNSUPPORTED = {  # OpenAI parameters this server does not implement, and the values that mean "not used"
    "best_of": (None, 1), "suffix": (None, ""), "logit_bias": (None, {}), "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0), "tools": (None, []), "response_format": (None, {"type": "text"}),
}


class ApiError(Exception):
    """An error answered as OpenAI's JSON error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class SamplingRequest(BaseModel):
    """What every generating endpoint takes; `top_k` is an extension (OpenAI has none). Unknown keys are
    ignored."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0, le=MAX_TOKENS)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stream: bool = False

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else self.stop or []

    def alternatives(self) -> int | None:
        """How many alternatives to report per token; None: no log-probabilities at all."""
        raise NotImplementedError


class CompletionRequest(SamplingRequest):
    """The body of POST /v1/completions: prompts as text or as token ids."""

    prompt: str | list[str] | list[int] | list[list[int]] = ""
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False

    def prompts(self) -> list[str] | list[list[int]]:
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]  # type: ignore[list-item]
        return self.prompt  # type: ignore[return-value]

    def alternatives(self) -> int | None:
        return self.logprobs


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    type: str
    text: str = ""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: str
    content: str | list[TextPart] | None = None

    def as_dict(self) -> dict[str, Any]:
        """The message as a template sees it: its content as one string (text parts joined)."""
        content = self.content
        if isinstance(content, list):
            if any(part.type != "text" for part in content):
                raise ApiError(400, "messages: only text content parts are supported", param="messages")
            content = "".join(part.text for part in content)
        return {**(self.model_extra or {}), "role": self.role, "content": content or ""}


class ChatRequest(SamplingRequest):
    """The body of POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)  # the newer name of max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def alternatives(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(BaseModel):
    """The body of POST /tokenize (as vLLM's server takes it); this model has no special tokens to add."""

    model_config = ConfigDict(extra="allow", strict=True)

    prompt: str
    add_special_tokens: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    tokens: list[int]


Body = TypeVar("Body", bound=BaseModel)
Request = TypeVar("Request", bound=SamplingRequest)


def parse_body(body: bytes, schema: type[Body]) -> Body:
    """Validate a JSON body; every problem becomes a 400 naming the parameter."""
    try:
        return schema.model_validate_json(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = ".".join(str(part) for part in error["loc"]) or None
        if error["type"] == "json_invalid":
            raise ApiError(400, f"the body is not valid JSON ({error['msg']})") from None
        if error["type"] == "model_type":
            raise ApiError(400, "the body must be a JSON object") from None
        raise ApiError(400, f"{param}: {error['msg']}" if param else error["msg"], param=param) from None


def parse_request(body: bytes, schema: type[Request]) -> Request:
    """Validate a generating request's body: its fields, then the parameters this server does not offer."""
    params = parse_body(body, schema)
    for name, neutral in UNSUPPORTED.items():
        if (params.model_extra or {}).get(name) not in neutral:
            raise ApiError(400, f"{name} is not supported by this server; leave it out", param=name)
    stops = params.stops()
    if len(stops) > MAX_STOPS or not all(stops) or sum(map(len, stops)) > MAX_STOP_CHARS:
        raise ApiError(400, f"stop: give at most {MAX_STOPS} non-empty strings of {MAX_STOP_CHARS} characters in "
                            f"all", param="stop")
    return params


def check_completion(params: CompletionRequest) -> CompletionRequest:
    """The completions rules beyond single fields."""
    prompts = params.prompts()
    if not prompts or len(prompts) * params.n > MAX_CHOICES:
        raise ApiError(400, f"give 1 to {MAX_CHOICES} completions per request (prompts x n)", param="prompt")
    if params.max_tokens is None:
        params.max_tokens = COMPLETION_MAX_TOKENS
    if params.max_tokens == 0 and not params.echo:
        raise ApiError(400, "max_tokens: 0 generates nothing; it is meant for scoring a prompt with echo: true "
                            "and logprobs", param="max_tokens")
    return params


# ----------------------------------------------------------------------------------------------------------
# Choices as they build up, and their JSON


@dataclass
class Choice:
    """One choice of a response: its text and log-probabilities so far (the echoed prompt first, if any)."""

    text: str = ""
    finish: str = ""
    logprobs: Logprobs | None = None  # None: not asked for
    tracker: Tracker | None = None

    def take(self, text: str, token: tuple[int, float, list[tuple[int, float]]] | None = None,
             finish: str | None = None) -> Logprobs | None:
        """Add what one engine event brings (released text, a token, a finish reason); returns the
        log-probabilities of the tokens whose text is now out (a stop sequence's tokens never are)."""
        self.text += text
        self.finish = finish or self.finish
        if self.tracker is None:
            return None
        if token is not None:
            self.tracker.add(*token)
        released = self.tracker.release(float("inf") if finish == "length" else len(self.text))
        if finish:
            self.tracker.drop()
        if self.logprobs is not None:
            self.logprobs.extend(released)
        return released


class CompletionShape:
    """/v1/completions: choices carry `text`; log-probabilities in the completions format."""

    object, chunk_object, id_prefix = "text_completion", "text_completion", "cmpl-"

    @staticmethod
    def choice(index: int, choice: Choice) -> dict[str, Any]:
        return CompletionShape.piece(index, choice.text, choice.finish, choice.logprobs)

    @staticmethod
    def piece(index: int, text: str, finish: str | None, logprobs: Logprobs | None,
              first: bool = False) -> dict[str, Any]:
        return {"text": text, "index": index, "logprobs": None if logprobs is None else logprobs.to_dict(),
                "finish_reason": finish or None}


class ChatShape:
    """/v1/chat/completions: choices carry a `message` (streamed: a `delta`, the role in the first one)."""

    object, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl-"

    @staticmethod
    def choice(index: int, choice: Choice) -> dict[str, Any]:
        return {"index": index, "message": {"role": "assistant", "content": choice.text},
                "logprobs": None if choice.logprobs is None else choice.logprobs.to_chat(),
                "finish_reason": choice.finish}

    @staticmethod
    def piece(index: int, text: str, finish: str | None, logprobs: Logprobs | None,
              first: bool = False) -> dict[str, Any]:
        delta = {"role": "assistant", "content": text} if first else {"content": text} if text else {}
        return {"index": index, "delta": delta, "logprobs": None if logprobs is None else logprobs.to_chat(),
                "finish_reason": finish or None}
