"""One MoE layer, every implementation side by side on the same weights and tokens: the engine's headline benchmark.

    python -m moe_infer.bench layer                                 EP=1, the paper-LM-shaped layer (below)
    torchrun --nproc-per-node 2 -m moe_infer.bench layer            EP=2 (or deepspeed --num_gpus 2 / make bench)

The default layer has the paper LM's waste factor E*C/k = 12.8 (E=64, C=0.4, top-2) at D=256, F=1024 with S=4096
tokens per rank. Each rank brings its own tokens (a different seed per rank); the router and experts are the same
random weights on every rank, and each rank holds its E/R experts.

For each implementation: wall time per layer call (the slowest rank's; the median of `--repeats` rounds with their
min-max, each round timing every implementation once in turn, so a noisy neighbour on a shared machine slows them
all alike; before each timed call the last-level cache is evicted, as a layer of a model finds it, unless
`--caches warm`: moe_infer.bench.caches),
tokens/s over the whole group, time per phase (gate, dispatch, experts, combine) and, for dynamic and static, the
time of those phases spent waiting for all-to-alls (a2a ms), the activation memory of one call
(moe_infer.bench.memory), the fraction of (token, expert) pairs dropped, and its largest difference from `dynamic`
(the implementations that drop nothing must agree to fp32 rounding). The floors, timed the same way, all on this
rank's rows already grouped by expert (what dynamic gets after its exchange):
    floor-matmul          the expert matrix products alone (x W1^T, h W2^T per expert, torch.mm)
    floor-ffn             the engine's expert FFNs (bias, activation, probability) with the kernel it chooses
                          (moe_infer.moe.kernels: grouped or per-expert, by rows per expert)
    floor-grouped-ffn     the same FFNs, always grouped (torch.nn.functional.grouped_mm)
    floor-per-expert-ffn  the same FFNs, always one expert at a time (torch.mm)
    floor-torch-ffn       the same FFNs as a plain torch loop (F.linear, activation, F.linear, scale): what a
                          per-expert loop costs before any routing, with torch's own kernels
And the MoE-vs-dense characterisation: `dense-equivalent`, one dense FFN of K*F hidden units on every token of the
rank (the same FLOPs per token as top-K routing, with the engine's kernel; no router, no exchange), with its time and
activation memory.
The table is printed and written to `--out` (JSON), and logged to W&B when `--run-dir` is given
(moe_infer.bench.results). `--out` replaces only a previous result of this benchmark, and `--run-dir` adds only to a
run of it: anything else already there is refused before any work.

Shape legend: T tokens per rank, D model dim, F ffn dim, E experts, K experts per token, R ranks, L experts per rank.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moe_infer.bench.caches import CacheFlusher
from moe_infer.bench.memory import peak_activation_bytes
from moe_infer.bench.results import Results, Spread, check_result_paths
from moe_infer.bench.synthetic import DENSE, DenseEquivalent, layer_config, random_layer
from moe_infer.collectives import all_reduce, barrier, clock
from moe_infer.model.config import ModelConfig
from moe_infer.model.layers import activation
from moe_infer.model.moe import ExpertFFN, MoELayer
from moe_infer.moe.experts import LocalExperts
from moe_infer.moe.layer import POLICIES, MoEOptions, build_moe_layer, load_router
from moe_infer.moe.stats import PHASES, MoEStats, PhaseTimer
from moe_infer.placement import Placement
from moe_infer.serve.flags import positive_int
from moe_infer.serve.process import launched
from pipeline.errors import PipelineError
from pipeline.platform import detect_platform, init_distributed, set_threads_per_rank, tune_host_malloc


@dataclass
class Result:
    name: str
    ms: float  # per layer call, slowest rank, median over repeats
    tokens_per_s: float  # tokens of the whole group per second, at the median time
    ms_min: float = 0.0  # the fastest and slowest repeat
    ms_max: float = 0.0
    repeats: int = 0
    phases_ms: dict[str, float] = field(default_factory=dict)
    activation_mb: float = 0.0
    dropped_fraction: float = 0.0
    sent_mb: float = 0.0  # bytes this rank sent to the others in the call's all-to-alls (the largest over ranks)
    exchange_ms: float = 0.0  # time waiting for all-to-alls, within dispatch + combine (dynamic, static; slowest rank)
    max_diff_vs_dynamic: float | None = None
    max_diff_vs_reference: float | None = None  # against moe_infer.model.moe's single-process layer


def _slowest(value: float, device: torch.device) -> float:
    """The largest of every rank's value (a collective)."""
    return all_reduce([float(value)], "max", device=device)[0]


