"""`python -m moe_infer.bench shift`: expert placement under a workload that shifts. The requests of --input (phase 1),
then those of --shift-to (phase 2), served by three variants, each from a fresh engine every round:

    contiguous   rank r holds experts r*E/R ... (r+1)*E/R - 1, always
    offline      greedy (the paper's), fitted on the group's phase-1 expert loads (recorded by a first, untimed
                 contiguous pass), then fixed: fitted on history that stops matching at the shift
    online       contiguous at the start, re-balanced while serving (--rebalance-interval / -window / -algorithm,
                 default every 8 steps from the last 32 calls)

    torchrun --nproc-per-node 2 -m moe_infer.bench shift --export exports/lm-tiny --input shakespeare.txt \\
        --shift-to bible.txt --max-new-tokens 24 --repeats 5

Every variant's outputs must equal contiguous's token for token (a placement only moves experts). Per variant:
balancedness over time, per window of --report-window MoE calls (mean / max of the rank loads summed over the window
under the placement in force at each call; 1 is even; the mean over the MoE layers), and its means before and after
the shift; output tokens/s per phase, the median of --repeats interleaved rounds with its min-max; the online
variant's re-fits, moves, bytes moved and seconds spent moving. Output: a table, --out (JSON) and beside it a .png
(balancedness over time, the shift marked), and a W&B run in --run-dir (defaults: runs/bench-shift-<export>.json,
runs/bench-shift-<export>/).
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from moe_infer.bench.results import Results, check_result_paths
from moe_infer.collectives import all_reduce, barrier, clock
from moe_infer.placement import Placement
from moe_infer.placement.algorithms import greedy
from moe_infer.placement.metrics import rank_loads
from moe_infer.placement.online import RebalanceOptions
from moe_infer.runtime.engine import Engine
from moe_infer.runtime.rebalance import Rebalancer
from moe_infer.serve.cli import Job, prepare
from moe_infer.serve.flags import (
    add_engine_arguments,
    add_request_arguments,
    engine_options,
    flag_record,
    positive_int,
)
from moe_infer.serve.process import launched, progress
from moe_infer.serve.requests import check_requests, encode_requests, read_requests
from pipeline.errors import PipelineError

VARIANTS = ("contiguous", "offline", "online")
RESULT_KEYS = ("rows", "variants", "report_window", "settings", "ranks")  # --out's, by which a previous one is known
DEFAULT_ONLINE = RebalanceOptions(interval=8, window=32)


class CallLog:
    """Records every MoE call's expert counts per layer (this rank's tokens), and, as a step hook, the placement in
    force from each call on: [(first call, rank lists)] per layer."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.counts: dict[str, list[torch.Tensor]] = {layer.name: [] for layer in engine.moe_layers}
        self.placements = {name: [(0, self._lists(name))] for name in self.counts}
        for layer in engine.moe_layers:
            layer.count_observers.append(self.counts[layer.name].append)

    def _lists(self, name: str) -> list[list[int]]:
        p = self.engine.placements[name]
        return [p.local_experts(r) for r in range(p.ranks)]

    def calls(self) -> dict[str, int]:
        return {name: len(c) for name, c in self.counts.items()}

    def after_step(self, step: int, worked: bool) -> None:
        for name, timeline in self.placements.items():
            now = self._lists(name)
            if now != timeline[-1][1]:
                timeline.append((len(self.counts[name]), now))

    def group_counts(self) -> dict[str, np.ndarray]:
        """Every layer's per-call counts summed over the ranks (a collective): int64 [calls, E]."""
        out = {}
        for name, calls in self.counts.items():
            local_CE = torch.stack(calls).to(self.engine.device)
            if self.engine.world_size > 1:
                torch.distributed.all_reduce(local_CE)
            out[name] = local_CE.cpu().numpy()
        return out


def balancedness_over_time(counts_CE: np.ndarray, timeline: list, window: int) -> list[float]:
    """Per window of `window` calls: mean / max of the rank loads summed over it, each call under the placement in
    force then."""
    loads_CD = np.zeros((counts_CE.shape[0], len(timeline[0][1])))
    for i, (first, lists) in enumerate(timeline):
        last = timeline[i + 1][0] if i + 1 < len(timeline) else counts_CE.shape[0]
        loads_CD[first:last] = rank_loads(counts_CE[first:last], lists)
    out = []
    for start in range(0, counts_CE.shape[0] - window + 1, window):
        loads_D = loads_CD[start : start + window].sum(axis=0)
        out.append(float(loads_D.mean() / loads_D.max()) if loads_D.max() > 0 else 1.0)
    return out


