"""A real server process for the HTTP tests: started as a user would start it (torchrun, deepspeed, or plain python),
found by the URL it prints, and always stopped with everything it started, even when a test fails.

    with ServerProcess(launcher + ["launch/infer.py", "--export", ..., "--mode", "serve", "--port", "0"]) as server:
        httpx.post(f"{server.url}/v1/completions", json=...)
        server.signal(signal.SIGTERM); code = server.wait(60)

The launcher's ranks live in sessions of their own (torchrun), so the process tree is recorded once the server is up
and every process of it is killed at the end if still alive.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
from cli_exports import REPO, env

READY = re.compile(r"serving \S+ on (http://\S+):")


class ServerProcess:
    def __init__(self, command: list[str], timeout_s: float = 180.0, **variables):
        self.log = Path(tempfile.mkstemp(prefix="server-", suffix=".log")[1])
        self._log_file = self.log.open("w")
        self.process = subprocess.Popen(
            command, stdout=self._log_file, stderr=subprocess.STDOUT, env=env(**variables), cwd=REPO
        )
        self.tree: list[psutil.Process] = []
        self.url = ""
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.kill()
            raise

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            match = READY.search(self.output)
            if match:
                self.url = match[1]
                self.tree = self._descendants()
                return
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited with {self.process.returncode}:\n{self.output}")
            time.sleep(0.2)
        raise AssertionError(f"the server was not up after {timeout_s:g} s:\n{self.output}")

    def _descendants(self) -> list[psutil.Process]:
        with contextlib.suppress(psutil.NoSuchProcess):
            return [psutil.Process(self.process.pid), *psutil.Process(self.process.pid).children(recursive=True)]
        return []

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    @property
    def ranks(self) -> list[psutil.Process]:
        """The processes that run launch/infer.py (the launcher excluded when there is one)."""
        return [p for p in self.tree if p.pid != self.process.pid or len(self.tree) == 1]

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout_s: float) -> int:
        return self.process.wait(timeout=timeout_s)

    def alive(self) -> list[psutil.Process]:
        alive = []
        for p in self.tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
        return alive

    def kill(self) -> None:
        """Stop everything: SIGTERM to the launcher (it passes it on), then SIGKILL to whatever is left."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=20)
        for p in self.alive() + self._descendants():
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        psutil.wait_procs([p for p in self.tree if p.pid != os.getpid()], timeout=10)
        self._log_file.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.kill()
