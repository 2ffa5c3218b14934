"""transformers as a baseline of the model sweep: `--policies ...,transformers` (moe_infer.bench.model).

    python -m moe_infer.bench model --export exports/lm-qwen3-tiny --policies transformers --max-batch 8
    python launch/infer.py --export exports/lm-qwen3-tiny --mode bench --policies dynamic,transformers

The export's own weights go into transformers' Qwen3MoeForCausalLM as `make export-hf` writes them
(moe_infer.hf_layout: written to a temporary directory and loaded with from_pretrained, in fp32), once per experts
implementation transformers offers on this machine: each registered one (eager, grouped_mm, batched_mm, ... in
transformers 5.24) that loads, runs and gives our engine's logits (within 1e-4 relative) is timed; the others are
named with the reason. Our engine (the dynamic policy) runs in the same process, on the same synthetic prompts as the
rest of the sweep (moe_infer.bench.model_measure's, seeded the same way).

For each batch size B, --hf-repeats rounds, each timing every variant once in turn (interleaved: a noisy neighbour
slows them alike): B prompts of --prompt-len tokens prefilled (transformers: one forward with a DynamicCache and
`logits_to_keep=1`, as its `generate` does; ours: one forward, logits at every position), then --decode-steps greedy
steps of one token with the cache. The rows the sweep records per variant are the medians; the min-max spread of
prefill and decode tokens/s over the rounds goes to bench.json ("transformers") and the comparison table.

One process only (transformers has no expert parallelism here): the sweep refuses `transformers` under a launcher
with more than one rank, or for an export with no Qwen3-MoE equivalent, before anything starts. transformers is
imported only when this baseline is asked for (the `hf` extra: pip install -e '.[hf]').
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moe_infer import export_format as fmt
from moe_infer import hf_layout
from moe_infer.bench.model_measure import Row
from moe_infer.bench.model_measure import _synthetic as synthetic_prompts  # the sweep's own prompts, seeded alike
from moe_infer.collectives import clock
from moe_infer.model.loader import Export, read_expert
from moe_infer.runtime.engine import Engine
from moe_infer.serve.flags import engine_options
from pipeline.errors import ConfigError

POLICY = "transformers"
OURS = "moe_infer[dynamic]"
PARITY_LIMIT = 1e-4


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--hf-repeats", type=int, default=5, help="transformers baseline: interleaved rounds per batch size (median)"
    )


def check(args: argparse.Namespace, export: Export, world: int) -> None:
    """Refuse the baseline before anything starts (every rank alike): one process, a Qwen3-MoE-shaped export, the
    `hf` extra installed."""
    if POLICY not in args.policies:
        return
    where = f"--policies {POLICY}"
    if world > 1:
        raise ConfigError(where, f"runs in one process (transformers has no expert parallelism), not {world} ranks")
    problems = hf_layout.mismatches(export.config)
    if problems:
        raise ConfigError(where, f"{export.path} has no Qwen3-MoE equivalent: {'; '.join(problems)}")
    if args.hf_repeats < 1:
        raise ConfigError("--hf-repeats", f"must be at least 1, got {args.hf_repeats}")
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ConfigError(where, "needs transformers: pip install -e '.[hf]' (make setup installs it)") from None


# ---- the models ---------------------------------------------------------------------------------------------------


def _implementations() -> list[str]:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return ["eager", *ALL_EXPERTS_FUNCTIONS.keys()]


def load_variants(export: Export, reference: Callable[[torch.Tensor], torch.Tensor], device: torch.device):
    """{name: transformers model} for every experts implementation that runs here with our logits, and
    {name: why not} for the others."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # no "Loading weights" bars in the benchmark's output
    probe_BS = torch.arange(4, 4 + 16, device=device).remainder(export.model_config.vocab_size).view(2, 8)
    expected = reference(probe_BS).float()
    models, unavailable = {}, {}
    with tempfile.TemporaryDirectory(prefix="hf-baseline-") as tmp:
        dense = export.read_tensors("dense.safetensors")
        experts = ((key, read_expert(export, *key)) for key in fmt.expert_keys(export.config))
        hf_layout.write_weights(Path(tmp), export.config, dense, experts)
        for implementation in _implementations():
            name = f"{POLICY}[{implementation}]"
            try:
                model = AutoModelForCausalLM.from_pretrained(
                    tmp, dtype=torch.float32, experts_implementation=implementation
                ).to(device)
                with torch.inference_mode():
                    got = model(input_ids=probe_BS).logits.float()
            except Exception as err:  # a kernel this machine lacks (CUDA-only, a missing package): named, skipped
                unavailable[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
                continue
            difference = float((got - expected).abs().max() / expected.abs().max())
            if difference > PARITY_LIMIT:
                unavailable[name] = f"logits differ from ours by {difference:.1e} relative"
                continue
            models[name] = model.eval()
    return models, unavailable


# ---- one timed run: prefill, then greedy decode steps --------------------------------------------------------------


def _run_ours(engine, tokens_BS: torch.Tensor, decode_steps: int) -> tuple[float, float]:
    model, device = engine.model, engine.device
    start = clock(device)
    cache = model.new_cache()
    next_B = model(tokens_BS, cache)[:, -1].argmax(dim=-1)
    prefill_s = clock(device) - start
    start = clock(device)
    for _ in range(decode_steps):
        next_B = model(next_B[:, None], cache)[:, -1].argmax(dim=-1)
    return prefill_s, clock(device) - start


def _run_transformers(model, tokens_BS: torch.Tensor, decode_steps: int) -> tuple[float, float]:
    from transformers import DynamicCache

    device = tokens_BS.device
    start = clock(device)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=tokens_BS, cache=cache, use_cache=True, logits_to_keep=1)
    next_B = out.logits[:, -1].argmax(dim=-1)
    prefill_s = clock(device) - start
    start = clock(device)
    for _ in range(decode_steps):
        next_B = model(input_ids=next_B[:, None], cache=cache, use_cache=True).logits[:, -1].argmax(dim=-1)
    return prefill_s, clock(device) - start


