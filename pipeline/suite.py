"""The paper's experiments as one suite (`make bench`): each experiment is one or more commands of the project's own
tools, run one after another, each writing its figures (JSON + an offline W&B run) under --out for `make report`.

    python -m pipeline.suite [--lm exports/lm-tiny-e64] [--mt exports/mt-tiny-e128] [--out runs/bench] [--quick]

The models are the paper-shaped ones by default: configs/lm-tiny-e64 (the paper LM's waste factor E*C/k = 12.8) and
configs/mt-tiny-e128 (the paper MT's 64), trained and converted by `make bench` when missing.

It lives in pipeline/, not with the benchmarks (moe_infer.bench): its held-out inputs come from the training data
stage (pipeline.config, pipeline.data), which moe_infer does not import; the benchmarks run as commands.

    layer        python -m moe_infer.bench layer at EP=1 and EP=N: every MoE implementation on one paper-shaped layer
                 (untrained weights at the paper LM's waste factor), the FLOP-equivalent dense FFN, the floors; and
                 at EP=1 at the trained models' dims (D=128, F=256, 1024 tokens: the expert kernel's small groups)
    policies-*   launch/infer.py --mode bench: throughput vs batch size per gating policy (LM: prefill + decode;
                 MT: encoder + decoder), peak memory, until --max-batch or out of memory; and the model with every
                 MoE layer replaced by its FLOP-equivalent dense FFN (MoE vs dense)
    traces-*     the trained models serving held-out text with --record-trace: the expert-load histories below
    replay-*     python -m moe_infer.bench replay: miss rate vs cache size per eviction policy, Belady's MIN; the MT
                 trace also at the paper MT's 16 experts per GPU (for the report's GPU projection)
    buffering-mt launch/infer.py --mode bench-serving: MT translation with K device slots vs every expert resident
    placement-lm python -m moe_infer.placement evaluate (Max Load, Avg Max Load per algorithm and D), then
                 bench-serving of the fitted placements against contiguous on held-out prompts
    transformers-lm  launch/infer.py --mode bench --policies transformers on the Qwen3-shaped LM (--hf-lm): our
                 engine against transformers' Qwen3MoeForCausalLM, each experts implementation, one process,
                 interleaved rounds (moe_infer.bench.hf_baseline)
    serving-*    python -m moe_infer.bench live: the HTTP server under the same live traffic of held-out prompts at
                 three offered loads (LM: dynamic vs static gating, expert buffering at half the local experts vs
                 all resident, greedy placement vs contiguous, the baseline twice as the noise control), and the
                 server at saturation against the batch CLI on the same prompts (LM and MT)
    *shift-lm    placement when the traffic shifts (plays, then Bible verses): pipeline.suite_shift

An experiment whose model is missing (no export) is skipped and says so; a command that fails is recorded and the
suite goes on. Progress: one line per command with the elapsed time and an estimate of what is left. The record of
what ran (commands, seconds, exit status) is written to <out>/suite.json, atomically after every command.

--out must be new, empty, or a previous suite's output (it holds that suite's record, suite.json): a second suite
adds to it, each command replacing its own results there (the suite passes --force to the commands that need it);
any other directory, and one that is, lies inside or contains an export the suite reads, is refused before anything
runs (pipeline.outputs.check_output).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from pipeline.atomic import write_atomic
from pipeline.errors import PipelineError
from pipeline.outputs import check_output
from pipeline.suite_shift import plan_shift

REPO = Path(__file__).resolve().parents[1]
SUITE_FILE = "suite.json"
PROMPT_WORDS = 24  # words per LM prompt cut from held-out scenes
PAPER_EXPERTS_PER_GPU = 16  # the paper MT: 128 experts on 8 GPUs (the GPU projection replays at this many)
MAX_SOURCE_WORDS = 36  # MT sources longer than this may not fit mt-tiny's 64 learned positions


@dataclass
class Step:
    experiment: str
    command: list[str]
    seconds: float = 0.0
    status: str = "pending"  # pending, ok, failed (exit N), skipped (why)


@dataclass
class Suite:
    out: Path
    steps: list[Step] = field(default_factory=list)

    def add(self, experiment: str, *command: str | Path) -> None:
        self.steps.append(Step(experiment, [str(c) for c in command]))

    def skip(self, experiment: str, why: str) -> None:
        self.steps.append(Step(experiment, [], status=f"skipped ({why})"))

    def save(self) -> None:
        write_atomic(self.out / SUITE_FILE, json.dumps({"steps": [asdict(s) for s in self.steps]}, indent=1) + "\n")

    def run(self) -> int:
        todo = [s for s in self.steps if s.status == "pending"]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": str(REPO)}
        start, failed = time.perf_counter(), 0
        for i, step in enumerate(todo, 1):
            elapsed = time.perf_counter() - start
            eta = f", ~{elapsed / (i - 1) * (len(todo) - i + 1) / 60:.0f} min left" if i > 1 else ""
            print(f"[suite {i}/{len(todo)} {elapsed / 60:.1f} min{eta}] {step.experiment}: {' '.join(step.command)}")
            sys.stdout.flush()
            begin = time.perf_counter()
            code = subprocess.run(step.command, cwd=REPO, env=env).returncode
            step.seconds = time.perf_counter() - begin
            step.status = "ok" if code == 0 else f"failed (exit {code})"
            failed += code != 0
            self.save()
        for step in self.steps:
            if step.status.startswith("skipped"):
                print(f"[suite] {step.experiment}: {step.status}")
        print(
            f"[suite] {len(todo) - failed} of {len(todo)} commands ok in {(time.perf_counter() - start) / 60:.1f} "
            f"min; record in {self.out / SUITE_FILE}"
        )
        return 1 if failed else 0


def describe_suite_output(out: Path) -> str | None:
    """'the output of an earlier suite (N commands)' when `out` holds a suite's record (SUITE_FILE), else None."""
    try:
        steps = json.loads((out / SUITE_FILE).read_text(encoding="utf-8"))["steps"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    fields = {"experiment", "command", "status"}
    if not isinstance(steps, list) or not all(isinstance(s, dict) and fields <= set(s) for s in steps):
        return None
    return f"the output of an earlier suite ({len(steps)} commands)"


def held_out_inputs(out: Path, quick: bool) -> tuple[Path, Path, Path]:
    """Prompts (LM: PROMPT_WORDS-word windows of held-out scenes) and sources (MT: held-out verses that fit the model)
    from the bundled corpora's valid and test splits, written under out/inputs/: (prompts to record the load history
    from, other prompts to serve the placements fitted on it, sources)."""
    from pipeline.config import load_config
    from pipeline.data.prepare import prepare_corpus

    def rows(config: str) -> list[dict]:
        # The bundled fixture's held-out splits: no download, and (splits being a hash of the document) they are
        # held out of the full corpus mt-tiny trains on too.
        directory = prepare_corpus(replace(load_config(config).data, size="fixture"))
        lines = []
        for split in ("valid", "test"):
            lines += (directory / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    prompts = []
    for row in rows("lm-tiny"):  # consecutive PROMPT_WORDS-word windows of each held-out scene
        words = row["text"].split()
        prompts += [" ".join(words[i : i + PROMPT_WORDS]) for i in range(0, len(words), PROMPT_WORDS)]
    sources = [r["src"].replace("\n", " ") for r in rows("mt-tiny") if len(r["src"].split()) <= MAX_SOURCE_WORDS]
    half = min(32 if quick else 96, len(prompts) // 2)
    sources = sources[: 32 if quick else 96]
    paths = [out / "inputs" / name for name in ("lm-prompts-fit.txt", "lm-prompts-serve.txt", "mt-sources.txt")]
    for path, lines in zip(paths, (prompts[:half], prompts[half : 2 * half], sources), strict=True):
        write_atomic(path, "\n".join(lines) + "\n")
    return paths[0], paths[1], paths[2]


def plan(args: argparse.Namespace) -> Suite:
    out, nproc, quick = args.out, args.nproc, args.quick
    suite = Suite(out)
    py = sys.executable
    torchrun = [py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    infer = [*torchrun, "launch/infer.py", "--quiet"]
    repeats = ["--repeats", "5"]  # every timed figure: the median of 5 interleaved repeats
    lm_prompts, lm_serve, mt_sources = held_out_inputs(out, quick)

    # Quick: half the tokens per rank (the waste factor, and so the ratios' direction, is the same; static's padded
    # buffers shrink 4x, so its seconds-long calls do too). Every figure is the median of 5 interleaved repeats.
    layer = ["--slow-repeats", "5"] + (["--tokens", "2048"] if quick else [])
    bench_layer = [py, "-m", "moe_infer.bench", "layer", *layer]
    suite.add("layer", *bench_layer, "--out", out / "layer-ep1.json", "--run-dir", out / "layer-ep1")
    suite.add(
        "layer",
        *torchrun,
        *bench_layer[1:],
        "--out",
        out / f"layer-ep{nproc}.json",
        "--run-dir",
        out / f"layer-ep{nproc}",
    )
    if not quick:  # the trained models' dims with 64 experts: ~32 rows per expert, where the kernel choice matters
        small = ["--hidden", "128", "--ffn", "256", "--tokens", "1024", "--policies", "dynamic,megatron,deepspeed"]
        suite.add("layer", *bench_layer, *small, "--out", out / "layer-ep1-d128.json", "--run-dir", out / "layer-d128")

    max_batch = "8" if quick else "32"
    for name, export, inputs in (("lm", args.lm, lm_prompts), ("mt", args.mt, mt_sources)):
        if not (export / "config.json").is_file():
            suite.skip(f"policies-{name}", f"no export at {export}: make train convert MODEL={export.name}")
            continue
        suite.add(
            f"policies-{name}",
            *infer,
            "--export",
            export,
            "--mode",
            "bench",
            "--policies",
            "dynamic,static,deepspeed,megatron,dense-equivalent",
            "--no-ds-drop-tokens",  # DeepSpeed without drops: the same outputs as dynamic
            "--max-batch",
            max_batch,
            "--prompt-len",
            "32",
            "--decode-steps",
            "8",
            "--repeats",
            "5",
            "--run-dir",
            out / f"policies-{name}",
        )
        trace = out / "traces" / f"{name}.npz"
        serve = ["--max-new-tokens", "24"] if name == "lm" else ["--max-len", "48"]
        suite.add(
            f"traces-{name}",
            *infer,
            "--export",
            export,
            "--input",
            inputs,
            *serve,
            "--batch-size",
            "8",
            "--record-trace",
            trace,
            "--record-calls",
            "100000",
            "--output",
            out / "traces" / f"{name}-out.txt",
            "--force",  # a previous suite's trace and outputs, in the suite's own directory
        )
        suite.add(
            f"replay-{name}",
            py,
            "-m",
            "moe_infer.bench",
            "replay",
            "--trace",
            trace,
            "--ranks",
            nproc,
            "--run-dir",
            out / f"replay-{name}",
        )
        experts = json.loads((export / "config.json").read_text(encoding="utf-8")).get("moe", {}).get("num_experts", 0)
        if name == "mt" and experts % PAPER_EXPERTS_PER_GPU == 0 and experts > PAPER_EXPERTS_PER_GPU:
            ranks = str(experts // PAPER_EXPERTS_PER_GPU)
            replay = [py, "-m", "moe_infer.bench", "replay", "--trace", trace, "--ranks", ranks, "--policies", "paper"]
            suite.add("replay-mt", *replay, "--run-dir", out / f"replay-mt-ep{ranks}")
        if name == "mt":
            suite.add(
                "buffering-mt",
                *infer,
                "--export",
                export,
                "--mode",
                "bench-serving",
                "--input",
                inputs,
                "--max-len",
                "48",
                "--batch-size",
                "8",
                "--slots-sweep",
                "1,2,3",
                "--evictions",
                "paper,lru",
                *repeats,
                "--run-dir",
                out / "buffering-mt",
            )
        else:
            # "contiguous" is the baseline again, as a file: the control that shows the bench's noise.
            algorithms = ("contiguous", "greedy", "anti-correlation")
            # Beside the evaluation's run directory, not in it: that holds only its tracked files.
            placements = [out / "placements" / f"{a}.json" for a in algorithms]
            suite.add(
                "placement-lm",
                py,
                "-m",
                "moe_infer.placement",
                "evaluate",
                "--trace",
                trace,
                "--ranks",
                "2,4,8",
                "--run-dir",
                out / "placement-lm",
            )
            fit = [py, "-m", "moe_infer.placement", "fit", "--trace", trace, "--ranks", nproc]
            for algorithm, path in zip(algorithms, placements, strict=True):
                # --force: a previous suite's placement file (fit replaces nothing else)
                suite.add("placement-lm", *fit, "--algorithm", algorithm, "--out", path, "--force")
            suite.add(
                "placement-lm",
                *infer,
                "--export",
                export,
                "--mode",
                "bench-serving",
                "--input",
                lm_serve,
                "--max-new-tokens",
                "24",
                "--batch-size",
                "8",
                "--slots-sweep",
                "none",
                "--placements",
                ",".join(map(str, placements)),
                *repeats,
                "--run-dir",
                out / "placement-serving-lm",
            )
    serving_under_load(suite, args, lm_serve, mt_sources)
    plan_shift(suite, args, lm_serve, mt_sources)  # after placement-lm: it fits the greedy placement
    plan_transformers(suite, args)
    return suite


def serving_under_load(suite: Suite, args: argparse.Namespace, lm_prompts: Path, mt_sources: Path) -> None:
    """The HTTP server under live traffic (python -m moe_infer.bench live): the same arrival trace of held-out
    prompts at three offered loads to a server per engine variant (LM), and each model's server at saturation
    against its batch CLI. Quick (the demo): the LM baseline and its noise control, two rounds, fewer requests."""
    live = [sys.executable, "-m", "moe_infer.bench", "live", "--nproc", args.nproc, "--max-concurrency", "64"]
    live += ["--offline", "--batch-size", "32"]
    if args.quick:
        load, lm_rates = ["--num-prompts", "16", "--max-tokens", "16", "--repeats", "2"], "0.5x,inf"
    else:
        load, lm_rates = ["--num-prompts", "48", "--max-tokens", "24", "--repeats", "5"], "0.4x,0.8x,inf"
    for name, export, inputs in (("lm", args.lm, lm_prompts), ("mt", args.mt, mt_sources)):
        if not (export / "config.json").is_file():
            suite.skip(f"serving-{name}", f"no export at {export}: make train convert MODEL={export.name}")
            continue
        variants = []
        if name == "lm" and not args.quick:
            variants += ["--variant", "static=--policy static"]
            experts = json.loads((export / "config.json").read_text()).get("moe", {}).get("num_experts")
            if experts and experts // args.nproc >= 2:  # buffering: half the local experts on the device
                variants += ["--variant", f"buffering=--expert-slots {experts // args.nproc // 2}"]
            variants += ["--variant", f"greedy=--placement {args.out / 'placements' / 'greedy.json'}"]
        rates = ["--request-rates", "inf" if name == "mt" else lm_rates]  # MT: the saturation figure only
        outputs = ["--out", args.out / f"live-{name}.json", "--run-dir", args.out / f"live-{name}"]
        suite.add(f"serving-{name}", *live, "--export", export, "--input", inputs, *load, *rates, *variants, *outputs)


def plan_transformers(suite: Suite, args: argparse.Namespace) -> None:
    """transformers-lm: our engine and transformers on the same weights and prompts, in one process."""
    export, quick = args.hf_lm, args.quick
    if not (export / "config.json").is_file():
        suite.skip("transformers-lm", f"no export at {export}: make train convert MODEL={export.name}")
        return
    if importlib.util.find_spec("transformers") is None:
        suite.skip("transformers-lm", "transformers is not installed: pip install -e '.[hf]'")
        return
    command = [sys.executable, "launch/infer.py", "--quiet", "--export", export, "--mode", "bench"]
    command += ["--policies", "transformers", "--max-batch", "8" if quick else "32", "--prompt-len", "32"]
    command += ["--decode-steps", "8" if quick else "16", "--hf-repeats", "2" if quick else "5"]
    suite.add("transformers-lm", *command, "--run-dir", args.out / "transformers-lm")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.suite",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--lm", type=Path, default=REPO / "exports/lm-tiny-e64", help="the trained LM export (paper-shaped by default)"
    )
    parser.add_argument(
        "--mt", type=Path, default=REPO / "exports/mt-tiny-e128", help="the trained MT export (paper-shaped by default)"
    )
    parser.add_argument(
        "--hf-lm",
        type=Path,
        default=REPO / "exports/lm-qwen3-tiny-e64",
        help="the Qwen3-shaped LM export for the transformers baseline (the paper-shaped LM's dims by default)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "runs/bench", help="where every experiment writes")
    parser.add_argument("--nproc", type=int, default=2, help="ranks for the EP experiments (the EP degree)")
    parser.add_argument("--quick", action="store_true", help="fewer batch sizes, tokens and requests (the demo's)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    exports = {"--lm": args.lm, "--mt": args.mt, "--hf-lm": args.hf_lm}
    try:
        check_output(args.out, kind="suite output", recognise=describe_suite_output, force=True, protected=exports,
                     note="only a previous suite's output is added to")  # fmt: skip
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # The traces steps' results files are the suite's own (--out is a previous suite's output). launch/infer.py's
    # --force replaces only a results file it recorded writing, and one written before it kept records is not: the
    # suite removes its own so that a suite from an older checkout runs again in the same directory.
    for name in ("lm", "mt"):
        (args.out / "traces" / f"{name}-out.txt").unlink(missing_ok=True)
    suite = plan(args)
    suite.save()
    return suite.run()


if __name__ == "__main__":
    sys.exit(main())
