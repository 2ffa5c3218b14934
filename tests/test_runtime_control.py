"""The serving loop's control plane (moe_infer.runtime.control): one all-gather per step carries rank 0's plan and
every rank's report, whatever their size (a message larger than a slot takes a second round); the mailbox hands the
front end's requests to the loop and wakes it at once."""

import threading
import time

import torch.distributed as dist

from moe_infer.runtime.control import ControlPlane, Mailbox, Plan, Report
from moe_infer.runtime.sequences import Decoding, Event, Request
from pipeline.platform.testing import run_distributed


def _exchange_small_and_large():
    control, rank = ControlPlane(dist.get_world_size()), dist.get_rank()
    report = Report([Event(i, [rank, i]) for i in range(3)], rows=rank + 1)
    small = Plan(assign={1: [Request(0, [5, 6], Decoding(4))]}, cancel=[9]) if rank == 0 else None
    plan, reports = control.exchange(small, report)
    first = (plan.assign[1][0].tokens, plan.cancel, [r.rows for r in reports], reports[1].events[2].tokens)
    # Far beyond a slot: 40 prompts of 1000 tokens from rank 0, and a large report from rank 1.
    large = Plan(assign={1: [Request(i, list(range(1000)), Decoding(4)) for i in range(40)]}) if rank == 0 else None
    big_report = Report([Event(i, list(range(500))) for i in range(40)] if rank == 1 else [])
    plan, reports = control.exchange(large, big_report)
    second = (
        len(plan.assign[1]),
        plan.assign[1][39].tokens[-1],
        len(reports[1].events),
        reports[1].events[0].tokens[-1],
    )
    return first, second


def test_one_exchange_carries_the_plan_and_every_report_small_or_large():
    for first, second in run_distributed(_exchange_small_and_large, world_size=2):
        assert first == ([5, 6], [9], [1, 2], [1, 2])
        assert second == (40, 999, 40, 499)


def test_the_mailbox_wakes_the_loop_at_once_and_keeps_draining():
    mailbox = Mailbox()
    assert mailbox.take(0.0).requests == []
    threading.Timer(0.2, mailbox.submit, args=([Request(1, [5], Decoding(2))],)).start()
    start = time.monotonic()
    inbox = mailbox.take(10.0)  # a blocked wait, woken by the submission
    assert [r.id for r in inbox.requests] == [1] and time.monotonic() - start < 5
    mailbox.cancel(1)
    mailbox.drain()
    inbox = mailbox.take(0.0)
    assert inbox.cancel == {1} and inbox.drain
    assert mailbox.take(0.0).drain  # once asked, it stays asked
