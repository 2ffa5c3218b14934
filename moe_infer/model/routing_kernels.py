"""The MoE router's per-token loops, compiled for the CPU (routing_kernels.c), with torch ops where that cannot run.

    values_TK, columns_TK = top_k(scores_TE, k)                  torch.topk(scores_TE, k, dim=1)'s values and columns
    probs_TK, experts_TK = top_k(logits_TE, k, softmax=True)      the same, then a softmax over each row's k values
    pairs = sort_pairs(key_N, num_keys, k)                         a stable sort of the pairs by key (SortedPairs:
                                                                  the order, each pair's token (pair n is token
                                                                  n // k's) and place, the pairs per key)
    out_TD = sum_pairs(y_MD, pairs.place_N, k)                    each token's k rows (in sorted order) summed
    probs_TK, experts_TK = route(x_TD, weight_DE, bias_E, k)      top_k(x_TD @ weight_DE + bias_E, k, softmax=True):
                                                                  the router, logits included, in one pass
    routed = route_rows(x_TD, weight_DE, bias_E, k)               route, the pairs sorted by expert and their rows
                                                                  gathered (RoutedRows): one rank's whole routing

Why C: at the paper-shaped models' shapes (E = 64, k = 2) torch's CPU ops cost far more than the routing's
arithmetic. torch.topk takes a slow per-row path below 64 * k values per row (the torch fallback pads the rows to
take the fast one, `_torch_top_k`); the softmax over 2 values and the stable argsort of the pairs pay tens of
microseconds of op dispatch each. top-k + softmax + sort of 1024 tokens x 64 experts, one core, the median of 9
interleaved rounds: torch ops 876 us [675-903], these loops 171 us [115-184]; 4096 tokens: 3.66 ms against 0.60;
32 tokens (a decode step): 63 against 39 us. In the layer bench's dynamic call (1024 tokens, D=128) the gate phase
went from 2.08 to 1.07 ms. The sum of each token's rows after the experts (the one-rank combine) writes each output
row once, where zeros + index_add_ write it k + 1 times: 376 us [277-723] against 472 [336-838] for 1024 tokens of
D=128 right after the experts' call (41 interleaved rounds), 2.11 ms [1.55-3.11] against 2.82 [2.34-4.19] for 4096
tokens of D=256 (15 rounds); compiled with -O3, whose vectoriser takes its row loop (-O2's does not): 95 us
[71-571] against 256 [218-966] warm at 1024 tokens of D=128 (61 interleaved rounds).

Why the router itself in C (route, route_rows; x86-64 with AVX2 and FMA, experts a multiple of 8): in a served
model every MoE layer finds the caches full of other layers' weights, and on this VM every distinct torch op then
pays tens to hundreds of microseconds for its own code and data before it computes anything (after the layer
bench's cache flush: torch.empty 106 us against 7 warm, index_select 312 against 40). The router was F.linear (a
deep MKL call), a logits tensor, top_k, sort_pairs and two index_selects; route_rows is one call that keeps each
block of 6 tokens' logits in L1 (6 x 16 FMA accumulators, the weight transposed once by the Router). Its logits are
one FMA chain per logit in d order: over 200,000 random tokens, the same bits as torch's GEMM at D=128 with E=64
and 128, the same choices with probabilities within 7e-7 at E=8, and at D=256, E=64 probabilities within 1.1e-6
and one token that chose the other of two near-equal experts. The one-rank dynamic layer (1024 tokens, D=128,
E=64, one core, cold caches, 31 interleaved rounds): everything but the experts 2.94 ms [2.34-4.47] with F.linear +
top_k + sort + gathers, 2.39 [2.00-3.28] with route_rows; 32 tokens (a decode step): 1.24 ms [0.93-2.17] against
0.95 [0.72-1.75]. With several threads, torch's GEMM shares the work and this loop does not: above
ROUTE_MAX_MACS_THREADED the router goes to torch.

The C file is compiled once per machine and source with the system's C compiler ($CC, default cc) into
$MOE_CACHE/routing-kernels/ (pipeline.cache), by whichever process needs it first, and loaded with ctypes. Where it
cannot be (no compiler, a failed build: one warning) or need not be (CUDA tensors, other dtypes, tensors that need
gradients), torch ops do the same work. MOE_ROUTING_KERNELS=auto|torch (auto, the default: C when it builds;
torch: torch ops always).

What the two paths may differ in: the order of equal scores (torch.topk leaves it unspecified; the C loop puts the
lower column first), the last bit of a probability (expf against torch's vectorised exp) and, for route, the last bit
of a logit (above).

Shape legend: T tokens, E experts (scores per token), K experts per token, N pairs (T*K, token-major), P keys.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
from pathlib import Path
from typing import NamedTuple

import torch

from pipeline.atomic import atomic_path
from pipeline.cache import cache_root
from pipeline.errors import env_choice

ENV = "MOE_ROUTING_KERNELS"
CHOICES = ("auto", "torch")
SOURCE = Path(__file__).with_name("routing_kernels.c")
CFLAGS = ("-O3", "-std=c11", "-shared", "-fPIC")  # -O3: it vectorises sum_pairs' row loop (-O2 does not)
BUILD_TIMEOUT_S = 120
# With several threads, route() leaves routers larger than this (tokens x D x E multiply-adds) to torch's threaded
# GEMM. At 1024 tokens, D=128, E=64 on 2 threads the two were equal warm (378 us [355-432] for route against 389
# [349-455] for F.linear + top_k, 11 interleaved rounds) and route faster after a cache flush (847 against 889 us);
# at 32-256 tokens route took 0.4-0.9x the time.
ROUTE_MAX_MACS_THREADED = 1024 * 128 * 64

log = logging.getLogger(__name__)
_library: ctypes.CDLL | None = None
_loaded = False  # whether loading was tried (a failed build is not retried in the same process)


def choice() -> str:
    return env_choice(ENV, CHOICES)


def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use; None where they cannot be used (torch ops then)."""
    global _library, _loaded
    if choice() == "torch":
        return None
    if not _loaded:
        _loaded = True
        try:
            _library = _load(_build())
        except (OSError, subprocess.SubprocessError) as e:
            log.warning("the router's C kernels could not be built (%s); routing runs on torch ops (slower on CPU)", e)
    return _library


