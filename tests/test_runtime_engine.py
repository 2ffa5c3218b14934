"""The engine end to end on small random exports: every MoE implementation, served at EP=1 and EP=2 (real gloo ranks
started through DeepSpeed's comm layer), gives the single-process reference model's logits to fp32 rounding when it
drops nothing; generation and translation under EP=2 equal the single-process results; an idle rank keeps up.
"""

from functools import partial

import pytest
import torch
from random_exports import random_export_config, write_random_export

from moe_infer.buffering.store import ENGINE_EVICTIONS, BufferedExperts
from moe_infer.model import load_model
from moe_infer.moe.layer import POLICIES, MoEOptions
from moe_infer.runtime.engine import Engine, EngineError, EngineOptions
from moe_infer.runtime.generate import GenerationSettings, generate
from moe_infer.runtime.translate import TranslationSettings, translate
from pipeline.platform.testing import DistributedTestFailure, run_distributed

# Large enough that no policy drops: static slots = 4 * tokens per rank, DeepSpeed pads to the largest count.
NO_DROP = MoEOptions(capacity_fraction=4.0, capacity_factor=4.0, drop_tokens=False)
TOKENS_PER_RANK = [(3, 7), (0, 7)]  # rank 0: 3 sequences of 7 tokens; rank 1: none (it still joins every exchange)
QWEN = dict(position_embedding="rope", norm="rmsnorm", activation="swiglu", bias=False, qk_norm=True)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine-exports")
    return {
        "top1": write_random_export(root / "top1", random_export_config("decoder", topk=1, pre_softmax=True), seed=1),
        "top2": write_random_export(root / "top2", random_export_config("decoder", topk=2, pre_softmax=False), seed=2),
        "mt": write_random_export(root / "mt", random_export_config("encoder-decoder", num_experts=4), seed=3),
        # Qwen3-MoE's shape: experts, router and attention without biases, q/k norms, RMSNorm, SwiGLU, RoPE
        "qwen": write_random_export(root / "qwen", random_export_config("decoder", **QWEN), seed=5),
        "top2-e8": write_random_export(
            root / "top2-e8", random_export_config("decoder", num_experts=8, topk=2, pre_softmax=False), seed=4
        ),
    }


def _serve_every_policy(export: str) -> dict[str, float]:
    """On each rank: the largest difference from the reference model, per policy, over this rank's tokens."""
    diffs = {}
    for policy in POLICIES:
        engine = Engine.start(export, EngineOptions(policy=policy, moe=NO_DROP, timeout_s=60))
        batch, length = TOKENS_PER_RANK[engine.rank]
        tokens = torch.randint(4, 50, (batch, length), generator=torch.Generator().manual_seed(engine.rank))
        reference = load_model(export)(tokens)
        with torch.inference_mode():
            logits = engine.model(tokens)
        assert logits.shape == reference.shape
        diffs[policy] = float((logits - reference).abs().max()) if batch else 0.0
        assert all(layer.calls == 1 and layer.totals.pairs_dropped == 0 for layer in engine.moe_layers), policy
    return diffs


@pytest.mark.parametrize(
    ("ranks", "routing"),
    [
        pytest.param(1, "top1", marks=pytest.mark.slow),
        pytest.param(1, "top2", marks=pytest.mark.slow),
        (1, "qwen"),
        pytest.param(2, "top1", marks=pytest.mark.slow),
        (2, "top2"),
    ],
)
def test_every_policy_equals_the_reference_model(exports, ranks, routing):
    per_rank = run_distributed(
        _serve_every_policy, world_size=ranks, args=(str(exports[routing]),), init_process_group=False, timeout_s=180
    )
    for diffs in per_rank:
        assert set(diffs) == set(POLICIES)
        assert max(diffs.values()) < 1e-5, diffs


