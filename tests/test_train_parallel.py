"""Tensor parallelism in training (megatron TP + sequence parallelism, x EP, on 2 real gloo ranks): a TP-split model
computes what the same weights compute at TP=1 (logits, loss and the synced gradient norm), and its checkpoint converts
through dist_checkpointing's resharding into the same EP-agnostic export, whose logits match the TP=2 model's."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import LM_TINY

from pipeline.config import load_config
from pipeline.platform.testing import run_distributed

REPO = Path(__file__).resolve().parent.parent
# Biases on, as lm-tiny has them: TP x EP=2 (TP without EP refuses biased experts, see parallel_config).
TINY_LM = [*LM_TINY, "train.steps=4", "train.eval_interval=4", "train.save_interval=4"]
TP2 = ["parallel.tp_size=2", "parallel.ep_size=2"]  # 2 ranks: the dense layers split in two, 4 experts on each rank
# 2 ranks at TP=1: two data-parallel replicas of half the micro batch read the same global batch. (Not EP=1 on one
# rank: megatron-core 0.16.1 cannot take gradients through biased experts at EP=1: the in-place bias add of
# parallel_config, on a one-rank all-reduce.)
TP1 = ["parallel.tp_size=1", "parallel.ep_size=2", "train.micro_batch_size=2"]
ATOL = RTOL = 1e-5


def _outputs(name: str, overrides: list[str], ckpt: str) -> dict:
    """Build the model at this layout, load `ckpt`: the logits of the parity batch, and the loss and synced grad norm
    of the first training batch (the loop's own gradient code, unclipped)."""
    from pipeline.convert.verify import parity_batch
    from pipeline.tokenizer import tokenizer_for
    from pipeline.train import checkpoint as ckpt_io
    from pipeline.train.batches import build_batches
    from pipeline.train.grads import ParamSets, parallel_groups, scale_aux_loss_grads, sync_and_clip_grads
    from pipeline.train.model import build_model, init_model_parallel, model_logits, model_loss

    cfg = load_config(name, overrides)
    init_model_parallel(cfg)
    groups = parallel_groups()
    tok = tokenizer_for(cfg)
    model = build_model(cfg, tok.vocab_size)
    ckpt_io.load_model(model, Path(ckpt))
    model.eval()
    with torch.no_grad():
        # The first validation batch at the micro batch size of TINY_LM, whatever this layout's.
        logits = model_logits(model, parity_batch(load_config(name, TINY_LM), tok)).cpu()
    model.train()
    scale_aux_loss_grads(groups)
    batch = build_batches(cfg, tok, "train", groups.dp_rank, groups.dp_size).batch(0)
    tokens = torch.tensor([float(batch.num_tokens)])
    torch.distributed.all_reduce(tokens, group=groups.dp)
    loss_sum = model_loss(model, batch)
    (loss_sum / tokens).backward()
    grad_norm = sync_and_clip_grads(ParamSets.of(model), float("inf"), groups)
    global_loss = loss_sum.detach().reshape(1)
    torch.distributed.all_reduce(global_loss, group=groups.dp)
    return {"logits": logits, "loss": (global_loss / tokens).item(), "grad_norm": grad_norm}


def _train_then_outputs(name: str, overrides: list[str], run_dir: str) -> dict:
    from pipeline.train.loop import train

    summary = train(load_config(name, overrides), Path(run_dir))
    from pipeline.train import checkpoint as ckpt_io

    ckpt = str(ckpt_io.latest_checkpoint(Path(run_dir)))
    return {"summary": summary, "ckpt": ckpt, **_outputs(name, overrides, ckpt)}


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tp2-run")
    ranks = run_distributed(
        _train_then_outputs, world_size=2, args=("lm-tiny", [*TINY_LM, *TP2], str(run_dir)), timeout_s=600
    )
    return {"run_dir": run_dir, "ranks": ranks, **ranks[0]}


@pytest.mark.slow
def test_a_tp2_ep2_model_computes_what_its_weights_compute_at_tp1(tp2):
    # The two TP ranks of the one replica gather the same logits, loss and norm.
    assert torch.equal(tp2["ranks"][1]["logits"], tp2["logits"])
    assert tp2["ranks"][1]["grad_norm"] == tp2["grad_norm"]
    assert tp2["summary"]["step"] == 4
    tp1, _ = run_distributed(_outputs, world_size=2, args=("lm-tiny", [*TINY_LM, *TP1], tp2["ckpt"]), timeout_s=300)
    torch.testing.assert_close(tp1["logits"], tp2["logits"], rtol=RTOL, atol=ATOL)
    assert tp1["loss"] == pytest.approx(tp2["loss"], rel=RTOL)
    # Without summing the sequence-parallel weights' grads over the TP group (norms, router): 0.9756 vs 0.9876.
    assert tp1["grad_norm"] == pytest.approx(tp2["grad_norm"], rel=RTOL)
    print(
        f"TP=2xEP=2 vs TP=1: loss {tp2['loss']:.6f} vs {tp1['loss']:.6f}, grad norm {tp2['grad_norm']:.6f} vs "
        f"{tp1['grad_norm']:.6f}, logits max abs diff {(tp1['logits'] - tp2['logits']).abs().max().item():.2e}"
    )


@pytest.mark.slow
def test_a_tp2_checkpoint_converts_to_an_export_with_the_tp2_logits(tp2, tmp_path):
    from moe_infer.model import load_model
    from pipeline.convert.verify import relative_difference

    out = tmp_path / "export"
    cmd = [sys.executable, "-m", "pipeline.convert", "--ckpt", str(tp2["run_dir"]), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "trained with TP=2 x EP=2 on 2 ranks" in proc.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["provenance"]["parity"]["passed"]
    tokens = _parity_tokens(tp2["ckpt"])
    exported = load_model(out, device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        difference = relative_difference(tp2["logits"], exported(tokens))
    print(f"export of the TP=2 checkpoint vs the TP=2 model: max relative logit difference {difference:.1e}")
    assert difference <= 1e-4


def _parity_tokens(ckpt: str) -> torch.Tensor:
    from pipeline.convert.source import open_checkpoint
    from pipeline.convert.verify import parity_batch

    source = open_checkpoint(Path(ckpt))
    return parity_batch(source.cfg, source.tokenizer).tokens


def test_resuming_at_another_tp_or_ep_layout_is_refused_with_one_message(tmp_path):
    from pipeline.errors import CheckpointError
    from pipeline.train import checkpoint as ckpt_io

    ckpt = tmp_path / "step_000004"
    (ckpt / "model").mkdir(parents=True)
    (ckpt / "config.yaml").write_text("{}")
    (ckpt / "tokenizer.model").write_text("")
    meta = {"format_version": ckpt_io.FORMAT_VERSION, "step": 4, "world_size": 1, "tp_size": 1, "ep_size": 1}
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="saved with tp_size 1, ep_size 1; resuming needs the same layout") as err:
        ckpt_io.load_train_state(None, ckpt, (2, 1))
    assert "got tp_size 2, ep_size 1" in str(err.value)
    meta.pop("tp_size")  # saved before tensor parallelism: TP=1
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="got tp_size 1, ep_size 2"):
        ckpt_io.load_train_state(None, ckpt, (1, 2))
