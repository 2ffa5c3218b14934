"""The training loop end to end on 2 real gloo ranks: loss falls, checkpoints round-trip and load at another EP degree,
a killed run resumes on the uninterrupted loss curve, SIGTERM checkpoints and exits, bad checkpoints are refused."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sacrebleu
import torch

from pipeline.config import load_config
from pipeline.errors import CheckpointError
from pipeline.platform.testing import run_distributed
from pipeline.tracking import read_metrics
from pipeline.train import checkpoint as ckpt_io

REPO = Path(__file__).resolve().parent.parent
# Small enough that a step takes tens of milliseconds on 2 cores.
TINY = [
    "model.hidden_size=64",
    "model.ffn_hidden_size=128",
    "model.num_attention_heads=4",
    "model.seq_length=64",
    "train.micro_batch_size=4",
    "train.log_interval=1",
    "train.warmup_steps=2",
]
LM_TINY = [*TINY, "model.num_layers=2"]
MT_TINY = [*TINY, "model.num_layers=2", "model.encoder_layers=2", "data.size=fixture"]
TOP1 = ["moe.topk=1", "moe.router_pre_softmax=true"]


def _train_runs(runs: list[tuple[str, list[str], str]]) -> list[dict]:
    from pipeline.train.loop import train

    return [train(load_config(name, overrides), Path(run_dir)) for name, overrides, run_dir in runs]


def _losses(run_dir: Path) -> dict[int, float]:
    if not (run_dir / "metrics.jsonl").is_file():  # not written yet by a run just launched
        return {}
    return {m["step"]: m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m}


@pytest.mark.parametrize("task", ["lm", "mt"])
def test_loss_falls_with_ep2_for_top1_and_top2(task, tmp_path):
    base = LM_TINY if task == "lm" else MT_TINY
    steps = ["train.steps=40", "train.eval_interval=40", "train.save_interval=40", "train.lr=3e-3"]
    steps += ["train.bleu_sentences=5"] if task == "mt" else []  # as many as the summary's examples: all recomputable
    runs = [
        (f"{task}-tiny", [*base, *steps, *topk], str(tmp_path / name)) for name, topk in (("top2", []), ("top1", TOP1))
    ]
    summaries = run_distributed(_train_runs, world_size=2, args=(runs,), timeout_s=300)[0]
    for (_, _, run_dir), summary in zip(runs, summaries, strict=True):
        losses = _losses(Path(run_dir))
        first = sum(losses[s] for s in range(1, 6)) / 5
        last = sum(losses[s] for s in range(36, 41)) / 5
        assert last < first - 1.0, f"{run_dir}: loss {first:.3f} -> {last:.3f}"
        assert summary["valid_loss"] < first - 0.5  # held-out text too, not just the training batches
        metrics = read_metrics(Path(run_dir))
        shares = [v for m in metrics for k, v in m.items() if k.startswith("experts/") and k.endswith("/max_share")]
        assert shares and all(0 < s <= 1 for s in shares)
        assert any(k.startswith("train/") and "aux" in k or "load_balancing" in k for m in metrics for k in m)
        if task == "mt":  # the reported scores are sacrebleu's on these very translations and sources
            examples = summary["examples"]
            assert summary["bleu_sentences"] == len(examples) == 5
            references = [[e["reference"] for e in examples]]
            hypotheses = [e["hypothesis"] for e in examples]
            assert summary["bleu"] == round(sacrebleu.corpus_bleu(hypotheses, references).score, 2)
            copy = sacrebleu.corpus_bleu([e["source"] for e in examples], references).score
            assert summary["copy_baseline_bleu"] == round(copy, 2)
            assert any(hypotheses) and summary["bleu_signature"].startswith("BLEU = ")


# ---- checkpoints: round trip, another EP degree, bad checkpoints --------------------------------------------------


def _fixed_batch(cfg):
    from pipeline.tokenizer import tokenizer_for
    from pipeline.train.batches import build_batches

    return build_batches(cfg, tokenizer_for(cfg), "valid", dp_rank=0, dp_size=1).eval_batches()[0]


def _logits_from_checkpoint(name: str, overrides: list[str], ckpt: str) -> torch.Tensor:
    """Build the model at the current EP degree, load the checkpoint, return the logits of a fixed batch."""
    from pipeline.tokenizer import tokenizer_for
    from pipeline.train.model import build_model, init_model_parallel, model_logits

    cfg = load_config(name, overrides)
    init_model_parallel(cfg)
    model = build_model(cfg, tokenizer_for(cfg).vocab_size)
    ckpt_io.load_model(model, Path(ckpt))
    model.eval()
    with torch.no_grad():
        return model_logits(model, _fixed_batch(cfg)).cpu()


def _train_then_logits(name: str, overrides: list[str], run_dir: str) -> dict:
    import psutil

    summary = _train_runs([(name, overrides, run_dir)])[0]
    # Two checkpoints were saved: any process a save started is still a child of this rank now.
    children = [" ".join(p.cmdline())[:120] for p in psutil.Process().children(recursive=True)]
    ckpt = ckpt_io.latest_checkpoint(Path(run_dir))
    logits = _logits_from_checkpoint(name, overrides, str(ckpt))
    return {"summary": summary, "ckpt": str(ckpt), "logits": logits, "children": children}


CKPT_STEPS = ["train.steps=6", "train.eval_interval=6", "train.save_interval=3"]


# The MT variants of the checkpoint tests run in `make test-all` (the default suite trains MT in
# test_loss_falls_with_ep2_for_top1_and_top2 and test_train_model; CI time).
@pytest.fixture(scope="module", params=["lm", pytest.param("mt", marks=pytest.mark.slow)])
def trained(request, tmp_path_factory):
    """A short EP=2 run, and the logits its checkpoint gives when reloaded at EP=2."""
    task = request.param
    name, overrides = f"{task}-tiny", [*(LM_TINY if task == "lm" else MT_TINY), *CKPT_STEPS]
    run_dir = tmp_path_factory.mktemp(f"{task}-run")
    ranks = run_distributed(_train_then_logits, world_size=2, args=(name, overrides, str(run_dir)), timeout_s=300)
    return {
        "name": name,
        "overrides": overrides,
        "run_dir": run_dir,
        **ranks[0],
        "rank1_logits": ranks[1]["logits"],
        "rank1_children": ranks[1]["children"],
    }


def test_checkpoints_are_complete_and_atomic(trained):
    root = trained["run_dir"] / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_000006"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000003", "step_000006"]  # no .partial left
    ckpt = root / "step_000006"
    meta = ckpt_io.read_meta(ckpt)
    assert meta["step"] == 6 and meta["world_size"] == 2 and meta["ep_size"] == 2
    assert sorted(p.name for p in (ckpt / "train_state").iterdir()) == ["rank00000.pt", "rank00001.pt"]
    assert (ckpt / "tokenizer.model").is_file() and (ckpt / "config.yaml").is_file()


def test_a_checkpoint_save_starts_no_process_that_could_outlive_the_rank(trained):
    # megatron's default save strategy leaves a multiprocessing Manager (and forks writers) behind in every rank.
    assert trained["children"] == [] and trained["rank1_children"] == []


def test_an_ep2_checkpoint_loads_at_ep1_with_identical_logits(trained):
    # Both EP=2 ranks computed the same batch: the replicated dense weights and the experts they share agree.
    assert torch.equal(trained["logits"], trained["rank1_logits"])
    overrides = [*trained["overrides"], "parallel.ep_size=1"]
    (ep1_logits,) = run_distributed(
        _logits_from_checkpoint, world_size=1, args=(trained["name"], overrides, trained["ckpt"]), timeout_s=120
    )
    torch.testing.assert_close(ep1_logits, trained["logits"], rtol=1e-5, atol=1e-5)


def test_a_checkpoint_of_another_model_is_refused(trained):
    ckpt = Path(trained["ckpt"])
    with pytest.raises(CheckpointError, match=r"another model .*model.hidden_size \(checkpoint 64, config 96\)"):
        ckpt_io.check_compatible(ckpt, load_config(trained["name"], [*trained["overrides"], "model.hidden_size=96"]))
    other = "lm-tiny" if trained["name"] == "mt-tiny" else "mt-tiny"
    with pytest.raises(CheckpointError, match="checkpoint; the config is for task"):
        ckpt_io.check_compatible(ckpt, load_config(other))


def _load_corrupt(name: str, overrides: list[str], ckpt: str) -> str:
    try:
        _logits_from_checkpoint(name, overrides, ckpt)
    except CheckpointError as err:
        return str(err)
    return "no error"


def test_corrupt_and_incomplete_checkpoints_give_one_clear_error(trained, tmp_path):
    broken = tmp_path / "step_000006"
    shutil.copytree(trained["ckpt"], broken)
    shard = max((p for p in (broken / "model").iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    overrides = [*trained["overrides"], "parallel.ep_size=1"]
    (message,) = run_distributed(_load_corrupt, world_size=1, args=(trained["name"], overrides, str(broken)))
    # Named by the checkpoint's own index (a checkpoint without a manifest gets no other check before loading).
    match = re.fullmatch(
        rf"corrupt checkpoint: {re.escape(str(shard))} has {shard.stat().st_size} bytes, the checkpoint's index "
        r"\(\.metadata\) places (\d+) bytes in it",
        message,
    )
    assert match and int(match[1]) > shard.stat().st_size, message
    with pytest.raises(CheckpointError, match=f"corrupt checkpoint: {shard} has .* manifest.json expects"):
        ckpt_io.verify_checkpoint(broken)
    (broken / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete: it has no meta.json"):
        ckpt_io.read_meta(broken)
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        ckpt_io.resolve_checkpoint(tmp_path)


# ---- the launcher: kill and resume, SIGTERM -------------------------------------------------------------------------


def _launch(config: str, overrides: list[str], run_dir: Path, *extra: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(REPO / "launch/train.py"),
        "--config",
        config,
        "--run-dir",
        str(run_dir),
        *extra,
    ]
    for item in overrides:
        cmd += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def _wait_until(proc: subprocess.Popen, done, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if proc.poll() is not None:
            raise AssertionError(
                f"the run ended (rc {proc.returncode}) before the test could interrupt it:\n"
                + proc.stdout.read()[-3000:]
            )
        if time.monotonic() > deadline:
            _kill_tree(proc)
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.05)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and its ranks (torchrun starts each rank in a session of its own)."""
    import psutil

    family = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
    for p in family:
        p.kill()
    psutil.wait_procs(family, timeout=30)
    proc.wait()


