"""The expert-parallel group's exchanges through shared memory, when every rank of the group runs on this host and the
tensors are on the CPU: tens of microseconds where gloo's TCP loopback takes several hundred per collective (the
cost that dominated decoding at EP=2). ExpertGroup (exchange.py) uses it behind the same InFlight interface.

    transport = shm_transport(group)                      once per process group (a collective the first time);
                                                          None: not every rank is on this host, or not x86-64 Linux
    op = transport.start_all_gather(out, x)               this rank's bytes published at once
    op = transport.start_all_to_all(out, x, send_R, recv_R)
    op.wait()                                             the peers' bytes copied into `out`

MOE_SHM=auto|off (auto, the default: shared memory when it can be used; off: gloo always). Every rank must have the
same setting. CUDA tensors keep NCCL (ExpertGroup never asks for this transport then).

The segment: one file in /dev/shm, created by rank 0, mapped by the others, then unlinked by rank 0 as soon as every
rank has mapped it, so nothing is left behind whatever happens to the ranks later (a rank 0 killed between the two
leaves a file named after its pid, which the next setup on this host removes). Per rank a region:
    control block (int64 words written by that rank alone)
        published          exchanges this rank has published
        consumed[R]        exchanges of rank r this rank has finished reading
        per slot S times   wanted (the bytes this rank's message needed), offset[R] and nbytes[R] of each reader's part
    SLOTS data areas of `capacity` bytes
Exchange n uses slot n % SLOTS. Start: wait until every peer has consumed this rank's exchange n - SLOTS (the slot's
last use), copy the peers' parts into the slot, write the table, then publish (published = n + 1). Wait: for each
peer, spin until its published > n, copy this rank's part out, then mark it consumed. Exchanges started and not yet
waited for are read in order whenever a slot is needed, so any number may be in flight without a deadlock.

Growth: a message bigger than `capacity` goes by gloo send/recv (readers find offset -1 in the table). Every rank
reads every rank's `wanted` of each exchange, so when exchange n + SLOTS starts all ranks know alike that exchange n
did not fit: they finish every exchange in flight and map a larger segment together (up to MAX_CAPACITY).

Memory ordering: x86-64 is TSO: stores become visible to other cores in program order, so a reader that sees
`published` also sees the data and table stored before it (copies made by other threads of an intra-op thread pool
are ordered by the pool's join before the publishing store); loads are not reordered with later stores either, so
`consumed` is stored only after the copy-out has read the slot. Other architectures would need explicit fences: they
use gloo.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import math
import mmap
import os
import platform
import secrets
import socket
import sys
import time
import weakref
from collections import deque
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.errors import PlatformError, env_choice

ENV = "MOE_SHM"
CHOICES = ("auto", "off")
SLOTS = 2  # data areas per rank: exchange n may be written while the peers still read exchange n - 1
FIRST_CAPACITY = 1 << 20  # bytes per data area at first (decode at batch 32: 20-40 KB per message)
MAX_CAPACITY = 64 << 20  # beyond this a message always goes by gloo
SHM_DIR = "/dev/shm"
PREFIX = "moe-shm-"  # + rank 0's pid + a random suffix
SPIN_POLLS = 200  # busy polls (well under a microsecond each) before yielding the core: the peer is usually close
YIELD_S = 0.005  # then sched_yield (ranks may share cores) for this long, then short sleeps
SLEEP_S = 50e-6
ALIVE_CHECK_S = 0.1  # while sleeping, how often to check that the awaited rank's process still exists
PUBLISHED = 0

log = logging.getLogger(__name__)


def chosen_transport() -> str:
    return env_choice(ENV, CHOICES)


_transports: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def shm_transport(group: dist.ProcessGroup | None) -> ShmTransport | None:
    """The group's transport, set up on first use (every rank of the group must call this together then)."""
    key = group if group is not None else dist.group.WORLD
    if key not in _transports:
        _transports[key] = ShmTransport.open(key)  # None is remembered too: gloo from then on
    return _transports[key]


class PeerLost(dist.DistError):
    """A peer that exited, or never came within the group's timeout, while this rank waited for it in an exchange:
    what gloo raises as a DistError in the same case, so the launchers' and the server's handling of a failed
    collective ("another rank stopped") holds for both transports."""