# Where experts live, per MoE layer of the top2 export (4 experts, 2 ranks), never the contiguous [[0, 1], [2, 3]]:
SHUFFLED = [[[3, 0], [1, 2]], [[2, 1], [0, 3]]]  # every expert once, in a non-contiguous order
REPLICATED = [[[0, 1], [2, 3, 1]], [[0, 1, 3], [2, 3, 0]]]  # expert 1 on both ranks in one layer, 0 and 3 in the other
PLACED = [("dynamic", SHUFFLED), ("static", SHUFFLED), ("dynamic", REPLICATED)]


def _where_experts_run(export: str) -> list[dict]:
    """Each PLACED case served on this rank, observed from outside the engine: the expert files Engine.start opened,
    the global expert each local slot holds (found by its weights), the real rows each slot computed (static's padding
    has probability 0), the experts the router picked for this rank's tokens, and the largest difference from the
    reference model's logits."""
    from collections import Counter
    from unittest import mock

    from safetensors.torch import load_file

    from moe_infer import export_format as fmt
    from moe_infer.model.loader import Export
    from moe_infer.moe.experts import LocalExperts
    from moe_infer.placement import Placement
    from moe_infer.placement.replicas import ReplicatedPlacement
    from moe_infer.runtime.engine import moe_layer_names

    names = moe_layer_names(Export.open(export))
    bias_of = {(n, e): load_file(f"{export}/{_expert_file(n, e)}")["fc1.bias"] for n in names for e in range(4)}
    read_tensors, forward = Export.read_tensors, LocalExperts.forward
    opened: list[str] = []
    rows: Counter = Counter()  # (layer name, local slot) -> rows computed
    layer_of: dict[int, str] = {}  # id of a layer's expert store -> the layer's name

    def spy_read(self, relpath):
        opened.append(relpath)
        return read_tensors(self, relpath)

    def spy_forward(self, routed):  # routed: moe_infer.moe.experts.Rows, grouped by local slot
        start = 0
        for slot, n in enumerate(routed.rows_L):
            rows[layer_of[id(self)], slot] += int((routed.probs_M[start : start + n] != 0).sum())
            start += n
        return forward(self, routed)

    seen = []
    for policy, lists in PLACED:
        placements = {}
        for i, name in enumerate(names):
            ranks = lists[i % 2]
            kind = ReplicatedPlacement if sum(map(len, ranks)) > 4 else Placement
            placements[name] = kind.from_rank_lists(ranks, 4)
        opened.clear()
        rows.clear()
        with mock.patch.object(Export, "read_tensors", spy_read):
            engine = Engine.start(export, EngineOptions(policy=policy, moe=NO_DROP, placement=placements, timeout_s=60))
        slots, routing = {}, {}
        for layer in engine.moe_layers:
            store = layer.experts
            layer_of[id(store)] = layer.name
            biases = [store.weights.b1_GF[s] for s in range(store.num_local)]
            slots[layer.name] = [e for b in biases for e in range(4) if torch.equal(b, bias_of[layer.name, e])]
            routing[layer.name] = []
            layer.router.register_forward_hook(partial(_record_routing, routing[layer.name]))
        tokens = torch.randint(4, 50, (2 + engine.rank, 6), generator=torch.Generator().manual_seed(engine.rank))
        with mock.patch.object(LocalExperts, "forward", spy_forward), torch.inference_mode():
            logits = engine.model(tokens)
        computed = {n: {slots[n][s]: count for (m, s), count in rows.items() if m == n and count} for n in names}
        seen.append(
            {
                "opened": sorted(p for p in opened if p.startswith(fmt.EXPERTS_DIR)),
                "slots": slots,
                "rows": computed,
                "routing": routing,
                "diff": float((logits - load_model(export)(tokens)).abs().max()),
            }
        )
    with pytest.raises(EngineError, match=r"replicas, which only the dynamic policy serves"):
        Engine.start(export, EngineOptions(policy="static", placement=placements, timeout_s=60))  # the last: replicas
    return seen


def _record_routing(picks: list, router, inputs, outputs) -> None:
    """A forward hook on a router: the experts it picked for each token, appended to `picks`."""
    picks.extend(outputs[1].tolist())


