"""The HTTP front end in a process of its own (the API process), bridged to rank 0's serving loop, as vLLM's API
server talks to its engine core: uvicorn, FastAPI and FrontEnd (tokenizing, detokenizing, server-sent events) no
longer share rank 0's GIL with the step loop, so they stop stalling it (and with it every rank, in the MoE
collectives) and run on the CPU the ranks leave idle while they wait in those collectives.

    rank 0:  api = ApiProcess(spec, host, port, mailbox)    binds the port now (in use: ConfigError), starts the child
             api.wait_up(timeout_s)                          the child serves (/health: 503 "loading" until "ready")
             api.state = "ready" | "draining"                 the front end's state, in the child
             api.fail_all(message, status); api.close()       answer every open request, stop the child, wait for it
             api.snapshot()                                   the child's /metrics figures (for the W&B logger)
    child:   python -m moe_infer.serve.api_process --bridge-fd N --listen-fd M --parent-pid P   (ApiProcess starts it)

    rank 0's main thread: the serving loop, its Mailbox       child's main thread: the bridge's reader
        on_events / on_assigned / on_figures ---> sender ---> FrontEnd's callbacks (to its event loop)
        mailbox.submit / cancel / drain <--- reader <------- MailboxClient (FrontEnd's mailbox, on the event loop)

The bridge is a socketpair carrying pickled tuples (multiprocessing.connection framing), one per callback: a step's
events go in one message. Rank 0 -> child: ("spec", FrontEndSpec) first, ("events", events), ("assigned", ids,
rank), ("figures", rank, figures), ("state", state), ("fail_all", message, status), ("stop",). Child -> rank 0:
("up",), ("submit", requests), ("cancel", id), ("drain",), ("snapshot", figures) (every `snapshot_interval_s` and
once at the end, when rank 0 logs to W&B). Rank 0 posts from its loop thread and from its signal handler, so a
sender thread does the writing (a SimpleQueue is safe to put to from a signal handler; a socket write is not).

Lifetimes: the child is started with subprocess (fork + exec: nothing of rank 0's threads or gloo state comes
along) and imports only the front end, which needs no torch (the request types and the mailbox come from
runtime.requests; importing torch took ~3 s of CPU here, while rank 0 loads the engine). Rank 0 binds the port
before it starts the child, so connections wait in the backlog meanwhile. It ignores SIGINT and SIGTERM (rank 0
handles them and tells it the state). It never outlives rank 0: the end of the bridge (EOF), or SIGHUP from the
kernel when rank 0 dies (PR_SET_PDEATHSIG), answers every open request with an error and exits, with a watchdog's
os._exit behind it.
If the child dies, rank 0 says so and drains the server, and its exit status is non-zero.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from moe_infer.serve.app import listen_socket, socket_url
from moe_infer.serve.process import say
from pipeline.errors import PipelineError

REPO = Path(__file__).resolve().parents[2]
# A launcher's variables: the child is no rank (tools that find a server's ranks by RANK must not count it).
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK")
PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass
class FrontEndSpec:
    """What the child needs to build the front end (rank 0 sends it first, pickled)."""

    tokenizer_proto: bytes
    tokenizer_path: Path
    eos_id: int  # the export's (MT: appended to a source, as in training)
    model_name: str
    limits: Any  # frontend.ServingLimits
    snapshot_interval_s: float | None = None  # send /metrics figures to rank 0 this often (its W&B logger)


def start_front_end(spec: FrontEndSpec, mailbox, sock: socket.socket):
    """The FrontEnd and its HTTP server on `sock`, started: in the API process, or in a thread of rank 0."""
    from moe_infer.serve.app import HttpServer, build_app
    from moe_infer.serve.frontend import FrontEnd
    from moe_infer.serve.metrics import ServerMetrics
    from pipeline.tokenizer import Tokenizer

    tokenizer = Tokenizer(spec.tokenizer_proto, spec.tokenizer_path)
    frontend = FrontEnd(tokenizer, spec.eos_id, spec.model_name, mailbox, ServerMetrics(), spec.limits)
    http = HttpServer(build_app(frontend), sock)
    http.start()
    return frontend, http


# ---- rank 0's side --------------------------------------------------------------------------------------------------


class ApiProcess:
    def __init__(self, spec: FrontEndSpec, host: str, port: int, mailbox):
        self.mailbox = mailbox
        sock = listen_socket(host, port)  # here, so a port in use is one clear error before anything starts
        self.url = socket_url(sock)
        ours, theirs = socket.socketpair()
        env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env["OMP_NUM_THREADS"] = "1"  # it computes nothing with torch (its Request types import it)
        command = [sys.executable, "-m", "moe_infer.serve.api_process", "--bridge-fd", str(theirs.fileno())]
        command += ["--listen-fd", str(sock.fileno()), "--parent-pid", str(os.getpid())]
        # From the main thread: PR_SET_PDEATHSIG fires when the thread that started the child ends.
        self.process = subprocess.Popen(command, pass_fds=(theirs.fileno(), sock.fileno()), env=env)
        theirs.close()
        sock.close()  # the child's now: the port is free again when it exits
        self.conn = Connection(ours.detach())
        self._state = "loading"
        self._snapshot: dict[str, float] = {}
        self._closing = False
        self.failure: str | None = None  # the child died on its own
        self._up = threading.Event()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._post(("spec", spec))
        self._sender = threading.Thread(target=self._send_all, name="api-bridge-send", daemon=True)
        self._reader = threading.Thread(target=self._read_all, name="api-bridge-read", daemon=True)
        self._sender.start()
        self._reader.start()
        mailbox.on_events = lambda events: self._post(("events", events))
        mailbox.on_assigned = lambda ids, rank: self._post(("assigned", ids, rank))
        mailbox.on_figures = lambda rank, figures: self._post(("figures", rank, figures))

    def _post(self, message: tuple | None) -> None:
        self._outbox.put(message)

    def _send_all(self) -> None:
        while (message := self._outbox.get()) is not None:
            try:
                self.conn.send(message)
            except OSError:  # the child is gone: the reader says so
                return

    def _read_all(self) -> None:
        mailbox = self.mailbox
        try:
            while True:
                kind, *args = self.conn.recv()
                if kind == "submit":
                    mailbox.submit(*args)
                elif kind == "cancel":
                    mailbox.cancel(*args)
                elif kind == "drain":
                    mailbox.drain()
                elif kind == "snapshot":
                    self._snapshot = args[0]
                elif kind == "up":
                    self._up.set()
        except (EOFError, OSError):
            pass
        if not self._closing:
            try:
                code = self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                code = None
            self.failure = f"the HTTP front end (process {self.process.pid}) stopped unexpectedly (exit status {code})"
            say(f"{self.failure}: the server drains and stops")
            mailbox.drain()

    def wait_up(self, timeout_s: float = 120.0) -> None:
        """Until the child serves HTTP; PipelineError if it exits or does not come up."""
        deadline = time.monotonic() + timeout_s
        while not self._up.wait(0.1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                status = self.process.poll()
                why = f"exit status {status}" if status is not None else f"not up after {timeout_s:g} s"
                raise PipelineError(f"the HTTP front end process did not start ({why}; its output is above)")

    @property
    def state(self) -> str:
        return self._state

    @state.setter
    def state(self, state: str) -> None:
        self._state = state
        self._post(("state", state))

    def fail_all(self, message: str, status: int = 500) -> None:
        self._post(("fail_all", message, status))

    def snapshot(self) -> dict[str, float]:
        return self._snapshot

    def close(self, timeout_s: float = 20.0) -> None:
        """Stop the child (it lets open responses finish, sends its last figures) and wait for it; kill it if it
        hangs."""
        self._closing = True
        self._post(("stop",))
        self._post(None)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            say(f"error: the HTTP front end (process {self.process.pid}) did not stop within {timeout_s:g} s: killed")
            self.process.kill()
            self.process.wait()
        self._reader.join(timeout=5)
        self.conn.close()


class ApiThread:
    """The front end in a thread of rank 0 instead (--frontend-in-thread): the same interface as ApiProcess. It shares
    rank 0's GIL with the serving loop; kept to measure the API process against."""

    def __init__(self, spec: FrontEndSpec, host: str, port: int, mailbox):
        self.frontend, self.http = start_front_end(spec, mailbox, listen_socket(host, port))
        self.url = self.http.url
        self.failure: str | None = None

    def wait_up(self, timeout_s: float = 0.0) -> None:
        pass

    @property
    def state(self) -> str:
        return self.frontend.state

    @state.setter
    def state(self, state: str) -> None:
        self.frontend.state = state

    def fail_all(self, message: str, status: int = 500) -> None:
        self.frontend.fail_all(message, status)

    def snapshot(self) -> dict[str, float]:
        return self.frontend.metrics.snapshot()

    def close(self) -> None:
        self.http.stop()


