"""Test helpers: run a function on N real gloo ranks, and hash upstream source for the pin tests.

    results = run_distributed(check_all_to_all, world_size=2)   # one spawned process per rank, returns per-rank results

The function must be importable by the spawned children (defined at module level) and its arguments and result
picklable. A child's exception fails the caller with that rank's traceback; a hang fails after `timeout_s`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import multiprocessing
import os
import pickle
import time
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

from pipeline.errors import PlatformError

# Time the other ranks get to report their own error once one rank failed (theirs is often the consequence).
_ERROR_GRACE_S = 2.0
# Time a rank that reported gets to exit by itself (its exit handlers run then) before it is stopped.
_EXIT_GRACE_S = 30.0


class DistributedTestFailure(AssertionError):
    """One or more ranks raised, died or timed out (an AssertionError, so pytest reports a plain failure)."""


def run_distributed(
    fn: Callable[..., Any],
    *,
    world_size: int = 2,
    args: Sequence[Any] = (),
    timeout_s: float = 120.0,
    init_process_group: bool = True,
    threads_per_rank: int = 1,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run `fn(*args)` once per rank in `world_size` spawned processes; return the results ordered by rank.

    Each child gets the launcher environment torchrun would give it (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT on a free port), plus `env`, `threads_per_rank` torch threads and, unless
    `init_process_group` is False, a gloo process group (via pipeline.platform.init_distributed, with `timeout_s`).
    """
    from pipeline.platform.device import free_port

    if "<locals>" in getattr(fn, "__qualname__", "<locals>"):
        raise TypeError(f"{fn!r} must be a module-level function: spawned ranks import it by name")
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    ranks: dict[int, tuple[multiprocessing.process.BaseProcess, Connection]] = {}
    reported: set[int] = set()  # ranks that sent their result or error: they are exiting by themselves
    try:
        for rank in range(world_size):
            launcher_env = {
                "RANK": str(rank),
                "WORLD_SIZE": str(world_size),
                "LOCAL_RANK": str(rank),
                "LOCAL_WORLD_SIZE": str(world_size),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": str(threads_per_rank),
                **(env or {}),
            }
            parent_end, child_end = ctx.Pipe(duplex=False)
            # Not daemonic: ranks may start processes of their own (dist_checkpointing's async writer does).
            process = ctx.Process(
                target=_child_main,
                args=(fn, tuple(args), child_end, init_process_group, threads_per_rank, timeout_s),
                name=f"rank{rank}",
            )
            with _environ(launcher_env):  # a spawned child starts with the parent's environment, set before imports
                process.start()
            child_end.close()  # the parent keeps only the reading end, so a dead child shows up as EOF
            ranks[rank] = (process, parent_end)
        return _collect(ranks, timeout_s, reported)
    finally:
        for rank, (process, conn) in ranks.items():
            _end(process, exit_grace_s=_EXIT_GRACE_S if rank in reported else 0.0)
            conn.close()


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _end(process: multiprocessing.process.BaseProcess, exit_grace_s: float) -> None:
    """Let a rank that reported finish exiting (its exit handlers run then); stop one that did not, and every process
    it started (a rank stopped by a signal runs no exit handlers, so its helpers would outlive it)."""
    import psutil

    process.join(timeout=exit_grace_s)
    if not process.is_alive():
        return
    try:
        family = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    process.terminate()
    process.join(timeout=5)
    if process.is_alive():
        process.kill()
        process.join()
    for child in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(family, timeout=5)


def _collect(ranks: dict, timeout_s: float, reported: set[int]) -> list[Any]:
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    pending = dict(ranks)
    deadline = time.monotonic() + timeout_s
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if errors:  # the grace period after a failure is over: report what failed, not the stragglers
                break
            raise DistributedTestFailure(
                f"timed out after {timeout_s:g}s; ranks still running: {sorted(pending)} (a hang or a missing peer)"
            )
        waitables = [conn for _, conn in pending.values()]
        wait(waitables, timeout=remaining)
        for rank, (process, conn) in list(pending.items()):
            if not conn.poll():
                continue
            try:
                status, payload = pickle.loads(conn.recv_bytes())
            except EOFError:  # the child died before it could report
                process.join(timeout=5)
                status, payload = "error", f"process exited with code {process.exitcode} without reporting"
            del pending[rank]
            reported.add(rank)
            if status == "ok":
                results[rank] = payload
            else:
                errors[rank] = payload
                deadline = min(deadline, time.monotonic() + _ERROR_GRACE_S)
    if errors:
        # In the order they failed: the first is usually the cause, the others its consequence.
        report = "\n".join(f"--- rank {rank} ---\n{text}" for rank, text in errors.items())
        stuck = f"; still running, stopped: {sorted(pending)}" if pending else ""
        raise DistributedTestFailure(f"{len(errors)} of {len(ranks)} rank(s) failed{stuck}:\n{report}")
    return [results[rank] for rank in sorted(results)]


def _child_main(fn, args, conn, init_process_group, threads_per_rank, timeout_s):
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(threads_per_rank)
        if init_process_group:
            from pipeline.platform.device import detect_platform, init_distributed

            init_distributed(detect_platform("cpu"), timeout_s=timeout_s)
        try:
            result = fn(*args)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        # Plain pickle: multiprocessing's own pickler would pass tensors as shared memory that dies with this process.
        conn.send_bytes(pickle.dumps(("ok", result)))
    except BaseException:
        conn.send_bytes(pickle.dumps(("error", traceback.format_exc())))
    finally:
        conn.close()


def resolve_upstream(ref: str) -> Any:
    """The object named "package.module:Qualified.name", as upstream defined it (behind any substitute applied)."""
    module_name, _, qualname = ref.partition(":")
    try:
        obj = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = inspect.getattr_static(obj, part) if inspect.isclass(obj) else getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise PlatformError(f"upstream {ref} no longer exists: {err}") from err
    if isinstance(obj, staticmethod | classmethod):
        obj = obj.__func__
    while hasattr(obj, "__upstream__"):  # our substitutes point back at what they replaced
        obj = obj.__upstream__
    return obj


def upstream_source_sha256(ref: str) -> str:
    """sha256 of inspect.getsource of the upstream object `ref` ("module:qualname")."""
    return hashlib.sha256(inspect.getsource(resolve_upstream(ref)).encode()).hexdigest()
