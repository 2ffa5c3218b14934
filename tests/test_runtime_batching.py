"""Continuous batching (moe_infer.runtime.batching) and the serving loop (moe_infer.runtime.steploop): requests that
arrive at any step, in any order, join a running batch and leave it, and no token changes: every output equals the
batch generation's (greedy and seeded sampling, LM; greedy and beam search, MT), in one process and on two expert-
parallel ranks behind rank 0's coordinator; cancelled requests free their rows at once; step hooks run on every rank
at the same steps and may use collectives there; the control plane's one exchange per step carries rank 0's plan and
every rank's report, whatever their size (a message larger than a slot takes a second round).
"""

import dataclasses
import random

import pytest
import torch
import torch.distributed as dist
from random_exports import random_export_config, write_random_export

from moe_infer.model import load_model
from moe_infer.runtime.batching import Batcher
from moe_infer.runtime.control import ControlPlane, Plan, Report
from moe_infer.runtime.engine import Engine, EngineOptions
from moe_infer.runtime.generate import GenerationSettings, generate
from moe_infer.runtime.requests import Decoding, Event, Inbox, Mailbox, Request
from moe_infer.runtime.steploop import Coordinator, StepLoop
from moe_infer.runtime.translate import TranslationSettings, translate
from pipeline.platform.testing import run_distributed

LENGTHS = [3, 1, 7, 5, 2, 9, 4, 6, 2, 8]
GEN = GenerationSettings(max_new_tokens=7, batch_size=4)
SAMPLED = dataclasses.replace(GEN, temperature=1.0, top_p=0.9, top_k=20, seed=11)
MT_GREEDY = TranslationSettings(max_len=7, batch_size=3)
MT_BEAM = TranslationSettings(max_len=7, beam_size=3, batch_size=2)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("batching")
    varied = dict(tie_embeddings=False, norm="rmsnorm", activation="swiglu")  # outputs that vary by prompt
    lm = random_export_config("decoder", position_embedding="rope", num_experts=4, **varied)
    mt = random_export_config("encoder-decoder", num_experts=4, lm_head_bias=False, **varied)
    return {"lm": str(write_random_export(root / "lm", lm, seed=5)), "mt": str(write_random_export(root / "mt", mt, 6))}


def _sequences(seed: int, eos: int | None = None) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 50, (n,), generator=gen).tolist() + ([eos] if eos is not None else []) for n in LENGTHS]


def _pick_eos(outputs: list[list[int]]) -> int:
    """A token that ends some outputs early and never appears in others: rows then leave at different steps."""
    for token in sorted({t for out in outputs for t in out}):
        firsts = [out.index(token) if token in out else None for out in outputs]
        if None in firsts and any(f is not None and f >= 1 for f in firsts):
            return token
    raise AssertionError("no token ends some outputs and not others")


@pytest.fixture(scope="module")
def models(exports):
    """(lm, prompts, mt, sources): the models with an EOS picked so that outputs end at different steps."""
    lm, mt = load_model(exports["lm"]), load_model(exports["mt"])
    prompts = _sequences(0)
    lm.cfg = dataclasses.replace(
        lm.cfg, eos_id=_pick_eos(generate(lm, prompts, dataclasses.replace(GEN, stop_at_eos=False)))
    )
    sources = _sequences(1, eos=mt.cfg.eos_id)
    mt.cfg = dataclasses.replace(mt.cfg, eos_id=49)
    mt.cfg = dataclasses.replace(mt.cfg, eos_id=_pick_eos(translate(mt, sources, MT_GREEDY)))
    return lm, prompts, mt, sources


def _requests(settings, seqs) -> list[Request]:
    if isinstance(settings, GenerationSettings):
        return [Request(i, seq, settings.decoding(i)) for i, seq in enumerate(seqs)]
    return [Request(i, seq, settings.decoding()) for i, seq in enumerate(seqs)]


