"""The converter end to end: a checkpoint trained with EP=2 on 2 gloo ranks -> an export (one process) -> logits
equal to megatron's; the export's layout, manifest and provenance; --force; bad checkpoints refused with one clear
error and nothing written; every model variant (norms, activations, positions, tying, top-1) matching megatron.

Workers (leading underscore) run inside spawned ranks (megatron's process state is global); they return plain values
that the test functions check.
"""

import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

from moe_infer import export_format as fmt
from moe_infer.model import load_model
from pipeline.config import load_config
from pipeline.convert import convert
from pipeline.convert.__main__ import main
from pipeline.convert.source import open_checkpoint
from pipeline.convert.verify import LIMIT, parity_batch, relative_difference
from pipeline.errors import CheckpointError, PipelineError
from pipeline.outputs import OutputError, describe_os_error
from pipeline.platform.testing import run_distributed

REPO = Path(__file__).resolve().parent.parent
# As tests/test_train.py's TINY runs: tens of milliseconds a step. The end-of-run BLEU is not tested here.
TINY = [
    "model.hidden_size=64",
    "model.ffn_hidden_size=128",
    "model.num_attention_heads=4",
    "model.seq_length=64",
    "model.num_layers=2",
    "train.micro_batch_size=4",
    "train.warmup_steps=1",
    "train.steps=3",
    "train.eval_interval=3",
    "train.save_interval=3",
    "train.bleu_sentences=4",
]
OVERRIDES = {"lm": TINY, "mt": [*TINY, "model.encoder_layers=2", "data.size=fixture"]}


def _megatron_outputs(cfg, model, batch) -> dict:
    from pipeline.train.model import decode, encode, model_logits

    with torch.no_grad():
        if cfg.task == "lm":
            return {"logits": model_logits(model, batch).cpu()}
        enc_SBD = encode(model, batch.src, batch.src_pad)
        logits = decode(model, enc_SBD, batch.tgt_in, batch.src_pad, batch.tgt_pad).float()
        return {"encoder_output": enc_SBD.transpose(0, 1).cpu(), "logits": logits.cpu()}


def _train_ep2(runs: list[tuple[str, list[str], str]]) -> list[dict]:
    """Train each run with EP=2, reload its checkpoint at EP=2, return megatron's outputs on the parity batch."""
    from pipeline.train import checkpoint as ckpt_io
    from pipeline.train.loop import train
    from pipeline.train.model import build_model

    outputs = []
    for name, overrides, run_dir in runs:
        cfg = load_config(name, overrides)
        train(cfg, Path(run_dir))
        source = open_checkpoint(Path(run_dir))  # the converter's view: the checkpoint's tokenizer and config
        model = build_model(cfg, source.tokenizer.vocab_size)
        ckpt_io.load_model(model, source.ckpt)
        outputs.append(_megatron_outputs(cfg, model.eval(), parity_batch(source.cfg, source.tokenizer)))
    return outputs


def _error(fn, *args, **kwargs) -> str:
    try:
        fn(*args, **kwargs)
    except PipelineError as err:
        return str(err)
    return "no error"


def _claim_the_other_task(ckpt: Path) -> None:
    """Make config.yaml and meta.json say the other task (LM <-> MT) over the same weights."""
    saved = yaml.safe_load((ckpt / "config.yaml").read_text())
    meta = json.loads((ckpt / "meta.json").read_text())
    task = meta["task"] = saved["task"] = "mt" if saved["task"] == "lm" else "lm"
    saved["model"]["encoder_layers"] = 2 if task == "mt" else 0
    saved["data"] = {"corpus": "bible" if task == "mt" else "shakespeare", "size": "fixture"}
    (ckpt / "config.yaml").write_text(yaml.safe_dump(saved))
    (ckpt / "meta.json").write_text(json.dumps(meta))