def timed_call(fn, device: torch.device, flush: CacheFlusher | None = None):
    """(seconds of the slowest rank, fn's result) for one call that all ranks start together, with cold caches when
    `flush` is given."""
    if flush is not None:
        flush()
    barrier(device)
    start = clock(device)
    result = fn()
    return _slowest(clock(device) - start, device), result


def expert_floors(
    cfg: ModelConfig, experts: LocalExperts, weights_L: list[dict], rows_L: list[int], device: torch.device
) -> dict:
    """This rank's expert work alone, on rows already grouped by expert (`rows_L` per local slot; `weights_L` the
    same experts' plain tensors): name -> fn."""
    gen = torch.Generator(device=device).manual_seed(1)
    x_MD = torch.randn(sum(rows_L), cfg.hidden_size, generator=gen, device=device)
    p_M, y_MD = torch.ones(x_MD.shape[0], device=device), torch.empty_like(x_MD)
    kernel, weights = experts.kernel, experts.weights

    def torch_ffns():
        start = 0
        for n, w in zip(rows_L, weights_L, strict=True):
            if n:
                x_ND, end = x_MD[start : start + n], start + n
                h_NF = activation(cfg.activation, F.linear(x_ND, w["fc1.weight"], w.get("fc1.bias")))
                F.linear(h_NF, w["fc2.weight"], w.get("fc2.bias")) * p_M[start:end].unsqueeze(-1)
                start = end

    return {
        "floor-matmul": lambda: experts.products(x_MD, rows_L),
        "floor-ffn": lambda: experts.run(x_MD, p_M, rows_L, y_MD),
        "floor-grouped-ffn": lambda: kernel.grouped(weights, x_MD, p_M, rows_L, y_MD),
        "floor-per-expert-ffn": lambda: kernel.per_expert(weights, x_MD, p_M, rows_L, y_MD),
        "floor-torch-ffn": torch_ffns,
    }


def run(args: argparse.Namespace, device: torch.device, ranks: int, rank: int) -> list[Result]:
    PhaseTimer.synchronize = True  # phase times of the device's work (CUDA), not of the host's launches
    cfg = layer_config(args.experts, args.hidden, args.ffn, args.topk, args.activation)
    placement = Placement.contiguous(cfg.num_experts, ranks)
    router, all_experts = random_layer(cfg, args.seed)
    local = {e: {k: v.to(device) for k, v in all_experts[e].items()} for e in placement.local_experts(rank)}
    router = {k: v.to(device) for k, v in router.items()}
    gen = torch.Generator().manual_seed(args.seed + 1 + rank)
    x_TD = torch.randn(args.tokens, args.hidden, generator=gen).to(device)
    options = MoEOptions(
        capacity_fraction=args.capacity_fraction,
        capacity_factor=args.ds_capacity_factor,
        drop_tokens=not args.ds_no_drop,
    )
    layers = {kind: build_moe_layer(kind, kind, cfg, router, local, placement, options) for kind in args.policies}
    calls = {kind: (lambda layer=layer: layer(x_TD)) for kind, layer in layers.items()}
    if "dynamic" in layers:
        rows_L = _rows_per_local_expert(layers["dynamic"], x_TD, placement, rank)
        weights_L = [local[e] for e in placement.local_experts(rank)]
        calls.update(expert_floors(cfg, layers["dynamic"].experts, weights_L, rows_L, device))
    dense = DenseEquivalent(cfg, device, args.seed).ffn  # the FFN alone: K*F hidden units, the MoE layer's FLOPs
    ones_T = torch.ones(x_TD.shape[0], device=device)
    calls[DENSE] = lambda: dense.run(x_TD, ones_T, [x_TD.shape[0]], torch.empty_like(x_TD))

    # Round robin: every repeat times each implementation once, so a noisy neighbour slows them all alike; the figure
    # is the median of the repeats with their min-max, and the phase split is that of the median call. The slow ones
    # (static: seconds per call and gigabytes of padded buffers that would evict everyone else's data from the
    # caches) are timed apart, afterwards, `--slow-repeats` times.
    slow = [name for name in calls if name in SLOW]
    rounds = [[name for name in calls if name not in SLOW]] * args.repeats + [slow] * args.slow_repeats
    timings: dict[str, list[tuple[float, MoEStats | None]]] = {name: [] for name in calls}
    outputs = {}
    flush = CacheFlusher(device) if args.caches == "cold" else None
    with torch.inference_mode():
        for fn in calls.values():
            for _ in range(args.warmup):
                fn()
        for names in rounds:
            for name in names:
                elapsed, result = timed_call(calls[name], device, flush)
                stats = layers[name].last if name in layers else None  # the MoEStats of this very call
                if name in layers:
                    outputs[name] = result
                timings[name].append((elapsed, stats))
        activation = {kind: peak_activation_bytes(calls[kind], device) for kind in [*layers, DENSE]}
        ref = reference_output(cfg, router, all_experts, x_TD, device)

    results = []
    for name in calls:
        spread = Spread.of([seconds for seconds, _ in timings[name]])
        _, stats = min(timings[name], key=lambda t: abs(t[0] - spread.median))  # the median call's figures
        ms = spread.times(1e3)
        result = Result(name, ms.median, spread.per(args.tokens * ranks).median, ms_min=ms.low, ms_max=ms.high)
        result.repeats = len(timings[name])
        if name in activation:
            result.activation_mb = _slowest(activation[name], device) / 2**20
        if stats is not None:
            result.phases_ms = {p: s * 1e3 for p, s in stats.seconds.items()}
            result.dropped_fraction = stats.dropped_fraction
            result.sent_mb = _slowest(stats.bytes_sent, device) / 2**20
            result.exchange_ms = _slowest(stats.exchange_seconds, device) * 1e3
            for attribute, other in (("max_diff_vs_dynamic", outputs.get("dynamic")), ("max_diff_vs_reference", ref)):
                if other is not None:
                    diff = outputs[name] - other
                    setattr(result, attribute, _slowest(float(diff.abs().max()) if diff.numel() else 0.0, device))
        results.append(result)
    return results