def _serve_as_they_arrive(model, requests: list[Request], arrival_steps: list[int], max_rows: int):
    """One process: request i is submitted at step arrival_steps[i]; every step admits, prefills and decodes."""
    batcher, outputs, step = Batcher(model, max_rows), {r.id: [] for r in requests}, 0
    pending = sorted(zip(arrival_steps, range(len(requests)), strict=True))
    most_rows = 0
    while pending or batcher.busy:
        while pending and pending[0][0] <= step:
            batcher.submit(requests[pending.pop(0)[1]])
        admitted = batcher.admit()
        if admitted:
            batcher.prefill(admitted)
        if batcher.running:
            batcher.decode()
        most_rows = max(most_rows, batcher.batch.size)
        for event in batcher.take_events():
            outputs[event.id] += event.tokens
        step += 1
    assert most_rows <= max_rows
    return [outputs[i] for i in range(len(requests))]


def test_no_token_changes_whatever_the_arrivals(models):
    lm, prompts, mt, sources = models
    n, rng = len(LENGTHS), random.Random(0)
    schedules = {
        "together": [0] * n,
        "one by one": [3 * i for i in range(n)],
        "random": [rng.randrange(12) for _ in range(n)],
        "reversed": [3 * (n - i) for i in range(n)],
    }
    cases = [(lm, prompts, GEN, 4), (lm, prompts, SAMPLED, 3), (mt, sources, MT_GREEDY, 3), (mt, sources, MT_BEAM, 6)]
    for model, seqs, settings, rows in cases:
        expected = generate(model, seqs, settings) if model is lm else translate(model, seqs, settings)
        for name, arrivals in schedules.items():
            served = _serve_as_they_arrive(model, _requests(settings, seqs), arrivals, rows)
            assert served == expected, (name, settings)
    # The outputs end at different steps (the EOS picked above), so rows did leave and join mid-batch.
    assert len({len(out) for out in generate(lm, prompts, GEN)}) > 1


def test_a_cancelled_request_frees_its_rows_at_once(models):
    lm, prompts, _, _ = models
    settings = dataclasses.replace(GEN, stop_at_eos=False, max_new_tokens=6)
    batcher = Batcher(lm, max_rows=3)
    for request in _requests(settings, prompts[:4]):
        batcher.submit(request)
    batcher.prefill(batcher.admit())  # three fit; the fourth waits
    batcher.decode()
    assert (batcher.batch.size, len(batcher.waiting)) == (3, 1)
    batcher.cancel({1, 3})  # one running, one waiting
    assert batcher.batch.size == 2 and not batcher.waiting
    assert all(layer.self_attn.k_BHKD.shape[0] == 2 for layer in batcher.batch.cache.layers.values())
    events = batcher.take_events()
    assert {e.id for e in events if e.finish == "cancelled"} == {1, 3}
    while batcher.running:
        batcher.decode()
    outputs = {}
    for event in events + batcher.take_events():
        outputs.setdefault(event.id, []).extend(event.tokens)
    expected = generate(lm, prompts[:3], settings)
    assert outputs[0] == expected[0] and outputs[2] == expected[2]


# ---- the serving loop on two expert-parallel ranks ------------------------------------------------------------------


class ScriptedMailbox(Mailbox):
    """Rank 0's front end, scripted: the requests of script[i] arrive at the loop's i-th look; then it drains."""

    def __init__(self, script: list[list[Request]]):
        super().__init__()
        self.script, self.outputs, self.finished = list(script), {}, set()
        self.on_events = self._record

    def _record(self, events) -> None:
        for event in events:
            self.outputs.setdefault(event.id, []).extend(event.tokens)
            if event.finish:
                self.finished.add(event.id)

    def take(self, wait_s: float = 0.0) -> Inbox:
        inbox = super().take(0.0)
        if self.script:
            inbox.requests += self.script.pop(0)
        else:
            inbox.drain = True  # the coordinator stops once everything has finished
        return inbox


class CollectiveHook:
    """Every 3 steps with work: an all-reduce of the step number (what an online re-balancer would do here)."""

    def __init__(self):
        self.seen = []

    def after_step(self, step, worked):
        if worked and step % 3 == 0:
            total = torch.tensor([step])
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(total)
            self.seen.append((step, int(total)))
        return {"steps": step}