def _convert(run_dir: str, out: str, scratch: str) -> dict:
    """Convert (verified), convert again with --force, then try bad checkpoints; return what happened."""
    from pipeline.convert.names import export_tensors
    from pipeline.convert.source import load_megatron
    from pipeline.train.checkpoint import write_manifest

    run_dir, out, scratch = Path(run_dir), Path(out), Path(scratch)
    first = convert(run_dir, out, log=lambda line: None)
    before = json.loads((out / fmt.MANIFEST_FILE).read_text())["files"]
    forced = convert(run_dir, out, force=True, verify=False, log=lambda line: None)
    after = json.loads((out / fmt.MANIFEST_FILE).read_text())["files"]
    ckpt = open_checkpoint(run_dir).ckpt

    truncated = Path(shutil.copytree(ckpt, scratch / "truncated" / ckpt.name))
    shard = max((p for p in (truncated / "model").iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    other = Path(shutil.copytree(ckpt, scratch / "other" / ckpt.name))
    saved = yaml.safe_load((other / "config.yaml").read_text())
    saved["model"]["ffn_hidden_size"] = 96  # config.yaml now describes another model than the weights hold
    (other / "config.yaml").write_text(yaml.safe_dump(saved))
    swapped = Path(shutil.copytree(ckpt, scratch / "swapped" / ckpt.name))
    _claim_the_other_task(swapped)
    for inconsistent in (other, swapped):  # consistent with their manifests: the checks behind them are the subject
        write_manifest(inconsistent)

    parity_refused = _error(_convert_with_swapped_experts, run_dir, scratch / "out-parity")
    killed = _kill_a_conversion(run_dir, scratch / "killed")
    convert(run_dir, scratch / "killed", log=lambda line: None)  # the next conversion to the same path

    source = open_checkpoint(run_dir)
    model = load_megatron(source)
    state = dict(model.state_dict())
    state["decoder.layers.1.mlp.router.weight"] = torch.zeros(4, 64)
    config = json.loads((out / fmt.CONFIG_FILE).read_text())
    return {
        "first": first,
        "forced": forced,
        "manifests": (before, after),
        "truncated": _error(convert, truncated, scratch / "out-truncated", log=lambda line: None),
        "other_model": _error(convert, other, scratch / "out-other", log=lambda line: None),
        "other_task": _error(convert, swapped, scratch / "out-swapped", log=lambda line: None),
        "wrong_shape": _error(export_tensors, state, config),
        "parity_refused": parity_refused,
        "left_by_the_killed_conversion": killed,
        "after_the_next_conversion": sorted(p.name for p in scratch.iterdir() if "killed" in p.name),
        "outputs_left": sorted(p.name for p in scratch.iterdir() if p.name.startswith("out-") or "partial" in p.name),
    }


def _convert_with_swapped_experts(run_dir: Path, out: Path) -> None:
    """A name-mapping bug that shapes cannot catch: experts 0 and 1 of the first MoE layer trade places."""
    import pipeline.convert as conversion

    mapped = conversion.export_tensors

    def swapped(state, config):
        dense, experts = mapped(state, config)
        first, second = sorted(experts)[:2]
        experts[first], experts[second] = experts[second], experts[first]
        return dense, experts

    conversion.export_tensors = swapped
    try:
        convert(run_dir, out, log=lambda line: None)
    finally:
        conversion.export_tensors = mapped


def _kill_a_conversion(run_dir: Path, out: Path) -> list[str]:
    """`python -m pipeline.convert` SIGKILLed once every file is written, while it verifies; returns what it left
    beside `out`."""
    import signal
    import subprocess
    import sys
    import time

    from pipeline.platform.device import LAUNCHER_VARS

    cmd = [sys.executable, "-m", "pipeline.convert", "--ckpt", str(run_dir), "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}  # a process of its own, not this rank's
    log = out.parent / f"{out.name}.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    try:
        while not any(out.parent.glob(f".{out.name}.partial-*/{fmt.MANIFEST_FILE}")):
            assert proc.poll() is None and time.monotonic() < deadline, f"it ended first:\n{log.read_text()[-2000:]}"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        log.unlink()
    return sorted(p.name for p in out.parent.iterdir() if out.name in p.name)


def _convert_all(jobs: list[tuple[str, str, str]], variants_root: str) -> dict:
    """Every conversion of the module in one process (importing megatron costs seconds per spawn)."""
    results = {"variants": _convert_variants(Path(variants_root))}
    for task, (run_dir, out, scratch) in zip(("lm", "mt"), jobs, strict=True):
        results[task] = _convert(run_dir, out, scratch)
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both tasks trained for 3 steps with EP=2 on 2 ranks, then converted (and mistreated) in one process."""
    root = tmp_path_factory.mktemp("convert")
    dirs = {task: (root / task / "run", root / task / "export", root / task / "scratch") for task in ("lm", "mt")}
    for _, _, scratch in dirs.values():
        scratch.mkdir(parents=True)
    trains = [(f"{task}-tiny", OVERRIDES[task], str(dirs[task][0])) for task in ("lm", "mt")]
    references = run_distributed(_train_ep2, world_size=2, args=(trains,), timeout_s=400)[0]
    jobs = [tuple(map(str, dirs[task])) for task in ("lm", "mt")]
    results = run_distributed(_convert_all, world_size=1, args=(jobs, str(root / "variants")), timeout_s=400)[0]
    out = {"variants": results["variants"], "variants_root": root / "variants"}
    for task, reference in zip(("lm", "mt"), references, strict=True):
        run_dir, export, scratch = dirs[task]
        out[task] = {"task": task, "run_dir": run_dir, "out": export, "scratch": scratch, "reference": reference}
        out[task].update(results[task])
    return out


@pytest.fixture(params=["lm", "mt"])
def converted(request, runs):
    return runs[request.param]


def test_an_ep2_checkpoint_round_trips_to_megatrons_logits(converted):
    parity = converted["first"]["parity"]
    assert parity["passed"] and parity["limit"] == LIMIT == 1e-4
    figures = ["logits"] if converted["task"] == "lm" else ["encoder_output", "decoder_logits"]
    assert all(0 <= parity[k] <= LIMIT for k in figures)
    # Here, in plain torch: the export against megatron's outputs at EP=2 (the converter compared at EP=1).
    source = open_checkpoint(converted["run_dir"])
    batch = parity_batch(source.cfg, source.tokenizer)
    model = load_model(converted["out"])
    reference = converted["reference"]
    if converted["task"] == "lm":
        assert relative_difference(reference["logits"], model(batch.tokens)) <= LIMIT
    else:
        memory = model.encode(batch.src, batch.src_pad)
        assert relative_difference(reference["encoder_output"], memory) <= LIMIT
        assert relative_difference(reference["logits"], model.decode(batch.tgt_in, memory, batch.src_pad)) <= LIMIT


def test_the_export_is_complete_checksummed_and_says_where_it_came_from(converted):
    out = converted["out"]
    config = json.loads((out / fmt.CONFIG_FILE).read_text())
    fmt.validate_config(config)
    experts = {fmt.expert_file(*key) for key in fmt.expert_keys(config)}
    assert len(experts) == 8 * (1 if converted["task"] == "lm" else 2)  # 8 experts, layer 2 of each stack
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert files == {fmt.CONFIG_FILE, fmt.TOKENIZER_FILE, fmt.DENSE_FILE, fmt.MANIFEST_FILE, *experts}
    manifest = json.loads((out / fmt.MANIFEST_FILE).read_text())["files"]
    assert set(manifest) == files - {fmt.MANIFEST_FILE}
    assert all(fmt.file_entry(out / name) == entry for name, entry in manifest.items())
    prov = config["provenance"]
    assert prov["step"] == 3 and prov["trained_ep_size"] == 2 and prov["trained_world_size"] == 2
    assert prov["source_checkpoint"].endswith("checkpoints/step_000003") and prov["run_config"]["name"].endswith("tiny")
    assert prov["parity"] is None  # the last conversion was --force --no-verify
    assert config["architecture"] == ("decoder" if converted["task"] == "lm" else "encoder-decoder")
    assert config["moe"]["moe_layers"]["decoder"] == [2] and config["moe"]["topk"] == 2
    ckpt = Path(prov["source_checkpoint"])
    assert (out / fmt.TOKENIZER_FILE).read_bytes() == (ckpt / "tokenizer.model").read_bytes()
    # --force replaced the export with identical weights; nothing but the export is left beside it.
    before, after = converted["manifests"]
    assert {k: v for k, v in before.items() if k != fmt.CONFIG_FILE} == {
        k: v for k, v in after.items() if k != fmt.CONFIG_FILE
    }
    assert sorted(p.name for p in out.parent.iterdir()) == ["export", "run", "scratch"]


def test_converting_into_an_existing_export_refuses_without_force(converted, capsys):
    out = converted["out"]
    manifest = (out / fmt.MANIFEST_FILE).read_bytes()
    name = f"{converted['task']}-tiny"
    with pytest.raises(OutputError, match=f"{out} already holds an export \\({name}, step 3\\): pass --force to"):
        convert(converted["run_dir"], out)
    assert (out / fmt.MANIFEST_FILE).read_bytes() == manifest
    if converted["task"] == "mt":
        return  # the command line once is enough
    assert main(["--ckpt", str(converted["run_dir"]), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"error: {out} already holds an export ({name}, step 3): pass --force to replace it (nothing was written)\n"
    )
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    assert "verified, EP-agnostic export" in help_text and "--no-verify" in help_text and "--force" in help_text


def test_force_replaces_only_an_export_never_the_checkpoint_or_anything_else(converted, tmp_path, capsys):
    run_dir = converted["run_dir"]
    ckpt = open_checkpoint(run_dir).ckpt
    before = sorted(p.relative_to(run_dir.parent) for p in run_dir.parent.rglob("*"))
    for out, how in [
        (run_dir, "is --ckpt"),
        (run_dir / "checkpoints" / "export", "is inside --ckpt"),
        (run_dir.parent, "contains --ckpt"),
        (ckpt, "is inside --ckpt"),
    ]:
        with pytest.raises(OutputError, match=f"^{out} {how} .*: the output must be somewhere else"):
            convert(run_dir, out, force=True)
    with pytest.raises(OutputError, match=f"^{run_dir} contains --ckpt {ckpt}: the output must be somewhere else"):
        convert(ckpt, run_dir, force=True)  # --ckpt names the checkpoint, --out its run directory
    user = tmp_path / "results"
    user.mkdir()
    (user / "table.csv").write_text("a,b\n")
    for force in (False, True):
        assert main(["--ckpt", str(run_dir), "--out", str(user), *(["--force"] if force else [])]) == 2
        err = capsys.readouterr().err
        assert err == (
            f"error: {user} exists and is not an export (a directory holding 1 entry (table.csv)): choose another "
            "path; --force replaces only an export (nothing was written)\n"
        )
    export = Path(shutil.copytree(converted["out"], tmp_path / "export"))
    (export / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="is an export but also holds notes.txt, which no export holds"):
        convert(run_dir, export, force=True)
    assert (user / "table.csv").read_text() == "a,b\n" and (export / "notes.txt").read_text() == "mine"
    assert sorted(p.relative_to(run_dir.parent) for p in run_dir.parent.rglob("*")) == before


def test_an_unwritable_output_place_gives_one_line(converted, tmp_path, monkeypatch, capsys):
    run_dir = converted["run_dir"]
    # sysfs refuses new directories to everyone (EPERM), root included.
    assert main(["--ckpt", str(run_dir), "--out", "/sys/moe-pipeline-test-export"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write the export to /sys/moe-pipeline-test-export: Operation not permitted")
    assert err.count("\n") == 1 and "Traceback" not in err
    # A read-only mount (EROFS) or a directory we may not write (EACCES) cannot be made here without privileges: the
    # directory tmp_path/ro answers as one would.
    real_mkdtemp = tempfile.mkdtemp
    for code, words in [(errno.EROFS, "Read-only file system [EROFS]"), (errno.EACCES, "Permission denied [EACCES]")]:

        def refuse(suffix=None, prefix=None, dir=None, code=code):
            if dir is not None and Path(dir).is_relative_to(tmp_path / "ro"):
                raise OSError(code, os.strerror(code), str(tmp_path / "ro"))
            return real_mkdtemp(suffix, prefix, dir)

        monkeypatch.setattr(tempfile, "mkdtemp", refuse)
        assert main(["--ckpt", str(run_dir), "--out", str(tmp_path / "ro" / "export")]) == 2
        err = capsys.readouterr().err
        assert (
            err == f"error: cannot write the export to {tmp_path / 'ro' / 'export'}: {words}: {tmp_path / 'ro'} "
            "(nothing was written)\n"
        )
    busy = OSError(errno.EBUSY, os.strerror(errno.EBUSY), "/mnt/exports")
    assert describe_os_error(busy).startswith("Device or resource busy [EBUSY]: /mnt/exports (a mount point")


def test_the_parity_check_refuses_a_wrong_mapping_and_writes_nothing(converted):
    assert converted["parity_refused"].startswith("parity: ")
    assert converted["parity_refused"].endswith("above the limit, nothing was written")
    assert converted["outputs_left"] == []  # no out-parity, no partial directory


def test_a_killed_conversion_leaves_a_temporary_that_the_next_one_removes(converted):
    (left,) = converted["left_by_the_killed_conversion"]
    assert left.startswith(".killed.partial-")
    assert converted["after_the_next_conversion"] == ["killed"]


def test_bad_checkpoints_give_one_clear_error_and_write_nothing(converted, tmp_path):
    scratch = converted["scratch"]
    assert re.fullmatch(
        r"corrupt checkpoint: .*/truncated/step_000003/model/__\d_\d\.distcp has \d+ bytes, manifest.json expects \d+",
        converted["truncated"],
    ), converted["truncated"]
    assert re.fullmatch(
        r".*/model: tensor (en|de)coder.layers.0.mlp.linear_fc1.weight has shape \[128, 64\], "
        r"the model described by config.yaml expects \[96, 64\]",
        converted["other_model"],
    ), converted["other_model"]
    what = "lacks 47 tensor(s) of the model" if converted["task"] == "lm" else "holds 47 tensor(s) the model does not"
    assert "model is not a checkpoint of the model its config.yaml describes: it " + what in converted["other_task"]
    assert converted["wrong_shape"] == (
        "tensor decoder.layers.1.mlp.router.weight (export decoder.layers.2.moe.router.weight) has shape [4, 64], "
        "expected [8, 64] from the model's config"
    )
    assert converted["outputs_left"] == []
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        convert(tmp_path, tmp_path / "out")
    other = "mt-tiny" if converted["task"] == "lm" else "lm-tiny"
    with pytest.raises(CheckpointError, match=f"is a '{converted['task']}' checkpoint; the config is for task"):
        convert(converted["run_dir"], tmp_path / "out", config=other)
    ckpt = Path(shutil.copytree(open_checkpoint(converted["run_dir"]).ckpt, tmp_path / "step_000003"))
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps({**meta, "task": other[:2]}))
    with pytest.raises(CheckpointError, match=f"meta.json says task '{other[:2]}' but config.yaml says"):
        convert(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(scratch.glob(".*partial*"))


# ---- every model variant the configs allow, against megatron (random weights, no training) ------------------------

VARIANTS = {
    "lm": ["model.norm=rmsnorm", "model.activation=swiglu", "model.position_embedding=rope", "moe.topk=1",
           "moe.router_pre_softmax=true", "model.tie_embeddings=false"],
    "mt": ["model.norm=rmsnorm", "model.activation=swiglu", "model.position_embedding=rope", "moe.interval=1",
           "moe.topk=3", "model.tie_embeddings=false"],
    "mt-pre-softmax": ["moe.router_pre_softmax=true", "model.position_embedding=rope"],
    # Qwen3-MoE's shape (configs/lm-qwen3-tiny): no linear biases, per-head RMSNorm on q and k
    "lm-qwen3": ["model.norm=rmsnorm", "model.activation=swiglu", "model.position_embedding=rope", "model.bias=false",
                 "model.qk_norm=true", "model.tie_embeddings=false"],
    "mt-qk-norm": ["model.bias=false", "model.qk_norm=true"],  # LayerNorm q/k norms (weight and bias)
}  # fmt: skip


def _convert_variants(root: Path) -> dict:
    """Random-weight checkpoints of each variant (EP=1, no training), converted with verification."""
    from pipeline.platform import detect_platform, init_distributed
    from pipeline.tokenizer import tokenizer_for
    from pipeline.train.checkpoint import save_checkpoint
    from pipeline.train.model import build_model, init_model_parallel

    init_distributed(detect_platform("cpu"))
    results = {}
    for name, overrides in VARIANTS.items():
        task = name[:2]
        cfg = load_config(f"{task}-tiny", [*OVERRIDES[task], *overrides, "parallel.ep_size=1"])
        init_model_parallel(cfg)
        tokenizer = tokenizer_for(cfg)
        model = build_model(cfg, tokenizer.vocab_size)
        with torch.no_grad():  # megatron starts biases at 0 and norms at 1: make every parameter count
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 0.05)
        save_checkpoint(root / name, 0, model, torch.optim.AdamW(model.parameters()), cfg, tokenizer)
        results[name] = convert(root / name, root / f"{name}-export", log=lambda line: None)["parity"]
    return results


def test_every_model_variant_matches_megatron(runs):
    assert sorted(runs["variants"]) == sorted(VARIANTS)
    for name, parity in runs["variants"].items():
        assert parity["passed"], (name, parity)
    config = json.loads((runs["variants_root"] / "mt-export" / fmt.CONFIG_FILE).read_text())
    assert config["moe"]["moe_layers"] == {"decoder": [1, 2], "encoder": [1, 2]}
    assert config["model"]["lm_head_bias"] is False and "lm_head.weight" in fmt.dense_shapes(config)
    qwen = json.loads((runs["variants_root"] / "lm-qwen3-export" / fmt.CONFIG_FILE).read_text())
    assert qwen["format_version"] == fmt.FORMAT_VERSION == 2
    assert (qwen["model"]["bias"], qwen["model"]["qk_norm"], qwen["moe"]["router"]["bias"]) == (False, True, False)
    assert "decoder.layers.1.attn.q_norm.weight" in fmt.dense_shapes(qwen)
    assert not [name for name in fmt.dense_shapes(qwen) if name.endswith(".bias")]
    assert fmt.expert_shapes(qwen).keys() == {"fc1.weight", "fc2.weight"}
    mt_qk = json.loads((runs["variants_root"] / "mt-qk-norm-export" / fmt.CONFIG_FILE).read_text())
    assert "encoder.layers.1.attn.k_norm.bias" in fmt.dense_shapes(mt_qk)
