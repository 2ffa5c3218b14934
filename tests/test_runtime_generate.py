"""Batched generation (LM) and translation (MT) on small random exports: left padding and the KV cache change nothing,
sampling is reproducible, beam search finds hypotheses scoring at least greedy's, every rank of a 2-process group
makes the same model calls whatever its share of the requests, and bad requests are named.

Random models repeat themselves a lot; to make rows finish at different steps, the tests pick as EOS a token that some
rows produce after a few steps and others never (`_pick_eos`, the model's cfg replaced).

Shape legend: B batch, S positions, V vocabulary.
"""

import dataclasses

import pytest
import torch
from random_exports import random_export_config, write_random_export

from moe_infer.model import ModelConfig, MoELayer, load_model
from moe_infer.runtime import batching
from moe_infer.runtime.generate import GenerationSettings, RequestError, filter_top_k, filter_top_p, generate
from moe_infer.runtime.lockstep import LockStep
from moe_infer.runtime.sequences import BeamSearch
from moe_infer.runtime.translate import TranslationSettings, bleu, normalized_score, score_targets, translate
from pipeline.errors import ConfigError
from pipeline.platform.testing import run_distributed

PROMPT_LENGTHS = [3, 1, 7, 5, 2, 9, 4]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    # Untied heads, RMSNorm and SwiGLU: random models whose greedy outputs vary a little from prompt to prompt.
    varied = dict(tie_embeddings=False, norm="rmsnorm", activation="swiglu")
    configs = {
        "lm": random_export_config("decoder"),
        "lm-rope": random_export_config("decoder", position_embedding="rope", **varied),
        "mt": random_export_config("encoder-decoder", position_embedding="rope", lm_head_bias=False, **varied),
    }
    return {name: str(write_random_export(root / name, config)) for name, config in configs.items()}


def _sequences(lengths, seed=0, eos=None):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 50, (n,), generator=gen).tolist() + ([eos] if eos is not None else []) for n in lengths]


def _pick_eos(outputs):
    """A token some outputs reach after a step or more and some never do (None if there is none)."""
    for token in sorted({t for out in outputs for t in out}):
        firsts = [out.index(token) if token in out else None for out in outputs]
        if None in firsts and any(f is not None and f >= 1 for f in firsts):
            return token
    return None


def _with_eos(model, eos):
    if eos is not None:
        model.cfg = dataclasses.replace(model.cfg, eos_id=eos)
    return model


def _lm_with_varied_eos(path, settings):
    model = load_model(path)
    prompts = _sequences(PROMPT_LENGTHS)
    plain = generate(model, prompts, dataclasses.replace(settings, stop_at_eos=False))
    return _with_eos(model, _pick_eos(plain)), prompts


def _mt_with_varied_eos(path, max_len):
    model = load_model(path)
    sources = _sequences(PROMPT_LENGTHS, seed=1, eos=model.cfg.eos_id)
    model.cfg = dataclasses.replace(model.cfg, eos_id=49)  # rarely produced: see what the model says
    plain = translate(model, sources, TranslationSettings(max_len=max_len, batch_size=3))
    eos = _pick_eos(plain)
    return _with_eos(model, eos), sources


# ---- the model: left padding, per-row positions, Cache.select, empty batches -------------------------------------


@pytest.mark.parametrize("name", ["lm", "lm-rope"])
def test_a_left_padded_row_gives_the_logits_of_its_prompt_alone(exports, name):
    model = load_model(exports[name])
    prompts = _sequences([5, 2, 3])
    width = 5
    tokens_BS = torch.zeros(3, width, dtype=torch.int64)
    pad_BS = torch.ones(3, width, dtype=torch.bool)
    for row, p in enumerate(prompts):
        tokens_BS[row, width - len(p) :], pad_BS[row, width - len(p) :] = torch.tensor(p), False
    cache = model.new_cache()
    prefill_BSV = model(tokens_BS, cache, pad_BS)
    step1_BSV = model(torch.tensor([[20], [21], [22]]), cache)
    cache.select(torch.tensor([2, 0]))  # row 1 finished; the others swap places
    step2_BSV = model(torch.tensor([[30], [31]]), cache)
    for row, p in enumerate(prompts):
        alone = model.new_cache()
        torch.testing.assert_close(model(torch.tensor([p]), alone)[0], prefill_BSV[row, width - len(p) :])
        torch.testing.assert_close(model(torch.tensor([[20 + row]]), alone), step1_BSV[row : row + 1])
        if row != 1:
            after = model(torch.tensor([[30 if row == 2 else 31]]), alone)
            torch.testing.assert_close(after[0], step2_BSV[[2, 0].index(row)])


def test_every_call_takes_an_empty_batch(exports):
    lm, mt = load_model(exports["lm"]), load_model(exports["mt"])
    cache = lm.new_cache()
    empty = torch.zeros(0, 3, dtype=torch.int64)
    assert lm(empty, cache, torch.zeros(0, 3, dtype=torch.bool)).shape == (0, 3, 50)
    assert lm(empty[:, :1], cache).shape == (0, 1, 50) and cache.length == 4
    moe: MoELayer = lm.decoder.layers["2"].moe
    assert moe(torch.zeros(0, 1, 32)).shape == (0, 1, 32)
    src_pad = torch.zeros(0, 1, dtype=torch.bool)
    memory = mt.encode(empty[:, :1], src_pad, skip_pads=True)
    assert mt.decode(empty[:, :1], memory, src_pad, mt.new_cache()).shape == (0, 1, 50)