def _build() -> Path:
    """The shared library for this source, compiler and machine, compiled unless it is in the cache already."""
    compiler = os.environ.get("CC", "cc")
    key = hashlib.sha256(
        b"\0".join([SOURCE.read_bytes(), compiler.encode(), " ".join(CFLAGS).encode(), platform.machine().encode()])
    ).hexdigest()[:16]
    target = cache_root() / "routing-kernels" / f"routing-{key}.so"
    if target.exists():
        return target
    with atomic_path(target) as tmp:  # several ranks may build at once: each renames a complete file in
        done = subprocess.run(
            [compiler, *CFLAGS, "-o", str(tmp), str(SOURCE), "-lm"],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
        )
        if done.returncode != 0:
            raise subprocess.SubprocessError(f"{compiler} exited with {done.returncode}: {done.stderr.strip()[-500:]}")
    return target


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.moe_topk.argtypes = [ptr, i64, i64, i64, ctypes.c_int, ptr, ptr]
    lib.moe_topk.restype = None
    lib.moe_route.argtypes = [ptr, i64, i64, ptr, ptr, i64, i64, ctypes.c_int, ptr, ptr]
    lib.moe_route.restype = ctypes.c_int
    lib.moe_route_rows.argtypes = [ptr, i64, i64, ptr, ptr, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr]
    lib.moe_route_rows.restype = ctypes.c_int
    lib.moe_sort_pairs.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, ptr]
    lib.moe_sort_pairs.restype = ctypes.c_int
    lib.moe_sum_pairs.argtypes = [ptr, i64, ptr, i64, i64, i64, ptr]
    lib.moe_sum_pairs.restype = ctypes.c_int
    return lib


def _compiled_for(t: torch.Tensor, dtype: torch.dtype) -> ctypes.CDLL | None:
    """The kernels, when they can take `t` (a CPU tensor of `dtype` that needs no gradient)."""
    if t.device.type != "cpu" or t.dtype != dtype or t.requires_grad:
        return None
    return library()