def _expert_file(layer_name: str, expert: int) -> str:
    """The export's file of one expert of a served MoE layer ("decoder.layers.2")."""
    from moe_infer import export_format as fmt

    stack, _, number = layer_name.split(".")
    return fmt.expert_file(stack, int(number), expert)


def test_a_placement_decides_which_rank_loads_and_computes_each_expert(exports):
    """Non-contiguous placements (dynamic and static) and replicas (dynamic): each rank opens exactly the expert files
    its placement names and holds them in its order (told apart by their weights, not by asking the engine); each
    expert's rows, from both ranks' tokens, are computed where the placement sends them (a replicated expert's
    token t by copy t mod copies); the logits are the reference model's."""
    from collections import Counter

    from moe_infer.model.loader import Export
    from moe_infer.runtime.engine import moe_layer_names

    export = str(exports["top2"])
    names = moe_layer_names(Export.open(export))
    per_rank = run_distributed(
        _where_experts_run, world_size=2, args=(export,), init_process_group=False, timeout_s=180
    )
    for case, (policy, lists) in enumerate(PLACED):
        results = [seen[case] for seen in per_rank]
        for rank, result in enumerate(results):
            held = {name: lists[i % 2][rank] for i, name in enumerate(names)}
            files = [_expert_file(name, e) for name in names for e in held[name]]
            assert result["opened"] == sorted(files), (policy, rank)
            assert result["slots"] == held, (policy, rank)
            assert result["diff"] < 1e-5, (policy, rank)
        for i, name in enumerate(names):
            ranks = lists[i % 2]
            copies = {e: [r for r, experts in enumerate(ranks) if e in experts] for e in range(4)}
            expected = [Counter() for _ in ranks]
            for result in results:  # every rank's tokens, wherever they were computed
                for t, experts in enumerate(result["routing"][name]):
                    for e in experts:
                        expected[copies[e][t % len(copies[e])]][e] += 1
            assert sum(sum(c.values()) for c in expected) == 2 * (2 + 3) * 6  # top-2, both ranks' tokens
            assert [r["rows"][name] for r in results] == [dict(c) for c in expected], (policy, name)


CALLS = [[(2, 5), (1, 5)], [(0, 5), (3, 5)], [(0, 5), (0, 5)]]  # per model call, per rank: (sequences, length)


def _call_tokens(call: int, rank: int) -> torch.Tensor:
    batch, length = CALLS[call][rank]
    return torch.randint(4, 50, (batch, length), generator=torch.Generator().manual_seed(10 * call + rank))


def _record_loads(export: str) -> dict[str, list]:
    """Serve CALLS with a load recorder; one process serves every rank's tokens of a call as one batch."""
    from moe_infer.runtime.recorder import LoadRecorder

    engine = Engine.start(export, EngineOptions(policy="dynamic", timeout_s=60))
    recorder = LoadRecorder(engine)
    with torch.inference_mode():
        for call in range(len(CALLS)):
            ranks = [engine.rank] if engine.world_size > 1 else range(len(CALLS[call]))
            engine.model(torch.cat([_call_tokens(call, rank) for rank in ranks]))
    return {name: counts.tolist() for name, counts in recorder.gather().items()}


def test_recorded_expert_loads_are_the_groups_and_skip_empty_calls(exports):
    args = (str(exports["top2"]),)
    single = run_distributed(_record_loads, world_size=1, args=args, init_process_group=False)[0]
    both = run_distributed(_record_loads, world_size=2, args=args, init_process_group=False)
    assert both[0] == both[1] == single
    for counts in single.values():
        assert len(counts) == 2  # the third call had no tokens anywhere
        assert [sum(row) for row in counts] == [3 * 5 * 2, 3 * 5 * 2]  # sequences x length x top-2


