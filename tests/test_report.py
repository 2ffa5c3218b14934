"""The report (pipeline.report): result files written the way the benchmarks write them, read back into one
self-contained HTML page and a markdown summary; missing experiments, corrupt files, atomic writes."""

import argparse
import json
import re
from dataclasses import asdict
from pathlib import Path

import pytest
from test_report_shift import per_variant, write_shift

from moe_infer.bench import live
from moe_infer.bench.load import RequestResult, summarize
from moe_infer.bench.model import Row as BenchRow
from moe_infer.bench.replay import COLUMNS as REPLAY_COLUMNS
from moe_infer.bench.replay import ratios_to_belady
from moe_infer.bench.serving import Result as ServingResult
from moe_infer.placement.__main__ import COLUMNS as PLACEMENT_COLUMNS
from pipeline.report import context
from pipeline.report.__main__ import main
from pipeline.report.headline import largest_batch, peers, placement, ratio_cell, throughput
from pipeline.report.projection import projection_section
from pipeline.report.sections import Table, Text
from pipeline.report.sources import discover
from pipeline.tracking import NamedRun, Tracker

PHASES = {"gate": 1.0, "dispatch": 2.0, "experts": 5.0, "combine": 2.0}


def fake_wandb_run(run_dir: Path, run_id: str) -> None:
    """What an offline Tracker leaves beside its files (tests run with WANDB_MODE=disabled, which writes none)."""
    (run_dir / "wandb" / f"offline-run-20260101_000000-{run_id}" / "files").mkdir(parents=True)
    (run_dir / "wandb_id.txt").write_text(run_id + "\n")


def write_layer(root: Path, ranks: int = 2) -> None:
    """layer-ep<R>.json as moe_infer.bench.layer writes it: beside its run directory."""
    run_dir = root / "bench" / f"layer-ep{ranks}"
    run_dir.mkdir(parents=True)
    fake_wandb_run(run_dir, "layer001")

    def result(name, ms, phases, act, sent):
        return {
            "name": name,
            "ms": ms,
            "tokens_per_s": 4096 * ranks / ms * 1e3,
            "phases_ms": phases,
            "activation_mb": act,
            "dropped_fraction": 0.0,
            "sent_mb": sent,
            "max_diff_vs_dynamic": None,
        }

    payload = {
        "ranks": ranks,
        "args": {
            "experts": "64",
            "hidden": "256",
            "ffn": "1024",
            "topk": "2",
            "tokens": "4096",
            "capacity_fraction": "0.4",
            "repeats": "3",
            "run_dir": str(run_dir),
            "out": "x.json",
        },
        "results": [
            result("dynamic", 10.0, PHASES, 5.0, 8.0),
            result("static", 1000.0, {k: v * 100 for k, v in PHASES.items()}, 3000.0, 100.0),
            result("megatron", 15.0, PHASES, 30.0, 8.0),
            result("floor-matmul", 7.0, {}, 0.0, 0.0),
        ],
    }
    (root / "bench" / f"layer-ep{ranks}.json").write_text(json.dumps(payload, indent=1))


def write_bench(root: Path, export: str, encoder: bool, static_oom: int | None) -> None:
    """bench.json as moe_infer.bench.model writes it (its own Row dataclass)."""
    run_dir = root / f"bench-{export}"
    run_dir.mkdir(parents=True)
    layers = {"decoder.layers.2": {"prefill": PHASES, "decode": PHASES}}
    if encoder:
        layers["encoder.layers.2"] = {"prefill": PHASES, "decode": PHASES}
    rows = []
    for policy, speed in (("dynamic", 3.0), ("static", 1.0)):
        for batch in (1, 2, 4, 8):
            if policy == "static" and static_oom and batch >= static_oom:
                break
            row = BenchRow(
                policy,
                batch,
                10.0,
                1000.0 * speed * batch,
                5.0,
                100.0 * speed * batch,
                400.0 + batch,
                0.5 * batch / speed,
                0.0,
                0.0,
                layers,
            )
            rows.append(asdict(row))
    limits = {"dynamic": None, "static": static_oom}
    payload = {
        "export": f"exports/{export}",
        "ranks": 2,
        "settings": {"export": f"exports/{export}", "max_batch": 8},
        "device": "cpu",
        "memory": "cpu peak RSS",
        "limits": limits,
        "rows": rows,
    }
    (run_dir / "bench.json").write_text(json.dumps(payload, indent=1))


