"""Rank 0's front end: HTTP requests in, the serving loop's events out as completions and streams.

    frontend = FrontEnd(tokenizer, cfg.eos_id, "lm-tiny", mailbox, metrics, ServingLimits(...))
    completion = frontend.submit(body)           checked and tokenized, one runtime request per prompt, queued
    body = await frontend.result(completion, request)      the whole completion (the client gone: cancelled)
    async for event in frontend.stream(completion): ...    server-sent events, `data: [DONE]` last

Threads: everything here runs on the HTTP server's event loop, except the mailbox callbacks, which the serving loop
calls from its own thread and which only hand their arguments over to the event loop (call_soon_threadsafe), and
`fail_all`, which does the same. One runtime request per prompt, its id unique in the job; their events come back
tagged with it.

States: loading (the engine is starting: 503), ready, draining (SIGTERM: new requests get 503, the ones in flight go
on), stopped / failed (every open request answered with an error).
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from moe_infer.runtime.requests import Decoding, Event, Mailbox, Request
from moe_infer.serve.metrics import ServerMetrics
from moe_infer.serve.protocol import (
    DONE_EVENT,
    ApiError,
    ChunkWriter,
    CompletionRequest,
    completion_body,
    error_event,
    usage_body,
)
from moe_infer.serve.text import ChoiceText

CLIENT_GONE = "499"  # the status counted for a client that went away (nginx's convention)


@dataclass(frozen=True)
class ServingLimits:
    max_positions: int  # the model's context: prompt + max_tokens (MT: source, and max_tokens) must fit
    default_max_tokens: int  # when a request gives none
    max_rows: int  # rows a rank decodes at once: a beam search needs beam_size of them
    max_queued: int  # prompts waiting at rank 0 beyond which new requests get 503
    translate: bool  # an MT export: prompts are sources, completions their translations


@dataclass
class Choice:
    completion: Completion
    index: int
    request_id: int
    prompt_tokens: int
    text: ChoiceText
    arrival: float
    assigned: bool = False
    first: float | None = None
    last: float | None = None
    finish: str | None = None


@dataclass
class Completion:
    id: str
    body: CompletionRequest
    choices: list[Choice] = field(default_factory=list)
    updates: asyncio.Queue = field(default_factory=asyncio.Queue)  # (index, text, finish reason) | ApiError | None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    error: ApiError | None = None

    def push(self, item) -> None:
        if self.body.stream:
            self.updates.put_nowait(item)

    def usage(self) -> dict[str, int]:
        return usage_body(sum(c.prompt_tokens for c in self.choices), sum(len(c.text.ids) for c in self.choices))


class FrontEnd:
    def __init__(
        self, tokenizer, eos_id: int, model_name: str, mailbox: Mailbox, metrics: ServerMetrics, limits: ServingLimits
    ):
        # The export's EOS id and not its ModelConfig: unpickling that would import torch into the API process.
        self.tokenizer, self.eos_id, self.model_name = tokenizer, eos_id, model_name
        self.mailbox, self.metrics, self.limits = mailbox, metrics, limits
        self.state = "loading"
        self.loop: asyncio.AbstractEventLoop | None = None
        self.open: dict[int, Choice] = {}  # runtime request id -> its choice, until it ends
        self._ids = itertools.count()
        mailbox.on_events = lambda events: self._soon(self._deliver, events)
        mailbox.on_assigned = lambda ids, rank: self._soon(self._assigned, ids)
        mailbox.on_figures = metrics.add_figures  # thread-safe (prometheus_client)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def _soon(self, fn, *args) -> None:
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(fn, *args)

    # ---- requests in ------------------------------------------------------------------------------------------------

    def submit(self, body: CompletionRequest) -> Completion:
        """Check the request against this server and model, tokenize its prompts, queue them (ApiError if not)."""
        if self.state != "ready":
            why = {"loading": "the model is still loading", "draining": "the server is shutting down"}
            raise ApiError(503, f"{why.get(self.state, 'the server has stopped')}; retry later")
        if body.model != self.model_name:
            raise ApiError(
                404,
                f"model {body.model!r} does not exist; this server serves {self.model_name!r}",
                "model",
                "model_not_found",
            )
        decodings = self._decodings(body)
        named = isinstance(body.prompt, list)
        prompts = [
            self._tokenize(f"prompt {i}" if named else "the prompt", text, decodings[i])
            for i, text in enumerate(body.prompts)
        ]
        waiting = sum(not c.assigned for c in self.open.values())
        if waiting + len(prompts) > self.limits.max_queued:
            raise ApiError(
                503,
                f"the queue is full ({waiting} prompts waiting, --max-queued-requests {self.limits.max_queued}); "
                "retry later",
            )
        completion = Completion(f"cmpl-{secrets.token_hex(12)}", body)
        now, requests = time.monotonic(), []
        for index, (ids, decoding) in enumerate(zip(prompts, decodings, strict=True)):
            request = Request(next(self._ids), ids, decoding)
            choice = Choice(
                completion, index, request.id, len(ids), ChoiceText(self.tokenizer, body.stops, body.stream), now
            )
            completion.choices.append(choice)
            self.open[request.id] = choice
            requests.append(request)
        self.metrics.waiting.inc(len(requests))
        self.mailbox.submit(requests)
        return completion

    def _decodings(self, body: CompletionRequest) -> list[Decoding]:
        limits = self.limits
        max_tokens = body.max_tokens if body.max_tokens is not None else limits.default_max_tokens
        if limits.translate:
            if body.temperature:
                raise ApiError(
                    400,
                    "temperature: an MT export translates greedily or by beam search (beam_size); expected 0",
                    "temperature",
                )
            if body.beam_size > limits.max_rows:
                raise ApiError(
                    400,
                    f"beam_size: at most {limits.max_rows} (the rows a rank decodes at once, --batch-size)",
                    "beam_size",
                )
            if max_tokens > limits.max_positions:
                raise ApiError(
                    400,
                    f"max_tokens: the model decodes at most {limits.max_positions} tokens, got {max_tokens}",
                    "max_tokens",
                )
            decoding = Decoding(
                max_tokens,
                stop_at_eos=not body.ignore_eos,
                beam_size=body.beam_size,
                length_penalty=body.length_penalty,
            )
            return [decoding] * len(body.prompts)
        if body.beam_size != 1:
            raise ApiError(400, "beam_size: beam search is for MT exports; this is an LM", "beam_size")
        temperature = 1.0 if body.temperature is None else body.temperature
        seed = body.seed if body.seed is not None else secrets.randbelow(2**62)
        return [
            Decoding(max_tokens, temperature, max(body.top_k, 0), body.top_p, seed + i, not body.ignore_eos)
            for i in range(len(body.prompts))
        ]

    def _tokenize(self, which: str, text: str, decoding: Decoding) -> list[int]:
        ids = self.tokenizer.encode(text)
        if not ids:
            raise ApiError(400, f"{which} is empty: it needs at least one token", "prompt")
        limit = self.limits.max_positions
        if self.limits.translate:
            ids = ids + [self.eos_id]  # the encoder's input as in training
            if len(ids) > limit:
                raise ApiError(
                    400,
                    f"{which} is {len(ids)} tokens (with EOS), beyond the model's {limit}-token context",
                    "prompt",
                    "context_length_exceeded",
                )
        elif len(ids) + decoding.max_tokens > limit:
            raise ApiError(
                400,
                f"the model's context is {limit} tokens; {which} has {len(ids)} and max_tokens asks for "
                f"{decoding.max_tokens} more ({len(ids) + decoding.max_tokens}): shorten the prompt or lower "
                "max_tokens",
                "prompt",
                "context_length_exceeded",
            )
        return ids

    # ---- events from the serving loop (on the event loop) ----------------------------------------------------------

    def _assigned(self, ids: list[int]) -> None:
        now = time.monotonic()
        for request_id in ids:
            choice = self.open.get(request_id)
            if choice is not None and not choice.assigned:
                choice.assigned = True
                self.metrics.queue.observe(now - choice.arrival)
                self.metrics.prompt_tokens.inc(choice.prompt_tokens)
                self.metrics.waiting.dec()
                self.metrics.running.inc()

    def _deliver(self, events: list[Event]) -> None:
        now = time.monotonic()
        for event in events:
            choice = self.open.get(event.id)
            if choice is None:  # ended here already (a stop sequence, the client gone): the rank's last word on it
                continue
            if event.tokens:
                self.metrics.generation_tokens.inc(len(event.tokens))
                if choice.first is None:
                    choice.first = now
                    self.metrics.ttft.observe(now - choice.arrival)
                else:
                    self.metrics.itl.observe(now - choice.last)
                choice.last = now
                delta = choice.text.add(event.tokens)
                if choice.text.stopped:
                    self.mailbox.cancel(choice.request_id)  # the rank stops decoding it
                    self._end(choice, "stop", delta)
                    continue
                if delta:
                    choice.completion.push((choice.index, delta, None))
            if event.finish == "cancelled":
                self._fail(choice.completion, ApiError(500, "the request was cancelled by the server"))
            elif event.finish is not None:
                self._end(choice, event.finish, "")

    def _end(self, choice: Choice, reason: str, delta: str) -> None:
        """A choice ended normally: its last text, its figures; the completion is done when all its choices are."""
        self._close(choice)
        choice.finish = reason
        choice.completion.push((choice.index, delta + choice.text.finish(), reason))
        self.metrics.e2e.observe(time.monotonic() - choice.arrival)
        self.metrics.success.labels(reason).inc()
        completion = choice.completion
        if all(c.finish is not None for c in completion.choices):
            completion.push(None)
            completion.done.set()

    def _close(self, choice: Choice) -> None:
        if self.open.pop(choice.request_id, None) is not None:
            (self.metrics.running if choice.assigned else self.metrics.waiting).dec()

    def _fail(self, completion: Completion, error: ApiError, status: str | None = None) -> None:
        """End a completion with an error: its open choices are dropped (and cancelled on their ranks)."""
        if completion.done.is_set():
            return
        for choice in completion.choices:
            if choice.request_id in self.open:
                self._close(choice)
                self.mailbox.cancel(choice.request_id)
        completion.error = error
        self.metrics.errors.labels(status or str(error.status)).inc()
        completion.push(error)
        completion.done.set()

    def fail_all(self, message: str, status: int = 500) -> None:
        """Every open request answered with this error (any thread): the server is stopping."""

        def fail() -> None:
            for completion in {c.completion.id: c.completion for c in self.open.values()}.values():
                self._fail(completion, ApiError(status, message))

        self._soon(fail)

    # ---- responses --------------------------------------------------------------------------------------------------

    async def result(self, completion: Completion, request) -> dict:
        """The whole completion once every choice has ended; a client that leaves first cancels it."""
        while not completion.done.is_set():
            try:
                await asyncio.wait_for(completion.done.wait(), timeout=0.5)
            except TimeoutError:
                if await request.is_disconnected():
                    self._fail(completion, ApiError(400, "the client went away"), CLIENT_GONE)
        if completion.error is not None:
            raise completion.error
        choices = [(c.text.text, c.finish) for c in completion.choices]
        return completion_body(completion.id, self.model_name, choices, completion.usage())

    async def stream(self, completion: Completion) -> AsyncIterator[str]:
        """Server-sent events: each choice's new text as it comes, its finish reason, the usage (stream_options),
        then `data: [DONE]`; an error event instead if the server fails it. A client that leaves cancels it."""
        body, chunks, updates = completion.body, ChunkWriter(completion.id, self.model_name), completion.updates
        try:
            ended = False
            while not ended:
                # Everything queued since the last write goes out in one write: when the event loop falls behind
                # the steps (a busy server), a choice's tokens leave as several events in one send, not one send
                # (and one pass through the ASGI stack) per token. A quiet server still sends each token at once.
                items, events = [await updates.get()], []
                while not updates.empty():
                    items.append(updates.get_nowait())
                for item in items:
                    if isinstance(item, ApiError):
                        yield "".join(events) + error_event(item)
                        return
                    if item is None:
                        ended = True
                        break
                    index, text, finish = item
                    if text or finish:
                        events.append(chunks.choice(index, text, finish))
                if ended:
                    if body.stream_options is not None and body.stream_options.include_usage:
                        events.append(chunks.usage(completion.usage()))
                    events.append(DONE_EVENT)
                if events:
                    yield "".join(events)
        finally:
            if not completion.done.is_set():  # the client went away (the response task was cancelled)
                self._fail(completion, ApiError(400, "the client went away"), CLIENT_GONE)
