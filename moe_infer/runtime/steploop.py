"""The serving loop every rank runs: continuous batching across the expert-parallel ranks, steered by rank 0.

    loop = StepLoop(Batcher(model, max_rows), ControlPlane(...), rank, hooks=[meter])
    loop.run(Coordinator(mailbox, world, max_rows, shutdown_timeout_s, heartbeat_s) if rank == 0 else None)

One iteration, on every rank:
  1. rank 0's Coordinator makes the plan: requests from the front end's mailbox queue at rank 0 and go, oldest first,
     to the rank with the least outstanding work (rows held + rows waiting) that has room for them; cancellations;
     stop after a drain. When no rank has work it first waits on the mailbox (up to `heartbeat_s`, well inside the
     collective timeout, so an idle server never trips it);
  2. the exchange (moe_infer.runtime.control): rank 0's plan to every rank, every rank's report (the events of its
     last step, its rows, its hooks' figures) to every rank. Idle ranks wait here, blocked in gloo, using no CPU;
  3. every rank takes its new requests and drops the cancelled ones, then runs the step: a prefill call if any rank
     has requests to admit, a decode call if any rank has rows. Every rank derives both from the same plan and
     reports, so all ranks make the same model calls (an idle rank on empty batches) and their MoE all-to-alls meet;
  4. the step hooks run, on every rank at the same point (`hook.after_step(step, worked)`): a hook may use
     collectives (online expert re-balancing every N steps goes here); what it returns travels to rank 0 in the next
     report and reaches the front end through `mailbox.on_figures` (the MoE figures in /metrics: runtime.metering),
     with the loop's own counts of steps and prefill steps.

Rank 0 hands every event to the front end (`mailbox.on_events`), which turns tokens into text and responses.
A failed collective (a rank died, or hung past the collective timeout) raises out of `run` on the ranks still alive.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Protocol

from moe_infer.runtime.batching import Batcher
from moe_infer.runtime.control import ControlPlane, Plan, Report
from moe_infer.runtime.requests import Mailbox, Request


class StepHook(Protocol):
    def after_step(self, step: int, worked: bool) -> dict[str, Any] | None:
        """Called on every rank after every iteration of the loop, at the same point: `step` counts the iterations
        that made model calls so far, `worked` says whether this one did. Figures returned go to rank 0."""


class Coordinator:
    """Rank 0's side of the loop: the queue, who serves what, the drain."""

    def __init__(self, mailbox: Mailbox, world_size: int, max_rows: int, shutdown_timeout_s: float, heartbeat_s: float):
        self.mailbox, self.world_size, self.max_rows = mailbox, world_size, max_rows
        self.shutdown_timeout_s, self.heartbeat_s = shutdown_timeout_s, heartbeat_s
        self.queue: deque[Request] = deque()
        self.serving: dict[int, int] = {}  # request id -> the rank it went to, until it ends
        self.load = [0] * world_size  # rows each rank holds or will need, as of its last report
        self.assigned = [0] * world_size  # rows given to each rank since its last report
        self.ranks_idle = True
        self.drain_deadline: float | None = None

    @property
    def idle(self) -> bool:
        return not (self.queue or self.serving) and self.ranks_idle

    def plan(self) -> Plan:
        inbox = self.mailbox.take(self.heartbeat_s if self.idle and self.drain_deadline is None else 0.0)
        plan = Plan()
        self.queue += inbox.requests
        for request_id in inbox.cancel:
            if request_id in self.serving:
                plan.cancel.append(request_id)
            else:
                self.queue = deque(r for r in self.queue if r.id != request_id)
        if inbox.drain:
            self.start_drain()
        if self.drain_deadline is not None and (
            not (self.queue or self.serving) or time.monotonic() > self.drain_deadline
        ):
            plan.stop = True  # whatever is still in flight gets an error from the front end
            return plan
        self._assign(plan)
        return plan

    def start_drain(self) -> None:
        if self.drain_deadline is None:
            self.drain_deadline = time.monotonic() + self.shutdown_timeout_s

    def _assign(self, plan: Plan) -> None:
        """Oldest first, each to the rank with the least outstanding rows that has room for it."""
        while self.queue:
            need = self.queue[0].decoding.rows
            outstanding = [self.load[r] + self.assigned[r] for r in range(self.world_size)]
            fits = [r for r in range(self.world_size) if outstanding[r] + need <= self.max_rows or outstanding[r] == 0]
            if not fits:
                return
            rank = min(fits, key=lambda r: (outstanding[r], r))
            request = self.queue.popleft()
            plan.assign.setdefault(rank, []).append(request)
            self.assigned[rank] += need
            self.serving[request.id] = rank

    def absorb(self, plan: Plan, reports: list[Report]) -> None:
        """What the ranks reported (their state after their last step, before this plan): events to the front end."""
        events = [event for report in reports for event in report.events]
        for event in events:
            if event.finish is not None:
                self.serving.pop(event.id, None)
        if events:
            self.mailbox.on_events(events)
        for rank, requests in plan.assign.items():
            self.mailbox.on_assigned([r.id for r in requests], rank)
        for rank, report in enumerate(reports):
            self.load[rank] = report.rows + report.waiting_rows
            if report.figures:
                self.mailbox.on_figures(rank, report.figures)
            if report.draining:
                self.start_drain()
        # The reports predate this plan: its rows count until the ranks report after taking them.
        self.assigned = [sum(r.decoding.rows for r in plan.assign.get(rank, [])) for rank in range(self.world_size)]
        self.ranks_idle = all(report.idle for report in reports)


class StepLoop:
    def __init__(
        self,
        batcher: Batcher,
        control: ControlPlane,
        rank: int,
        hooks: list[StepHook] | None = None,
    ):
        self.batcher, self.control, self.rank = batcher, control, rank
        self.hooks = list(hooks or [])
        self.draining = False  # set by this rank's SIGTERM handler: told to rank 0, which drains the server
        self.steps = 0  # steps that made model calls (every rank counts the same)
        self.prefills = 0  # of them, steps with a prefill call

    def add_hook(self, hook: StepHook) -> None:
        self.hooks.append(hook)

    def run(self, coordinator: Coordinator | None = None) -> None:
        """Serve until rank 0 says stop (every rank calls this together; rank 0 with its coordinator)."""
        report = Report()
        while True:
            plan = coordinator.plan() if coordinator is not None else None
            plan, reports = self.control.exchange(plan, report)
            if coordinator is not None:
                coordinator.absorb(plan, reports)
            if plan.stop:
                return
            worked = self._step(plan, reports)
            figures: dict[str, Any] = {"loop": {"steps": self.steps, "prefills": self.prefills}} if worked else {}
            for hook in self.hooks:
                figures.update(hook.after_step(self.steps, worked) or {})
            report = Report(
                self.batcher.take_events(),
                self.batcher.reserved_rows,
                sum(r.decoding.rows for r in self.batcher.waiting),
                self.draining,
                figures,
            )

    def _step(self, plan: Plan, reports: list[Report]) -> bool:
        """This rank's part of one step; the calls every rank makes follow from the plan and the reports alone."""
        batcher = self.batcher
        for request in plan.assign.get(self.rank, []):
            batcher.submit(request)
        batcher.cancel(plan.cancel)
        any_prefill = any(plan.assign.values()) or any(r.waiting_rows for r in reports)
        any_decode = any_prefill or any(r.rows for r in reports)
        if any_prefill:
            batcher.prefill(batcher.admit())
            self.prefills += 1
        if any_decode:
            batcher.decode()
        self.steps += any_decode
        return any_decode
