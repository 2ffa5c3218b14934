"""Training batches: a data order that is a pure function of the step, disjoint ranks, exact epochs, masks, bucketing,
evaluation coverage, the tokens cache, the unigram baseline (pipeline.train.batches)."""

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.errors import ConfigError, DataError
from pipeline.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer, tokenizer_for
from pipeline.train.batches import (
    LMBatches,
    MTBatches,
    build_batches,
    copy_baseline_texts,
    label_tokens,
    tokenized_split,
    unigram_baseline,
    unigram_cross_entropy,
)


@pytest.fixture(scope="module")
def lm_cfg():
    return load_config("lm-tiny")


@pytest.fixture(scope="module")
def mt_cfg():
    return load_config("mt-tiny", ["data.size=fixture"])


@pytest.fixture(scope="module")
def lm_tok(lm_cfg):
    return tokenizer_for(lm_cfg)


@pytest.fixture(scope="module")
def mt_tok(mt_cfg):
    return tokenizer_for(mt_cfg)


def global_batch(ranks, step: int) -> np.ndarray:
    """Reassemble the global batch from every rank's items (rank r holds positions r, r + dp, ...)."""
    items = np.empty(ranks[0].global_batch, dtype=np.int64)
    for rank in ranks:
        items[rank.dp_rank :: rank.dp_size] = rank.step_items(step)
    return items


def assert_same_batch(a, b) -> None:
    for name, value in vars(a).items():
        assert torch.equal(value, getattr(b, name)), name


@pytest.mark.parametrize("task", ["lm", "mt"])
def test_batch_is_a_pure_function_of_the_step(task, lm_cfg, mt_cfg, lm_tok, mt_tok):
    cfg, tok = (lm_cfg, lm_tok) if task == "lm" else (mt_cfg, mt_tok)
    first, second = (build_batches(cfg, tok, "train", dp_rank=1, dp_size=2) for _ in range(2))
    steps_per_epoch = first.num_items // first.global_batch
    # Out of order, across epoch boundaries, and after other steps were read: always the same batch.
    for step in (0, 7, 3 * steps_per_epoch + 1, 2, 7):
        assert_same_batch(first.batch(step), second.batch(step))
    other_seed = load_config(cfg.name, ["data.size=fixture", "train.seed=99"])
    assert not np.array_equal(build_batches(other_seed, tok, "train", 1, 2).step_items(0), first.step_items(0))


