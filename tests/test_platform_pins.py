"""Pins: the CPU substitutes were written against exact upstream code. When an upgrade changes one of those upstream
functions (or the versions themselves), these tests fail and name the substitute to re-check."""

from importlib.metadata import version

import pytest
import torch

from pipeline.errors import PlatformError
from pipeline.platform import deepspeed_cpu, megatron_cpu
from pipeline.platform.testing import upstream_source_sha256

pytestmark = pytest.mark.filterwarnings("ignore:Transformer Engine and Apex are not installed:UserWarning")

PINNED_VERSIONS = {"megatron-core": "0.16.1", "deepspeed": "0.19.8"}
PINNED_TORCH_ON_CPU = "2.13."

PINS = [
    *[(ref, sha, "pipeline/platform/megatron_cpu.py") for ref, sha in megatron_cpu.UPSTREAM_PINS.items()],
    *[(ref, sha, "pipeline/platform/deepspeed_cpu.py") for ref, sha in deepspeed_cpu.UPSTREAM_PINS.items()],
]


def _substitutes_relying_on(ref: str) -> list[str]:
    return [name for name, refs in megatron_cpu.SUBSTITUTES.items() if ref in refs]


@pytest.mark.parametrize("package", sorted(PINNED_VERSIONS))
def test_pinned_versions_are_installed(package):
    installed = version(package)
    assert installed == PINNED_VERSIONS[package], (
        f"{package} {installed} is installed but the CPU substitutes in pipeline/platform were written and pinned "
        f"against {PINNED_VERSIONS[package]}: re-check them (tests/test_platform_pins.py) before moving the pin"
    )


def test_cpu_torch_is_the_pinned_release():
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine keeps its own torch build; the substitutes are not used there")
    assert torch.__version__.startswith(PINNED_TORCH_ON_CPU), (
        f"torch {torch.__version__} on CPU, but the platform layer was checked against torch {PINNED_TORCH_ON_CPU}x"
    )


@pytest.mark.parametrize(("ref", "pinned", "where"), PINS, ids=[ref for ref, _, _ in PINS])
def test_upstream_function_is_unchanged(ref, pinned, where):
    substitutes = _substitutes_relying_on(ref)
    what = f"substitute(s) {substitutes}" if substitutes else "the workaround"
    try:
        current = upstream_source_sha256(ref)
    except PlatformError as err:
        pytest.fail(f"{err}: re-check {what} in {where} against the new code")
    assert current == pinned, (
        f"upstream {ref} changed (sha256 {current[:12]}, pinned {pinned[:12]}): re-check {what} in {where} "
        f"against the new code, then update UPSTREAM_PINS there"
    )


def test_every_megatron_substitute_is_pinned():
    referenced = {ref for refs in megatron_cpu.SUBSTITUTES.values() for ref in refs}
    assert referenced == set(megatron_cpu.UPSTREAM_PINS), "SUBSTITUTES and UPSTREAM_PINS must name the same functions"
    assert all(refs for refs in megatron_cpu.SUBSTITUTES.values())
