"""The serving loop's control plane: what rank 0 tells every rank each step (Plan), what every rank tells rank 0
(Report), and the one collective that carries both (ControlPlane.exchange). The mailbox between rank 0's front end
and its loop is moe_infer.runtime.requests.Mailbox (torch-free, for the API process).

    control = ControlPlane(world_size, cuda=False, timeout_s=120)     on every rank, in the same order
    plan, reports = control.exchange(plan_or_none, my_report)         every rank gets rank 0's plan and all reports

The exchange carries small Python objects (requests' token ids, events' new tokens, a few counts), pickled, in one
all-gather of fixed-size byte slots per step (a second one only for a message larger than a slot). On CUDA it runs on
a gloo group of its own, so the objects never go through the GPU; on CPU the default (gloo) group carries it. A rank
blocked in it uses no CPU while it waits, which is how idle ranks wait for work.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from moe_infer.runtime.requests import Event, Request


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