def _finish(proc: subprocess.Popen, timeout_s: float = 240) -> str:
    out, _ = proc.communicate(timeout=timeout_s)
    return out


# Dropout on: every step draws from the RNG, so a resume that lost the RNG state leaves the uninterrupted loss curve.
RESUME = [*LM_TINY, "train.steps=30", "train.save_interval=10", "train.eval_interval=1000", "model.dropout=0.1"]


def test_a_killed_run_resumes_on_the_uninterrupted_loss_curve(tmp_path):
    whole = _launch("lm-tiny", RESUME, tmp_path / "whole")
    killed_dir = tmp_path / "killed"
    killed = _launch("lm-tiny", RESUME, killed_dir)
    # SIGKILL the whole job (launcher and ranks) after the step-10 checkpoint, some steps into the next interval.
    _wait_until(
        killed,
        lambda: (
            (killed_dir / "checkpoints/step_000010/meta.json").is_file() and max(_losses(killed_dir), default=0) >= 12
        ),
    )
    _kill_tree(killed)
    out = _finish(whole)
    assert whole.returncode == 0, out[-3000:]
    # Usually step 10; step 20 if the run outpaced the poll. Either way it was cut short of its final checkpoint.
    saved_step = ckpt_io.read_meta(ckpt_io.latest_checkpoint(killed_dir))["step"]
    assert saved_step in (10, 20)
    resumed = _launch("lm-tiny", RESUME, killed_dir, "--resume")
    out = _finish(resumed)
    assert resumed.returncode == 0, out[-3000:]
    assert "resuming from" in out and f"(step {saved_step})" in out
    expected, got = _losses(tmp_path / "whole"), _losses(killed_dir)
    assert sorted(got) == sorted(expected) == list(range(1, 31))
    for step in range(1, 31):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-6), f"step {step}"


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    overrides = [*LM_TINY, "train.steps=400", "train.save_interval=1000", "train.eval_interval=1000"]
    proc = _launch("lm-tiny", overrides, tmp_path)
    _wait_until(proc, lambda: max(_losses(tmp_path), default=0) >= 3)
    os.killpg(proc.pid, signal.SIGTERM)  # what a scheduler does to the job: launcher and ranks together
    out = _finish(proc)
    assert "stopped by signal at step" in out, out[-3000:]
    ckpt = ckpt_io.latest_checkpoint(tmp_path)
    assert ckpt is not None and 3 <= ckpt_io.read_meta(ckpt)["step"] < 400
    assert not list((tmp_path / "checkpoints").glob(".*partial"))