def _serve_behind_the_coordinator(jobs: list[tuple], gaps: list[int]):
    """Each rank, for each (export, eos, settings, sequences, max rows): the served model (dynamic policy, experts
    split over the ranks) in the step loop; rank 0 feeds the requests `gaps[i]` loop iterations apart. Returns rank
    0's outputs and finished ids, and the hook's record, per job."""
    results = []
    for export, eos, settings, seqs, max_rows in jobs:
        engine = Engine.start(export, EngineOptions(policy="dynamic", timeout_s=120))
        engine.model.cfg = dataclasses.replace(engine.model.cfg, eos_id=eos)  # the EOS the test picked
        requests = _requests(settings, seqs)
        script: list[list[Request]] = []
        for request, gap in zip(requests, gaps, strict=True):
            script += [[] for _ in range(gap)] + [[request]]
        hook = CollectiveHook()
        control = ControlPlane(engine.world_size, timeout_s=120)
        loop = StepLoop(Batcher(engine.model, max_rows), control, engine.rank, [hook])
        mailbox, coordinator = ScriptedMailbox(script), None
        if engine.rank == 0:
            coordinator = Coordinator(mailbox, engine.world_size, max_rows, shutdown_timeout_s=60, heartbeat_s=1)
        loop.run(coordinator)
        outputs = [mailbox.outputs.get(r.id, []) for r in requests]
        results.append((outputs, sorted(mailbox.finished), hook.seen))
    return results


def _exchange_small_and_large():
    """One control-plane exchange of small messages, then one far beyond a slot (the second round)."""
    control, rank = ControlPlane(dist.get_world_size()), dist.get_rank()
    report = Report([Event(i, [rank, i]) for i in range(3)], rows=rank + 1)
    small = Plan(assign={1: [Request(0, [5, 6], Decoding(4))]}, cancel=[9]) if rank == 0 else None
    plan, reports = control.exchange(small, report)
    first = (plan.assign[1][0].tokens, plan.cancel, [r.rows for r in reports], reports[1].events[2].tokens)
    # Far beyond a slot: 40 prompts of 1000 tokens from rank 0, and a large report from rank 1.
    large = Plan(assign={1: [Request(i, list(range(1000)), Decoding(4)) for i in range(40)]}) if rank == 0 else None
    big_report = Report([Event(i, list(range(500))) for i in range(40)] if rank == 1 else [])
    plan, reports = control.exchange(large, big_report)
    second = (
        len(plan.assign[1]),
        plan.assign[1][39].tokens[-1],
        len(reports[1].events),
        reports[1].events[0].tokens[-1],
    )
    return first, second


def _on_two_ranks(jobs: list[tuple], gaps: list[int]):
    return _serve_behind_the_coordinator(jobs, gaps), _exchange_small_and_large()


@pytest.fixture(scope="module")
def two_ranks(exports, models):
    """Both ranks' results of the serving loop (LM sampling, MT beam search) and of the control-plane exchanges."""
    lm, prompts, mt, sources = models
    gaps = [0, 0, 2, 0, 1, 5, 0, 0, 3, 1]
    jobs = [
        (exports["lm"], lm.cfg.eos_id, SAMPLED, prompts, 3),
        (exports["mt"], mt.cfg.eos_id, MT_BEAM, sources, 6),
    ]
    return run_distributed(_on_two_ranks, world_size=2, args=(jobs, gaps), init_process_group=False)


def test_two_ranks_behind_the_coordinator_serve_every_request_unchanged(models, two_ranks):
    lm, prompts, mt, sources = models
    (rank0, _), (rank1, _) = two_ranks
    expected = [generate(lm, prompts, SAMPLED), translate(mt, sources, MT_BEAM)]
    for (outputs, finished, seen0), (_, _, seen1), want in zip(rank0, rank1, expected, strict=True):
        assert outputs == want and finished == list(range(len(LENGTHS)))
        assert seen0 == seen1 and len(seen0) >= 2 and all(total == 2 * step for step, total in seen0)


def test_one_exchange_carries_the_plan_and_every_report_small_or_large(two_ranks):
    for _, (first, second) in two_ranks:
        assert first == ([5, 6], [9], [1, 2], [1, 2])
        assert second == (40, 999, 40, 499)