def _generate_and_translate(lm: str, mt: str, slots: int | None = None, eviction: str = "paper") -> tuple[list, list]:
    options = EngineOptions(policy="dynamic", expert_slots=slots, eviction=eviction, timeout_s=60)
    engine = Engine.start(lm, options)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14], [15, 16]]
    settings = GenerationSettings(max_new_tokens=5, batch_size=2)
    generated = engine.gather(generate(engine.model, engine.share(prompts), settings, engine.sync), len(prompts))
    # Sampling is seeded per request id, so a prompt's sample is the same whichever rank serves it.
    sampling = GenerationSettings(max_new_tokens=5, batch_size=2, temperature=1.0, top_k=20, seed=7)
    ids = engine.share(range(len(prompts)))
    sampled = generate(engine.model, engine.share(prompts), sampling, engine.sync, request_ids=ids)
    generated += engine.gather(sampled, len(prompts))
    _check_buffering(engine)
    engine = Engine.start(mt, options)
    sources = [[5, 6, 7, 3], [8, 3], [9, 10, 11, 12, 3]]
    settings = TranslationSettings(max_len=6, beam_size=2, batch_size=2)
    translated = engine.gather(translate(engine.model, engine.share(sources), settings, engine.sync), len(sources))
    _check_buffering(engine)
    return generated, translated


def _check_buffering(engine: Engine) -> None:
    """Buffering is on exactly when there are fewer slots than local experts, and then it copied experts in (in some
    layer: with a few tokens, a layer may never need more than the experts it starts with)."""
    misses = 0
    for layer in engine.moe_layers:
        local = len(engine.placements[layer.name].local_experts(engine.rank))
        slots = engine.options.expert_slots
        buffered = slots is not None and slots < local
        assert isinstance(layer.experts, BufferedExperts) == buffered, (layer.name, slots)
        misses += layer.experts.stats.misses if buffered else 0
    assert misses > 0 or not slots or slots >= 2, "buffering with one slot copied nothing"


def test_generation_and_translation_under_two_ranks_equal_one_process(exports):
    args = (str(exports["top2"]), str(exports["mt"]))
    single = run_distributed(_generate_and_translate, world_size=1, args=args, init_process_group=False)[0]
    both = run_distributed(_generate_and_translate, world_size=2, args=args, init_process_group=False, timeout_s=180)
    assert both[0] == both[1] == single
    assert all(len(tokens) > 0 for tokens in single[0])


def _with_every_buffering(lm: str, mt: str) -> dict[tuple[str, int], tuple]:
    outputs = {}
    for eviction in ENGINE_EVICTIONS:
        for slots in (1, 2, 3):  # the MT export's 2 local experts are all resident from 2 slots on
            outputs[eviction, slots] = _generate_and_translate(lm, mt, slots, eviction)
    return outputs


def test_expert_buffering_changes_no_output_under_two_ranks(exports):
    """Generation and beam translation with K = 1, 2, 3 device slots per layer (of 4 and 2 local experts) and every
    eviction policy equal the unbuffered single process, token for token."""
    args = (str(exports["top2-e8"]), str(exports["mt"]))
    single = run_distributed(_generate_and_translate, world_size=1, args=args, init_process_group=False)[0]
    both = run_distributed(_with_every_buffering, world_size=2, args=args, init_process_group=False, timeout_s=300)
    for outputs in both:
        for setting, output in outputs.items():
            assert output == single, setting


def _start(export: str) -> None:
    Engine.start(export, EngineOptions(timeout_s=30))


def test_an_expert_count_the_ranks_do_not_divide_is_refused(tmp_path):
    export = write_random_export(tmp_path / "three", random_export_config("decoder", num_experts=3))
    message = r"EngineError: .*three: the export has 3 experts per MoE layer, which cannot be split evenly over 2 ranks"
    with pytest.raises(DistributedTestFailure, match=message):
        run_distributed(_start, world_size=2, args=(str(export),), init_process_group=False, timeout_s=60)


def test_an_unknown_policy_is_named():
    with pytest.raises(EngineError, match=r"unknown MoE policy 'fast'; expected one of dynamic, static"):
        Engine.start("anywhere", EngineOptions(policy="fast"))
