"""Cross-layer expert prefetch, as a replay study: does knowing layer l's active experts cut layer l+1's cache misses?
A study beyond the paper, not used by the engine: on our traces it did not beat plain LFU eviction.

    python -m moe_infer.bench prefetch --trace runs/lm-tiny-e64/traces/served-decode-heldout.npz --ranks 2 \\
        [--slots 8,16,24] [--policies paper,lru] [--threshold 0.5] [--predictor transition|base] [--run-dir DIR]
                                                  (also `python -m moe_infer.buffering prefetch ...`)

    history = LoadHistory.read("runs/lm-tiny-e64/traces/served-decode-heldout.npz")
    rows = prefetch_study(history, ranks=2, slots=[8, 16], policies=["paper", "lru"])
    print(format_tables(rows))                   per predicted layer, then the total: misses and copies without / with
    model = fit_transition(counts_BE_l, counts_BE_next)      P(n active in l+1 | m active in l), and the base rate
    model.scores(active_BE_l)                    float [B, E]: each call's predicted probability of each next expert

The model (the paper does no cross-layer prefetch; Pre-gated MoE and MoE-Infinity do): for each pair of consecutive
MoE layers of one stack (decoder.layers.2 -> decoder.layers.4; never encoder -> decoder), call i of both layers is
the same forward pass. A call's score for expert n of layer l+1 is a logistic model over layer l's active set:
logit = bias[n] + sum over active m of weight[m, n], fitted on the calls (a plain mean of co-activation P(n | m)
over the active experts scored barely above the base rate on the 64-expert trace; the logistic fit did better).
The control, predictor "base", scores every call at n's base rate P(n). Both are fitted on the first half of the
trace and replayed on the second (the paper's protocol), so the fit never sees the calls it predicts.

Replay: each (layer, rank) cache starts as the engine's (local experts 0..K-1) and runs the held-out calls twice
with the same policy: on demand only, and with a prefetch before each call of layer l+1 of the local experts scored
>= `threshold`, at most K of them, highest score first (ExpertCache.prefetch), each evicting the cached expert
predicted least likely to run (ties: the cache's policy; never one predicted to run).
The first MoE layer of a stack has no predecessor: its two runs are the same. Prefetching changes slot contents
only; the experts that run, and in which order, are the trace's (the cache checks every step against it).

Stall-time model: an on-demand miss puts one full host-to-device copy on the critical path; a prefetched copy is
issued once layer l's gating is known and is assumed to finish while layer l's experts and the next attention block
compute, so it costs bandwidth (copies) but no stall. The assumption fails when the prefetches of one call outlast
that window, so the table also shows the extra copies. A prefetch is wasted when its expert does not run in the
call it was fetched for. Rank r is assumed to know layer l's global active set (an all-gather of E counts).

Rows (COLUMNS), summed over ranks, layer "total" summed over layers: accesses, on-demand misses without and with
prefetch, their relative reduction, copies without (= misses) and with (on-demand + prefetched), prefetched, wasted.

Shape legend: B calls (batches), E experts, L local experts per rank, K device slots.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moe_infer.bench.replay import ORACLE, TOTAL, int_list, local_expert_lists, name_list, rank_batches
from moe_infer.bench.results import Results
from moe_infer.buffering.cache import ExpertCache, simulate
from moe_infer.buffering.policies import POLICIES, CacheView, EvictionPolicy, make_policy
from moe_infer.placement.history import LoadHistory
from moe_infer.placement.map import Placement
from pipeline.errors import PipelineError, exit_status
from pipeline.tracking import check_run_dir

RESULT_FILE = "prefetch.json"
COLUMNS = [
    "layer",
    "policy",
    "slots",
    "accesses",
    "misses",
    "misses_prefetch",
    "reduction",
    "copies",
    "copies_prefetch",
    "prefetched",
    "wasted",
]
DEFAULT_THRESHOLD = 0.5  # prefetch an expert when it is predicted more likely to run than not
PREDICTORS = ("transition", "base")
_FIT_STEPS, _FIT_RATE, _FIT_L2 = 300, 1.0, 1e-2  # converged on the lm-tiny traces: more steps change no decision


@dataclass(frozen=True)
class Transition:
    """Layer `source` -> the next MoE layer `target` of one stack: P(n active in target | source's active set) as a
    logistic model, logit = bias_E[n] + sum over source's active m of weights_EE[m, n]."""

    source: str
    target: str
    weights_EE: np.ndarray  # float64 [E, E]: row m, column n = how m active in source moves n's log-odds in target
    bias_E: np.ndarray  # float64 [E]: n's log-odds when source has no active expert

    def scores(self, active_BE: np.ndarray) -> np.ndarray:
        """float64 [B, E]: each call's predicted probability that each target expert runs."""
        logits_BE = np.asarray(active_BE, dtype=np.float64) @ self.weights_EE + self.bias_E
        return 1.0 / (1.0 + np.exp(-logits_BE))


def fit_transition(
    source_BE: np.ndarray, target_BE: np.ndarray, source: str = "", target: str = "", predictor: str = "transition"
) -> Transition:
    """Fit on the calls of two consecutive layers (counts or activity; row i of both = the same call). predictor
    "base": the control, every call predicted at the target's base rate P(n), whatever the source did."""
    if predictor not in PREDICTORS:
        raise PipelineError(f"prefetch: unknown predictor {predictor!r}; expected one of {', '.join(PREDICTORS)}")
    if source_BE.shape != target_BE.shape or source_BE.shape[0] < 1:
        raise PipelineError(
            f"prefetch: layers {source} and {target} have {source_BE.shape} and {target_BE.shape} counts; "
            "the fit needs the same calls (>= 1) of both"
        )
    x_BE, y_BE = (np.asarray(source_BE) > 0).astype(np.float64), (np.asarray(target_BE) > 0).astype(np.float64)
    calls, experts = x_BE.shape
    # Clipped by half a call, so an expert always (never) active keeps a finite log-odds.
    base_E = y_BE.mean(axis=0).clip(0.5 / calls, 1.0 - 0.5 / calls)
    weights_EE, bias_E = np.zeros((experts, experts)), np.log(base_E / (1.0 - base_E))
    if predictor == "transition":
        # Full-batch gradient descent with an L2 pull to 0 (= the base rate): deterministic, and the mean of
        # P(n | m) over the active m, the first thing tried, scored barely better than the base rate on the
        # lm-tiny-e64 trace (its average over ~20 active experts flattens the one or two that matter).
        for _ in range(_FIT_STEPS):
            error_BE = 1.0 / (1.0 + np.exp(-(x_BE @ weights_EE + bias_E))) - y_BE
            weights_EE -= _FIT_RATE * (x_BE.T @ error_BE / calls + _FIT_L2 * weights_EE)
            bias_E -= _FIT_RATE * error_BE.mean(axis=0)
    return Transition(source, target, weights_EE, bias_E)


def layer_pairs(history: LoadHistory) -> list[tuple[str, str]]:
    """(layer, next MoE layer of the same stack) in the history's layer order; the stack is the name before
    ".layers." (decoder.layers.2 -> decoder), so an encoder layer never predicts a decoder layer."""
    last_in_stack: dict[str, str] = {}
    pairs = []
    for layer in history.layer_names:
        stack = layer.rpartition(".layers.")[0] or layer.rpartition(".")[0]
        if stack in last_in_stack:
            source = last_in_stack[stack]
            calls = (len(history.counts_BE[source]), len(history.counts_BE[layer]))
            if calls[0] != calls[1]:
                raise PipelineError(
                    f"prefetch: {source} has {calls[0]} calls but {layer} has {calls[1]}; consecutive layers of one "
                    "stack must record the same calls (call i of both = one forward pass)"
                )
            pairs.append((source, layer))
        last_in_stack[stack] = layer
    if not pairs:
        raise PipelineError(
            f"prefetch: {history.source or 'the trace'} has no two consecutive MoE layers of one stack "
            f"(layers {history.layer_names}): there is nothing to predict a layer from"
        )
    return pairs


def choose(scores_L: np.ndarray, slots: int, threshold: float) -> list[int]:
    """The local experts to prefetch: score >= threshold, the `slots` best (ties: lower id), in ascending id order
    (the engine's run order, so the paper's LIFO sees them as it would see misses)."""
    above_L = np.flatnonzero(scores_L >= threshold)
    best = above_L[np.argsort(-scores_L[above_L], kind="stable")][:slots]
    return sorted(best.tolist())


class LeastLikelyFirst(EvictionPolicy):
    """A prefetch's victim: the cached expert predicted least likely to run in the coming call; ties by `fallback`
    (the cache's own policy). Evicting by the cache's policy instead cut fewer misses and, for paper at K = 3L/4,
    added some: its LIFO knows which experts already ran in a batch, which a prefetch, before the batch, does not."""

    name = "least-likely"

    def __init__(self, scores_L: np.ndarray, fallback: EvictionPolicy):
        self.scores_L, self.fallback = scores_L, fallback

    def victim(self, cached: Sequence[int], view: CacheView) -> int:
        lowest = min(self.scores_L[e] for e in cached)
        return self.fallback.victim([e for e in cached if self.scores_L[e] == lowest], view)


def replay_rank(
    batches: Sequence[Sequence[int]], scores_BL: np.ndarray | None, slots: int, policy: str, threshold: float
) -> dict[str, int]:
    """One (layer, rank) cache over `batches`, on demand and with prefetch: {accesses, misses, misses_prefetch,
    prefetched, wasted}. scores_BL None: no predecessor, nothing prefetched."""
    plain = simulate(batches, slots, policy, initial=range(slots))
    cache = ExpertCache(slots, policy, initial=range(slots), future=batches)
    wasted = 0
    for i, batch in enumerate(batches):
        if scores_BL is not None:
            victims = LeastLikelyFirst(scores_BL[i], cache.policy)
            copies = cache.prefetch(choose(scores_BL[i], slots, threshold), victims)
            wasted += len({access.expert for access in copies} - set(batch))
        cache.step(batch)
    assert cache.accesses == plain.accesses  # same experts ran: prefetch moves slot contents only
    return {
        "accesses": plain.accesses,
        "misses": plain.misses,
        "misses_prefetch": cache.misses,
        "prefetched": cache.prefetches,
        "wasted": wasted,
    }


def prefetch_study(
    history: LoadHistory,
    ranks: int,
    slots: Sequence[int],
    policies: Sequence[str],
    threshold: float = DEFAULT_THRESHOLD,
    predictor: str = "transition",
    placements: Mapping[str, Placement] | None = None,
) -> list[list]:
    """Rows of COLUMNS for each layer (then the total), each policy and each K: fit on the first half of
    `history`, replay the second."""
    for name in policies:
        if make_policy(name).needs_future:
            raise PipelineError(f"prefetch: {ORACLE!r} is a replay oracle for demand loading; it does not prefetch")
    if placements is None and (ranks < 1 or history.num_experts % ranks):
        raise PipelineError(f"prefetch: {ranks} rank(s) do not split the {history.num_experts} experts evenly")
    if not slots or min(slots) < 1:
        raise PipelineError(f"prefetch: slots must be positive integers, got {list(slots)}")
    if not 0.0 <= threshold <= 1.0:
        raise PipelineError(f"prefetch: threshold is a probability in [0, 1], got {threshold}")
    pairs = layer_pairs(history)
    fit, held_out = history.split_halves()
    models = {b: fit_transition(fit.counts_BE[a], fit.counts_BE[b], a, b, predictor) for a, b in pairs}
    totals: dict[tuple[str, int], dict[str, int]] = {}
    rows = []
    for layer in history.layer_names:
        model = models.get(layer)
        scores_BE = None if model is None else model.scores(held_out.counts_BE[model.source] > 0)
        rank_experts = local_expert_lists(history, ranks, placements, layer)
        for policy in policies:
            for k in slots:
                sums = dict.fromkeys(["accesses", "misses", "misses_prefetch", "prefetched", "wasted"], 0)
                for local in rank_experts:
                    batches = rank_batches(held_out.counts_BE[layer], local)
                    scores_BL = None if scores_BE is None else scores_BE[:, local]
                    counts = replay_rank(batches, scores_BL, min(k, len(local)), policy, threshold)
                    sums = {key: sums[key] + counts[key] for key in sums}
                rows.append(_row(layer, policy, k, sums))
                total = totals.setdefault((policy, k), dict.fromkeys(sums, 0))
                for key in sums:
                    total[key] += sums[key]
    rows += [_row(TOTAL, policy, k, totals[policy, k]) for policy in policies for k in slots]
    return rows


def _row(layer: str, policy: str, k: int, sums: dict[str, int]) -> list:
    misses, after = sums["misses"], sums["misses_prefetch"]
    reduction = round((misses - after) / misses, 4) if misses else 0.0
    prefetched = sums["prefetched"]
    return [
        layer,
        policy,
        k,
        sums["accesses"],
        misses,
        after,
        reduction,
        misses,
        after + prefetched,
        prefetched,
        sums["wasted"],
    ]


def format_tables(rows: list[list]) -> str:
    """One table per layer: on-demand misses (the stalls) and copies (bandwidth) without / with prefetch."""
    header = ["policy", "K", "stalls", "stalls+pf", "cut", "copies", "copies+pf", "extra", "wasted pf"]
    blocks = []
    for layer in dict.fromkeys(row[0] for row in rows):
        cells = [header]
        for _, policy, k, _, misses, after, reduction, copies, with_pf, _, wasted in (r for r in rows if r[0] == layer):
            extra = f"{(with_pf - copies) / copies:+.1%}" if copies else f"+{with_pf}"
            cells.append(
                [policy, str(k), str(misses), str(after), f"{reduction:.1%}", str(copies), str(with_pf), extra]
                + [str(wasted)]
            )
        widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
        lines = [
            "  ".join([r[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True))])
            for r in cells
        ]
        blocks.append(f"{layer}\n" + "\n".join(lines))
    return "\n\n".join(blocks)


