"""The experiment suite's plan and runner (pipeline.suite); the experiments themselves are tested where
they live (layer bench, bench, bench-serving, replay, placement)."""

import argparse
import json
import sys
from pathlib import Path

from pipeline.suite import SUITE_FILE, Suite, build_parser, plan


def test_the_plan_skips_a_missing_model_and_serves_held_out_inputs(tmp_path):
    lm = tmp_path / "lm"
    lm.mkdir()
    (lm / "config.json").write_text("{}")
    args = argparse.Namespace(out=tmp_path / "bench", nproc=2, quick=True, lm=lm, mt=tmp_path / "no-mt", hf_lm=lm)
    suite = plan(args)
    experiments = [s.experiment for s in suite.steps]
    assert experiments[:2] == ["layer", "layer"]
    assert {"policies-lm", "traces-lm", "replay-lm", "placement-lm", "transformers-lm"} <= set(experiments)
    transformers = next(s for s in suite.steps if s.experiment == "transformers-lm")
    assert transformers.command[:2] == [sys.executable, "launch/infer.py"]  # one process
    assert "--policies" in transformers.command and "transformers" in transformers.command
    skipped = [s for s in suite.steps if s.status.startswith("skipped")]
    assert [s.experiment for s in skipped] == ["policies-mt", "serving-mt"] and "no export at" in skipped[0].status
    fit = (args.out / "inputs" / "lm-prompts-fit.txt").read_text().splitlines()
    serve = (args.out / "inputs" / "lm-prompts-serve.txt").read_text().splitlines()
    assert fit and serve and not set(fit) & set(serve)  # placements are served on prompts they were not fitted on
    placement_bench = next(s for s in suite.steps if "bench-serving" in s.command and s.experiment == "placement-lm")
    assert str(args.out / "inputs" / "lm-prompts-serve.txt") in placement_bench.command
    live = next(s for s in suite.steps if s.experiment == "serving-lm")
    assert live.command[2:4] == ["moe_infer.bench", "live"] and "--offline" in live.command
    assert str(args.out / "live-lm.json") in live.command


def full_plan_args(tmp_path):
    """The full (not quick) plan's arguments with an 8-expert LM export and no MT or transformers one."""
    lm = tmp_path / "lm"
    lm.mkdir()
    (lm / "config.json").write_text(json.dumps({"moe": {"num_experts": 8}}))
    return argparse.Namespace(
        out=tmp_path / "bench", nproc=2, quick=False, lm=lm, mt=tmp_path / "no-mt", hf_lm=tmp_path / "no-hf"
    )


def test_the_full_plan_serves_every_technique_under_live_traffic(tmp_path):
    args = full_plan_args(tmp_path)
    live = next(s for s in plan(args).steps if s.experiment == "serving-lm")
    variants = [live.command[i + 1] for i, arg in enumerate(live.command) if arg == "--variant"]
    greedy = args.out / "placements" / "greedy.json"
    assert variants == ["static=--policy static", "buffering=--expert-slots 2", f"greedy=--placement {greedy}"]
    assert live.command[live.command.index("--request-rates") + 1] == "0.4x,0.8x,inf"
    # The MT server at saturation only, with one --request-rates (a second one used to override the first).
    args.mt = args.lm
    live_mt = next(s for s in plan(args).steps if s.experiment == "serving-mt")
    assert [live_mt.command[i + 1] for i, a in enumerate(live_mt.command) if a == "--request-rates"] == ["inf"]


def test_the_full_plan_serves_the_shifting_workload_with_three_placements(tmp_path):
    args = full_plan_args(tmp_path)
    steps = plan(args).steps
    experiments = [s.experiment for s in steps]
    # The live run's offline variant reads the greedy placement that placement-lm fits: it must come later.
    assert experiments.index("serving-shift-lm") > max(i for i, e in enumerate(experiments) if e == "placement-lm")
    phase1, phase2 = args.out / "inputs" / "lm-prompts-serve.txt", args.out / "inputs" / "mt-sources.txt"
    bench = next(s.command for s in steps if s.experiment == "shift-lm")
    assert bench[bench.index("--input") + 1] == str(phase1) and bench[bench.index("--shift-to") + 1] == str(phase2)
    assert bench[bench.index("--repeats") + 1] == "5" and "--rebalance-interval" in bench
    live = next(s.command for s in steps if s.experiment == "serving-shift-lm")
    trace = live[live.index("--input") + 1]
    assert trace.endswith("lm-shift-trace.txt")
    lines = phase1.read_text().splitlines() + phase2.read_text().splitlines()
    assert Path(trace).read_text().splitlines() == lines  # phase 1's prompts, then phase 2's: the shift at len(phase 1)
    variants = [live[i + 1] for i, arg in enumerate(live) if arg == "--variant"]
    greedy = args.out / "placements" / "greedy.json"
    assert variants == [f"offline-greedy=--placement {greedy}", "online=--rebalance-interval 8 --rebalance-window 32"]
    assert live[live.index("--request-rates") + 1] == "0.7x"  # one fixed offered load
    args.quick = True
    assert [s.experiment for s in plan(args).steps if "shift" in s.experiment] == ["shift-lm"]


