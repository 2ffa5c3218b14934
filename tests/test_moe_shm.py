"""The shared-memory exchanges of the expert-parallel group (moe_infer.moe.dispatch.shm) on two real gloo ranks: the
same bytes as gloo's all-gather and all-to-all (even, uneven and zero splits, many in a row and several in flight,
messages past the segment's size), the same dispatcher outputs bit for bit, and nothing left in /dev/shm.
"""

import os
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from moe_layers import D, E, layer_config, random_layer
from test_moe_dispatch import _moe, _SlotExperts

import moe_infer.moe.dispatch.shm as shm
from moe_infer.moe.dispatch import DynamicDispatch, StaticDispatch
from moe_infer.moe.dispatch.exchange import ExpertGroup
from moe_infer.placement import Placement
from pipeline.errors import ConfigError
from pipeline.platform.testing import DistributedTestFailure, run_distributed

FIRST, MOST = 16 << 10, 128 << 10  # the test's segment: 16 KiB per data area at first, at most 128 KiB


def _ours(pid: int) -> list[str]:
    return [p.name for p in Path(shm.SHM_DIR).glob(f"{shm.PREFIX}{pid}-*")]


def _groups() -> tuple[ExpertGroup, ExpertGroup]:
    """The same two ranks exchanging through shared memory and through gloo (what MOE_SHM=off gives)."""
    placement = Placement.contiguous(8, 2)
    fast, slow = ExpertGroup(placement, None), ExpertGroup(placement, None)
    slow.shared_memory = False
    return fast, slow


def _exchanges_equal_gloos(steps: int) -> dict:
    shm.FIRST_CAPACITY, shm.MAX_CAPACITY = FIRST, MOST
    rank = dist.get_rank()
    fast, slow = _groups()
    capacities = []
    for step in range(steps):
        gen = torch.Generator().manual_seed(step)  # the same on both ranks: they agree on the sizes
        # Rows per (source, destination): zeros, a few, and now and then more than a data area holds.
        scale = [0, 1, 7, 60, 400, 3000][int(torch.randint(0, 6, (1,), generator=gen))]
        counts_RR = torch.randint(0, scale + 1, (2, 2), generator=gen)
        counts_RR[int(torch.randint(0, 2, (1,), generator=gen)), 1] *= int(step % 3 == 0)  # a zero split
        dtype, width = [(torch.float32, 36), (torch.bfloat16, 20), (torch.int64, 0)][step % 3]
        shape = (-1, width) if width else (-1,)
        send_R, recv_R = counts_RR[rank].tolist(), counts_RR[:, rank].tolist()
        x = (torch.randn(sum(send_R) * max(width, 1), generator=gen) * 100).to(dtype).view(*shape)
        x += rank
        block = (torch.randn(int(counts_RR[0, 0]) * max(width, 1), generator=gen) * 100).to(dtype).view(*shape) + rank
        # Several in flight, waited for out of order; the all-to-all's stats stay gloo's.
        in_flight = [
            (fast.start_all_to_all(x, send_R, recv_R, None), slow.start_all_to_all(x, send_R, recv_R, None)),
            (fast.start_all_gather(block, None), slow.start_all_gather(block, None)),
            (fast.start_all_to_all(x.flip(0), send_R, recv_R, None), slow.all_to_all(x.flip(0), send_R, recv_R, None)),
        ]
        for got, expected in reversed(in_flight):
            got = got.wait()
            expected = expected if isinstance(expected, torch.Tensor) else expected.wait()
            assert got.dtype == expected.dtype and torch.equal(got, expected), f"step {step}"
        capacities.append(shm.shm_transport(None).segment.capacity)
    return {"pid": os.getpid(), "left": _ours(os.getpid()), "capacities": capacities}


def test_shared_memory_exchanges_equal_gloos():
    per_rank = run_distributed(_exchanges_equal_gloos, world_size=2, args=(60,), timeout_s=60)
    for result in per_rank:
        assert result["left"] == []  # unlinked as soon as both ranks had mapped it, while they still run
        assert _ours(result["pid"]) == []
        # It started small, grew for the larger messages, and stopped at the most it may take (3000-row messages
        # went by gloo from then on).
        assert result["capacities"][0] == FIRST and result["capacities"][-1] == MOST
    assert per_rank[0]["capacities"] == per_rank[1]["capacities"]


