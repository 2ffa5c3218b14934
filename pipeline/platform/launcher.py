"""A rank ends when its launcher does.

`torchrun` starts every worker in a session of its own, so `kill -9` of the launcher (or of its process group) does not
reach the ranks: they go on with parent pid 1, training and writing checkpoints, or serving. The deepspeed launcher's
ranks happen to die with it; nothing guarantees that for any other launcher.

`watch_launcher()` records the parent process (the launcher: torchrun's agent, deepspeed's per-node `launch`, the test
helper `run_distributed`) and starts a daemon thread that polls `os.getppid()`. When the parent is gone (the rank was
reparented to init or a subreaper) the rank prints one line, sends itself SIGTERM (a training rank saves a checkpoint
and exits at the end of its step, a server shuts down) and SIGKILL after `grace_s` if it is still alive then.
Checkpoints are written under a temporary name and renamed when complete, so either signal at any moment leaves the
previous complete checkpoint as the latest one.

Polling rather than prctl(PR_SET_PDEATHSIG): the death signal fires when the *thread* that forked the rank exits,
which kills healthy ranks of a launcher that starts workers from a short-lived thread, and it is Linux-only.
`pipeline.platform.init_distributed` starts the watch whenever a launcher set the rank environment; a plain
`python script.py` (a world of one, maybe under nohup) is never watched.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

POLL_S = 0.5
GRACE_S = 5.0


@dataclass
class LauncherWatch:
    """The running watch: `launcher_pid` is the parent recorded when it started."""

    launcher_pid: int
    poll_s: float
    grace_s: float
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def stop(self) -> None:
        """Stop watching (the thread ends within one poll)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.poll_s * 4)

    @property
    def launcher_alive(self) -> bool:
        return os.getppid() == self.launcher_pid

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            if not self.launcher_alive:
                self._stop_this_rank()
                return

    def _stop_this_rank(self) -> None:
        rank = os.environ.get("RANK", "?")
        print(
            f"rank {rank} (pid {os.getpid()}): the launcher (pid {self.launcher_pid}) is gone; stopping "
            f"(SIGTERM, then SIGKILL after {self.grace_s:g} s)",
            file=sys.stderr,
            flush=True,
        )
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        while time.monotonic() < deadline:  # a daemon thread: if the process exits meanwhile, this simply ends
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGKILL)


_watch: LauncherWatch | None = None
_lock = threading.Lock()


def watch_launcher(poll_s: float = POLL_S, grace_s: float = GRACE_S) -> LauncherWatch:
    """Start (once per process) the thread that stops this rank when its parent, the launcher, is gone.

    Call it as early as possible after the launcher started the process: a launcher that dies before this call is not
    noticed (the rank is already reparented). Returns the running watch; later calls return the same one.
    """
    global _watch
    with _lock:
        if _watch is not None and not _watch._stop.is_set():
            return _watch
        watch = LauncherWatch(launcher_pid=os.getppid(), poll_s=poll_s, grace_s=grace_s)
        watch._thread = threading.Thread(target=watch._run, name="launcher-watch", daemon=True)
        watch._thread.start()
        _watch = watch
        return watch


def current_watch() -> LauncherWatch | None:
    """The running watch of this process, if any."""
    return _watch if _watch is not None and not _watch._stop.is_set() else None