def top_k(scores_TE: torch.Tensor, k: int, softmax: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(values_TK, columns_TK int64): the k largest scores of each row in descending order, and their columns; with
    `softmax`, the values replaced by a softmax over each row's k values (fp32)."""
    tokens, experts = scores_TE.shape
    lib = _compiled_for(scores_TE, torch.float32)
    if lib is None or not 0 < k <= experts:
        values_TK, columns_TK = _torch_top_k(scores_TE, k)
        return (torch.softmax(values_TK, dim=-1, dtype=torch.float32) if softmax else values_TK), columns_TK
    scores_TE = scores_TE.contiguous()
    values_TK = scores_TE.new_empty(tokens, k)
    columns_TK = torch.empty(tokens, k, dtype=torch.int64)
    lib.moe_topk(scores_TE.data_ptr(), tokens, experts, k, int(softmax), values_TK.data_ptr(), columns_TK.data_ptr())
    return values_TK, columns_TK


def route(
    x_TD: torch.Tensor, weight_DE: torch.Tensor, bias_E: torch.Tensor | None, k: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """top_k(x_TD @ weight_DE + bias_E, k, softmax=True) in one compiled pass (moe_route): (probs_TK, experts_TK), or
    None where it does not run (see _router_library). `weight_DE` is the router's weight transposed, [D, E]."""
    call = _router_call(x_TD, weight_DE, bias_E, k)
    if call is None:
        return None
    lib, leading, probs_TK, experts_TK, _inputs = call
    status = lib.moe_route(*leading, 1, probs_TK.data_ptr(), experts_TK.data_ptr())  # 1: the softmax over the k
    return (probs_TK, experts_TK) if status == 0 else None


class RoutedRows(NamedTuple):
    """route_rows' result: the router's choice, and the pairs' rows grouped by expert."""

    probs_TK: torch.Tensor  # fp32: each token's K probabilities, as route
    experts_TK: torch.Tensor  # int64: its K experts
    counts_E: torch.Tensor  # int64: the pairs per expert
    place_N: torch.Tensor  # int64: the row of each pair (token-major) in x_ND, as sort_pairs' place_N
    x_ND: torch.Tensor  # each pair's token's row, grouped by expert (ascending), tokens in order within an expert
    probs_N: torch.Tensor  # fp32: each row's probability


def route_rows(x_TD: torch.Tensor, weight_DE: torch.Tensor, bias_E: torch.Tensor | None, k: int) -> RoutedRows | None:
    """route, then the pairs sorted by expert (sort_pairs with the experts as keys) and their rows and probabilities
    gathered in that order, all in one compiled call (moe_route_rows): what one rank holding every expert at its own
    id hands its experts. None where route would not run."""
    call = _router_call(x_TD, weight_DE, bias_E, k)
    if call is None:
        return None
    lib, leading, probs_TK, experts_TK, (x_TD, weight_DE, _) = call
    (tokens, hidden), experts = x_TD.shape, weight_DE.shape[1]
    counts_E, place_N = torch.empty(experts, dtype=torch.int64), torch.empty(tokens * k, dtype=torch.int64)
    x_ND, probs_N = x_TD.new_empty(tokens * k, hidden), x_TD.new_empty(tokens * k)
    outputs = (probs_TK, experts_TK, counts_E, place_N, x_ND, probs_N)
    status = lib.moe_route_rows(*leading, *(t.data_ptr() for t in outputs))
    return RoutedRows(*outputs) if status == 0 else None


def _router_call(x_TD: torch.Tensor, weight_DE: torch.Tensor, bias_E: torch.Tensor | None, k: int):
    """What both compiled routers start from, or None where they do not run (_router_library): (the kernels, the
    leading arguments of moe_route and moe_route_rows, probs_TK and experts_TK for the choice, and the contiguous
    inputs those arguments point into, which the caller holds until its call returns)."""
    lib = _router_library(x_TD, weight_DE, k)
    if lib is None:
        return None
    inputs = x_TD, weight_DE, bias_E = [None if t is None else t.contiguous() for t in (x_TD, weight_DE, bias_E)]
    (tokens, hidden), experts = x_TD.shape, weight_DE.shape[1]
    bias = None if bias_E is None else bias_E.data_ptr()
    leading = (x_TD.data_ptr(), tokens, hidden, weight_DE.data_ptr(), bias, experts, k)
    return lib, leading, x_TD.new_empty(tokens, k), torch.empty(tokens, k, dtype=torch.int64), inputs


def _router_library(x_TD: torch.Tensor, weight_DE: torch.Tensor, k: int) -> ctypes.CDLL | None:
    """The kernels, for a router the compiled pass can take (fp32 on CPU, no gradient, E a multiple of 8; the C side
    also needs AVX2 and FMA) and would be faster for: with several threads, not above ROUTE_MAX_MACS_THREADED
    multiply-adds (torch's GEMM uses the threads, the compiled pass one)."""
    (tokens, hidden), experts = x_TD.shape, weight_DE.shape[1]
    if weight_DE.dtype != torch.float32 or not 0 < k <= experts or experts % 8:
        return None
    if torch.get_num_threads() > 1 and tokens * hidden * experts > ROUTE_MAX_MACS_THREADED:
        return None
    return _compiled_for(x_TD, torch.float32)


def _torch_top_k(scores_TE: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(scores_TE, k, dim=1), padded on CPU for 32k-64k experts.

    torch's CPU topk (2.13) sorts each row by one of two algorithms: a partial sort when the row has at least 64 * k
    values, else an nth_element over (value, index) pairs that costs ~3x as much per value. At E = 64, k = 2 that is
    the slow one: 0.87 ms for 1024 tokens (1 thread). The same rows padded with -inf to 64 * k values take the fast
    path: 0.48 ms. Padding never wins below 32 * k experts (the row gets longer than the time it saves). A pad is
    chosen only by a row with fewer than k values above -inf; such a call is given to torch.topk as it is."""
    tokens, experts = scores_TE.shape
    if scores_TE.device.type != "cpu" or tokens < 64 or not 32 * k <= experts < 64 * k:
        return torch.topk(scores_TE, k=k, dim=1)
    padded_TP = scores_TE.new_full((tokens, 64 * k), float("-inf"))
    padded_TP[:, :experts] = scores_TE
    values_TK, columns_TK = torch.topk(padded_TP, k=k, dim=1)
    if bool((columns_TK[:, -1] >= experts).any()):
        return torch.topk(scores_TE, k=k, dim=1)
    return values_TK, columns_TK


class SortedPairs(NamedTuple):
    """The pairs sorted by key, all int64."""

    order_N: torch.Tensor  # order_N[i]: the pair at sorted place i (stable: pairs of equal key in their order)
    token_N: torch.Tensor  # token_N[i]: its token (order_N[i] // k)
    counts_P: torch.Tensor  # the pairs per key
    place_N: torch.Tensor  # place_N[n]: the sorted place of pair n (order_N's inverse)


def sort_pairs(key_N: torch.Tensor, num_keys: int, k: int) -> SortedPairs:
    """The pairs (k per token, token-major) in ascending key order. Keys lie in [0, num_keys)."""
    lib = _compiled_for(key_N, torch.int64)
    if lib is None:
        order_N = torch.argsort(key_N, stable=True)
        token_N = torch.div(order_N, k, rounding_mode="floor")
        place_N = torch.empty_like(order_N).index_copy_(0, order_N, torch.arange(order_N.numel(), device=key_N.device))
        return SortedPairs(order_N, token_N, torch.bincount(key_N, minlength=num_keys), place_N)
    key_N = key_N.contiguous()
    pairs = key_N.numel()
    order_N, token_N, place_N = (torch.empty(pairs, dtype=torch.int64) for _ in range(3))
    counts_P = torch.empty(num_keys, dtype=torch.int64)
    status = lib.moe_sort_pairs(
        key_N.data_ptr(),
        pairs,
        num_keys,
        k,
        counts_P.data_ptr(),
        order_N.data_ptr(),
        token_N.data_ptr(),
        place_N.data_ptr(),
    )
    if status != 0:
        raise ValueError(f"sort_pairs: keys must lie in [0, {num_keys}) (or memory ran out)")
    return SortedPairs(order_N, token_N, counts_P, place_N)


def sum_pairs(y_MD: torch.Tensor, place_N: torch.Tensor, k: int) -> torch.Tensor:
    """[T, D], T = place_N.numel() // k: out_TD[t] = the sum of rows place_N[t*k : t*k + k] of y_MD, added in that
    order (with sort_pairs' place_N: each token's k expert outputs, the pairs sorted)."""
    tokens, hidden = place_N.numel() // k, y_MD.shape[1]
    lib = _compiled_for(y_MD, torch.float32)
    if lib is None or place_N.dtype != torch.int64 or place_N.device.type != "cpu":
        return y_MD.index_select(0, place_N).view(tokens, k, hidden).sum(1)
    y_MD, place_N = y_MD.contiguous(), place_N.contiguous()
    out_TD = y_MD.new_empty(tokens, hidden)
    status = lib.moe_sum_pairs(y_MD.data_ptr(), y_MD.shape[0], place_N.data_ptr(), tokens, k, hidden, out_TD.data_ptr())
    if status != 0:
        raise ValueError(f"sum_pairs: places must lie in [0, {y_MD.shape[0]})")
    return out_TD