# ---- LM generation --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lm", "lm-rope"])
def test_batched_left_padded_generation_equals_each_prompt_alone(exports, name):
    settings = GenerationSettings(max_new_tokens=8, batch_size=3)
    model, prompts = _lm_with_varied_eos(exports[name], settings)
    batched = generate(model, prompts, settings)
    assert batched == [generate(model, [p], settings)[0] for p in prompts]
    if name == "lm-rope":  # rows that ended on EOS left the batch while the others went on
        assert 0 < min(map(len, batched)) < max(map(len, batched)) == 8


@pytest.mark.parametrize("name", ["lm", "lm-rope"])
def test_generation_with_the_cache_equals_recomputing_everything(exports, name):
    settings = GenerationSettings(max_new_tokens=6, batch_size=4)
    model, prompts = _lm_with_varied_eos(exports[name], settings)
    assert generate(model, prompts, settings) == generate(
        model, prompts, dataclasses.replace(settings, use_cache=False)
    )


def test_sampling_is_reproducible_and_top_k_1_is_greedy(exports):
    model = load_model(exports["lm-rope"])
    prompts = _sequences(PROMPT_LENGTHS)
    sampled = GenerationSettings(max_new_tokens=6, temperature=1.0, top_p=0.95, seed=7, batch_size=3)
    first = generate(model, prompts, sampled)
    assert generate(model, prompts, sampled) == first
    assert generate(model, prompts, dataclasses.replace(sampled, seed=8)) != first
    # Each prompt draws from its own generator: the batching does not change its sample.
    assert generate(model, prompts, dataclasses.replace(sampled, batch_size=1)) == first
    greedy = GenerationSettings(max_new_tokens=6, batch_size=3)
    assert generate(model, prompts, dataclasses.replace(sampled, top_k=1)) == generate(model, prompts, greedy)


def test_top_k_and_top_p_filters():
    logits_BV = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]))
    kept = lambda x: torch.isfinite(x).tolist()  # noqa: E731
    assert kept(filter_top_k(logits_BV, 2)) == [[True, True, False], [False, True, True]]
    assert kept(filter_top_p(logits_BV, 0.7)) == [[True, True, False], [False, True, True]]
    assert kept(filter_top_p(logits_BV, 0.4)) == [[True, False, False], [False, True, False]]
    assert filter_top_p(logits_BV, 1.0) is logits_BV and filter_top_k(logits_BV, 0) is logits_BV


# ---- MT -------------------------------------------------------------------------------------------------------------


def test_batched_greedy_translation_equals_one_by_one(exports):
    model, sources = _mt_with_varied_eos(exports["mt"], max_len=8)
    settings = TranslationSettings(max_len=8, batch_size=3)
    batched = translate(model, sources, settings)
    assert batched == [translate(model, [s], settings)[0] for s in sources]
    assert min(map(len, batched)) < max(map(len, batched))


def _normalized(model, sources, outputs, max_len, length_penalty):
    """Each output's score as beam search ranks it (an output shorter than max_len ended with EOS)."""
    ended = [len(out) < max_len for out in outputs]
    sums = score_targets(model, sources, outputs, eos=ended)
    return [normalized_score(s, len(o) + e, length_penalty) for s, o, e in zip(sums, outputs, ended, strict=True)]


@pytest.mark.parametrize("length_penalty", [1.0, 0.0])
def test_beam_search_scores_at_least_greedy(exports, length_penalty):
    max_len = 8
    model, sources = _mt_with_varied_eos(exports["mt"], max_len)
    greedy = translate(model, sources, TranslationSettings(max_len=max_len, batch_size=4))
    beam = translate(
        model, sources, TranslationSettings(max_len=max_len, beam_size=4, length_penalty=length_penalty, batch_size=4)
    )
    beam_scores = _normalized(model, sources, beam, max_len, length_penalty)
    greedy_scores = _normalized(model, sources, greedy, max_len, length_penalty)
    assert all(b >= g - 1e-5 for b, g in zip(beam_scores, greedy_scores, strict=True)), (beam_scores, greedy_scores)
    assert beam != greedy  # the search found something greedy did not
    # Batched beam search equals one sentence at a time.
    assert beam == [
        translate(model, [s], TranslationSettings(max_len=max_len, beam_size=4, length_penalty=length_penalty))[0]
        for s in sources
    ]


def test_beam_search_with_one_beam_is_greedy(exports, monkeypatch):
    model, sources = _mt_with_varied_eos(exports["mt"], max_len=8)
    settings = TranslationSettings(max_len=8, batch_size=len(sources))
    greedy = translate(model, sources, settings)
    # Every request decoded by the beam search machinery, with one beam.
    monkeypatch.setattr(batching, "new_sequence", lambda request, eos, device: BeamSearch(request, eos))
    assert translate(model, sources, settings) == greedy


