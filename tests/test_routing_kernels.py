"""The router's compiled CPU loops (moe_infer.model.routing_kernels) against the torch ops they replace, and the
build: cached per source, a failed build falling back to torch ops with one warning, MOE_ROUTING_KERNELS.
The pairs' sort and the sum of each token's rows run on both paths (compiled, and torch ops with the library
unloaded) against plain torch."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_infer.model import routing_kernels
from moe_infer.model.routing_kernels import _torch_top_k, route, route_rows, sort_pairs, sum_pairs, top_k
from pipeline.errors import ConfigError


@pytest.fixture
def compiled():
    """The compiled kernels (built in the suite's private cache), loaded again after a test that unloads them."""
    lib = routing_kernels.library()
    assert lib is not None, "the suite's machines have a C compiler: the kernels must build"
    yield lib
    routing_kernels._library, routing_kernels._loaded = lib, True


def avx2_and_fma() -> bool:
    """Whether this CPU can take the compiled router (route, route_rows): x86-64 Linux with AVX2 and FMA."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags


def scores(tokens: int, experts: int, seed: int) -> torch.Tensor:
    return torch.randn(tokens, experts, generator=torch.Generator().manual_seed(seed))


SHAPES = [(300, 64, 2), (300, 96, 2), (50, 32, 1), (7, 8, 2), (300, 128, 8)]


@pytest.mark.parametrize(("tokens", "experts", "k"), SHAPES)
def test_top_k_equals_torch_topk(compiled, tokens, experts, k):
    scores_TE = scores(tokens, experts, experts + k)
    expected = torch.topk(scores_TE, k=k, dim=1)
    values, columns = top_k(scores_TE, k)
    assert torch.equal(values, expected.values) and torch.equal(columns, expected.indices)
    probs, columns = top_k(scores_TE, k, softmax=True)
    assert torch.equal(columns, expected.indices)
    torch.testing.assert_close(probs, torch.softmax(expected.values, dim=-1), rtol=1e-6, atol=1e-7)


def test_top_k_on_ties_infinities_and_nans(compiled):
    """Equal scores: the lower column first. -inf is a score like any other; NaN ranks above every number (as in
    torch.topk)."""
    scores_TE = torch.zeros(3, 8)
    scores_TE[1, 1:] = float("-inf")
    scores_TE[2, 5] = float("nan")
    values, columns = top_k(scores_TE, 2)
    assert columns.tolist() == [[0, 1], [0, 1], [5, 0]]
    assert values[1].tolist() == [0.0, float("-inf")] and values[2].isnan().tolist() == [True, False]


@pytest.mark.parametrize(("experts", "k"), [(64, 2), (64, 7), (12, 12), (13, 3), (5, 1)])
def test_top_k_ranks_like_a_stable_descending_sort(compiled, experts, k):
    """Rows full of ties, infinities and NaNs (the vectorised path takes rows of a multiple of 8 scores without NaN on
    CPUs with AVX2, the scalar loop the others): the first k of a stable descending sort, which puts NaN first and
    equal scores in column order."""
    gen = torch.Generator().manual_seed(experts * k)
    choices = torch.tensor([float("-inf"), -1.0, 0.0, 0.5, float("inf"), float("nan")])
    scores_TE = choices[torch.randint(0, 5, (400, experts), generator=gen)]  # no NaN ...
    scores_TE[:40] = choices[torch.randint(0, 6, (40, experts), generator=gen)]  # ... but in the first 40 rows
    values, columns = top_k(scores_TE, k)
    expected = torch.sort(scores_TE, dim=1, descending=True, stable=True)
    assert torch.equal(columns, expected.indices[:, :k])
    assert torch.equal(values.nan_to_num(), expected.values[:, :k].nan_to_num())


def test_the_torch_fallback_pads_rows_and_equals_torch_topk():
    # 32k..64k experts take the padded path; the others are torch.topk itself.
    for experts, k in [(64, 2), (96, 2), (32, 1), (8, 2), (128, 2)]:
        scores_TE = scores(300, experts, experts)
        expected, got = torch.topk(scores_TE, k=k, dim=1), _torch_top_k(scores_TE, k)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        # A row with fewer than k scores above -inf: a real column, never a pad's.
        scores_TE[7, 1:] = float("-inf")
        assert int(_torch_top_k(scores_TE, k)[1].max()) < experts


ROUTERS = [(300, 64, 128, 2), (5, 64, 128, 2), (13, 8, 32, 1), (7, 72, 100, 8), (40, 128, 64, 2), (0, 16, 8, 2)]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("tokens", "experts", "hidden", "k"), ROUTERS)
def test_route_equals_linear_then_top_k(compiled, tokens, experts, hidden, k, bias):
    """The compiled router (logits, top-k, softmax in one pass): the same experts as F.linear then top_k, and the same
    probabilities up to fp32 rounding (its dot products run in d order; torch's GEMM may sum in another). Token counts
    around its blocks of 6, 8 experts past a multiple of 16 (72), a D that is no multiple of 8 (100)."""
    gen = torch.Generator().manual_seed(tokens + experts)
    x_TD, weight_ED = torch.randn(tokens, hidden, generator=gen), torch.randn(experts, hidden, generator=gen) / 8
    bias_E = torch.randn(experts, generator=gen) if bias else None
    got = route(x_TD, weight_ED.t().contiguous(), bias_E, k)
    if not avx2_and_fma():
        assert got is None
        return
    probs_TK, experts_TK = top_k(torch.nn.functional.linear(x_TD, weight_ED, bias_E), k, softmax=True)
    assert torch.equal(got[1], experts_TK)
    torch.testing.assert_close(got[0], probs_TK, rtol=1e-5, atol=1e-6)


def test_route_rows_equals_route_then_sort_and_gather(compiled):
    """One rank's whole routing in one call: route's choice, the pairs sorted by expert (as sort_pairs), and each
    pair's row and probability at its sorted place."""
    if not avx2_and_fma():
        pytest.skip("the compiled router needs AVX2 and FMA")
    gen = torch.Generator().manual_seed(3)
    x_TD, weight_DE = torch.randn(301, 64, generator=gen), torch.randn(64, 32, generator=gen) / 8
    bias_E = torch.randn(32, generator=gen)
    routed = route_rows(x_TD, weight_DE, bias_E, 2)
    probs_TK, experts_TK = route(x_TD, weight_DE, bias_E, 2)
    assert torch.equal(routed.probs_TK, probs_TK) and torch.equal(routed.experts_TK, experts_TK)
    pairs = sort_pairs(experts_TK.reshape(-1), 32, 2)
    assert torch.equal(routed.counts_E, pairs.counts_P) and torch.equal(routed.place_N, pairs.place_N)
    assert torch.equal(routed.x_ND, x_TD.index_select(0, pairs.token_N))
    assert torch.equal(routed.probs_N, probs_TK.reshape(-1).index_select(0, pairs.order_N))


def test_route_declines_what_it_cannot_take_or_would_run_slower(compiled, monkeypatch):
    """None (the caller then uses torch ops): experts not a multiple of 8, fp64, a tensor that needs gradients, k
    beyond the experts, MOE_ROUTING_KERNELS=torch, and with several threads a router above ROUTE_MAX_MACS_THREADED
    multiply-adds (torch's GEMM uses the threads)."""
    x_TD, weight_DE = torch.randn(4, 16), torch.randn(16, 8)
    assert route(x_TD, torch.randn(16, 12), None, 2) is None
    assert route(x_TD.double(), weight_DE.double(), None, 2) is None
    assert route(x_TD.requires_grad_(), weight_DE, None, 2) is None
    assert route(x_TD.detach(), weight_DE, None, 9) is None
    monkeypatch.setattr(routing_kernels, "ROUTE_MAX_MACS_THREADED", 4 * 16 * 8 - 1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert route(x_TD.detach(), weight_DE, None, 2) is None
        torch.set_num_threads(1)
        assert (route(x_TD.detach(), weight_DE, None, 2) is None) == (not avx2_and_fma())
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setenv("MOE_ROUTING_KERNELS", "torch")
    assert route(x_TD.detach(), weight_DE, None, 2) is None and route_rows(x_TD.detach(), weight_DE, None, 2) is None


@pytest.mark.parametrize("path", ["compiled", "torch ops"])
@pytest.mark.parametrize(("pairs", "keys", "k"), [(2048, 64, 2), (33, 5, 1), (0, 4, 2), (96, 9, 8)])
def test_sort_pairs_is_a_stable_sort_with_counts_and_places(compiled, monkeypatch, path, pairs, keys, k):
    if path == "torch ops":
        monkeypatch.setattr(routing_kernels, "_library", None)
    key_N = torch.randint(0, keys, (pairs,), generator=torch.Generator().manual_seed(pairs))
    order_N, token_N, counts_P, place_N = sort_pairs(key_N, keys, k)
    assert torch.equal(order_N, torch.argsort(key_N, stable=True))
    assert torch.equal(token_N, torch.div(order_N, k, rounding_mode="floor"))
    assert torch.equal(counts_P, torch.bincount(key_N, minlength=keys))
    assert torch.equal(place_N[order_N], torch.arange(pairs))  # the inverse of the order
    if path == "compiled":
        with pytest.raises(ValueError, match=r"keys must lie in \[0, 4\)"):
            sort_pairs(torch.tensor([0, 4]), 4, 1)


@pytest.mark.parametrize("path", ["compiled", "torch ops"])
@pytest.mark.parametrize(("tokens", "k", "hidden"), [(300, 2, 64), (17, 1, 5), (40, 8, 3), (0, 2, 4)])
def test_sum_pairs_adds_each_tokens_rows_as_index_add_does(compiled, monkeypatch, path, tokens, k, hidden):
    """The one-rank combine: each token's k expert outputs, found at their sorted places, summed. index_add_ into
    zeros adds them in sorted order, sum_pairs in the token's order: the same sum, up to fp32 rounding for k > 2."""
    if path == "torch ops":
        monkeypatch.setattr(routing_kernels, "_library", None)
    gen = torch.Generator().manual_seed(tokens + k)
    pairs = sort_pairs(torch.randint(0, 7, (tokens * k,), generator=gen), 7, k)
    y_MD = torch.randn(tokens * k, hidden, generator=gen)
    expected_TD = torch.zeros(tokens, hidden).index_add_(0, pairs.token_N, y_MD)
    got_TD = sum_pairs(y_MD, pairs.place_N, k)
    if k <= 2:
        assert torch.equal(got_TD, expected_TD)
    torch.testing.assert_close(got_TD, expected_TD, rtol=1e-6, atol=1e-6)
    if path == "compiled" and tokens:
        with pytest.raises(ValueError, match=r"places must lie in \[0, "):
            sum_pairs(y_MD, pairs.place_N + tokens * k, k)


def test_the_kernels_are_built_once_per_source_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_CACHE", str(tmp_path))
    probe = "from moe_infer.model import routing_kernels as rk; print(rk._build())"
    first = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    built = sorted(p.name for p in (tmp_path / "routing-kernels").iterdir())
    assert built == [first.rsplit("/", 1)[1]]  # the library alone: no temporary left beside it
    mtime = (tmp_path / "routing-kernels" / built[0]).stat().st_mtime_ns
    again = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert again == first and (tmp_path / "routing-kernels" / built[0]).stat().st_mtime_ns == mtime


def test_a_failed_build_falls_back_to_torch_ops_with_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MOE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(routing_kernels, "_library", None)
    monkeypatch.setattr(routing_kernels, "_loaded", False)
    scores_TE = scores(100, 64, 0)
    with caplog.at_level("WARNING"):
        got = top_k(scores_TE, 2)
        top_k(scores_TE, 2)
    assert torch.equal(got[1], torch.topk(scores_TE, 2, dim=1).indices)
    warnings = [r.getMessage() for r in caplog.records if r.name == routing_kernels.__name__]
    assert len(warnings) == 1 and "no-such-compiler" in warnings[0] and "torch ops" in warnings[0]
    assert not (tmp_path / "routing-kernels").exists() or not any((tmp_path / "routing-kernels").iterdir())


def test_moe_routing_kernels_setting(monkeypatch, compiled):
    monkeypatch.setenv("MOE_ROUTING_KERNELS", "torch")
    assert routing_kernels.library() is None
    monkeypatch.setenv("MOE_ROUTING_KERNELS", "c")
    with pytest.raises(ConfigError, match=r"^MOE_ROUTING_KERNELS: expected one of auto, torch, got 'c'$"):
        routing_kernels.library()
    monkeypatch.setenv("MOE_ROUTING_KERNELS", "auto")
    assert routing_kernels.library() is compiled