def reference_output(cfg: ModelConfig, router: dict, experts: dict, x_TD: torch.Tensor, device) -> torch.Tensor:
    """The single-process reference MoE layer (moe_infer.model.moe: every expert, nothing dropped) on this rank's
    tokens: what the implementations that drop nothing must equal."""
    reference = MoELayer(cfg, "reference")
    reference.router = load_router(cfg, router, device)
    for e, tensors in experts.items():
        ffn = ExpertFFN(cfg).to_empty(device=device).requires_grad_(False)
        zeros = {name: torch.zeros_like(p) for name, p in ffn.named_parameters() if name.endswith("bias")}
        ffn.load_state_dict({**zeros, **{k: v.to(device) for k, v in tensors.items()}})  # no biases: zeros
        reference.experts[str(e)] = ffn
    return reference(x_TD)


def _rows_per_local_expert(layer, x_TD: torch.Tensor, placement: Placement, rank: int) -> list[int]:
    """How many rows each local expert of this rank receives from the whole group (what dynamic computes)."""
    with torch.inference_mode():
        _, experts_TK = layer.router(x_TD)
    counts_E = torch.bincount(experts_TK.reshape(-1).cpu(), minlength=placement.num_experts)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(counts_E)
    return [int(counts_E[e]) for e in placement.local_experts(rank)]


def format_table(results: list[Result], ranks: int, caches: str = "cold") -> str:
    by_name = {r.name: r for r in results}
    base = by_name.get("dynamic")
    name_width = max(16, *(len(r.name) + 2 for r in results))
    head = f"{'implementation':<{name_width}}{'ms/call':>10}{'min-max':>20}{'tok/s':>10}{'x dynamic':>11}"
    head += f"{'gate':>7}{'dispatch':>9}{'experts':>9}{'combine':>9}{'a2a ms':>8}{'act MB':>8}{'a2a MB':>8}"
    head += f"{'dropped':>8}{'diff ref':>10}"
    repeats = sorted({r.repeats for r in results})
    lines = [
        f"MoE layer, EP={ranks}: times in ms, the median of {'/'.join(map(str, repeats))} interleaved repeats with "
        f"their min-max, {caches} caches; 'x dynamic' = time / dynamic's time, '~' where the two spreads overlap "
        "(within noise); "
        "diff ref = largest difference from the single-process reference layer",
        head,
    ]
    for r in results:
        ratio = f"{'-':>11}"
        if base:
            noise = "~" if r is not base and r.ms_min <= base.ms_max and base.ms_min <= r.ms_max else " "
            ratio = f"{r.ms / base.ms:>10.2f}{noise}"
        phases = "".join(f"{r.phases_ms.get(p, 0.0):>{w}.1f}" for p, w in zip(PHASES, (7, 9, 9, 9), strict=True))
        if not r.phases_ms:
            phases = f"{'':>34}"
        diff = f"{r.max_diff_vs_reference:>10.1e}" if r.max_diff_vs_reference is not None else f"{'':>10}"
        # The all-to-all wait is measured where our ExpertGroup does the exchange (dynamic, static), not in the peers.
        exchange = f"{r.exchange_ms:>8.1f}" if r.name in EXCHANGE_TIMED else f"{'-':>8}"
        extra = (
            f"{exchange}{r.activation_mb:>8.1f}{r.sent_mb:>8.1f}{r.dropped_fraction:>8.3f}{diff}" if r.phases_ms else ""
        )
        extra = extra or (f"{'':>8}{r.activation_mb:>8.1f}" if r.activation_mb else "")
        spread = f"{r.ms_min:.1f}-{r.ms_max:.1f}"
        lines.append(f"{r.name:<{name_width}}{r.ms:>10.1f}{spread:>20}{r.tokens_per_s:>10.0f}{ratio}{phases}{extra}")
    return "\n".join(lines)