def test_launcher_reports_bad_input_in_one_line(tmp_path):
    out = subprocess.run(
        [sys.executable, str(REPO / "launch/train.py"), "--config", "lm-tiny", "--set", "moe.num_experts=7"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: ") and "parallel.ep_size" in out.stderr
    assert "Traceback" not in out.stderr
    out = subprocess.run(
        [sys.executable, str(REPO / "launch/train.py"), "--config", "paper-lm"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "too large to train here" in out.stderr


def test_routing_traces_are_recorded_on_a_held_out_split(tmp_path):
    overrides = [*MT_TINY, "train.steps=4", "train.eval_interval=4", "train.save_interval=4"]
    proc = _launch("mt-tiny", overrides, tmp_path, "--record-traces", "valid")
    out = _finish(proc)
    assert proc.returncode == 0, out[-3000:]
    from moe_infer.placement.routing_traces import load_traces

    (path,) = (tmp_path / "traces").glob("valid-step*.npz")
    layers, meta = load_traces(path)
    assert meta["split"] == "valid" and meta["task"] == "mt" and meta["num_experts"] == 8
    assert set(layers) == {"encoder.layers.1", "decoder.layers.1"}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["traces"] == str(path)


def _train_again(name: str, overrides: list[str], run_dir: str) -> str:
    from pipeline.errors import PipelineError

    try:
        _train_runs([(name, overrides, run_dir)])
    except PipelineError as err:
        return str(err)
    return "no error"


def test_a_fresh_run_never_overwrites_an_existing_one(trained):
    args = (trained["name"], trained["overrides"], str(trained["run_dir"]))
    message = run_distributed(_train_again, world_size=2, args=args, timeout_s=120)[0]
    assert "already holds a run (latest checkpoint step_000006): pass --resume" in message