# ---- the command ----------------------------------------------------------------------------------------------------


def study(args: argparse.Namespace) -> int:
    if args.run_dir:  # a run of this study only (its tracked files and prefetch.json), checked before any work
        check_run_dir(args.run_dir, own=(RESULT_FILE,))
    history = LoadHistory.read(args.trace)
    if args.ranks < 1 or history.num_experts % args.ranks:
        raise PipelineError(f"--ranks: {args.ranks} ranks do not split the {history.num_experts} experts evenly")
    local = history.num_experts // args.ranks
    slots = int_list(args.slots, "--slots") if args.slots else sorted({max(1, local * q // 4) for q in (1, 2, 3)})
    if not slots or any(not 1 <= k <= local for k in slots):
        raise PipelineError(f"--slots: each K must be in 1..{local} (the local experts per rank), got {slots}")
    policies = name_list(args.policies)
    rows = prefetch_study(history, args.ranks, slots, policies, args.threshold, args.predictor)
    pairs = ", ".join(f"{a} -> {b}" for a, b in layer_pairs(history))
    print(f"{args.trace}: {history.num_experts} experts, {args.ranks} rank(s), L={local}, predicted: {pairs}")
    print(
        f"fit on the first {history.num_batches // 2} calls, replayed on the rest; predictor {args.predictor}, ", end=""
    )
    print(f"threshold {args.threshold}; stalls = on-demand misses, copies+pf = stalls+pf + prefetched\n")
    print(format_tables(rows))
    if args.run_dir:
        settings = {
            "trace": str(args.trace),
            "ranks": args.ranks,
            "num_experts": history.num_experts,
            "local_experts": local,
            "slots": slots,
            "policies": policies,
            "threshold": args.threshold,
            "predictor": args.predictor,
            "layers": history.layer_names,
        }
        names = COLUMNS
        summary = {f"{r[0]}/{r[1]}/K{r[2]}/{names[i]}": r[i] for r in rows for i in (4, 5, 6, 8, 10)}
        doc = {**settings, "columns": names, "rows": rows}
        with Results("buffering", settings, args.run_dir, "buffering", args.run_dir / RESULT_FILE) as results:
            results.table("prefetch", names, rows, **summary)
            results.save(doc)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", type=Path, required=True, help="load history or routing trace (as for replay)")
    parser.add_argument(
        "--ranks", type=int, default=1, help="expert-parallel ranks D, contiguous placement (default 1)"
    )
    parser.add_argument("--slots", help="comma-separated device slots K per rank (default: L/4, L/2, 3L/4)")
    parser.add_argument("--policies", default="paper,lru", help=f"comma-separated, of {', '.join(POLICIES[:-1])}")
    parser.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help=f"prefetch experts predicted to run with at least this probability (default {DEFAULT_THRESHOLD})",
    )
    parser.add_argument("--predictor", choices=PREDICTORS, default="transition", help="base: the control")
    parser.add_argument("--run-dir", type=Path, help="also log the rows here (W&B table + summary, prefetch.json)")


def main(args: argparse.Namespace) -> int:
    return exit_status(study, args)
