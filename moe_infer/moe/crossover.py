"""Which weight layout the expert kernels run fastest with, and up to how many rows per expert the grouped kernel beats
the per-expert one (moe_infer.moe.kernels): measured once per device, dtype and expert shape, then cached.

    rows, layout, note = measured_kernel(device, dtype, hidden=128, ffn=256, activation="gelu", bias=True)
    kernel = choose_kernel(activation, hidden, ffn, bias, device, dtype)     the same, as an ExpertKernel
    ExpertWeights.stack(tensors, device, dtype, kernel.layout)

The measurement: GROUPS experts of the shape with random weights, stacked in each candidate layout (both on CPU, the
exported one elsewhere), at 1, 2, 4, ... rows per expert (up to MAX_ROWS, and while a call's products stay under
MAX_PRODUCT_MACS); both kernels in every layout timed in interleaved rounds (the fastest of ROUNDS each: noise only
ever adds time). The layout is the one whose faster kernel took less time over the row counts measured (geometric
mean: each row count counts alike, whether a decode step's few rows or a prefill's hundreds). The crossover is, in
that layout, the largest row count at which grouped was at least as fast, before per-expert won twice in a row (0: it
never was). It takes about a second at the trained models' shapes, a few at the paper LM's D=256, F=1024.

The cache: $MOE_CACHE/expert-kernels.json (default <repo>/.cache), one entry per (device name, dtype, D, F,
activation, biases, threads, torch version), written atomically. Fallbacks, each with the reason kept in the kernel's
`note`: no grouped_mm in this torch, or a grouped_mm that fails or disagrees with the per-expert kernel on this
device and dtype, gives 0 (per-expert only, the layout still measured); a cache that cannot be read or written is
measured again in memory. MOE_EXPERT_KERNEL=grouped|per-expert forces one kernel in the device's default layout (for
tests and benchmarks), auto (the default) measures.
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from moe_infer.collectives import clock
from moe_infer.moe.kernels import EXPORTED, LAYOUTS, ExpertKernel, ExpertWeights, default_layout
from pipeline.atomic import write_atomic
from pipeline.cache import cache_root
from pipeline.errors import env_choice

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

_measured: dict[str, tuple[int, str, str]] = {}  # this process's answers, by key


def choose_kernel(activation: str, hidden: int, ffn: int, bias: bool, device, dtype) -> ExpertKernel:
    """The kernel for experts of this shape on this device and dtype (MOE_EXPERT_KERNEL, else measured)."""
    forced = env_choice(ENV, CHOICES)
    if forced == "grouped" and not hasattr(F, "grouped_mm"):
        forced = "per-expert"
    if forced != "auto":
        rows = ALWAYS if forced == "grouped" else 0
        return ExpertKernel(activation, ffn, rows, default_layout(device), f"{ENV}={forced}")
    rows, layout, note = measured_kernel(torch.device(device), dtype, hidden, ffn, activation, bias)
    return ExpertKernel(activation, ffn, rows, layout, note)


def measured_kernel(
    device: torch.device, dtype: torch.dtype, hidden: int, ffn: int, activation: str, bias: bool
) -> tuple[int, str, str]:
    """(rows per expert up to which grouped is used, the weight layout, how they were decided): cached, else
    measured now."""
    key = _key(device, dtype, hidden, ffn, activation, bias)
    if key in _measured:
        return _measured[key]
    cache = _cache_file()
    cached = _read(cache).get(key)
    if isinstance(cached, dict) and isinstance(cached.get("grouped_max_rows"), int) and cached.get("layout") in LAYOUTS:
        rows, layout = cached["grouped_max_rows"], cached["layout"]
        _measured[key] = (rows, layout, f"measured crossover {rows} rows/expert, {layout} layout (cached in {cache})")
        return _measured[key]
    rows, layout, why = _measure(device, dtype, hidden, ffn, activation, bias)
    if why:
        answer = (0, layout, why)
    else:
        answer = (rows, layout, f"measured crossover {rows} rows/expert, {layout} layout")
        entry = {"grouped_max_rows": rows, "layout": layout}
        try:
            write_atomic(cache, json.dumps({**_read(cache), key: entry}, indent=1, sort_keys=True) + "\n")
        except OSError as err:
            answer = (rows, layout, f"{answer[2]} (not cached: {err.strerror})")
    _measured[key] = answer
    return answer


KERNELS_VERSION = 4  # bumped when the kernels or the measurement change (2: CPU weight layout, one kernel per call;
# 3: GROUPS 8 -> 32; 4: the layout measured too, per-expert with fused biases)


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


def _measure(device, dtype, hidden, ffn, activation, bias) -> tuple[int, str, str]:
    """(the crossover, the layout, "") or (0, the layout, why grouped cannot be used here)."""
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
    layouts = LAYOUTS if device.type == "cpu" else (EXPORTED,)
    weights = {layout: ExpertWeights.stack(experts, device, dtype, layout) for layout in layouts}
    kernel = ExpertKernel(activation, ffn, 0)
    grouped_ok = hasattr(F, "grouped_mm")
    why = "" if grouped_ok else f"torch {torch.__version__} has no grouped_mm: per-expert kernel only"
    times: dict[tuple[str, str], list[float]] = {}  # (layout, kernel) -> seconds at each row count measured
    rows = 1
    with torch.inference_mode():
        while rows <= MAX_ROWS and GROUPS * rows * hidden * (f1 + ffn) <= MAX_PRODUCT_MACS:
            x_MD = torch.randn(GROUPS * rows, hidden, generator=gen).to(device=device, dtype=dtype)
            p_M = torch.rand(GROUPS * rows, generator=gen).to(device)
            rows_G, out_MD = [rows] * GROUPS, torch.empty_like(x_MD)
            if grouped_ok:
                why = _disagreement(kernel, weights[layouts[0]], x_MD, p_M, rows_G, out_MD)
                grouped_ok = not why
                if why:  # per-expert only from here: the layout is measured on its times alone
                    times = {call: t for call, t in times.items() if call[1] == "per-expert"}
            calls = {}
            for layout, stacked in weights.items():
                args = (stacked, x_MD, p_M, rows_G, out_MD)
                calls[layout, "per-expert"] = partial(kernel.per_expert, *args)
                if grouped_ok:
                    calls[layout, "grouped"] = partial(kernel.grouped, *args)
            for call, seconds in _fastest(calls, device).items():
                times.setdefault(call, []).append(seconds)
            if grouped_ok and all(_crossover(times, layout)[1] for layout in layouts):
                break  # per-expert has won twice in a row in every layout: it wins from here on
            rows *= 2

    def geometric_mean(layout: str) -> float:
        best = [min(t) for t in zip(*(v for (lay, _), v in times.items() if lay == layout), strict=True)]
        return math.fsum(math.log(t) for t in best) / len(best)

    layout = min(layouts, key=geometric_mean)
    return (0, layout, why) if why else (_crossover(times, layout)[0], layout, "")


def _disagreement(kernel: ExpertKernel, weights: ExpertWeights, x_MD, p_M, rows_G, out_MD) -> str:
    """Why the grouped kernel cannot be used here ("" when it runs and agrees with the per-expert kernel)."""
    device, dtype = x_MD.device, x_MD.dtype
    try:
        grouped = kernel.grouped(weights, x_MD, p_M, rows_G, out_MD.clone())
    except (RuntimeError, NotImplementedError) as err:
        return f"grouped_mm fails on {device.type} {dtype}: {str(err).splitlines()[0]}"
    expected = kernel.per_expert(weights, x_MD, p_M, rows_G, out_MD)
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    scale = float(expected.abs().max()) or 1.0
    if not torch.allclose(grouped, expected, rtol=tolerance, atol=tolerance * scale):
        gap = float((grouped - expected).abs().max())
        return f"grouped_mm disagrees with the per-expert kernel by {gap:.2e} on {device.type} {dtype}"
    return ""


def _crossover(times: dict[tuple[str, str], list[float]], layout: str) -> tuple[int, bool]:
    """(the largest row count 2^i at which grouped was at least as fast in `layout` before per-expert won twice in a
    row, whether per-expert has won twice in a row)."""
    grouped, per_expert = times.get((layout, "grouped"), []), times[layout, "per-expert"]
    if not grouped:
        return 0, True
    best, losses = 0, 0
    for i, (g, p) in enumerate(zip(grouped, per_expert, strict=True)):
        if g <= p:
            best, losses = 1 << i, 0
        else:
            losses += 1
            if losses == 2:
                return best, True
    return best, False


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
