"""What the serving loop and its front end pass each other, and nothing that needs torch: the API process (the HTTP
front end in a process of its own, moe_infer.serve.api_process) imports only this of the runtime, so it starts in a
fraction of a second instead of spending ~3 s of CPU importing torch while rank 0 loads the engine.

    request = Request(id=7, tokens=prompt_ids, decoding=Decoding(max_tokens=32, temperature=0.8, seed=7))
    Event(id=7, tokens=[...], finish="stop")      what a request produced since its last event
    mailbox = Mailbox()                   rank 0: the front end submits and cancels from its own thread(s)
    mailbox.submit([request]); mailbox.cancel(7); mailbox.drain()
    inbox = mailbox.take(wait_s)          the loop: what arrived (waits up to wait_s when nothing has)

How a request is decoded: moe_infer.runtime.sequences; the loop and its control plane: steploop.py, control.py.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

FINISH_REASONS = ("stop", "length", "cancelled")


@dataclass(frozen=True)
class Decoding:
    """How one request is decoded."""

    max_tokens: int  # new tokens at most (MT: decoder steps at most, EOS included)
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int = 0  # the request's generator (sampling only)
    stop_at_eos: bool = True
    beam_size: int = 1  # MT: 1 is greedy
    length_penalty: float = 1.0  # MT beam search

    @property
    def rows(self) -> int:
        """The batch rows the request may hold at once."""
        return self.beam_size


@dataclass
class Request:
    id: int  # unique among the requests a batcher holds (the job's request number)
    tokens: list[int]  # the prompt (LM), or the source ids + EOS (MT)
    decoding: Decoding


@dataclass
class Event:
    """What a request produced since its last event: new tokens (beam search: the whole result, once) and, when it
    ended, why (one of FINISH_REASONS)."""

    id: int
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None


@dataclass
class Inbox:
    """What the front end sent since the loop last looked."""

    requests: list[Request] = field(default_factory=list)
    cancel: set[int] = field(default_factory=set)
    drain: bool = False


class Mailbox:
    """Rank 0's front end (any thread) -> its serving loop (the main thread), and back through callbacks the front end
    sets: `on_events(events)` with every rank's new tokens, `on_assigned(ids, rank)` when requests leave the queue for
    a rank, `on_figures(rank, figures)` with what the ranks' step hooks reported. The callbacks run on the loop's
    thread: they must hand the work over to the front end's own thread (e.g. loop.call_soon_threadsafe)."""

    def __init__(self):
        self._ready = threading.Condition()
        self._inbox = Inbox()
        self.on_events: Callable[[list[Event]], None] = lambda events: None
        self.on_assigned: Callable[[list[int], int], None] = lambda ids, rank: None
        self.on_figures: Callable[[int, dict[str, Any]], None] = lambda rank, figures: None

    def submit(self, requests: list[Request]) -> None:
        with self._ready:
            self._inbox.requests += requests
            self._ready.notify()

    def cancel(self, request_id: int) -> None:
        with self._ready:
            self._inbox.cancel.add(request_id)
            self._ready.notify()

    def drain(self) -> None:
        """Stop taking requests, finish the ones in flight (the loop's shutdown timeout), then stop."""
        with self._ready:
            self._inbox.drain = True
            self._ready.notify()

    def take(self, wait_s: float = 0.0) -> Inbox:
        """Everything sent since the last call; when nothing was, wait up to `wait_s` for something."""
        with self._ready:
            inbox = self._inbox
            if wait_s > 0 and not (inbox.requests or inbox.cancel or inbox.drain):
                self._ready.wait(wait_s)
            self._inbox = Inbox(drain=inbox.drain)  # draining, once asked, stays asked
            return inbox
