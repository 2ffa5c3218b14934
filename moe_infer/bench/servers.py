"""A server process started as a user would start it (torchrun, deepspeed, or plain python), found by the URL it
prints, and always stopped with everything it started: for the live-traffic bench and the HTTP tests.

    command = serve_command(["exports/lm-tiny", "--batch-size", "32"], ranks=2)
    with ServerProcess(command, env) as server:          waits for "serving NAME on URL:"
        ... server.url ...
        server.signal(signal.SIGTERM); code = server.wait(60)

torchrun starts its ranks in sessions of their own, so the process tree is recorded once the server is up and every
process of it still alive at the end is killed.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from pipeline.platform.device import free_port

REPO = Path(__file__).resolve().parents[2]
READY = re.compile(r"serving \S+ on (http://\S+):")


def serve_command(export_and_flags: list[str], ranks: int, launcher: str = "torchrun") -> list[str]:
    """launch/infer.py --mode serve on `ranks` ranks (torchrun or deepspeed; one rank: a plain process), port 0."""
    if ranks == 1:
        start = [sys.executable]
    elif launcher == "deepspeed":
        start = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks)]
        start += ["--master_port", str(free_port())]
    else:
        start = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}"]
        start.append(f"--master-port={free_port()}")
    export, *flags = export_and_flags
    return [*start, str(REPO / "launch/infer.py"), "--export", export, "--mode", "serve", "--port", "0", *flags]


class ServerProcess:
    def __init__(self, command: list[str], env: dict[str, str] | None = None, timeout_s: float = 180.0):
        self.log = Path(tempfile.mkstemp(prefix="moe-server-", suffix=".log")[1])
        self._log_file = self.log.open("w")
        self.process = subprocess.Popen(command, stdout=self._log_file, stderr=subprocess.STDOUT, env=env, cwd=REPO)
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
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.output[-4000:]}")
            time.sleep(0.2)
        raise RuntimeError(f"the server was not up after {timeout_s:g} s:\n{self.output[-4000:]}")

    def _descendants(self) -> list[psutil.Process]:
        with contextlib.suppress(psutil.NoSuchProcess):
            return [psutil.Process(self.process.pid), *psutil.Process(self.process.pid).children(recursive=True)]
        return []

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    @property
    def ranks(self) -> list[psutil.Process]:
        """The ranks: the processes a launcher started with RANK set (the one process, without a launcher; the HTTP
        front end's process has no RANK)."""
        ranks = []
        for p in self.tree:
            with contextlib.suppress(psutil.Error):
                if "RANK" in p.environ() and p.pid != self.process.pid:
                    ranks.append(p)
        return ranks or self.tree[:1]

    def api_process(self) -> psutil.Process:
        """The HTTP front end's process (moe_infer.serve.api_process), a child of rank 0."""
        return next(p for p in self.tree if "moe_infer.serve.api_process" in p.cmdline())

    def rank(self, rank: int) -> psutil.Process:
        return next(p for p in self.ranks if p.environ().get("RANK", "0") == str(rank))

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

    def kill(self, grace_s: float = 30.0) -> None:
        """Stop everything: SIGTERM to the launcher (it passes it on; the server drains), SIGKILL to what is left.
        Once the ranks are gone the launcher gets a few seconds, not the grace: all it has left to do is its exit
        (torchrun's interpreter collecting garbage took 3-6 s of a loaded machine's CPU after every stop here)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            ranks = [p for p in self.ranks if p.pid != self.process.pid]
            psutil.wait_procs(ranks, timeout=grace_s)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=2.0 if ranks else grace_s)
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
