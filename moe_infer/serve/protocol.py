"""The OpenAI completions protocol as this server speaks it: the request body, checked (CompletionRequest), the
response and stream chunk bodies, and OpenAI-style errors (ApiError).

    body = CompletionRequest.parse(raw_bytes)        ApiError(400, ...) naming the field for anything wrong
    completion_body(...), usage_body(...), ChunkWriter(id, model).choice(...) / .usage(...)

Fields: `model`, `prompt` (a string or a list of strings: one choice each), `max_tokens` (default 16; an MT export:
its translation limit), `temperature` (default 1; an MT export decodes greedily or by beam search: 0 only), `top_p`,
`stop` (a string or a list), `seed`, `stream` (server-sent events ending `data: [DONE]`), `stream_options`
(`include_usage`), `n` (1), `user` (ignored). Extensions: `top_k` (0 or -1: off), `ignore_eos`, and for an MT export
`beam_size` and `length_penalty`. OpenAI fields this server does not implement (`echo`, `logprobs`, `best_of` > 1,
`presence_penalty`, `frequency_penalty`, `logit_bias`, `suffix`) are refused with a 400 naming them, never ignored;
so is any unknown field.

Seeds: prompt i of a request (its choice index) samples from a generator seeded with `seed + i`, exactly as line i of
`launch/infer.py --mode generate --seed S` samples with `S + i`: one request with the whole file as its prompt list
and seed S, or each line alone with seed S + i, gives the batch CLI's output. Without a seed, a random one is drawn.
"""

from __future__ import annotations

import json
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_SEED = 2**63 - 1


class ApiError(Exception):
    """An HTTP error with an OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 404: "not_found_error", 500: "server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = self.TYPES.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # strict: "5" is not a number, true is not 1

    model: str
    prompt: str | list[str]
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=-1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1)
    user: str | None = None
    ignore_eos: bool = False
    beam_size: int = Field(default=1, ge=1)
    length_penalty: float = 1.0
    # OpenAI fields accepted only at their "off" value.
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None

    @classmethod
    def parse(cls, raw: bytes) -> CompletionRequest:
        """The checked body, or ApiError(400) naming the problem (malformed JSON, a bad or unknown field)."""
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as err:
            raise ApiError(400, f"the request body is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}")
        try:
            request = cls.model_validate(data)
        except ValidationError as err:
            raise _field_error(err) from None
        request._refuse_unsupported()
        return request

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def _refuse_unsupported(self) -> None:
        if isinstance(self.prompt, list) and not self.prompt:
            raise ApiError(400, "prompt: an empty list; expected a string or a non-empty list of strings", "prompt")
        if any(s == "" for s in self.stops):
            raise ApiError(400, "stop: an empty string cannot be a stop sequence", "stop")
        off = {
            "n": (self.n, 1, "one choice per prompt (send a list of prompts for several)"),
            "echo": (self.echo, False, "the prompt is not echoed"),
            "logprobs": (self.logprobs, None, "log-probabilities are not returned"),
            "best_of": (self.best_of if self.best_of != 1 else None, None, "best_of is not implemented"),
            "presence_penalty": (self.presence_penalty, 0.0, "penalties are not implemented"),
            "frequency_penalty": (self.frequency_penalty, 0.0, "penalties are not implemented"),
            "logit_bias": (self.logit_bias or None, None, "logit_bias is not implemented"),
            "suffix": (self.suffix, None, "suffix (insertion) is not implemented"),
        }
        for name, (value, expected, why) in off.items():
            if value != expected:
                raise ApiError(400, f"{name}: {why} by this server; got {value!r}, expected {expected!r}", name)


def _field_error(err: ValidationError) -> ApiError:
    """The first problem pydantic found, as `field: what is wrong` (400)."""
    first = err.errors()[0]
    loc = [str(part) for part in first["loc"]]
    param = loc[0] if loc else None
    where = ".".join(loc) or "body"
    if first["type"] == "extra_forbidden":
        return ApiError(400, f"{where}: unknown field (not an OpenAI completions field this server knows)", param)
    if first["type"] == "missing":
        return ApiError(400, f"{where}: required", param)
    shown = json.dumps(first.get("input")) if _jsonable(first.get("input")) else repr(first.get("input"))
    if param in ("prompt", "stop"):  # unions: pydantic names each alternative; one line says what is expected
        return ApiError(400, f"{param}: expected a string or a list of strings, got {shown}", param)
    return ApiError(400, f"{where}: {first['msg']}, got {shown}", param)


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


# ---- responses -------------------------------------------------------------------------------------------------------


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def completion_body(
    completion_id: str, model: str, choices: list[tuple[str, str | None]], usage: dict[str, int]
) -> dict[str, Any]:
    """The whole completion: one (text, finish reason) per prompt."""
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [_choice(i, text, reason) for i, (text, reason) in enumerate(choices)],
        "usage": usage,
    }


class ChunkWriter:
    """The server-sent events of one streamed completion: `data: {chunk}` lines with the completion's id, creation
    time and model (the same in every chunk, as OpenAI's), formatted once; per chunk only the choice is."""

    def __init__(self, completion_id: str, model: str):
        head = {"id": completion_id, "object": "text_completion", "created": int(time.time()), "model": model}
        self._head = json.dumps(head, ensure_ascii=False)[:-1]  # without its closing brace

    def choice(self, index: int, text: str, finish_reason: str | None = None) -> str:
        """A choice's new text (or its end)."""
        choice = json.dumps(_choice(index, text, finish_reason), ensure_ascii=False)
        return f'data: {self._head}, "choices": [{choice}]}}\n\n'

    def usage(self, usage: dict[str, int]) -> str:
        """The last chunk with stream_options.include_usage: no choices, the usage."""
        return f'data: {self._head}, "choices": [], "usage": {json.dumps(usage)}}}\n\n'


def error_event(error: ApiError) -> str:
    return f"data: {json.dumps(error.body(), ensure_ascii=False)}\n\n"


DONE_EVENT = "data: [DONE]\n\n"