def _dispatch_outputs(token_counts: list[int]) -> None:
    rank = dist.get_rank()
    placement = Placement.contiguous(E, 2)
    router, experts = random_layer(layer_config(2, False))
    store = _SlotExperts([experts[e] for e in placement.local_experts(rank)])
    for counts in token_counts:  # a prefill-sized pass, then decode-sized ones
        x_TD = torch.randn(counts[rank], D, generator=torch.Generator().manual_seed(sum(counts) + rank))
        probs_TK, experts_TK = router(x_TD)
        for exchange in ("all-to-all", "all-gather", "static"):
            outputs = []
            for shared_memory in (True, False):
                if exchange == "static":
                    dispatcher = StaticDispatch(placement, 1.0)
                else:
                    dispatcher = DynamicDispatch(placement)
                    dispatcher.exchange = exchange
                dispatcher.ranks.shared_memory = shared_memory
                outputs.append(_moe(dispatcher, x_TD, probs_TK, experts_TK, store))
            (fast, fast_stats), (slow, slow_stats) = outputs
            assert torch.equal(fast, slow), (exchange, counts)
            assert (fast_stats.bytes_sent, fast_stats.bytes_received) == (
                slow_stats.bytes_sent,
                slow_stats.bytes_received,
            )
    assert shm.shm_transport(None).next_index > 0


def test_dispatchers_give_the_same_bits_through_shared_memory_and_gloo():
    run_distributed(_dispatch_outputs, world_size=2, args=([[150, 120], [32, 32], [0, 5]],), timeout_s=60)


def _peer_killed(report: str) -> None:
    shm.YIELD_S, shm.ALIVE_CHECK_S = 0.001, 0.01
    fast, _ = _groups()
    fast.start_all_gather(torch.ones(3), None).wait()  # the segment is set up: both ranks mapped it
    if dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    start = time.monotonic()
    try:
        fast.start_all_gather(torch.ones(3), None).wait()
        message = "no error"
    except shm.PeerLost as err:  # a DistError, as gloo's: the launchers say "another rank stopped"
        message = str(err)
    Path(report).write_text(f"{os.getpid()}\n{time.monotonic() - start:.3f}\n{message}")


def test_a_killed_peer_gives_one_clear_error_and_leaves_nothing(tmp_path):
    report = tmp_path / "rank0"
    with pytest.raises(DistributedTestFailure, match="--- rank 1 ---\nprocess exited with code -9"):
        run_distributed(_peer_killed, world_size=2, args=(str(report),), timeout_s=60)
    pid, seconds, message = report.read_text().split("\n", 2)
    assert message.startswith("shm exchange: rank 1 (pid ") and message.endswith("exited while rank 0 waited for it")
    assert float(seconds) < 10
    assert _ours(int(pid)) == []


def test_stale_segments_of_dead_creators_are_removed():
    gone = os.fork()
    if gone == 0:
        os._exit(0)
    os.waitpid(gone, 0)
    stale, live = Path(shm.SHM_DIR) / f"{shm.PREFIX}{gone}-test", Path(shm.SHM_DIR) / f"{shm.PREFIX}{os.getpid()}-test"
    try:
        stale.write_bytes(b"x")
        live.write_bytes(b"x")
        shm._remove_stale()
        assert not stale.exists() and live.exists()
    finally:
        stale.unlink(missing_ok=True)
        live.unlink(missing_ok=True)


def test_an_unknown_transport_is_refused(monkeypatch):
    monkeypatch.setenv("MOE_SHM", "yes")
    with pytest.raises(ConfigError, match=r"^MOE_SHM: expected one of auto, off, got 'yes'$"):
        ExpertGroup(Placement.contiguous(8, 1), None)
    monkeypatch.setenv("MOE_SHM", "off")
    assert not ExpertGroup(Placement.contiguous(8, 1), None).shared_memory
