"""Online expert re-balancing (moe_infer.runtime.rebalance) on two real gloo ranks: re-fitting every two steps and
moving experts between the ranks changes no token, in the batch loop (dynamic, static, and dynamic with expert
buffering) and in the serving loop with requests arriving and in flight during the moves; every rank holds the same
placement after every re-fit; a rank that dies during a move ends the other one with the cause, not a hang.
"""

import dataclasses
import os

import pytest
import torch
from random_exports import random_export_config, write_random_export
from test_runtime_batching import ScriptedMailbox

from moe_infer.model import load_model
from moe_infer.moe.layer import MoEOptions
from moe_infer.placement.online import RebalanceOptions
from moe_infer.runtime.batching import Batcher
from moe_infer.runtime.control import ControlPlane
from moe_infer.runtime.engine import Engine, EngineOptions
from moe_infer.runtime.generate import GenerationSettings, generate
from moe_infer.runtime.rebalance import Rebalancer
from moe_infer.runtime.requests import Request
from moe_infer.runtime.steploop import Coordinator, StepLoop
from pipeline.platform.testing import DistributedTestFailure, run_distributed

# min_gain 0: every fitted placement that is no worse is taken, so experts move at nearly every re-fit.
OFTEN = RebalanceOptions(interval=2, window=4, min_gain=0.0)
SETTINGS = GenerationSettings(max_new_tokens=8, batch_size=3)
LENGTHS = [3, 1, 7, 5, 2, 9, 4, 6]
NO_DROP = MoEOptions(capacity_fraction=4.0)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    config = random_export_config(
        "decoder",
        num_experts=8,
        position_embedding="rope",
        tie_embeddings=False,
        activation="swiglu",
        norm="rmsnorm",
        bias=False,  # experts without biases: only their two weights move
    )
    export = str(write_random_export(tmp_path_factory.mktemp("rebalance") / "lm", config, seed=7))
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 50, (n,), generator=gen).tolist() for n in LENGTHS]
    settings = dataclasses.replace(SETTINGS, stop_at_eos=False)
    return export, prompts, settings, generate(load_model(export), prompts, settings)


class PlacementLog:
    """A step hook after the re-balancer: every layer's rank lists whenever they changed; and whether the MoE layers
    of the (one) stack still share one token-count agreement per forward pass (share_token_counts) after every step:
    a layer rebuilt by a move that left its stack's link would read a stale count, or agree on its own."""

    def __init__(self, engine: Engine):
        self.engine, self.seen, self.linked = engine, [], True

    def snapshot(self):
        return {n: [p.local_experts(r) for r in range(p.ranks)] for n, p in sorted(self.engine.placements.items())}

    def after_step(self, step, worked):
        self.linked &= len({id(m.dispatcher.tokens.counts) for m in self.engine.moe_layers}) == 1
        now = self.snapshot()
        if not self.seen or self.seen[-1][1] != now:
            self.seen.append((step, now))


def _start(export, policy="dynamic", slots=None, rebalance=OFTEN):
    engine = Engine.start(
        export, EngineOptions(policy=policy, expert_slots=slots, moe=NO_DROP, rebalance=rebalance, timeout_s=60)
    )
    rebalancer = Rebalancer(engine) if rebalance is not None else None
    return engine, rebalancer, PlacementLog(engine)


def _batch_and_loop(export, prompts, settings, batch_variants, serving_loop):
    """Per variant: the outputs and the placement log, and the re-balancer's totals."""
    results = {}
    for policy, slots in batch_variants:
        engine, rebalancer, log = _start(export, policy, slots)
        engine.sync.hooks += [rebalancer, log]
        outputs = engine.serve(prompts, settings)
        results[f"batch {policy} slots={slots}"] = (outputs, log.seen, rebalancer.figures(), log.linked)
    if serving_loop:
        results["serving loop"] = _serving_loop(export, prompts, settings)
    return results


def _serving_loop(
    export, prompts, settings
):  # The serving loop: rank 0's coordinator hands requests out as they arrive, some while experts move.
    engine, rebalancer, log = _start(export)
    requests = [Request(i, p, settings.decoding(i)) for i, p in enumerate(prompts)]
    script = []
    for request, gap in zip(requests, [0, 0, 2, 0, 1, 3, 0, 2], strict=True):
        script += [[] for _ in range(gap)] + [[request]]
    mailbox, coordinator = ScriptedMailbox(script), None
    loop = StepLoop(Batcher(engine.model, 3), ControlPlane(2, timeout_s=60), engine.rank, [rebalancer, log])
    if engine.rank == 0:
        coordinator = Coordinator(mailbox, 2, 3, shutdown_timeout_s=60, heartbeat_s=1)
    loop.run(coordinator)
    outputs = [mailbox.outputs.get(r.id) for r in requests] if engine.rank == 0 else None
    return outputs, log.seen, rebalancer.figures(), log.linked


@pytest.mark.parametrize(
    "batch_variants, serving_loop",
    [
        # The serving loop with resident experts (LocalExperts rebuilt), the batch loop with expert buffering.
        ([("dynamic", 2)], True),
        pytest.param([("dynamic", None), ("static", None)], False, marks=pytest.mark.slow),
    ],
    ids=["serving-loop+buffered", "batch-resident+static"],
)
def test_rebalancing_changes_no_token_and_every_rank_holds_the_same_placement(lm, batch_variants, serving_loop):
    export, prompts, settings, expected = lm
    args = (export, prompts, settings, batch_variants, serving_loop)
    rank0, rank1 = run_distributed(_batch_and_loop, world_size=2, args=args, init_process_group=False, timeout_s=240)
    for variant, (outputs, log0, figures, linked) in rank0.items():
        assert outputs == expected, variant
        _, log1, _, _ = rank1[variant]
        assert linked and rank1[variant][3], variant  # the moved layers' new dispatchers kept the stack's agreement
        assert log0 == log1, variant  # the same placement on both ranks after every re-fit, at the same steps
        moved = sum(layer["moves"] for layer in figures["layers"].values())
        assert figures["refits"] >= 3 and moved >= 2 and len(log0) >= 3, (variant, figures)
        for _, placement in log0:
            for rank_lists in placement.values():
                assert sorted(sum(rank_lists, [])) == list(range(8)) and [len(r) for r in rank_lists] == [4, 4]
        bytes_moved = sum(layer["bytes_moved"] for layer in figures["layers"].values())
        assert bytes_moved == moved * (2 * 48 * 32 + 32 * 48) * 4  # swiglu fc1 [2F, D], fc2 [D, F], no biases


def _die_during_a_move(export, prompts, settings):
    engine, rebalancer, _ = _start(export)
    if engine.rank == 1:
        rebalancer._exchange = lambda *args: os._exit(3)  # rank 1 dies as its first move starts
    engine.sync.hooks.append(rebalancer)
    engine.serve(prompts, settings)


@pytest.mark.slow
def test_a_rank_dying_during_a_move_ends_the_other_with_the_cause(lm):
    export, prompts, settings, _ = lm
    with pytest.raises(DistributedTestFailure) as failure:
        run_distributed(
            _die_during_a_move, world_size=2, args=(export, prompts, settings), init_process_group=False, timeout_s=90
        )
    report = str(failure.value)
    assert "2 of 2 rank(s) failed" in report and "exited with code 3" in report  # rank 0 ended too, not stuck
    assert "RebalanceError: re-balancing decoder.layers." in report and "moving experts" in report
