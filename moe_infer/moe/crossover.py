"""Up to how many rows per expert the grouped expert kernel beats the per-expert one (moe_infer.moe.kernels): measured
once per device, dtype and expert shape, then cached.

    rows = grouped_max_rows(device, dtype, hidden=128, ffn=256, activation="gelu", bias=True)
    ExpertKernel(activation, ffn, rows)

The measurement: GROUPS experts of the shape with random weights, at 1, 2, 4, ... rows per expert (up to MAX_ROWS,
and while a call's products stay under MAX_PRODUCT_MACS),
both kernels timed in interleaved rounds (the fastest of ROUNDS each: noise only ever adds time). The figure is the
largest row count at which grouped was at least as fast, before per-expert won twice in a row (0: it never was).
It takes well under a second at the shapes this project serves.

The cache: $MOE_CACHE/expert-kernels.json (default <repo>/.cache), one entry per (device name, dtype, D, F,
activation, biases, threads, torch version), written atomically. Fallbacks, each with the reason kept in the kernel's
`note`: no grouped_mm in this torch, or a grouped_mm that fails or disagrees with the per-expert kernel on this
device and dtype, gives 0 (per-expert only); a cache that cannot be read or written is measured again in memory.
MOE_EXPERT_KERNEL=grouped|per-expert forces one kernel (for tests and benchmarks), auto (the default) measures.
"""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from moe_infer.collectives import clock
from moe_infer.moe.kernels import ExpertKernel, ExpertWeights
from pipeline.atomic import write_atomic
from pipeline.cache import cache_root
from pipeline.errors import ConfigError

ENV = "MOE_EXPERT_KERNEL"
CHOICES = ("auto", "grouped", "per-expert")
# As many experts as a served layer holds per rank (the paper-shaped models: 32-64), so their weights stream from
# memory as a layer's do: with 8 (2 MB at D=128, F=256, all in cache) per-expert looked as fast as grouped at 32 rows
# and lost by 25% at a layer's 64 experts; with 32 the crossover moved from 32 to 64 rows there.
GROUPS = 32
MAX_ROWS = 512
MAX_PRODUCT_MACS = 1 << 31  # larger calls take ~0.1 s each on a CPU core: the crossover lies below that
ROUNDS = 5
ALWAYS = 1 << 30  # grouped_max_rows that means "always grouped"
CACHE_FILE = "expert-kernels.json"

_measured: dict[str, tuple[int, str]] = {}  # this process's answers, by key


def choose_kernel(activation: str, hidden: int, ffn: int, bias: bool, device, dtype) -> ExpertKernel:
    """The kernel for experts of this shape on this device and dtype (MOE_EXPERT_KERNEL, else measured)."""
    forced = os.environ.get(ENV, "auto").strip() or "auto"
    if forced not in CHOICES:
        raise ConfigError(ENV, f"expected one of {', '.join(CHOICES)}, got {forced!r}")
    if forced == "grouped" and not hasattr(F, "grouped_mm"):
        forced = "per-expert"
    if forced != "auto":
        return ExpertKernel(activation, ffn, ALWAYS if forced == "grouped" else 0, f"{ENV}={forced}")
    rows, note = grouped_max_rows(torch.device(device), dtype, hidden, ffn, activation, bias)
    return ExpertKernel(activation, ffn, rows, note)


def grouped_max_rows(
    device: torch.device, dtype: torch.dtype, hidden: int, ffn: int, activation: str, bias: bool
) -> tuple[int, str]:
    """(rows per expert up to which grouped is used, how that was decided): cached, else measured now."""
    key = _key(device, dtype, hidden, ffn, activation, bias)
    if key in _measured:
        return _measured[key]
    cache = _cache_file()
    cached = _read(cache).get(key)
    if isinstance(cached, int):
        _measured[key] = (cached, f"measured crossover {cached} rows/expert (cached in {cache})")
        return _measured[key]
    rows, why = _measure(device, dtype, hidden, ffn, activation, bias)
    if why:
        answer = (0, why)
    else:
        answer = (rows, f"measured crossover {rows} rows/expert")
        try:
            write_atomic(cache, json.dumps({**_read(cache), key: rows}, indent=1, sort_keys=True) + "\n")
        except OSError as err:
            answer = (rows, f"{answer[1]} (not cached: {err.strerror})")
    _measured[key] = answer
    return answer