class ShmOp:
    """One exchange under way: what InFlight waits on, as it would on a gloo Work. Rank r's part for this rank,
    expect_R[r] bytes, goes to the address at_R[r] inside `out`."""

    def __init__(self, transport: ShmTransport, out: torch.Tensor, at_R: list[int], expect_R: list[int]):
        self.transport, self.out, self.at_R, self.expect_R = transport, out, at_R, expect_R
        self.index, self.wanted, self.sends, self.done = -1, 0, [], False

    def wait(self) -> bool:
        while not self.done:
            self.transport.complete_oldest()
        return True


class ShmTransport:
    def __init__(self, group, segment: _Segment, pids: list[int | None], timeout_s: float):
        self.group, self.segment, self.pids, self.timeout_s = group, segment, pids, timeout_s
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.peers = [r for r in range(self.size) if r != self.rank]
        self.global_R = [dist.get_global_rank(group, r) for r in range(self.size)]
        self.next_index = 0
        self.pending: deque[ShmOp] = deque()  # started, not read yet, oldest first
        self.wanted_S = [0] * SLOTS  # the most bytes any rank wanted to publish in the last exchange done per slot
        self.growable = True

    @classmethod
    def open(cls, group) -> ShmTransport | None:
        """The transport when every rank is on this host (a collective of the group), else None."""
        peers = _gather((_host_identity(), os.getpid()), group)
        identities = {identity for identity, _ in peers}
        if len(identities) != 1 or not next(iter(identities))[-1]:
            return None
        segment = _open_segment(group, FIRST_CAPACITY)
        if segment is None:
            return None
        # A pid is checked only where this process can see it (a peer in another pid namespace cannot be).
        pids = [pid if _alive(pid) else None for _, pid in peers]
        return cls(group, segment, pids, _timeout_s(group))

    def start_all_gather(self, out: torch.Tensor, x: torch.Tensor) -> ShmOp:
        """Every rank's `x` (the same shape everywhere) into `out`, rank after rank."""
        x = x.contiguous()
        nbytes = x.numel() * x.element_size()
        _check_output(out, self.size * nbytes)
        op = ShmOp(self, out, [out.data_ptr() + r * nbytes for r in range(self.size)], [nbytes] * self.size)
        ctypes.memmove(op.at_R[self.rank], x.data_ptr(), nbytes)
        return self._start(op, x, [0] * self.size, [nbytes] * self.size)

    def start_all_to_all(self, out: torch.Tensor, x: torch.Tensor, send_R: list[int], recv_R: list[int]) -> ShmOp:
        """Rows send_R[r] of `x` (in rank order) to rank r; recv_R[r] rows from rank r into `out`, in rank order."""
        x, row, me = x.contiguous(), math.prod(x.shape[1:]) * x.element_size(), self.rank
        nbytes_R, expect_R = [rows * row for rows in send_R], [rows * row for rows in recv_R]
        offset_R = list(itertools.accumulate(nbytes_R[:-1], initial=0))
        _check_output(out, sum(expect_R))
        if sum(nbytes_R) != x.numel() * x.element_size():
            raise ValueError(f"shm all-to-all: send_R {send_R} rows do not add up to x's {x.shape[0]}")
        op = ShmOp(self, out, [out.data_ptr() + o for o in itertools.accumulate(expect_R[:-1], initial=0)], expect_R)
        ctypes.memmove(op.at_R[me], x.data_ptr() + offset_R[me], nbytes_R[me])
        return self._start(op, x, offset_R, nbytes_R)

    def _start(self, op: ShmOp, x: torch.Tensor, offset_R: list[int], nbytes_R: list[int]) -> ShmOp:
        """Publish the peers' parts of `x`: bytes offset_R[r]:+nbytes_R[r] for rank r."""
        index = self._claim_slot()
        slot, size, wanted = index % SLOTS, self.size, x.numel() * x.element_size()
        op.index, op.wanted = index, wanted
        spans = {(offset_R[p], nbytes_R[p]) for p in self.peers if nbytes_R[p]}  # an all-gather's are all one
        if wanted <= self.segment.capacity:
            # Raw copies between addresses: a torch view and copy_ per part cost more than the copy itself here.
            data, source = self.segment.data_at(self.rank, slot), x.data_ptr()
            for offset, nbytes in spans:
                ctypes.memmove(data + offset, source + offset, nbytes)
        else:  # too big for the segment: gloo this time (offset -1 tells the readers), the segment grows soon
            for p in self.peers:
                if nbytes_R[p]:
                    part = _bytes_at(x, x.data_ptr() + offset_R[p], nbytes_R[p])
                    op.sends.append((dist.isend(part, self.global_R[p], group=self.group), part))
            offset_R = [-1] * size
        ctrl, base = self.segment.ctrl[self.rank], _slot_base(slot, size)
        ctrl[base] = wanted
        ctrl[base + 1 : base + 1 + size] = offset_R
        ctrl[base + 1 + size : base + 1 + 2 * size] = nbytes_R
        ctrl[PUBLISHED] = index + 1  # after the data and the table (TSO: see the module's docstring)
        self.pending.append(op)
        return op

    def _claim_slot(self) -> int:
        """The next exchange's index, once its slot is free on every peer (growing the segment first if needed)."""
        index = self.next_index
        if index >= SLOTS:
            while self.pending and self.pending[0].index <= index - SLOTS:
                self.complete_oldest()  # what the slot's last use wanted, read from every rank
            wanted = self.wanted_S[index % SLOTS]
            if wanted > self.segment.capacity and self.growable:
                self._grow(wanted)
                index = self.next_index
        if index >= SLOTS:
            ctrl_R, spin = self.segment.ctrl, _Spin(self)
            for p in self.peers:
                while ctrl_R[p][1 + self.rank] <= index - SLOTS:
                    spin.pause(p)
        self.next_index = index + 1
        return index

    def complete_oldest(self) -> None:
        """Read the oldest exchange in flight: every peer's part for this rank, as each peer publishes it."""
        op = self.pending.popleft()
        slot, size, me = op.index % SLOTS, self.size, self.rank
        base, ctrl_R, mine = _slot_base(slot, size), self.segment.ctrl, self.segment.ctrl[self.rank]
        waiting, wanted, spin = list(self.peers), op.wanted, _Spin(self)
        while waiting:
            ready = [p for p in waiting if ctrl_R[p][PUBLISHED] > op.index]
            if not ready:
                spin.pause(waiting[0])
                continue
            for p in ready:
                ctrl = ctrl_R[p]
                offset, nbytes = ctrl[base + 1 + me], ctrl[base + 1 + size + me]
                if nbytes != op.expect_R[p]:
                    raise PlatformError(
                        f"shm exchange {op.index}: rank {p} sent {nbytes} bytes to rank {me}, which expected "
                        f"{op.expect_R[p]}: the ranks started their exchanges in different orders or shapes"
                    )
                if nbytes and offset < 0:
                    dist.recv(_bytes_at(op.out, op.at_R[p], nbytes), self.global_R[p], group=self.group)
                elif nbytes:
                    ctypes.memmove(op.at_R[p], self.segment.data_at(p, slot) + offset, nbytes)
                wanted = max(wanted, ctrl[base])
                mine[1 + p] = op.index + 1  # consumed: stored after the copy's loads (TSO)
                waiting.remove(p)
        for work, _ in op.sends:
            work.wait()
        self.wanted_S[slot], op.done = wanted, True

    def _grow(self, wanted: int) -> None:
        """Every rank at the same exchange: finish all in flight, then map a segment that fits `wanted` together."""
        while self.pending:
            self.complete_oldest()
        capacity = min(MAX_CAPACITY, max(2 * self.segment.capacity, 1 << (wanted - 1).bit_length()))
        segment = _open_segment(self.group, capacity) if capacity > self.segment.capacity else None
        if segment is None:  # every rank knows alike (the capacity, or the setup's shared outcome)
            self.growable = False
            return
        self.segment, self.next_index, self.wanted_S = segment, 0, [0] * SLOTS