def _serve_phases(engine: Engine, job: Job, phases: list[list[list[int]]], log: CallLog):
    """(seconds per phase, the slowest rank's; outputs per phase; calls per layer at the shift)."""
    seconds, outputs, shift = [], [], None
    for i, requests in enumerate(phases):
        barrier(engine.device)
        start = clock(engine.device)
        outputs.append(engine.serve(requests, job.settings))
        (elapsed,) = all_reduce([clock(engine.device) - start], "max", device=engine.device)
        seconds.append(elapsed)
        if i == 0:
            shift = log.calls()
    return seconds, outputs, shift


def _start(job: Job, variant: str, fitted: dict | None) -> tuple[Engine, CallLog, Rebalancer | None]:
    options = replace(engine_options(job.args, job.args.policy, None), rebalance=None)
    if variant == "offline":
        options = replace(options, placement=fitted)
    if variant == "online":
        options = replace(options, rebalance=engine_options(job.args, job.args.policy).rebalance or DEFAULT_ONLINE)
    engine = Engine.start(job.export.path, options)
    log, rebalancer = CallLog(engine), None
    if variant == "online":
        rebalancer = Rebalancer(engine)
        engine.sync.hooks.append(rebalancer)
    engine.sync.hooks.append(log)
    return engine, log, rebalancer


def fit_offline(job: Job, phase1: list[list[int]]) -> dict[str, Placement]:
    """Greedy per layer on the group's phase-1 loads, served once with contiguous placement (untimed)."""
    engine, log, _ = _start(job, "contiguous", None)
    engine.serve(phase1, job.settings)
    ranks = engine.world_size
    return {
        name: Placement.from_rank_lists(greedy(counts_CE.mean(axis=0), ranks), counts_CE.shape[1])
        for name, counts_CE in log.group_counts().items()
    }


def run(job: Job, phases: list[list[list[int]]], out: IO[str]) -> None:
    args = job.args
    fitted = fit_offline(job, phases[0])
    per_variant: dict[str, dict[str, Any]] = {v: {"seconds": [], "tokens": None} for v in VARIANTS}
    reference = None
    for round_ in range(args.repeats):
        for variant in VARIANTS[round_ % 3 :] + VARIANTS[: round_ % 3]:
            engine, log, rebalancer = _start(job, variant, fitted)
            seconds, outputs, shift = _serve_phases(engine, job, phases, log)
            reference = outputs if reference is None else reference
            if outputs != reference:
                raise PipelineError(f"bench shift: the {variant} placement changed the outputs")
            record = per_variant[variant]
            record["seconds"].append(seconds)
            record["tokens"] = [sum(map(len, o)) for o in outputs]
            counts = log.group_counts()
            if "balancedness" not in record:  # the same every round: the loads do not depend on the timing
                record["balancedness"] = _over_time(counts, log.placements, shift, args.report_window)
                record["shift_window"] = min(shift.values()) // args.report_window
                if rebalancer is not None:
                    record["rebalancing"] = rebalancer.figures()
            progress(args.quiet, job.rank, f"shift: round {round_ + 1} {variant}: {[f'{s:.2f}' for s in seconds]} s")
    if job.rank == 0:
        report(job, per_variant, out)


def _over_time(counts: dict[str, np.ndarray], timelines: dict, shift: dict[str, int], window: int) -> dict:
    per_layer = {name: balancedness_over_time(c, timelines[name], window) for name, c in counts.items()}
    windows = min(len(v) for v in per_layer.values())
    mean = [float(np.mean([v[i] for v in per_layer.values()])) for i in range(windows)]
    return {"per_layer": per_layer, "mean": mean, "shift_calls": shift}


