"""The collectives and the clock that the MoE dispatchers, the runtime and the benchmarks share: one all-reduce of a
few numbers, one barrier, one synchronize-then-read-the-clock.

    all_reduce([tokens], "max", device=x_TD.device)   element-wise over the group, as a list; the values themselves
                                                       on a world of one (no process group needed)
    barrier(device)                                    every rank waits for all the others (after its queued work)
    clock(device)                                      time.perf_counter() once the device's queued work is done

The tensors live on `device`: NCCL reduces only CUDA tensors, gloo only CPU ones. Integers are reduced as int64 and
come back as ints; any float makes the reduction float64.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """The group's size; 1 without a process group."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def all_reduce(
    values: Sequence[float], op: str = "sum", *, device: torch.device | str = "cpu", group=None
) -> list[float]:
    """Element-wise sums ("sum") or maxima ("max") of `values` over the group (a collective: every rank calls it)."""
    if world_size(group) == 1 or not values:
        return list(values)
    dtype = torch.int64 if all(isinstance(v, int) for v in values) else torch.float64
    t = torch.tensor(list(values), dtype=dtype, device=device)
    dist.all_reduce(t, op=_OPS[op], group=group)
    return t.tolist()


def clock(device: torch.device | str = "cpu", synchronize: bool = True) -> float:
    """time.perf_counter() after the device's queued kernels have run (CUDA launches asynchronously; `synchronize`
    False: right away, the host's time)."""
    if synchronize and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def barrier(device: torch.device | str = "cpu", group=None) -> None:
    """Every rank leaves together: a one-number all-reduce every rank must reach, after its own queued work."""
    clock(device)
    all_reduce([0], "max", device=device, group=group)