KERNELS_VERSION = 3  # bumped when the kernels or the measurement change (2: CPU weight layout, one kernel per call;
# 3: GROUPS 8 -> 32)


def _key(device, dtype, hidden, ffn, activation, bias) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return (
        f"{name}|{str(dtype).removeprefix('torch.')}|D{hidden}|F{ffn}|{activation}|bias={bias}|"
        f"threads={torch.get_num_threads()}|torch={torch.__version__}|kernels={KERNELS_VERSION}"
    )


def _cache_file() -> Path:
    return cache_root() / CACHE_FILE


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _measure(device, dtype, hidden, ffn, activation, bias) -> tuple[int, str]:
    """(the crossover, "") or (0, why grouped cannot be used here)."""
    if not hasattr(F, "grouped_mm"):
        return 0, f"torch {torch.__version__} has no grouped_mm: per-expert kernel only"
    gen = torch.Generator().manual_seed(0)
    f1 = 2 * ffn if activation == "swiglu" else ffn
    experts = []
    for _ in range(GROUPS):
        tensors = {
            "fc1.weight": torch.randn(f1, hidden, generator=gen) / hidden**0.5,
            "fc2.weight": torch.randn(hidden, ffn, generator=gen) / ffn**0.5,
        }
        if bias:
            tensors |= {"fc1.bias": torch.randn(f1, generator=gen), "fc2.bias": torch.randn(hidden, generator=gen)}
        experts.append(tensors)
    weights = ExpertWeights.stack(experts, device, dtype)
    kernel = ExpertKernel(activation, ffn, 0)
    best, losses, rows = 0, 0, 1
    with torch.inference_mode():
        while rows <= MAX_ROWS and losses < 2 and GROUPS * rows * hidden * (f1 + ffn) <= MAX_PRODUCT_MACS:
            x_MD = torch.randn(GROUPS * rows, hidden, generator=gen).to(device=device, dtype=dtype)
            p_M = torch.rand(GROUPS * rows, generator=gen).to(device)
            rows_G, out_MD = [rows] * GROUPS, torch.empty_like(x_MD)
            try:
                grouped = kernel.grouped(weights, x_MD, p_M, rows_G, out_MD.clone())
            except (RuntimeError, NotImplementedError) as err:
                return 0, f"grouped_mm fails on {device.type} {dtype}: {str(err).splitlines()[0]}"
            expected = kernel.per_expert(weights, x_MD, p_M, rows_G, out_MD)
            tolerance = 1e-4 if dtype == torch.float32 else 3e-2
            scale = float(expected.abs().max()) or 1.0
            if not torch.allclose(grouped, expected, rtol=tolerance, atol=tolerance * scale):
                gap = float((grouped - expected).abs().max())
                return 0, f"grouped_mm disagrees with the per-expert kernel by {gap:.2e} on {device.type} {dtype}"
            args = (weights, x_MD, p_M, rows_G, out_MD)
            times = _fastest(
                {"grouped": partial(kernel.grouped, *args), "per-expert": partial(kernel.per_expert, *args)}, device
            )
            if times["grouped"] <= times["per-expert"]:
                best, losses = rows, 0
            else:
                losses += 1
            rows *= 2
    return best, ""


def _fastest(calls: dict, device: torch.device) -> dict[str, float]:
    """The fastest of ROUNDS interleaved timings of each call (one warm-up each first)."""
    for fn in calls.values():
        fn()
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(ROUNDS):
        for name, fn in calls.items():
            start = clock(device)
            fn()
            best[name] = min(best[name], clock(device) - start)
    return best