def summary_rows(per_variant: dict) -> list[dict[str, Any]]:
    """One row per variant: mean balancedness before and after the shift (the window across it in neither),
    tokens/s per phase (median and min-max over the rounds), the online variant's re-fits, moves, bytes and seconds."""
    rows = []
    for variant, r in per_variant.items():
        mean, cut = r["balancedness"]["mean"], r["shift_window"]
        row = {"variant": variant, "before": _avg(mean[:cut]), "after": _avg(mean[cut + 1 :])}
        for phase in (0, 1):
            rates = [r["tokens"][phase] / s[phase] for s in r["seconds"]]
            row[f"phase{phase + 1}_tok_s"] = statistics.median(rates)
            row[f"phase{phase + 1}_tok_s_range"] = [min(rates), max(rates)]
        fig = r.get("rebalancing", {})
        row["refits"] = fig.get("refits", 0)
        row["moves"] = sum(x["moves"] for x in fig.get("layers", {}).values())
        row["bytes_moved"] = sum(x["bytes_moved"] for x in fig.get("layers", {}).values())
        row["move_seconds"] = fig.get("move_seconds", 0.0)
        rows.append(row)
    return rows


def report(job: Job, per_variant: dict, out: IO[str]) -> None:
    args = job.args
    rows = summary_rows(per_variant)
    json_path, run_dir = result_paths(args, job.export.path.name)
    columns = list(rows[0])
    name = f"bench-shift-{job.export.path.name}"
    with Results(name, flag_record(args), run_dir, "bench-shift", json_path=json_path) as results:
        results.save({"rows": rows, "variants": per_variant, "report_window": args.report_window,
                      "settings": flag_record(args), "ranks": job.world})  # fmt: skip
        results.table("shift", columns, [[str(row[c]) for c in columns] for row in rows])
        plot(per_variant, args.report_window, json_path.with_suffix(".png"))
        results.print(_table(rows), out)


def result_paths(args: argparse.Namespace, export_name: str) -> tuple[Path, Path]:
    """(--out, its plot beside it as .png; --run-dir), by default runs/bench-shift-<export>.json and ...-<export>/."""
    return Path(args.out or f"runs/bench-shift-{export_name}.json"), Path(
        args.run_dir or f"runs/bench-shift-{export_name}"
    )


def _avg(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def _table(rows: list[dict]) -> str:
    head = f"{'variant':<11} {'bal. before':>11} {'bal. after':>10} {'phase 1 tok/s (min-max)':>26} "
    head += f"{'phase 2 tok/s (min-max)':>26} {'moves':>6} {'MB moved':>9} {'move s':>7}"
    lines = [head]
    for r in rows:
        spans = [
            f"{r[f'phase{p}_tok_s']:.1f} ({r[f'phase{p}_tok_s_range'][0]:.1f}-{r[f'phase{p}_tok_s_range'][1]:.1f})"
            for p in (1, 2)
        ]
        lines.append(
            f"{r['variant']:<11} {r['before']:>11.3f} {r['after']:>10.3f} {spans[0]:>26} {spans[1]:>26} "
            f"{r['moves']:>6} {r['bytes_moved'] / 1e6:>9.2f} {r['move_seconds']:>7.2f}"
        )
    return "\n".join(lines)


def plot(per_variant: dict, window: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for variant, r in per_variant.items():
        mean = r["balancedness"]["mean"]
        ax.plot([(i + 1) * window for i in range(len(mean))], mean, marker=".", label=variant)
    shift = min(next(iter(per_variant.values()))["balancedness"]["shift_calls"].values())
    ax.axvline(shift, color="grey", linestyle="--", label="shift")
    ax.set_xlabel(f"MoE calls (windows of {window})")
    ax.set_ylabel("balancedness (mean / max rank load)")
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    add_request_arguments(parser)
    shift = parser.add_argument_group("the shift")
    shift.add_argument("--shift-to", required=True, help="phase 2: one prompt per line, served after --input's")
    shift.add_argument("--repeats", type=positive_int, default=5, help="interleaved rounds (default 5)")
    shift.add_argument("--report-window", type=positive_int, default=32, help="MoE calls per balancedness window")
    shift.add_argument("--out", help="the result JSON (default runs/bench-shift-<export>.json; its plot beside it)")


def main(args: argparse.Namespace) -> int:
    json_path, run_dir = result_paths(args, Path(args.export).name)
    inputs = {"--input": Path(args.input), "--shift-to": Path(args.shift_to), "--export": Path(args.export)}
    with launched(args.quiet) as command:
        check_result_paths(json_path, run_dir, "shift-bench result", RESULT_KEYS, inputs)
        job = prepare(args, command.rank, command.world)
        lines = read_requests(args.shift_to, command.rank, command.world)
        phase2 = encode_requests(job.tokenizer, lines, job.mode)
        check_requests(phase2, job.export.model_config, job.mode, job.settings, args.shift_to)
        command.checked()
        run(job, [job.requests, phase2], command.out)
    return command.status