@pytest.mark.parametrize("task", ["lm", "mt"])
def test_ranks_take_disjoint_slices_and_epochs_are_permutations(task, lm_cfg, mt_cfg, lm_tok, mt_tok):
    cfg, tok = (lm_cfg, lm_tok) if task == "lm" else (mt_cfg, mt_tok)
    ranks = [build_batches(cfg, tok, "train", dp_rank=r, dp_size=2) for r in range(2)]
    g, n = ranks[0].global_batch, ranks[0].num_items
    assert n % g != 0  # so batches straddle epoch boundaries and the test covers them
    steps = 3 * n // g + 2
    stream = []
    for step in range(steps):
        mine = [set(r.step_items(step).tolist()) for r in ranks]
        assert len(mine[0]) == len(mine[1]) == cfg.train.micro_batch_size and not mine[0] & mine[1]
        whole = global_batch(ranks, step)
        assert np.array_equal(whole, ranks[0].global_items(step))
        stream.append(whole)
    stream = np.concatenate(stream)
    for epoch in range(3):
        order = ranks[0].epoch_order(epoch)
        assert np.array_equal(np.sort(order), np.arange(n))  # every item exactly once
        assert np.array_equal(stream[epoch * n : (epoch + 1) * n], order)
    assert not np.array_equal(ranks[0].epoch_order(0), ranks[0].epoch_order(1))
    for epoch in range(1, 40):  # the batch that straddles two epochs never holds an item twice
        assert len(set(ranks[0].global_items(epoch * n // g).tolist())) == g


def test_lm_batches_are_packed_windows_of_the_stream(lm_cfg, lm_tok):
    s, b = lm_cfg.model.seq_length, lm_cfg.train.micro_batch_size
    batches = build_batches(lm_cfg, lm_tok, "train", 0, 1)
    stream = tokenized_split(lm_cfg, lm_tok, "train")["stream"]
    assert stream[-1] == EOS_ID and (stream == EOS_ID).sum() == 41  # one EOS closes each of the 41 documents
    batch = batches.batch(3)
    assert batch.tokens.shape == batch.labels.shape == batch.loss_mask.shape == (b, s)
    assert batch.tokens.dtype == batch.labels.dtype == torch.int64 and batch.loss_mask.dtype == torch.float32
    assert torch.equal(batch.labels[:, :-1], batch.tokens[:, 1:])
    assert bool((batch.loss_mask == 1).all())
    for row, item in enumerate(batches.step_items(3)):
        assert np.array_equal(batch.tokens[row].numpy(), stream[item * s : item * s + s])
        assert np.array_equal(batch.labels[row].numpy(), stream[item * s + 1 : item * s + s + 1])
    assert batches.num_items == (len(stream) - 1) // s
    assert batches.tokens_per_step == s * b


def test_mt_batches_shapes_and_masks(mt_cfg, mt_tok):
    batches = build_batches(mt_cfg, mt_tok, "train", 0, 2)
    for step in range(0, 40, 3):
        batch = batches.batch(step)
        assert batch.src.dtype == batch.tgt_in.dtype == batch.labels.dtype == torch.int64
        assert batch.src_pad.dtype == batch.tgt_pad.dtype == torch.bool and batch.loss_mask.dtype == torch.float32
        assert batch.src.shape[0] == batch.tgt_in.shape[0] == mt_cfg.train.micro_batch_size
        assert batch.tgt_in.shape == batch.labels.shape == batch.loss_mask.shape == batch.tgt_pad.shape
        assert torch.equal(batch.src_pad, batch.src == PAD_ID) and torch.equal(batch.tgt_pad, batch.labels == PAD_ID)
        assert torch.equal(batch.loss_mask, (~batch.tgt_pad).float())
        assert bool((batch.tgt_in[:, 0] == BOS_ID).all())
        for name, ids, pad in (("src", batch.src, batch.src_pad), ("labels", batch.labels, batch.tgt_pad)):
            last = (~pad).sum(1) - 1
            assert bool((ids[torch.arange(len(ids)), last] == EOS_ID).all()), name
        # Teacher forcing: the decoder input is the labels shifted right behind BOS.
        real = ~batch.tgt_pad[:, 1:]
        assert torch.equal(batch.tgt_in[:, 1:][real], batch.labels[:, :-1][real])
        assert not bool(batch.src_pad.all(1).any() or batch.tgt_pad.all(1).any())  # someone sets the width


def test_mt_truncation_keeps_the_eos(mt_tok):
    cfg = load_config("mt-tiny", ["data.size=fixture", "model.seq_length=8"])
    batches = build_batches(cfg, mt_tok, "train", 0, 1)
    batch = batches.batch(0)
    assert batch.src.shape[1] <= 8 and batch.labels.shape[1] <= 8
    full = [row for row in range(len(batch.src)) if not batch.src_pad[row].any()]
    assert full and all(batch.src[row, -1] == EOS_ID for row in full)
    assert bool((batch.labels[~batch.tgt_pad].reshape(-1) != PAD_ID).all())


def padding_fraction(batches: MTBatches, steps: int) -> float:
    padded = total = 0
    for step in range(steps):
        batch = batches.batch(step)
        padded += int(batch.src_pad.sum() + batch.tgt_pad.sum())
        total += batch.src_pad.numel() + batch.tgt_pad.numel()
    return padded / total


def test_bucketing_cuts_padding(mt_cfg, mt_tok):
    data = tokenized_split(mt_cfg, mt_tok, "train")
    src = np.split(data["src"], data["src_offsets"][1:-1])
    tgt = np.split(data["tgt"], data["tgt_offsets"][1:-1])

    def make(bucket_batches: int) -> MTBatches:
        return MTBatches(src, tgt, 96, 16, 0, 1, seed=1, shuffle=True, bucket_batches=bucket_batches)

    steps = len(src) // 16
    bucketed, unsorted = padding_fraction(make(50), steps), padding_fraction(make(1), steps)
    print(f"padding over one epoch: bucketed {bucketed:.1%}, random batches {unsorted:.1%}")
    assert bucketed < 0.5 * unsorted


@pytest.mark.parametrize("task", ["lm", "mt"])
@pytest.mark.parametrize("micro_batch_size", [3, 4])
def test_eval_batches_cover_the_split_once_with_equal_counts(task, micro_batch_size, lm_tok, mt_tok):
    cfg = load_config(f"{task}-tiny", ["data.size=fixture", f"train.micro_batch_size={micro_batch_size}"])
    tok = lm_tok if task == "lm" else mt_tok
    ranks = [build_batches(cfg, tok, "valid", r, 2).eval_batches() for r in range(2)]
    assert len(ranks[0]) == len(ranks[1])
    assert all(b.labels.shape[0] <= micro_batch_size for r in ranks for b in r)
    # Global batch j sits on rank j % 2, as batch j // 2: reassemble the split in order.
    in_order = [ranks[j % 2][j // 2] for j in range(2 * len(ranks[0]))]
    seen = [row[mask.bool()].tolist() for b in in_order for row, mask in zip(b.labels, b.loss_mask, strict=True)]
    expected = label_tokens(cfg, tok, "valid")
    if task == "lm":
        assert np.array_equal(np.concatenate([np.array(s, dtype=np.int64) for s in seen]), expected)
    else:
        pairs = [s for s in seen if s]
        assert len(pairs) == 45 and np.array_equal(np.concatenate(pairs), expected)
    stand_ins = [b for r in ranks for b in r if b.num_tokens == 0]
    assert len(stand_ins) == (micro_batch_size == 3 or task == "lm")  # valid: 20 LM windows, 45 MT pairs


def test_tokenized_splits_are_cached(tmp_path, monkeypatch, lm_cfg, lm_tok):
    tok = Tokenizer(lm_tok.model_proto)
    calls = []
    original = Tokenizer.encode_batch
    monkeypatch.setattr(Tokenizer, "encode_batch", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    monkeypatch.setenv("MOE_CACHE", str(tmp_path))
    first = build_batches(lm_cfg, tok, "train", 0, 1)
    assert calls and list((tmp_path / "tokens").glob("lm-train-*/stream.npy"))
    calls.clear()
    second = build_batches(lm_cfg, tok, "train", 0, 1)
    assert not calls
    assert np.array_equal(first.stream, second.stream)
    assert_same_batch(first.batch(5), second.batch(5))
    assert not list((tmp_path / "tokens").glob(".*"))  # no staging directory left behind


def test_unigram_cross_entropy_matches_the_entropy():
    rng = np.random.default_rng(0)
    probs = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    train, valid = rng.choice(6, 200_000, p=probs), rng.choice(6, 50_000, p=probs)
    entropy = float(-(probs * np.log(probs)).sum())
    assert unigram_cross_entropy(train, valid, vocab_size=6) == pytest.approx(entropy, abs=0.02)
    # A token never seen in training still has a finite cost (add-one smoothing).
    assert np.isfinite(unigram_cross_entropy(train, np.array([7]), vocab_size=8))


@pytest.mark.parametrize("task", ["lm", "mt"])
def test_unigram_baseline_of_the_tiny_configs(task, lm_cfg, mt_cfg, lm_tok, mt_tok):
    cfg, tok = (lm_cfg, lm_tok) if task == "lm" else (mt_cfg, mt_tok)
    baseline = unigram_baseline(cfg, tok)
    print(f"{cfg.name} unigram baseline: {baseline:.3f} nats/token")
    assert 3.0 < baseline < np.log(tok.vocab_size)  # far better than uniform, far from a real model


def test_too_small_splits_name_the_split_and_what_is_needed(lm_tok, mt_tok):
    with pytest.raises(DataError, match=r"split 'train' has [\d,]+ tokens.*needs 1,600,001"):
        build_batches(load_config("lm-tiny", ["model.seq_length=100000"]), lm_tok, "train", 0, 2)
    with pytest.raises(DataError, match=r"split 'train' has 1,071 sentence pairs \([\d,]+ tokens\).*2000 pairs"):
        too_big = load_config("mt-tiny", ["data.size=fixture", "train.micro_batch_size=1000"])
        build_batches(too_big, mt_tok, "train", 0, 2)
    with pytest.raises(DataError, match="split 'valid' has 1 tokens: evaluation needs at least 2"):
        LMBatches(np.array([EOS_ID]), 4, 2, 0, 1, seed=0, shuffle=False, split="valid")
    with pytest.raises(DataError, match="split 'bogus'"):
        build_batches(load_config("lm-tiny"), lm_tok, "bogus", 0, 1)


def test_copy_baseline_texts(mt_cfg, lm_cfg):
    sources, references = copy_baseline_texts(mt_cfg)
    assert len(sources) == len(references) == 45 and all(isinstance(s, str) and s for s in sources + references)
    with pytest.raises(ConfigError, match="task"):
        copy_baseline_texts(lm_cfg)