def test_the_default_plan_measures_the_paper_shaped_models_with_spreads(tmp_path):
    exports = {}
    for name, experts in (("lm-tiny-e64", 64), ("mt-tiny-e128", 128)):
        exports[name] = tmp_path / name
        exports[name].mkdir()
        (exports[name] / "config.json").write_text(json.dumps({"moe": {"num_experts": experts}}))
    defaults = build_parser().parse_args([])
    assert defaults.lm.name == "lm-tiny-e64" and defaults.mt.name == "mt-tiny-e128"
    paths = ["--out", tmp_path / "bench", "--lm", exports["lm-tiny-e64"], "--mt", exports["mt-tiny-e128"]]
    args = build_parser().parse_args([*map(str, paths), "--hf-lm", str(tmp_path / "no-hf-lm")])
    steps = plan(args).steps
    policies = [s.command for s in steps if s.experiment.startswith("policies-")]
    assert len(policies) == 2
    for command in policies:  # DeepSpeed without drops; every figure the median of 5 interleaved repeats
        assert "--no-ds-drop-tokens" in command and command[command.index("--repeats") + 1] == "5"
    # The MT trace replayed at the paper MT's 16 experts per GPU (128 experts on 8 ranks): the GPU projection's input.
    replay = next(s.command for s in steps if str(args.out / "replay-mt-ep8") in s.command)
    assert replay[replay.index("--ranks") + 1] == "8"
    layers = [s.command for s in steps if s.experiment == "layer"]
    assert any("--hidden" in c and c[c.index("--hidden") + 1] == "128" for c in layers)


def test_a_failing_command_is_recorded_and_the_suite_goes_on(tmp_path):
    suite = Suite(tmp_path)
    suite.add("fails", sys.executable, "-c", "raise SystemExit(3)")
    suite.add("works", sys.executable, "-c", "pass")
    suite.skip("absent", "no export")
    assert suite.run() == 1
    record = json.loads((tmp_path / SUITE_FILE).read_text())["steps"]
    assert [s["status"] for s in record] == ["failed (exit 3)", "ok", "skipped (no export)"]


def test_the_suite_writes_only_into_its_own_output(tmp_path, capsys):
    """--out: new, empty or an earlier suite's output; anything else, or an export it reads, refused before any work."""
    from pipeline.suite import main

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    assert main(["--out", str(notes), "--quick"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {notes} exists and is not a suite output (a directory holding 1")
    lm = tmp_path / "lm"
    lm.mkdir()
    assert main(["--out", str(lm / "bench"), "--lm", str(lm), "--quick"]) == 2
    assert f"is inside --lm {lm}" in capsys.readouterr().err
    assert [p.name for p in notes.iterdir()] == ["todo.txt"] and not (lm / "bench").exists()
    earlier = Suite(tmp_path / "earlier")
    earlier.skip("absent", "no export")
    earlier.save()
    from pipeline.suite import describe_suite_output

    assert describe_suite_output(tmp_path / "earlier") == "the output of an earlier suite (1 commands)"


def test_an_earlier_suites_results_files_are_written_anew(tmp_path, monkeypatch):
    """launch/infer.py's --force replaces only a results file it recorded writing; the suite's traces outputs from an
    older checkout were never recorded, so the suite removes its own before running again in the same directory."""
    from pipeline import suite as suite_module

    earlier = Suite(tmp_path / "bench")
    earlier.skip("absent", "no export")
    earlier.save()
    (tmp_path / "bench" / "traces").mkdir()
    old = tmp_path / "bench" / "traces" / "lm-out.txt"
    old.write_text("an older checkout's results\n")
    monkeypatch.setattr(suite_module.Suite, "run", lambda self: 0)  # the plan only: no command runs
    assert suite_module.main(["--out", str(tmp_path / "bench"), "--quick", "--lm", str(tmp_path / "no-lm")]) == 0
    assert not old.exists()
