"""Device and backend choice, threads per rank, and torch.distributed start-up from the launcher's environment.

One rule throughout: CUDA + NCCL when torch sees a GPU, else CPU + gloo. On a CUDA machine nothing here changes torch's
own behaviour beyond binding each rank to its local GPU.

Launchers: `torchrun` and the `deepspeed` launcher both set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT.
A plain `python script.py` sets none of them; it then runs as a world of one on a free local port.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from pipeline.errors import PlatformError
from pipeline.platform.launcher import watch_launcher

BACKENDS = ("nccl", "gloo")
PREFERENCES = ("auto", "cpu", "cuda")
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE (deepspeed/launcher/launch.py).
LOCAL_WORLD_SIZE_VARS = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE")


@dataclass(frozen=True)
class Platform:
    """Where tensors live and which collective backend connects the ranks."""

    device: torch.device
    backend: str  # "nccl" | "gloo"
    cuda: bool

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise PlatformError(f"backend {self.backend!r} is not supported: expected one of {BACKENDS}")
        if self.cuda != (self.device.type == "cuda"):
            raise PlatformError(f"Platform(cuda={self.cuda}) does not match device {self.device}")
        if self.backend == "nccl" and not self.cuda:
            raise PlatformError(f"backend 'nccl' needs a CUDA device, got {self.device}: use backend 'gloo' on CPU")


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect_platform(prefer: str = "auto") -> Platform:
    """CUDA + NCCL when available (or asked for), else CPU + gloo. Asking for CUDA where there is none is an error."""
    choice = str(prefer).lower()
    if choice not in PREFERENCES:
        raise PlatformError(f"device preference {prefer!r} is not one of {PREFERENCES}")
    has_cuda = torch.cuda.is_available()
    if choice == "cuda" and not has_cuda:
        raise PlatformError(
            f"CUDA was asked for but torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}): use prefer='cpu' or 'auto'"
        )
    if has_cuda and choice != "cpu":
        local_rank = _env_int("LOCAL_RANK", default=0)
        _check_local_gpu(local_rank)
        return Platform(device=torch.device("cuda", local_rank), backend="nccl", cuda=True)
    return Platform(device=torch.device("cpu"), backend="gloo", cuda=False)


def local_world_size() -> int:
    """How many ranks share this machine, from the launcher's environment (1 without a launcher)."""
    for name in LOCAL_WORLD_SIZE_VARS:
        if name in os.environ:
            return _env_int(name, minimum=1)
    return 1


def set_threads_per_rank(n: int | None = None) -> int:
    """Give each rank its share of the cores, so ranks on one machine do not oversubscribe it.

    `n=None`: on CPU, usable cores // ranks on this machine (at least 1); on CUDA torch's setting is left as it is.
    Also sets OMP_NUM_THREADS so that processes this one starts inherit the same limit. Returns the thread count.
    """
    if n is None:
        if torch.cuda.is_available():
            return torch.get_num_threads()
        n = max(1, _usable_cores() // local_world_size())
    elif isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise PlatformError(f"threads per rank must be a positive integer, got {n!r}")
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)
    return n


