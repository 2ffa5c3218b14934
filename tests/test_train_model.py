"""The megatron model layer: GPT (LM) and T5 (MT) MoE models with EP=2 on 2 real gloo ranks, routing records, decoding.

Each suite runs once per module on 2 spawned ranks (importing megatron costs seconds per spawn) and returns plain
values; the test functions check parts of them. Workers (leading underscore) run inside the ranks.
"""

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist

from moe_infer.placement.routing_traces import load_traces, save_traces
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.platform.testing import run_distributed
from pipeline.tokenizer import BOS_ID, EOS_ID, PAD_ID
from pipeline.train.batch import LMBatch, MTBatch

VOCAB = 40
SMALL = [
    "model.hidden_size=32",
    "model.ffn_hidden_size=64",
    "model.num_attention_heads=4",
    "model.seq_length=16",
    "moe.num_experts=4",
    "moe.interval=2",
]
LM = ["model.num_layers=4", *SMALL]  # MoE on layers 2 and 4
MT = ["model.encoder_layers=2", "model.num_layers=4", "data.size=fixture", *SMALL]  # decoder deeper than encoder
# The top-1 cases also take every other variant of the model: one spawn covers them all.
TOP1 = [
    "moe.topk=1",
    "moe.router_pre_softmax=true",
    "moe.dispatcher=allgather",
    "moe.z_loss_coeff=0.001",
    "model.position_embedding=rope",
    "model.activation=swiglu",
    "model.norm=rmsnorm",
    "model.tie_embeddings=false",
    "model.bias=false",
    "model.qk_norm=true",
]
TRAIN_STEPS = 30


def _lm_batch(rank: int) -> LMBatch:
    """A repeating pattern (learnable), a different phase per row and rank. [4, 16]."""
    stream = torch.tensor([4 + (i % 7) for i in range(64)])
    rows = torch.stack([stream[3 * b + rank : 3 * b + rank + 17] for b in range(4)])
    return LMBatch(tokens=rows[:, :-1], labels=rows[:, 1:], loss_mask=torch.ones(4, 16))


def _mt_batch(sources: list[list[int]]) -> MTBatch:
    """The copy task: target = source. Padded like the data layer's batches."""
    n, ss, st = len(sources), max(map(len, sources)) + 1, max(map(len, sources)) + 1
    src, tgt_in, labels = (torch.full((n, w), PAD_ID) for w in (ss, st, st))
    for i, s in enumerate(sources):
        src[i, : len(s) + 1] = torch.tensor([*s, EOS_ID])
        tgt_in[i, : len(s) + 1] = torch.tensor([BOS_ID, *s])
        labels[i, : len(s) + 1] = torch.tensor([*s, EOS_ID])
    return MTBatch(src, tgt_in, labels, labels.ne(PAD_ID).float(), src.eq(PAD_ID), labels.eq(PAD_ID))


def _mt_sources(rank: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7 + rank)
    return [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in (9, 6, 12, 4)]


def _grad_norms(model) -> dict[str, float]:
    return {n: (p.grad.float().norm().item() if p.grad is not None else math.nan) for n, p in model.named_parameters()}