def test_bleu():
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert bleu(["a b c d"], ["w x y z"]) == pytest.approx(0.0)
    with pytest.raises(RequestError, match="one reference per hypothesis: got 1 and 2"):
        bleu(["a"], ["a", "b"])


# ---- lock step on two ranks ---------------------------------------------------------------------------------------


def _count_moe_calls(model) -> dict[str, int]:
    counts: dict[str, int] = {}

    def hook(module, args, output):
        counts[module.name] = counts.get(module.name, 0) + 1

    for module in model.modules():
        if isinstance(module, MoELayer):
            module.register_forward_hook(hook)
    return counts


def _serve_share(lm_path: str, mt_path: str, lm_eos: int, mt_eos: int | None, prompts, sources, settings) -> dict:
    """One rank: its share of the prompts and sources, with the full model; the model calls it made."""
    lm, mt = _with_eos(load_model(lm_path), lm_eos), _with_eos(load_model(mt_path), mt_eos)
    lm_calls, mt_calls = _count_moe_calls(lm), _count_moe_calls(mt)
    sync = LockStep()
    rank = torch.distributed.get_rank()
    out = {"generated": generate(lm, prompts[rank], settings["lm"], sync)}
    out["greedy"] = translate(mt, sources[rank], settings["greedy"], sync)
    out["beam"] = translate(mt, sources[rank], settings["beam"], sync)
    return {**out, "lm_calls": lm_calls, "mt_calls": mt_calls}


def test_ranks_make_the_same_model_calls_whatever_their_share(exports):
    settings = {
        "lm": GenerationSettings(max_new_tokens=6, batch_size=2),
        "greedy": TranslationSettings(max_len=6, batch_size=2),
        "beam": TranslationSettings(max_len=6, beam_size=3, batch_size=2),
    }
    lm, prompts = _lm_with_varied_eos(exports["lm-rope"], settings["lm"])
    mt, sources = _mt_with_varied_eos(exports["mt"], max_len=6)
    # Rank 0: 5 prompts (3 batches), 2 sources; rank 1: no prompt, 5 sources.
    prompt_shares, source_shares = [prompts[:5], []], [sources[:2], sources[2:]]
    args = (exports["lm-rope"], exports["mt"], lm.cfg.eos_id, mt.cfg.eos_id, prompt_shares, source_shares, settings)
    ranks = run_distributed(_serve_share, world_size=2, args=args, timeout_s=120)
    assert ranks[0]["lm_calls"] == ranks[1]["lm_calls"] and min(ranks[0]["lm_calls"].values()) > 3
    assert ranks[0]["mt_calls"] == ranks[1]["mt_calls"]
    assert set(ranks[0]["mt_calls"]) == {"encoder.layers.2", "decoder.layers.2", "decoder.layers.4"}
    assert ranks[0]["generated"] + ranks[1]["generated"] == generate(lm, prompts[:5], settings["lm"])
    for kind in ("greedy", "beam"):
        assert ranks[0][kind] + ranks[1][kind] == translate(mt, sources, settings[kind])


# ---- bad requests -----------------------------------------------------------------------------------------------


def test_bad_prompts_are_named(exports):
    model = load_model(exports["lm"])  # learned positions: 32 of them
    settings = GenerationSettings(max_new_tokens=8)
    cases = [
        ([[5, 6], []], r"prompt 1 is empty"),
        (
            [[5] * 25],
            r"prompt 0 needs 33 positions \(25 tokens \+ 8 new tokens\), beyond the model's "
            r"limit of 32 learned positions",
        ),
        ([[5], [5, 50]], r"prompt 1 has token id 50 at position 1, outside the model's vocabulary \[0, 50\)"),
        ([[-1]], r"prompt 0 has token id -1 at position 0"),
    ]
    for prompts, message in cases:
        with pytest.raises(RequestError, match=message):
            generate(model, prompts, settings)
    assert generate(model, [[5] * 24], settings)[0]  # exactly at the limit: fine
    with pytest.raises(ConfigError, match="top_p: must be in"):
        GenerationSettings(top_p=0.0)


def test_bad_sources_are_named(exports):
    from moe_infer.runtime.translate import check_sources

    cfg = ModelConfig.from_export(random_export_config("encoder-decoder"))  # learned positions: 32
    settings = TranslationSettings(max_len=16)
    with pytest.raises(RequestError, match="source 0 is empty"):
        check_sources([[]], cfg, settings)
    with pytest.raises(
        RequestError,
        match=r"source 1 needs 40 positions \(40 tokens\), beyond the model's limit of 32 learned positions",
    ):
        check_sources([[5], [5] * 40], cfg, settings)
    with pytest.raises(RequestError, match="max_len 40 is beyond the model's limit of 32 learned positions"):
        check_sources([[5]], cfg, TranslationSettings(max_len=40))
    with pytest.raises(RequestError, match="source 0 has token id 99"):
        translate(load_model(exports["mt"]), [[99]], settings)
