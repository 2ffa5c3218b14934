"""The serving benchmark (moe_infer.bench.serving) through `launch/infer.py --mode bench-serving`: its settings
checked before any engine starts, and buffering and placements compared on the same requests."""

import json

import pytest
from cli_exports import GENERATE, make_cli_exports, run, torchrun

from moe_infer.bench import infer_mode_argv
from moe_infer.bench.cli import main as bench_main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_cli_exports(tmp_path_factory.mktemp("cli"))


def _bench(capfd, *argv: str) -> tuple[int, str]:
    """launch/infer.py's command line, in this process: --mode bench-serving is the serving benchmark."""
    code = bench_main(infer_mode_argv(list(argv)))
    return code, capfd.readouterr().err


def test_bench_serving_settings_are_checked_before_any_engine_starts(setup, capfd, tmp_path):
    prompts = str(setup["root"] / "prompts.txt")
    bench = ["--export", setup["lm"], "--mode", "bench-serving", "--input", prompts, *GENERATE]
    bench += ["--run-dir", str(tmp_path / "b")]
    code, err = _bench(capfd, *bench, "--slots-sweep", "1,4")  # the random LM has 4 experts, all local on one rank
    assert code == 2 and "[4] slots would hold every one of the 4 local experts" in err
    code, err = _bench(capfd, *bench, "--placements", str(tmp_path / "missing.json"))
    assert code == 1 and "missing.json: cannot read the placement file" in err
    assert "Traceback" not in err and not (tmp_path / "b").exists()


def test_bench_serving_compares_buffering_and_placements_on_the_same_requests(setup, tmp_path):
    """Two ranks: the baseline, expert buffering with one slot (of 2 local experts) and a replicated placement serve
    the same prompts with the same outputs (the bench fails otherwise), and each gets its figures."""
    from moe_infer.placement.files import write_placement_file

    placement = tmp_path / "replicas.json"
    layers = {"decoder.layers.2": [[3, 1], [0, 2, 1]], "decoder.layers.4": [[2, 0, 1], [3, 1]]}
    write_placement_file(placement, layers, num_experts=4, algorithm="hand-made", source="test")
    run_dir = tmp_path / "serving"
    args = ["--export", setup["lm"], "--mode", "bench-serving", "--input", str(setup["root"] / "prompts.txt")]
    args += [*GENERATE, "--slots-sweep", "1", "--evictions", "paper,lru", "--placements", str(placement)]
    args += ["--repeats", "1", "--run-dir", str(run_dir), "--quiet"]
    result = run(args, launcher=torchrun(2), timeout=180)
    assert result.returncode == 0, result.stderr
    rows = {r["variant"]: r for r in json.loads((run_dir / "serving.json").read_text())["rows"]}
    assert list(rows) == ["baseline", "paper K=1", "lru K=1", "placement replicas"]
    for name in ("paper K=1", "lru K=1"):
        assert rows[name]["memory_saving"] == pytest.approx(2.0) and rows[name]["misses"] > 0
        assert rows[name]["copied_mb"] > 0 and rows[name]["hits"] + rows[name]["misses"] > 0
    assert rows["baseline"]["misses"] == 0 and rows["placement replicas"]["expert_mb_per_rank"] > 0
    assert all(0 < r["rank_balance"] <= 1 and r["tok_s"] > 0 for r in rows.values())
    assert "placement replicas" in result.stdout


def test_bench_serving_adds_only_to_a_run_of_its_own(setup, capfd, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    bench = ["--export", setup["lm"], "--mode", "bench-serving", "--input", str(setup["root"] / "prompts.txt")]
    code, err = _bench(capfd, *bench, *GENERATE, "--run-dir", str(notes))
    assert code == 2 and err.startswith(f"error: {notes} exists and is not a tracked run"), err
    code, err = _bench(capfd, *bench, *GENERATE, "--run-dir", setup["lm"])
    assert code == 2 and f"is --export {setup['lm']}" in err, err
    assert [p.name for p in notes.iterdir()] == ["todo.txt"]