def _check_forward_backward(task: str, overrides: list[str], batch) -> dict:
    """Build, one forward/backward, routing counts and aux losses. Returns what the test compares across ranks."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from pipeline.train.model import build_model, is_expert_param, model_loss, moe_aux_losses
    from pipeline.train.routing import RoutingRecorder

    cfg = load_config(f"{task}-tiny", overrides)
    model = build_model(cfg, VOCAB)
    with RoutingRecorder(model) as recorder:
        loss = model_loss(model, batch)
        loss.backward()
        local, total = recorder.counts(reduce=False), recorder.counts()
    stacks = {"decoder": cfg.model.num_layers, "encoder": cfg.model.encoder_layers}
    return {
        "loss": loss.item(),
        "tokens": batch.num_tokens,
        "grads": _grad_norms(model),
        "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
        "expert_flags": {n: is_expert_param(p) for n, p in model.named_parameters()},
        "moe_layers": [n for n, m in model.named_modules() if isinstance(m, MoELayer)],
        "expected_moe_layers": sorted(
            f"{stack}.layers.{n - 1}.mlp"
            for stack, depth in stacks.items()
            for n in range(1, depth + 1)
            if cfg.moe.is_moe_layer(n)
        ),
        "layer_names": recorder.layer_names,
        "local_counts": {k: v.tolist() for k, v in local.items()},
        "global_counts": {k: v.tolist() for k, v in total.items()},
        "aux": moe_aux_losses(),
        "aux_after_clear": moe_aux_losses(),
        "final_norms": [n for n, m in model.named_modules() if n.endswith("final_layernorm") and m is not None],
        "topk": cfg.moe.topk,
        "norms": sorted(
            {type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.LayerNorm | torch.nn.RMSNorm)}
        ),
    }


def _train(model, batch, steps: int) -> list[float]:
    """AdamW steps as the training loop takes them: dense grads summed over the ranks, each loss / global tokens."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from pipeline.train.model import is_expert_param, model_loss, moe_aux_losses

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / dist.get_world_size()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.tensor([float(batch.num_tokens)])
    dist.all_reduce(tokens)
    losses = []
    for _ in range(steps):
        loss = model_loss(model, batch) / tokens
        loss.backward()
        for p in model.parameters():
            if not is_expert_param(p) and p.grad is not None:
                dist.all_reduce(p.grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        moe_aux_losses()
        total = loss.detach().reshape(1)
        dist.all_reduce(total)
        losses.append(total.item())
    return losses


def _ep1_parity(task: str, overrides: list[str], model, batch) -> float:
    """Max |logits| difference between this EP=2 model and an EP=1 model given the same (gathered) weights."""
    from megatron.core import parallel_state

    from pipeline.train.model import build_model, init_model_parallel, model_logits

    model.eval()
    with torch.no_grad():
        logits_ep2 = model_logits(model, batch)
    ep_rank, ep_size = (
        parallel_state.get_expert_model_parallel_rank(),
        parallel_state.get_expert_model_parallel_world_size(),
    )
    local_experts = model.config.num_moe_experts // ep_size
    full, mine = {}, {}
    for name, tensor in model.state_dict().items():
        if ".local_experts." not in name:
            full[name] = tensor
            continue
        head, _, rest = name.partition(".local_experts.")
        k, _, tail = rest.partition(".")
        mine[f"{head}.local_experts.{ep_rank * local_experts + int(k)}.{tail}"] = tensor
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    for part in gathered:
        full.update(part)
    parallel_state.destroy_model_parallel()
    cfg1 = load_config(f"{task}-tiny", [*overrides, "parallel.ep_size=1"])
    init_model_parallel(cfg1)
    model1 = build_model(cfg1, VOCAB)
    model1.load_state_dict(full, strict=True)  # strict: model1 holds all the experts, each under its global id
    model1.eval()
    with torch.no_grad():
        logits_ep1 = model_logits(model1, batch)
    return (logits_ep1 - logits_ep2).abs().max().item()


def _lm_suite() -> dict:
    from pipeline.train.model import build_model, init_model_parallel, model_logits, model_loss

    out = {}
    try:
        init_model_parallel(load_config("lm-tiny", [*LM, "moe.num_experts=8", "parallel.ep_size=4"]))
    except ConfigError as err:
        out["bad_ep_error"] = str(err)
    cfg = load_config("lm-tiny", LM)
    init_model_parallel(cfg)
    batch = _lm_batch(dist.get_rank())
    out["top1"] = _check_forward_backward("lm", [*LM, *TOP1], batch)
    out["top2"] = _check_forward_backward("lm", LM, batch)

    # The aux loss reaches the router through MoEAuxLossAutoScaler even when the main loss has no gradient.
    model = build_model(cfg, VOCAB)
    (model_loss(model, batch) * 0.0).backward()
    out["aux_only_grads"] = _grad_norms(model)

    bf16 = build_model(load_config("lm-tiny", [*LM, "train.dtype=bf16"]), VOCAB)
    model_loss(bf16, batch).backward()
    out["bf16"] = {
        "param_dtypes": sorted({str(p.dtype) for p in bf16.parameters()}),
        "logits_dtype": str(model_logits(bf16, batch).dtype),
        "grads_finite": all(torch.isfinite(p.grad).all().item() for p in bf16.parameters() if p.grad is not None),
    }

    model = build_model(cfg, VOCAB)
    out["losses"] = _train(model, batch, TRAIN_STEPS)
    out["parity"] = _ep1_parity("lm", LM, model, batch)
    return out


def _mt_suite(trace_dir: str) -> dict:
    from pipeline.train.decode import greedy_translate
    from pipeline.train.model import build_model, decode, encode, init_model_parallel, model_logits
    from pipeline.train.routing import RoutingRecorder

    rank = dist.get_rank()
    cfg = load_config("mt-tiny", MT)
    init_model_parallel(cfg)
    batch = _mt_batch(_mt_sources(rank))
    out = {"top1": _check_forward_backward("mt", [*MT, *TOP1], batch)}
    out["top2"] = _check_forward_backward("mt", MT, batch)

    model = build_model(cfg, VOCAB)
    out["losses"] = _train(model, batch, TRAIN_STEPS)
    model.eval()

    with RoutingRecorder(model, record_tokens=True) as recorder, torch.no_grad():
        for _ in range(2):
            model_logits(model, batch)
        path = save_traces(recorder.traces(), f"{trace_dir}/rank{rank}.npz", {"num_experts": 4, "topk": 2})
        counts = recorder.counts(reduce=False)
    layers, meta = load_traces(path)
    out["traces"] = {
        "names": list(layers),
        "rows": {n: len(t["experts"]) for n, t in layers.items()},
        "batches": {n: sorted(set(t["batch"].tolist())) for n, t in layers.items()},
        "bincount_matches": all(
            np.bincount(t["experts"].reshape(-1), minlength=4).tolist() == counts[n].tolist() for n, t in layers.items()
        ),
        "src_tokens": int((~batch.src_pad).sum()),
        "tgt_tokens": int((~batch.tgt_pad).sum()),
        "meta": meta,
    }

    # Unequal work: rank 0 translates 3 sentences (2 batches), rank 1 one (1 batch, then dummies).
    sources = _mt_sources(0)[:3] if rank == 0 else [_mt_sources(0)[1]]
    outputs = greedy_translate(model, sources, max_len=10, batch_size=2)
    # Teacher-forced argmax over each output must reproduce it (one forward per rank: MoE forwards are collective).
    check = _mt_batch([o if o else [PAD_ID] for o in outputs])
    src = _mt_batch(sources)
    with torch.no_grad():
        logits = decode(model, encode(model, src.src, src.src_pad), check.tgt_in, src.src_pad)
    argmax = logits.argmax(-1).tolist()
    empty = greedy_translate(model, sources[:1] if rank == 0 else [], max_len=10, batch_size=2)
    out["greedy"] = {
        "outputs": outputs,
        "empty_rank": empty,
        "consistent": all(argmax[i][: len(o)] == o for i, o in enumerate(outputs)),
        "sources": sources,
    }
    out["parity"] = _ep1_parity("mt", MT, model, batch)
    return out


@pytest.fixture(scope="module")
def lm_ranks():
    return run_distributed(_lm_suite, world_size=2, timeout_s=240)


@pytest.fixture(scope="module")
def mt_ranks(tmp_path_factory):
    return run_distributed(_mt_suite, world_size=2, args=(str(tmp_path_factory.mktemp("traces")),), timeout_s=240)


def _check_build(ranks: list[dict], key: str) -> None:
    for rank, got in enumerate(ranks):
        got = got[key]
        assert math.isfinite(got["loss"]), f"rank {rank}: loss {got['loss']}"
        assert all(math.isfinite(v) for v in got["grads"].values()), f"rank {rank}: missing or non-finite grads"
        experts = [n for n in got["grads"] if ".local_experts." in n]
        routers = [n for n in got["grads"] if n.endswith("router.weight")]
        assert experts and routers
        assert sum(got["grads"][n] for n in experts) > 0, "no gradient reached the experts"
        assert all(got["grads"][n] > 0 for n in routers), "no gradient reached a router"
        assert sorted(got["moe_layers"]) == got["expected_moe_layers"]
        assert got["layer_names"] == [n.removesuffix(".mlp") for n in got["moe_layers"]]  # module order
        assert got["expert_flags"] == {n: ".local_experts." in n for n in got["expert_flags"]}
        assert got["aux"]["load_balancing_loss"] > 0 and got["aux_after_clear"]["load_balancing_loss"] == 0
    w0, w1 = ranks[0][key]["weights"], ranks[1][key]["weights"]
    for name in w0:  # biases start at zero everywhere: only expert weight matrices differ
        expert_weight = ".local_experts." in name and name.endswith(".weight")
        assert torch.equal(w0[name], w1[name]) != expert_weight, f"{name}: experts differ across EP ranks, dense not"


def _check_variants(ranks: list[dict]) -> None:
    top1, top2 = ranks[0]["top1"], ranks[0]["top2"]
    assert top1["norms"] == ["RMSNorm"] and top2["norms"] == ["LayerNorm"]
    assert top1["aux"]["z_loss"] > 0 and "z_loss" not in top2["aux"]
    assert "embedding.position_embeddings.weight" in top2["weights"]
    assert "embedding.position_embeddings.weight" not in top1["weights"]  # rope
    # model.bias=false: no linear layer has a bias, the router included (RMSNorm has none either); T5's tied lm_head
    # keeps its own (megatron's T5LMHead), untied here.
    assert [n for n in top1["weights"] if n.endswith(".bias")] == []
    assert {n for n in top2["weights"] if n.endswith("router.bias")}
    # model.qk_norm=true: per-head norms (head_dim 8) in every self-attention, none in cross-attention
    qk = {n: w.shape for n, w in top1["weights"].items() if "_layernorm" in n and ("q_" in n or "k_" in n)}
    attentions = [n for n in top1["weights"] if n.endswith("linear_qkv.weight")]
    assert len(qk) == 2 * len(attentions) and set(qk.values()) == {torch.Size([8])}
    assert all(g > 0 for n, g in top1["grads"].items() if n in qk)
    assert not [n for n in top2["weights"] if "q_layernorm" in n]


def test_gpt_moe_builds_trains_and_shards_experts(lm_ranks):
    _check_build(lm_ranks, "top1")
    _check_build(lm_ranks, "top2")
    _check_variants(lm_ranks)
    assert "output_layer.weight" in lm_ranks[0]["top1"]["weights"]  # untied
    assert "output_layer.weight" not in lm_ranks[0]["top2"]["weights"]
    assert lm_ranks[0]["top2"]["layer_names"] == ["decoder.layers.1", "decoder.layers.3"]
    assert lm_ranks[0]["top2"]["final_norms"] == ["decoder.final_layernorm"]


def test_t5_moe_builds_trains_and_keeps_its_final_norms(mt_ranks):
    _check_build(mt_ranks, "top1")
    _check_build(mt_ranks, "top2")
    _check_variants(mt_ranks)
    got = mt_ranks[0]["top2"]
    assert got["layer_names"] == ["encoder.layers.1", "decoder.layers.1", "decoder.layers.3"]
    assert got["final_norms"] == ["encoder.final_layernorm", "decoder.final_layernorm"]
    assert {"encoder.final_layernorm.weight", "decoder.final_layernorm.weight"} <= got["weights"].keys()


def test_router_counts_cover_every_token_topk_times(lm_ranks, mt_ranks):
    for key in ("top1", "top2"):
        per_rank = [r[key] for r in lm_ranks]
        for got in per_rank:
            assert all(sum(c) == got["tokens"] * got["topk"] for c in got["local_counts"].values())
        for layer, total in per_rank[0]["global_counts"].items():
            assert total == [a + b for a, b in zip(*(r["local_counts"][layer] for r in per_rank), strict=True)]
    for r in mt_ranks:  # padding is not counted: encoder layers see source tokens, decoder layers target tokens
        got, traces = r["top2"], r["traces"]
        for layer, counts in got["local_counts"].items():
            tokens = traces["src_tokens"] if layer.startswith("encoder") else traces["tgt_tokens"]
            assert sum(counts) == tokens * 2, layer


def test_aux_loss_gradient_reaches_the_router_on_its_own(lm_ranks):
    # The main loss was multiplied by 0: what reaches the routers is the load-balancing loss alone. It flows on into
    # the router inputs (so into earlier layers), never into anything after the last router.
    grads = lm_ranks[0]["aux_only_grads"]
    assert all(grads[n] > 0 for n in grads if n.endswith("router.weight"))
    after_last_router = [n for n in grads if n.startswith("decoder.layers.3.mlp.experts") or "final_layernorm" in n]
    assert after_last_router and all(grads[n] == 0 for n in after_last_router)
    assert grads["decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.weight"] > 0


def test_bf16_model(lm_ranks):
    got = lm_ranks[0]["bf16"]
    assert got["param_dtypes"] == ["torch.bfloat16"] and got["logits_dtype"] == "torch.float32"
    assert got["grads_finite"]


def test_training_steps_lower_the_loss(lm_ranks, mt_ranks):
    for ranks in (lm_ranks, mt_ranks):
        losses = ranks[0]["losses"]
        assert losses == ranks[1]["losses"]  # the all-reduced loss
        assert losses[-1] < 0.5 * losses[0], losses


def test_ep2_logits_match_an_ep1_model_with_the_same_weights(lm_ranks, mt_ranks):
    for ranks in (lm_ranks, mt_ranks):
        assert max(r["parity"] for r in ranks) < 1e-5


def test_init_model_parallel_rejects_an_ep_size_that_does_not_divide_the_ranks(lm_ranks):
    assert "parallel.ep_size" in lm_ranks[0]["bad_ep_error"] and "(2)" in lm_ranks[0]["bad_ep_error"]


def test_traces_round_trip_per_layer(mt_ranks):
    for r in mt_ranks:
        t = r["traces"]
        assert t["names"] == ["encoder.layers.1", "decoder.layers.1", "decoder.layers.3"]
        assert t["rows"] == {n: 2 * (t["src_tokens"] if n.startswith("enc") else t["tgt_tokens"]) for n in t["names"]}
        assert all(b == [0, 1] for b in t["batches"].values())
        assert t["bincount_matches"]
        assert t["meta"]["topk"] == 2 and t["meta"]["format"] == "moe-routing-traces"


def test_greedy_translate_with_unequal_work_per_rank(mt_ranks):
    for r in mt_ranks:
        g = r["greedy"]
        assert len(g["outputs"]) == len(g["sources"])
        assert all(len(o) <= 10 and BOS_ID not in o and EOS_ID not in o for o in g["outputs"])
        assert g["consistent"]
    assert mt_ranks[0]["greedy"]["empty_rank"] == mt_ranks[0]["greedy"]["outputs"][:1]
    assert mt_ranks[1]["greedy"]["empty_rank"] == []  # a rank with no sentences still steps with the others
    # The same sentence decodes the same alone (rank 1) as batched with a longer one (rank 0): masks hide padding.
    assert mt_ranks[1]["greedy"]["outputs"][0] == mt_ranks[0]["greedy"]["outputs"][1]