def write_serving(root: Path) -> None:
    """serving.json as moe_infer.bench.serving writes it (its own Result dataclass): the baseline, K slots x
    eviction policy, and a placement file."""
    run_dir = root / "bench-serving-mt-tiny"
    run_dir.mkdir(parents=True)
    rows = [
        ServingResult(
            "baseline", "contiguous", None, "-", 1.0, 100.0, 1.0, 4.0, 2.0, 1.0, 1.0, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.8
        )
    ]
    for k in (1, 2, 3):
        mb = float(k)
        for eviction, speed in (("paper", 0.95), ("lru", 0.9)):
            rows.append(
                ServingResult(
                    f"{eviction} K={k}",
                    "contiguous",
                    k,
                    eviction,
                    1.1,
                    100 * speed,
                    speed,
                    mb,
                    mb / 2,
                    4.0 / mb,
                    4.0 / mb,
                    10,
                    5,
                    1 / 3,
                    1.5,
                    2.0,
                    1.0,
                    0.8,
                )
            )
    rows.append(
        ServingResult(
            "placement greedy",
            "greedy.json",
            None,
            "-",
            0.9,
            110.0,
            1.1,
            4.0,
            2.0,
            1.0,
            1.0,
            0,
            0,
            0.0,
            0.0,
            0.0,
            0.0,
            0.95,
        )
    )
    payload = {
        "export": "exports/mt-tiny",
        "ranks": 2,
        "device": "cpu",
        "mode": "translate",
        "requests": 8,
        "output_tokens": 64,
        "settings": {"slots_sweep": [1, 2, 3]},
        "rows": [asdict(r) for r in rows],
    }
    (run_dir / "serving.json").write_text(json.dumps(payload, indent=1))


def write_buffering(root: Path) -> None:
    """buffering.json, the serving bench's earlier form (moe_infer.buffering.bench): `x_resident`, no placement."""
    run_dir = root / "bench-buffering-mt-tiny"
    run_dir.mkdir(parents=True)
    row = {
        "variant": "resident",
        "slots": None,
        "eviction": "-",
        "seconds": 1.0,
        "tok_s": 100.0,
        "x_resident": 1.0,
        "expert_mb_per_rank": 4.0,
        "decoder_expert_mb": 2.0,
        "memory_saving": 1.0,
        "decoder_memory_saving": 1.0,
        "hits": 0,
        "misses": 0,
        "miss_rate": 0.0,
        "copied_mb": 0.0,
        "copy_ms": 0.0,
        "stall_ms": 0.0,
    }
    rows = [row, row | {"variant": "lru K=1", "slots": 1, "eviction": "lru", "x_resident": 0.8, "memory_saving": 4.0}]
    payload = {"export": "exports/mt-tiny", "ranks": 2, "device": "cpu", "rows": rows}
    (run_dir / "buffering.json").write_text(json.dumps(payload, indent=1))


def write_replay(root: Path) -> None:
    """replay.json shaped as `python -m moe_infer.bench replay --run-dir` writes it: the settings, then the
    rows of moe_infer.bench.replay.COLUMNS, K = L/2 and each policy's misses over Belady's there."""
    rows = []
    for layer in ("decoder.layers.2", "total"):
        for policy, misses in (("paper", [9, 5, 0]), ("lru", [9, 8, 0]), ("belady", [9, 4, 0])):
            rows += [[layer, policy, k, 10 - m, m, 10, m / 10] for k, m in zip((1, 2, 3), misses, strict=True)]
    settings = {
        "trace": "runs/x/traces/t.npz",
        "ranks": 2,
        "placement": "contiguous",
        "num_experts": 6,
        "local_experts": 3,
        "slots": [1, 2, 3],
        "policies": ["paper", "lru", "belady"],
    }
    doc = {**settings, "columns": REPLAY_COLUMNS, "rows": rows, "half_slots": 2}
    doc["misses_over_belady"] = ratios_to_belady(rows, 2)
    (root / "replay-lm-tiny").mkdir(parents=True)
    (root / "replay-lm-tiny" / "replay.json").write_text(json.dumps(doc, indent=1))