class _Spin:
    """Waiting for a peer: busy polls first, then yielding the core (ranks may share cores), then short sleeps; a
    peer whose process is gone, or that never comes within the group's timeout, raises one clear PeerLost."""

    def __init__(self, transport: ShmTransport):
        self.transport, self.polls, self.since, self.checked = transport, 0, 0.0, 0.0

    def pause(self, rank: int) -> None:
        self.polls += 1
        if self.polls < SPIN_POLLS:
            return
        now = time.monotonic()
        if self.polls == SPIN_POLLS:
            self.since = self.checked = now
        if now - self.since < YIELD_S:
            os.sched_yield()
            return
        time.sleep(SLEEP_S)
        if now - self.checked < ALIVE_CHECK_S:
            return
        self.checked, t = now, self.transport
        if t.pids[rank] is not None and not _alive(t.pids[rank]):
            raise PeerLost(f"shm exchange: rank {rank} (pid {t.pids[rank]}) exited while rank {t.rank} waited for it")
        if now - self.since > t.timeout_s:
            raise PeerLost(
                f"shm exchange: rank {t.rank} waited {t.timeout_s:g} s for rank {rank}, which never came "
                f"(the ranks must run the same exchanges; {ENV}=off exchanges through gloo instead)"
            )


class _Segment:
    """The mapped file: per rank a control block of int64 words and SLOTS data areas of `capacity` bytes."""

    def __init__(self, mm: mmap.mmap, size: int, capacity: int):
        self.mm, self.capacity = mm, capacity
        words, self.region = _layout(size, capacity)
        self.ctrl = [(ctypes.c_int64 * words).from_buffer(mm, r * self.region) for r in range(size)]
        self.data = ctypes.addressof(ctypes.c_char.from_buffer(mm)) + _round64(8 * words)  # rank 0's first area

    def data_at(self, rank: int, slot: int) -> int:
        """The address of a rank's data area."""
        return self.data + rank * self.region + slot * self.capacity


