"""The serving loop's control plane: what rank 0 tells every rank each step (Plan), what every rank tells rank 0
(Report), the one collective that carries both (ControlPlane.exchange), and the mailbox between rank 0's front end
threads and its loop (Mailbox).

    control = ControlPlane(world_size, cuda=False, timeout_s=120)     on every rank, in the same order
    plan, reports = control.exchange(plan_or_none, my_report)         every rank gets rank 0's plan and all reports

    mailbox = Mailbox()                   rank 0: the front end submits and cancels from its own thread(s)
    mailbox.submit([request]); mailbox.cancel(7); mailbox.drain()
    inbox = mailbox.take(wait_s)          the loop: what arrived (waits up to wait_s when nothing has)

The exchange carries small Python objects (requests' token ids, events' new tokens, a few counts), pickled, in one
all-gather of fixed-size byte slots per step (a second one only for a message larger than a slot). On CUDA it runs on
a gloo group of its own, so the objects never go through the GPU; on CPU the default (gloo) group carries it. A rank
blocked in it uses no CPU while it waits, which is how idle ranks wait for work.
"""

from __future__ import annotations

import pickle
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from moe_infer.runtime.sequences import Event, Request


@dataclass
class Plan:
    """Rank 0 to every rank, once per step."""

    assign: dict[int, list[Request]] = field(default_factory=dict)  # rank -> requests it takes on now
    cancel: list[int] = field(default_factory=list)  # request ids: whichever rank holds one drops it
    stop: bool = False  # leave the loop (after a drain, or when rank 0's front end has failed)


@dataclass
class Report:
    """Every rank to rank 0, once per step: what its last step produced and where it stands after it."""

    events: list[Event] = field(default_factory=list)
    rows: int = 0  # batch rows its running requests hold (a beam search: beam_size)
    waiting_rows: int = 0  # rows its waiting requests will need
    draining: bool = False  # this rank was asked to shut down (SIGTERM)
    figures: dict[str, Any] = field(default_factory=dict)  # from the step hooks (MoE figures, ...), for rank 0

    @property
    def idle(self) -> bool:
        return not (self.rows or self.waiting_rows or self.events)


class ControlPlane:
    """One all-gather per step in the common case: every rank's pickled (plan, report) in a fixed-size slot of a
    uint8 tensor, its length first; only when some rank's message does not fit, a second all-gather with slots as
    large as the largest message (torch's all_gather_object always makes two: the sizes, then the data)."""

    SLOT_BYTES = 16 * 1024
    _LENGTH = 8  # bytes of the length header

    def __init__(self, world_size: int, cuda: bool = False, timeout_s: float = 300.0):
        self.world_size = world_size
        self.group = None
        if world_size > 1 and cuda:  # a collective every rank makes, in the same order (the loop's constructor)
            self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))

    def exchange(self, plan: Plan | None, report: Report) -> tuple[Plan, list[Report]]:
        """Rank 0's plan (others pass None) and every rank's report, on every rank (a collective)."""
        if self.world_size == 1:
            return plan or Plan(), [report]
        message = pickle.dumps((plan, report), protocol=pickle.HIGHEST_PROTOCOL)
        slots_WB = self._all_gather(message, self.SLOT_BYTES)
        lengths = [int.from_bytes(bytes(slot_B[: self._LENGTH].tolist()), "little") for slot_B in slots_WB]
        if max(lengths) > self.SLOT_BYTES - self._LENGTH:  # someone's did not fit: again, with room for the largest
            slots_WB = self._all_gather(message, max(lengths) + self._LENGTH)
        gathered = [
            pickle.loads(slot_B[self._LENGTH : self._LENGTH + n].numpy().tobytes())
            for slot_B, n in zip(slots_WB, lengths, strict=True)
        ]
        return gathered[0][0], [r for _, r in gathered]

    def _all_gather(self, message: bytes, slot_bytes: int) -> torch.Tensor:
        """[W, slot_bytes] uint8: every rank's slot (its length, then its message if it fits)."""
        mine_B = torch.zeros(slot_bytes, dtype=torch.uint8)
        mine_B[: self._LENGTH] = torch.frombuffer(
            bytearray(len(message).to_bytes(self._LENGTH, "little")), dtype=torch.uint8
        )
        if len(message) <= slot_bytes - self._LENGTH:
            mine_B[self._LENGTH : self._LENGTH + len(message)] = torch.frombuffer(bytearray(message), dtype=torch.uint8)
        slots_WB = torch.empty(self.world_size, slot_bytes, dtype=torch.uint8)
        dist.all_gather(list(slots_WB.unbind(0)), mine_B, group=self.group)  # (views: gathered in place)
        return slots_WB


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