def write_placement(root: Path) -> None:
    """placement.table.json through the Tracker, as `python -m moe_infer.placement evaluate --run-dir` logs it."""
    loads = {"contiguous": [0.9, 0.7, 0.5], "greedy": [0.8, 0.4, 0.35], "eplb+8": [0.7, 0.4, 0.3]}
    rows = [
        [layer, d, algorithm, load, load * 0.8, 0.9, 0.9]
        for layer in ("decoder.layers.2", "decoder.layers.4")
        for algorithm, values in loads.items()
        for d, load in zip((2, 4, 8), values, strict=True)
    ]
    run_dir = root / "lm-tiny-placement"
    with Tracker(NamedRun("placement", {"trace": "t.npz"}), run_dir, "placement") as tracker:
        tracker.log_table("placement", PLACEMENT_COLUMNS, rows)
    fake_wandb_run(run_dir, "place001")


def write_live(root: Path) -> None:
    """live-lm.json as `python -m moe_infer.bench live` writes it: 2 rounds, a baseline twice and a static variant."""
    settings = dict(export="exports/lm-tiny", nproc=2, threads=1, input="p.txt", request_rates="0.5x,inf")
    settings |= dict(num_prompts=4, max_tokens=8, max_concurrency=64, repeats=2, offline=True, run_dir=None)
    namespace = argparse.Namespace(**settings)
    variants = [
        live.Variant("baseline", []),
        live.Variant(live.NOISE, []),
        live.Variant("static", ["--policy", "static"]),
    ]
    rows = []
    for round_ in range(2):
        for label, rate in (("0.5x", 2.0), ("inf", float("inf"))):
            for i, v in enumerate(variants):
                done = [RequestResult(10, 8, 0.1 * (i + 1), [0.02] * 6, 0.3 + 0.01 * round_, "text") for _ in range(4)]
                row = summarize(done, 1.0 + 0.1 * i, rate, {})
                rows.append({**row, "variant": v.name, "rate_label": label, "round": round_})
    texts = {v.name: ["a", "b"] for v in variants}
    doc = live._document(namespace, "lm-tiny", 4.0, [("0.5x", 2.0), ("inf", float("inf"))], rows, variants,
                         [40.0, 44.0], texts, {"offline_texts": ["a", "b"]})  # fmt: skip
    (root / "bench").mkdir(parents=True, exist_ok=True)
    (root / "bench" / "live-lm.json").write_text(json.dumps(doc))


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """A runs directory with every kind of result, and the report made from it."""
    root = tmp_path_factory.mktemp("runs")
    write_layer(root)
    write_bench(root, "lm-tiny", encoder=False, static_oom=4)
    write_bench(root, "mt-tiny", encoder=True, static_oom=None)
    write_serving(root)
    write_buffering(root)
    write_replay(root)
    write_placement(root)
    write_live(root)
    write_shift(root, per_variant())
    out = tmp_path_factory.mktemp("reports") / "report.html"
    assert main(["--runs", str(root), "--out", str(out)]) == 0
    return root, out


def test_the_report_is_one_html_file_with_every_section_and_the_headline_table(full, capsys):
    root, out = full
    html = out.read_text()
    assert sorted(p.name for p in out.parent.iterdir()) == ["report.html", "report.md"]  # nothing half-written
    # Self-contained: every figure inlined, nothing fetched.
    images = re.findall(r'<img [^>]*src="([^"]+)"', html)
    assert len(images) >= 8 and all(src.startswith("data:image/png;base64,") for src in images)
    assert not re.search(r'(src|href)="https?:', html)
    for title in ("One MoE layer", "Whole model", "Expert buffering", "Expert cache replay", "Expert placement"):
        assert title in html
    # Serving under load: the latency curves, each variant against the baseline, the batch CLI at saturation.
    assert "Serving under load" in html and "baseline again" in html and "<td>static</td>" in html
    assert "the batch CLI on the same prompts 42 (40-44)" in html
    assert "not run" not in html
    # The paper's numbers beside the measured ones, each with its source.
    for paper in ("6.21x", "5.75x", "2.58x", "1.47x", "&gt; 0.6 -&gt; &lt; 0.4", "8x (LM)"):
        assert paper in html
    assert "100.00x" in html  # static 1000 ms / dynamic 10 ms, the layer bench
    assert "3.00x" in html  # dynamic / static tokens/s at the largest common batch of the model bench
    assert "3000.0 -&gt; 5.0 MB (600.0x)" in html
    assert "&gt;= 4x (batch/rank: static 2, dynamic &gt;= 8)" in html  # static ran out of memory at 4
    assert "0.950x baseline (paper K=2, saving 2.00x)" in html  # the largest K saving >= 1.47x, its best policy
    assert "0.800x baseline (lru K=1, saving 4.00x)" in html  # the older buffering.json
    assert "+10.0% (placement greedy)" in html
    assert "0.70 -&gt; 0.40" in html and "D=4 (the largest change)" in html
    assert "1.25x" in html  # LIFO 5 misses / Belady's 4 at K=2
    assert str(root / "bench" / "layer-ep2.json") in html
    # W&B runs linked, settings collapsed, provenance; a bench's extra column shown as it comes.
    assert "layer001" in html and "place001" in html and "wandb sync" in html
    assert "Placement under a shifting workload" in html and "45.0 (40.0-50.0)" in html
    assert html.count("<details>") == 9 and "capacity_fraction" in html  # one per result file
    assert "git revision" in html and "torch" in html
    assert "<th>placement</th>" in html and "<th>rank_balance</th>" in html and "greedy.json" in html
    markdown = (out.parent / "report.md").read_text()
    assert "| claim | paper | measured here |" in markdown and "6.21x" in markdown and "100.00x" in markdown