SLOW = ("static",)  # timed apart from the round robin (see run)
EXCHANGE_TIMED = ("dynamic", "static")
RESULT_KEYS = {"ranks", "args", "results"}  # the JSON `write` saves, by which --out recognises a previous one


def _policies(text: str) -> list[str]:
    names = text.split(",")
    unknown = [p for p in names if p not in POLICIES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown policies {unknown}; expected some of {', '.join(POLICIES)}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experts", type=positive_int, default=64)
    parser.add_argument("--hidden", type=positive_int, default=256)
    parser.add_argument("--ffn", type=positive_int, default=1024)
    parser.add_argument("--topk", type=positive_int, default=2)
    parser.add_argument("--activation", choices=("gelu", "swiglu"), default="gelu")
    parser.add_argument("--tokens", type=positive_int, default=4096, help="tokens per rank")
    parser.add_argument("--capacity-fraction", type=float, default=0.4, help="static: slots per expert / tokens")
    parser.add_argument("--ds-capacity-factor", type=float, default=1.0)
    parser.add_argument(
        "--ds-no-drop",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="DeepSpeed drop_tokens=False (pad to the largest count; the default)",
    )
    parser.add_argument("--policies", type=_policies, default=list(POLICIES))
    parser.add_argument("--repeats", type=positive_int, default=5, help="interleaved rounds; the median is the figure")
    parser.add_argument("--slow-repeats", type=positive_int, default=5, help="timed calls of static (seconds each)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--caches",
        choices=("cold", "warm"),
        default="cold",
        help="cold (default): the last-level cache evicted before each timed call, as a layer of a model finds it; "
        "warm: whatever the previous call left (moe_infer.bench.caches)",
    )
    parser.add_argument(
        "--threads", type=positive_int, help="torch threads per rank (default: the machine's cores over the ranks)"
    )
    parser.add_argument("--run-dir", type=Path, help="track the run here (W&B offline + metrics.jsonl)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed's launcher


def main(args: argparse.Namespace) -> int:
    with launched(quiet=False) as command:
        # --out replaces only a previous layer-bench result; on every rank, before any collective
        check_result_paths(args.out, args.run_dir, "layer-bench result", RESULT_KEYS)
        platform = detect_platform()
        set_threads_per_rank(args.threads)
        tune_host_malloc()
        info = init_distributed(platform, use_deepspeed=True)
        device = torch.device("cuda", torch.cuda.current_device()) if platform.cuda else torch.device("cpu")
        if args.experts % info.world_size:
            raise PipelineError(
                f"layer bench: {args.experts} experts cannot be split evenly over {info.world_size} ranks"
            )
        command.checked()
        results = run(args, device, info.world_size, info.rank)
        write(results, info.world_size, args, command)
    return command.status


def write(results: list[Result], ranks: int, args: argparse.Namespace, command) -> None:
    """The table; --out, the JSON; --run-dir, one W&B run (offline by default): a row per implementation, the table,
    the ratios as summary."""
    settings = {k: str(v) for k, v in vars(args).items() if k != "local_rank"}
    columns = ["implementation", "ms", "ms_min", "ms_max", "tokens_per_s", "x_dynamic", *PHASES, "exchange_ms"]
    columns += ["activation_mb", "sent_mb", "dropped", "diff_vs_reference"]
    base = next((r.ms for r in results if r.name == "dynamic"), None)
    name = f"layer-bench-ep{ranks}"
    is_main = command.rank == 0
    with Results(name, {"ranks": ranks, **settings}, args.run_dir, "bench", args.out, is_main=is_main) as out:
        rows = []
        for step, r in enumerate(results):
            ratio = r.ms / base if base else None
            row = [r.name, r.ms, r.ms_min, r.ms_max, r.tokens_per_s, ratio, *(r.phases_ms.get(p) for p in PHASES)]
            exchange = r.exchange_ms if r.name in EXCHANGE_TIMED else None
            rows.append(row + [exchange, r.activation_mb, r.sent_mb, r.dropped_fraction, r.max_diff_vs_reference])
            out.row({f"{r.name}/ms": r.ms, f"{r.name}/tokens_per_s": r.tokens_per_s}, step=step)
        out.table("layer_bench", columns, rows, **{f"{r.name}_x_dynamic": r.ms / base for r in results if base})
        out.save({"ranks": ranks, "args": settings, "results": [asdict(r) for r in results]})
        out.print(format_table(results, ranks, args.caches), command.out)
