"""One rank of a command that a launcher (torchrun, deepspeed) started, or a process of its own: where its results
go, how it reports errors, and how it ends. The serving CLI and the benchmarks that serve an export share it.

    with launched(args.quiet) as command:
        job = prepare(args)           every check, identical on every rank, before any collective
        command.checked()             from here an error may be one rank's own
        ...                           command.out: stdout for results only
    return command.status

Errors: a PipelineError met before `checked()` is met by every rank alike and printed once, by rank 0; after it, each
rank that meets one prints it with its rank. Exit status 2 for bad input (requests, flag values: RequestError,
ConfigError), 1 for any other known problem (a missing or broken export). An unexpected exception prints its
traceback with the rank and exits 1; a collective that failed because another rank stopped (or --timeout passed)
only says so, since the rank that caused it prints the cause. The process group is destroyed at the end either way.

Everything libraries print (DeepSpeed's logs, W&B's notes) goes to stderr: stdout carries the results only.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from pipeline.errors import ConfigError, PipelineError


def launcher_rank() -> tuple[int, int]:
    """(rank, world size) as the launcher set them, before torch.distributed exists ((0, 1) without a launcher)."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1  # init_distributed names the bad variable later


@contextlib.contextmanager
def results_stdout() -> Iterator[IO[str]]:
    """A text stream on the process's stdout, while file descriptor 1 itself points at stderr: whatever the libraries
    print (DeepSpeed logs to stdout, W&B prints its notes there, C++ code writes to fd 1) lands on stderr, and stdout
    carries the results alone."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    results = os.fdopen(os.dup(saved), "w", encoding="utf-8", closefd=True)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield results
    finally:
        results.flush()
        results.close()
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def configure_process(quiet: bool) -> None:
    from pipeline.platform import quiet_known_warnings

    quiet_known_warnings()  # (threads per rank: Engine.start decides)
    if quiet:
        import logging

        os.environ.setdefault("WANDB_SILENT", "true")
        logging.getLogger("DeepSpeed").setLevel(logging.ERROR)


def progress(quiet: bool, rank: int, message: str) -> None:
    """A progress line on stderr, from rank 0, unless --quiet."""
    if not quiet and rank == 0:
        print(message, file=sys.stderr, flush=True)


@dataclass
class Command:
    rank: int
    world: int
    out: IO[str]
    status: int = 0
    same_everywhere: bool = True  # errors so far are met by every rank alike (checks before any collective)

    def checked(self) -> None:
        self.same_everywhere = False


@contextlib.contextmanager
def launched(quiet: bool) -> Iterator[Command]:
    """The command's rank: results on `command.out`, its errors reported (see the module docstring) into
    `command.status`, the process group destroyed at the end."""
    rank, world = launcher_rank()
    with results_stdout() as out:
        command = Command(rank, world, out)
        try:
            configure_process(quiet)
            yield command
        except PipelineError as err:
            command.status = _fail(err, rank, world, command.same_everywhere)
        except Exception as err:  # a bug, not a user error: the traceback, with the rank that met it
            command.status = _crash(err, rank, world)
        finally:
            _finish_distributed()


def _fail(err: PipelineError, rank: int, world: int, same_everywhere: bool) -> int:
    """Print one clear message: an error every rank meets alike is printed by rank 0 only."""
    from moe_infer.runtime.generate import RequestError

    if rank == 0 or not same_everywhere:
        where = f" (rank {rank} of {world})" if world > 1 and not same_everywhere else ""
        print(f"error{where}: {err}", file=sys.stderr, flush=True)
    return 2 if isinstance(err, RequestError | ConfigError) else 1


def is_collective_failure(err: BaseException, world: int) -> bool:
    """A collective that failed because a peer went away or --timeout passed: a consequence, not the cause."""
    import torch.distributed as dist

    if world == 1:
        return False
    if isinstance(err, dist.DistError):
        return True
    text = str(err)
    peer_gone = ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out", "Broken pipe")
    return isinstance(err, RuntimeError) and any(s in text for s in peer_gone)


def _crash(err: BaseException, rank: int, world: int) -> int:
    if is_collective_failure(err, world):
        # The rank that caused it prints its own traceback; this one only says why it stopped.
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(
            f"error (rank {rank} of {world}): a collective failed: another rank stopped, or --timeout passed ({first})",
            file=sys.stderr,
            flush=True,
        )
        return 1
    print(f"rank {rank} of {world}: unexpected error\n{traceback.format_exc()}", file=sys.stderr, flush=True)
    return 1


def _finish_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