def init_distributed(platform: Platform | None = None, timeout_s: float = 300, use_deepspeed: bool = False) -> DistInfo:
    """Join the job the launcher started (or a world of one without a launcher). Safe to call more than once.

    `timeout_s` bounds rendezvous and every collective: a rank that dies makes the others fail after it, never hang.
    `use_deepspeed` starts DeepSpeed's comm layer (deepspeed.init_distributed) on top, with the CPU traps avoided.
    A process started by a launcher (RANK/WORLD_SIZE/LOCAL_RANK set) also starts `watch_launcher()`: it stops when
    its launcher is gone, whichever launcher it was.
    """
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or not timeout_s > 0:
        raise PlatformError(f"distributed timeout must be a positive number of seconds, got {timeout_s!r}")
    if not dist.is_available():
        raise PlatformError("this torch build has no torch.distributed support")
    platform = platform or detect_platform()
    if platform.backend == "nccl" and not torch.cuda.is_available():
        raise PlatformError("backend 'nccl' was asked for but CUDA is not available: use 'gloo' on CPU")

    if not dist.is_initialized():
        launched = any(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        rank, world_size, local_rank = _launcher_env()
        if launched:  # torchrun starts ranks in sessions of their own: a rank must notice its launcher's death itself
            watch_launcher()
        if platform.cuda:
            _check_local_gpu(local_rank)
            torch.cuda.set_device(local_rank)
    else:
        rank, world_size, local_rank = dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", default=0)

    timeout = timedelta(seconds=timeout_s)
    if use_deepspeed:
        _init_deepspeed_comm(platform, timeout)
    elif not dist.is_initialized():
        _init_torch_distributed(platform, rank, world_size, local_rank, timeout)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _init_torch_distributed(platform: Platform, rank: int, world_size: int, local_rank: int, timeout: timedelta):
    # device_id binds NCCL's communicator to this rank's GPU up front (no guessing at the first collective).
    device_id = torch.device("cuda", local_rank) if platform.cuda else None
    try:
        dist.init_process_group(
            backend=platform.backend,
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            device_id=device_id,
        )
    except (RuntimeError, ValueError) as err:
        raise PlatformError(
            f"rank {rank}/{world_size} could not join the {platform.backend} process group at "
            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within {timeout.total_seconds():g}s: {err}"
        ) from err


def _init_deepspeed_comm(platform: Platform, timeout: timedelta):
    import deepspeed
    import deepspeed.comm

    from pipeline.platform.deepspeed_cpu import patch_deepspeed_for_cpu

    if deepspeed.comm.is_initialized():
        return
    patch_deepspeed_for_cpu()  # before the backend exists: it decides on the shm op (a JIT compile) when built
    try:
        # The launcher env is complete by now, so MPI discovery (mpi4py) is never needed.
        deepspeed.init_distributed(dist_backend=platform.backend, auto_mpi_discovery=False, timeout=timeout)
    except (RuntimeError, ValueError) as err:
        raise PlatformError(f"deepspeed.init_distributed failed on backend {platform.backend}: {err}") from err


def _launcher_env() -> tuple[int, int, int]:
    """RANK, WORLD_SIZE, LOCAL_RANK from the launcher; with no launcher at all, fill in a world of one.

    The defaults go into os.environ because deepspeed.init_distributed reads them there (and tries mpi4py without them).
    """
    present = [name for name in LAUNCHER_VARS if name in os.environ]
    rank_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    if not any(name in os.environ for name in rank_vars):
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(free_port())
    missing = [name for name in LAUNCHER_VARS if name not in os.environ]
    if missing:
        raise PlatformError(
            f"incomplete launcher environment: {', '.join(missing)} not set (found {', '.join(present) or 'none'}); "
            f"start with torchrun or the deepspeed launcher, or set none of {', '.join(LAUNCHER_VARS)}"
        )
    world_size = _env_int("WORLD_SIZE", minimum=1)
    rank = _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK")
    _env_int("MASTER_PORT", minimum=1)
    if rank >= world_size:
        raise PlatformError(f"RANK={rank} is not below WORLD_SIZE={world_size}")
    return rank, world_size, local_rank


def _env_int(name: str, default: int | None = None, minimum: int = 0) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise PlatformError(f"environment variable {name} is not set")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise PlatformError(f"environment variable {name}={raw!r} is not an integer") from None
    if value < minimum:
        raise PlatformError(f"environment variable {name}={value} must be >= {minimum}")
    return value


def _check_local_gpu(local_rank: int):
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise PlatformError(f"LOCAL_RANK={local_rank} but this machine has {count} visible GPU(s)")


def _usable_cores() -> int:
    # sched_getaffinity honours taskset/cgroup CPU sets, which os.cpu_count() ignores.
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