def _layout(size: int, capacity: int) -> tuple[int, int]:
    """(control words, bytes per rank's region)."""
    words = 1 + size + SLOTS * (1 + 2 * size)  # published, consumed[R], per slot: wanted, offset[R], nbytes[R]
    return words, _round64(8 * words) + SLOTS * capacity


def _slot_base(slot: int, size: int) -> int:
    return 1 + size + slot * (1 + 2 * size)


def _round64(n: int) -> int:
    return -(-n // 64) * 64


def _open_segment(group, capacity: int) -> _Segment | None:
    """A zeroed segment mapped by every rank of the group (a collective), or None on every rank when one failed."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    nbytes = size * _layout(size, capacity)[1]
    path, mm, failure = None, None, None
    try:
        if rank == 0:
            _remove_stale()
            path = f"{SHM_DIR}/{PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
            try:
                mm = _map(path, nbytes, create=True)
            except OSError as err:
                failure, path = f"cannot create {path} ({nbytes} bytes): {err}", None
        created = _gather(path, group)[0]
        if rank != 0 and created is not None:
            try:
                mm = _map(created, nbytes, create=False)
            except OSError as err:
                failure = f"rank {rank} cannot map {created}: {err}"
        failures = [f for f in _gather(failure, group) if f]
    finally:
        if path is not None:  # every rank has mapped it (or failed, or died): the name is not needed any more
            Path(path).unlink(missing_ok=True)
    if failures or created is None:
        if rank == 0:
            log.warning("shm exchange: gloo is used instead (%s)", "; ".join(failures))
        return None
    return _Segment(mm, size, capacity)


def _map(path: str, nbytes: int, create: bool) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
    try:
        if create:  # reserved now: a full /dev/shm fails here, not with SIGBUS at the first write
            os.posix_fallocate(fd, 0, nbytes)
        return mmap.mmap(fd, nbytes)
    finally:
        os.close(fd)


def _remove_stale() -> None:
    """Segments of ours whose creator is gone (it was killed between creating and unlinking one)."""
    for entry in Path(SHM_DIR).glob(f"{PREFIX}*"):
        pid = entry.name[len(PREFIX) :].partition("-")[0]
        try:
            if pid.isdigit() and entry.stat().st_uid == os.getuid() and not _alive(int(pid)):
                entry.unlink(missing_ok=True)
        except OSError:
            pass


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (a rank that died and its launcher has not reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _host_identity() -> tuple:
    """What ranks on one host share (hostname, boot id), and whether this one can use shared memory at all."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = None
    usable = sys.platform == "linux" and platform.machine() == "x86_64" and boot is not None and Path(SHM_DIR).is_dir()
    return socket.gethostname(), boot, usable


def _timeout_s(group) -> float:
    """The group's collective timeout (what gloo itself would wait), else 5 minutes."""
    try:
        return group._get_backend(torch.device("cpu")).options._timeout.total_seconds()
    except (AttributeError, RuntimeError):
        return 300.0


def _gather(value, group) -> list:
    values = [None] * dist.get_world_size(group)
    dist.all_gather_object(values, value, group=group)
    return values


def _check_output(out: torch.Tensor, nbytes: int) -> None:
    """The raw copies write into `out` by address: it must be a contiguous CPU buffer of exactly `nbytes`."""
    if out.device.type != "cpu" or not out.is_contiguous() or out.numel() * out.element_size() != nbytes:
        raise ValueError(f"shm exchange: the output must be a contiguous CPU tensor of {nbytes} bytes")


def _bytes_at(t: torch.Tensor, address: int, nbytes: int) -> torch.Tensor:
    """`nbytes` of contiguous `t` from `address` on, as a uint8 view of the same memory."""
    start = address - t.data_ptr()
    return t.view(-1).view(torch.uint8)[start : start + nbytes]