# ---- the comparison ---------------------------------------------------------------------------------------------


@dataclass
class Spread:
    """tokens/s of one variant at one batch size over the rounds."""

    prefill_tok_s: list[float] = field(default_factory=list)
    decode_tok_s: list[float] = field(default_factory=list)
    prefill_ms: list[float] = field(default_factory=list)
    decode_ms_per_step: list[float] = field(default_factory=list)

    def add(self, batch: int, prompt_len: int, decode_steps: int, prefill_s: float, decode_s: float) -> None:
        self.prefill_tok_s.append(batch * prompt_len / prefill_s)
        self.decode_tok_s.append(batch * decode_steps / decode_s)
        self.prefill_ms.append(prefill_s * 1e3)
        self.decode_ms_per_step.append(decode_s / decode_steps * 1e3)

    def summary(self) -> dict[str, Any]:
        return {
            key: {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}
            for key, values in vars(self).items()
        }


def sweep(args, export: Export, placements, batch_sizes: list[int], on_row) -> dict[str, Any]:
    """Our engine (the dynamic policy, this one process) and every transformers variant, interleaved over
    --hf-repeats rounds per batch size; a median Row per variant and batch size to `on_row`. Returns the figures
    for bench.json."""
    engine = Engine.start(export.path, engine_options(args, "dynamic", placements))
    try:
        return _compare(args, export, engine, batch_sizes, on_row)
    finally:
        engine.model = None


@torch.inference_mode()
def _compare(args, export: Export, engine, batch_sizes: list[int], on_row) -> dict[str, Any]:
    models, unavailable = load_variants(export, lambda t: engine.model(t), engine.device)
    runners = {OURS: lambda t: _run_ours(engine, t, args.decode_steps)}
    runners |= {name: (lambda t, m=m: _run_transformers(m, t, args.decode_steps)) for name, m in models.items()}
    warm = synthetic_prompts(engine, 1, args.prompt_len, args.seed)
    for run in runners.values():  # lazy initialisation, allocator and thread pools warmed once
        run(warm)
    results: dict[str, dict[int, dict[str, Any]]] = {name: {} for name in runners}
    for batch in batch_sizes:
        tokens_BS = synthetic_prompts(engine, batch, args.prompt_len, args.seed)
        spreads = {name: Spread() for name in runners}
        for _ in range(args.hf_repeats):
            for name, run in runners.items():
                spreads[name].add(batch, args.prompt_len, args.decode_steps, *run(tokens_BS))
        for name, spread in spreads.items():
            summary = spread.summary()
            results[name][batch] = summary
            on_row(_median_row(name, batch, summary))
    return {
        "repeats": args.hf_repeats,
        "interleaved": True,
        "variants": list(runners),
        "unavailable": unavailable,
        "transformers_prefill": "one forward, DynamicCache, logits_to_keep=1 (as generate)",
        "figures": {name: {str(b): s for b, s in per.items()} for name, per in results.items()},
    }


def _median_row(name: str, batch: int, summary: dict[str, Any]) -> Row:
    median = {key: value["median"] for key, value in summary.items()}
    return Row(
        policy=name,
        batch_per_rank=batch,
        prefill_ms=median["prefill_ms"],
        prefill_tok_s=median["prefill_tok_s"],
        decode_ms_per_step=median["decode_ms_per_step"],
        decode_tok_s=median["decode_tok_s"],
        peak_mem_mb=0.0,  # one process holds every variant: memory is not compared here
        moe_act_mb=0.0,
        dropped_prefill=0.0,
        dropped_decode=0.0,
    )


def format_comparison(figures: dict[str, Any]) -> str:
    """The table: tokens/s median [min-max] per variant and batch size, each against ours."""
    lines = [
        f"{OURS} vs transformers, one process, median [min-max] of {figures['repeats']} interleaved rounds "
        "(tokens/s; x = variant / ours, medians)"
    ]
    ours = figures["figures"][OURS]
    lines.append(f"{'variant':<28}{'B':>4}  {'prefill tok/s':>30}  {'decode tok/s':>30}")
    for name, per_batch in figures["figures"].items():
        for batch, s in per_batch.items():
            cells = []
            for key in ("prefill_tok_s", "decode_tok_s"):
                v = s[key]
                ratio = v["median"] / ours[batch][key]["median"]
                cells.append(f"{v['median']:>9.0f} [{v['min']:.0f}-{v['max']:.0f}] x{ratio:.2f}")
            lines.append(f"{name:<28}{batch:>4}  {cells[0]:>30}  {cells[1]:>30}")
    for name, why in figures["unavailable"].items():
        lines.append(f"{name}: not timed ({why})")
    return "\n".join(lines)