def test_the_summary_on_stdout_names_the_report_and_the_headlines(tmp_path, capsys):
    write_placement(tmp_path / "runs")
    out = tmp_path / "out" / "report.html"
    assert main(["--runs", str(tmp_path / "runs"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "Greedy placement" in printed and "0.70 -> 0.40" in printed


def test_missing_experiments_say_not_run_with_the_command(tmp_path):
    write_placement(tmp_path / "runs")
    out = tmp_path / "report.html"
    assert main(["--runs", str(tmp_path / "runs"), "--out", str(out)]) == 0
    html = out.read_text()
    assert html.count("not run: <code>") == 6
    assert "python -m moe_infer.bench replay" in html and "--mode bench-serving" in html
    assert "not measured" in html and "make bench" in html
    assert "not run: `make bench" in (tmp_path / "report.md").read_text()


def test_no_runs_at_all_still_writes_a_report(tmp_path, capsys):
    out = tmp_path / "report.html"
    assert main(["--runs", str(tmp_path / "nowhere"), "--out", str(out)]) == 0
    assert "no such directory" in capsys.readouterr().err
    assert out.read_text().count("not run: <code>") == 7


def test_a_previous_report_is_replaced_and_any_other_file_is_not(tmp_path, capsys):
    out = tmp_path / "report.html"
    assert main(["--runs", str(tmp_path / "nowhere"), "--out", str(out)]) == 0
    first = out.read_text()
    assert main(["--runs", str(tmp_path / "nowhere"), "--out", str(out)]) == 0  # our own: replaced
    assert out.read_text().startswith(first[:60])
    capsys.readouterr()
    page = tmp_path / "index.html"
    page.write_text("<html>my page</html>")
    assert main(["--runs", str(tmp_path / "nowhere"), "--out", str(page)]) == 2
    assert capsys.readouterr().err.endswith(
        f"error: {page} exists and is not a report (a file of 20 bytes): choose another path; only a previous report "
        "is replaced (nothing was written)\n"
    )
    notes = tmp_path / "notes.md"
    notes.write_text("# my notes\n")
    assert main(["--runs", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r.html"), "--markdown", str(notes)]) == 2
    assert page.read_text() == "<html>my page</html>" and notes.read_text() == "# my notes\n"
    assert not (tmp_path / "r.html").exists()


def test_a_corrupt_file_is_a_warning_naming_it_and_an_error_with_strict(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_placement(runs)
    (runs / "bench-x").mkdir()
    (runs / "bench-x" / "bench.json").write_text('{"export": "exports/x", "rows": [')  # cut short
    (runs / "layer-ep1.json").write_text(json.dumps({"ranks": 1, "args": {}}))  # no results
    out = tmp_path / "report.html"
    assert main(["--runs", str(runs), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"warning: {runs / 'bench-x' / 'bench.json'}: not valid JSON" in err
    assert f"warning: {runs / 'layer-ep1.json'}: missing 'results'" in err
    html = out.read_text()
    assert f"warning: {runs / 'bench-x' / 'bench.json'}: not valid JSON" in html
    assert "Expert placement" in html and "0.70 -&gt; 0.40" in html  # the good file is still reported

    out.write_text("previous report")
    assert main(["--runs", str(runs), "--out", str(out), "--strict"]) == 2
    assert f"error: {runs / 'bench-x' / 'bench.json'}" in capsys.readouterr().err
    assert out.read_text() == "previous report"


def test_a_failure_while_rendering_leaves_the_previous_report_whole(tmp_path, monkeypatch):
    write_placement(tmp_path / "runs")
    out = tmp_path / "report.html"
    assert main(["--runs", str(tmp_path / "runs"), "--out", str(out)]) == 0
    previous = out.read_text()

    def broken(*args, **kwargs):
        raise RuntimeError("disk full, say")

    monkeypatch.setattr("pipeline.report.__main__.render_markdown", broken)
    with pytest.raises(RuntimeError):
        main(["--runs", str(tmp_path / "runs"), "--out", str(out)])
    assert out.read_text() == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "report.md", "runs"]  # no temporary left


def test_headline_cells_from_tables(tmp_path):
    write_placement(tmp_path)
    write_bench(tmp_path, "lm-tiny", encoder=False, static_oom=1)
    found, problems = discover([tmp_path])
    assert not problems
    (row,) = placement(found)
    assert row.measured == "0.70 -> 0.40" and "D=4" in row.source and "decoder.layers.2" in row.source
    (row,) = largest_batch(found)
    assert row.measured == "static ran out of memory at batch 1/rank, dynamic fits 8"


def test_publish_is_skipped_with_one_line_without_credentials(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert main(["--runs", str(tmp_path), "--out", str(tmp_path / "r.html"), "--publish"]) == 0
    assert "publish: skipped, WANDB_API_KEY is not set" in capsys.readouterr().out


def test_git_revision_is_read_from_the_checkout_files(tmp_path):
    assert context.git_revision(tmp_path) == "unknown"
    git = tmp_path / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    (git / "packed-refs").write_text("# pack-refs\n" + "a" * 40 + " refs/heads/main\n")
    assert context.git_revision(tmp_path) == "a" * 40
    (git / "refs" / "heads" / "main").write_text("b" * 40 + "\n")
    assert context.git_revision(tmp_path) == "b" * 40
    (git / "HEAD").write_text("c" * 40 + "\n")  # detached
    assert context.git_revision(tmp_path) == "c" * 40


def test_out_must_be_html(tmp_path):
    with pytest.raises(SystemExit):
        main(["--runs", str(tmp_path), "--out", str(tmp_path / "report.pdf")])


# ---- spreads, waste factors and the GPU projection ------------------------------------------------------------------


def test_ratios_carry_their_spread_and_say_within_noise():
    assert ratio_cell((30.0, 28.0, 33.0), (10.0, 9.0, 11.0)) == "3.00x [2.55-3.67]"
    assert ratio_cell((10.5, 9.0, 12.0), (10.0, 9.5, 11.0)) == "1.05x [0.82-1.26] within noise"
    assert ratio_cell((3.0, 3.0, 3.0), (1.0, 1.0, 1.0)) == "3.00x"  # a file without spreads: the ratio alone


def _bench_with_spreads(root: Path, export: str, moe: dict) -> None:
    """bench.json rows as Row.of_repeats makes them, from three repeats per (policy, batch)."""
    run_dir = root / f"bench-{export}"
    run_dir.mkdir(parents=True)
    layers = {"decoder.layers.2": {"prefill": PHASES, "decode": PHASES}}
    rows = []
    for policy, speed in (("dynamic", 1.05), ("static", 1.0), ("megatron", 0.5), ("dense-equivalent", 2.0)):
        repeats = [
            BenchRow(policy, 8, 10 / (speed * j), 1000 * speed * j, 5.0, 100 * speed * j, 1.0, 1.0, 0, 0, layers)
            for j in (0.9, 1.0, 1.2)
        ]
        rows.append(asdict(BenchRow.of_repeats(repeats)))
    payload = {"export": f"exports/{export}", "ranks": 2, "settings": {"repeats": 3}, "moe": moe, "rows": rows}
    (run_dir / "bench.json").write_text(json.dumps(payload, indent=1))


def test_whole_model_ratios_show_spread_and_flag_a_waste_factor_that_is_not_the_papers(tmp_path):
    _bench_with_spreads(tmp_path, "lm-tiny", {"num_experts": 8, "topk": 2, "capacity_fraction": 0.5})
    _bench_with_spreads(tmp_path, "lm-tiny-e64", {"num_experts": 64, "topk": 2, "capacity_fraction": 0.4})
    found, _ = discover([tmp_path])
    rows = {(r.claim, r.source.split(",")[0].split(": ")[-1]): r for r in throughput(found)}
    tiny = rows["Dynamic vs static gating: throughput (LM model, prefill)", "lm-tiny"]
    assert tiny.measured == "1.05x [0.79-1.40] within noise"
    assert "waste factor E*C/k = 2 (NOT the paper's 12.8" in tiny.source
    paper_shaped = rows["Dynamic vs static gating: throughput (LM model, prefill)", "lm-tiny-e64"]
    assert "waste factor E*C/k = 12.8" in paper_shaped.source and "NOT" not in paper_shaped.source
    beyond = {r.claim: r.measured for r in peers(found) if "e64" in r.source}
    assert beyond["Dynamic vs megatron throughput (LM model, decode)"] == "2.10x [1.57-2.80]"
    assert beyond["MoE (dynamic) time / FLOP-equivalent dense time (LM, prefill)"].startswith("1.90x")


def test_our_engine_against_transformers_on_the_same_weights(tmp_path):
    from moe_infer.bench import hf_baseline  # transformers itself is imported only when the baseline runs

    variants = [hf_baseline.OURS, "transformers[grouped_mm]"]
    rows = []
    for name, speed in zip(variants, (2.0, 1.0), strict=True):
        spread = hf_baseline.Spread()
        for j in (0.9, 1.0, 1.2):
            spread.add(32, 32, 8, prefill_s=0.1 / (speed * j), decode_s=0.08 / (speed * j))
        rows.append(asdict(hf_baseline._median_row(name, 32, spread.summary())))
    moe = {"num_experts": 64, "topk": 2, "capacity_fraction": 0.4}
    payload = {"export": "exports/lm-qwen3-tiny-e64", "ranks": 1, "moe": moe, "rows": rows}
    (tmp_path / "transformers-lm").mkdir()
    (tmp_path / "transformers-lm" / "bench.json").write_text(
        json.dumps({**payload, "transformers": {"variants": variants}})
    )
    found, _ = discover([tmp_path])
    got = {r.claim: r for r in peers(found)}
    prefill = got["Our engine vs transformers[grouped_mm] throughput (LM model, prefill)"]
    assert prefill.measured == "2.00x [1.50-2.67]"  # 18.4K-24.6K tokens/s against 9.2K-12.3K: no overlap
    assert "lm-qwen3-tiny-e64, one process, same weights, batch 32, 64 experts" in prefill.source
    assert "Our engine vs transformers[grouped_mm] throughput (LM model, decode)" in got
    assert not any("static" in claim for claim in got)  # the comparison's own rows only


def _replay_at_16_experts_per_gpu(root: Path) -> None:
    """A replay of a 128-expert MT trace over 8 ranks (the paper MT's 16 experts per GPU), with its calls."""
    rows = [
        ["decoder.layers.2", "paper", k, 400 - misses, misses, 400, misses / 400]
        for k, misses in zip(range(1, 17), range(160, 0, -10), strict=True)
    ]
    doc = {"trace": "mt.npz", "ranks": 8, "local_experts": 16, "columns": REPLAY_COLUMNS, "rows": rows}
    doc["batches"] = {"decoder.layers.2": 10, "encoder.layers.2": 10}
    (root / "replay-mt-ep8").mkdir(parents=True)
    (root / "replay-mt-ep8" / "replay.json").write_text(json.dumps(doc))


def test_the_gpu_projection_is_a_labelled_model_fed_with_the_replayed_misses(tmp_path):
    out = tmp_path / "report.html"
    assert main(["--runs", str(tmp_path / "none"), "--out", str(out)]) == 0
    assert "GPU projection (a cost model, not a measurement)" in out.read_text()
    assert "not projected, no replay of an MT trace at 16 experts per GPU" in out.read_text()

    _replay_at_16_experts_per_gpu(tmp_path / "runs")
    found, _ = discover([tmp_path / "runs"])
    section = projection_section(found["replay"])
    decode, throughput_table, rebalance = (b for b in section.blocks if isinstance(b, Table))
    assert decode.caption.startswith("PROJECTED") and throughput_table.caption.startswith("PROJECTED")
    k1 = decode.rows[0]
    assert k1[:3] == [1, 5.0, 2.0]  # 400 accesses and 80 misses over 10 calls x 8 ranks
    assert k1[-1] == "1.47x"  # the decoder's MoE layers at 1 slot per GPU: the paper's static-memory saving
    assert decode.rows[-1][0] == "all resident" and decode.rows[-1][-1] == "1.00x"
    assert any("Assumptions:" in b.text for b in section.blocks if isinstance(b, Text))
    assert rebalance.rows[0][1] == pytest.approx(16.777216)  # one paper-LM expert: 2 x 1024 x 4096 x 2 bytes