# ---- the child's side -----------------------------------------------------------------------------------------------


class EngineGone(Exception):
    """Rank 0 died before this process could ask to be told of it."""


class MailboxClient:
    """The FrontEnd's mailbox in the child: submit / cancel / drain go to rank 0's Mailbox over the bridge; the
    callbacks (set by FrontEnd) are called with what rank 0's loop sends."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self._lock = threading.Lock()  # the event loop and the snapshot thread both send
        self.on_events = lambda events: None
        self.on_assigned = lambda ids, rank: None
        self.on_figures = lambda rank, figures: None

    def send(self, message: tuple) -> None:
        # (rank 0 gone: the main thread finds out from the bridge's end)
        with self._lock, contextlib.suppress(OSError):
            self.conn.send(message)

    def submit(self, requests) -> None:
        self.send(("submit", requests))

    def cancel(self, request_id: int) -> None:
        self.send(("cancel", request_id))

    def drain(self) -> None:
        self.send(("drain",))


def _die_with_parent(parent_pid: int, bridge_fd: int) -> None:
    """SIGHUP when rank 0 dies (PR_SET_PDEATHSIG) shuts the bridge down, so the main thread's next read of it ends
    (EOF) as it does when rank 0's end closes. The handler raises nothing: when rank 0 dies, its end closes and the
    signal comes a moment later, and an exception from the handler could land inside the code answering the open
    requests (the main thread already on its way out through the EOF) and kill the process before they are answered.
    """
    bridge = socket.socket(fileno=os.dup(bridge_fd))  # (shutdown acts on the socket, whichever descriptor)

    def engine_gone(signum, frame):
        with contextlib.suppress(OSError):
            bridge.shutdown(socket.SHUT_RDWR)

    signal.signal(signal.SIGHUP, engine_gone)
    if sys.platform.startswith("linux"):  # elsewhere the bridge's end (EOF) alone tells
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGHUP, 0, 0, 0)
    if os.getppid() != parent_pid:  # rank 0 died before the line above
        raise EngineGone


def serve(bridge_fd: int, listen_fd: int, parent_pid: int) -> int:
    conn = Connection(bridge_fd)
    sock = socket.socket(fileno=listen_fd)
    mailbox = MailboxClient(conn)
    frontend = http = None
    status = 0
    try:
        _die_with_parent(parent_pid, bridge_fd)
        kind, spec = conn.recv()
        frontend, http = start_front_end(spec, mailbox, sock)
        if spec.snapshot_interval_s is not None:
            threading.Thread(
                target=_send_snapshots, args=(frontend.metrics, mailbox, spec.snapshot_interval_s), daemon=True
            ).start()
        mailbox.send(("up",))
        while True:
            kind, *args = conn.recv()
            if kind == "events":
                mailbox.on_events(*args)
            elif kind == "assigned":
                mailbox.on_assigned(*args)
            elif kind == "figures":
                mailbox.on_figures(*args)
            elif kind == "state":
                frontend.state = args[0]
            elif kind == "fail_all":
                frontend.fail_all(*args)
            elif kind == "stop":
                signal.signal(signal.SIGHUP, signal.SIG_IGN)  # rank 0 waits for this process from here
                break
    except (EOFError, OSError, EngineGone):  # rank 0 is gone: answer what is open, then go
        watchdog = threading.Timer(10.0, os._exit, (1,))  # whatever happens below, the child ends
        watchdog.daemon = True
        watchdog.start()
        status = 1
        if frontend is not None:
            frontend.state = "failed"
            frontend.fail_all("the server failed and is stopping: its engine (rank 0) stopped")
    if http is not None:
        http.stop()
    if status == 0 and frontend is not None:
        mailbox.send(("snapshot", frontend.metrics.snapshot()))
    return status


def _send_snapshots(metrics, mailbox: MailboxClient, interval_s: float) -> None:
    while True:
        time.sleep(interval_s)
        mailbox.send(("snapshot", metrics.snapshot()))


def main(argv: list[str] | None = None) -> int:
    # Rank 0 handles the signals and tells this process what to do (a Ctrl-C reaches the whole process group).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parser = argparse.ArgumentParser(
        prog="python -m moe_infer.serve.api_process",
        description="The HTTP server's front end, in its own process: started by rank 0 of launch/infer.py --mode "
        "serve (moe_infer.serve.server), never by hand.",
    )
    parser.add_argument("--bridge-fd", type=int, required=True, help="rank 0's end of the bridge (a socket)")
    parser.add_argument("--listen-fd", type=int, required=True, help="the HTTP socket, bound and listening")
    parser.add_argument("--parent-pid", type=int, required=True, help="rank 0's process id")
    args = parser.parse_args(argv)
    status = serve(args.bridge_fd, args.listen_fd, args.parent_pid)
    # Nothing is left to clean up (the sockets close with the process), and the interpreter's own teardown can take
    # a while (uvicorn, FastAPI, pydantic): rank 0's exit waits for this process's.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    main()
