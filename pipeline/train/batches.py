"""Training and evaluation batches: tokenized splits (cached), packed LM sequences, length-bucketed MT pairs.

The data order is a pure function of (step, seed, dp_rank, dp_size): epoch e is a permutation of every item drawn from
np.random.default_rng((seed, e)), epochs follow each other in one endless stream of positions, and global batch `step`
is positions [step * G, (step + 1) * G) of that stream with G = micro_batch_size * dp_size. Rank r takes every
dp_size-th item of it (strided, so with length-sorted MT batches every rank gets a similar length mix and no rank
waits on the others in the all-to-alls). Nothing depends on what was read before, so a resumed run (kill, reload at
step k) reads exactly the batches an uninterrupted run would have.

    batches = build_batches(cfg, tokenizer, "train", dp_rank, dp_size)
    batch = batches.batch(step)          # LMBatch | MTBatch for this rank
    evals = batches_valid.eval_batches() # the whole split once, the same number of batches on every rank

Tokenized splits are cached as .npy under <cache>/tokens/, keyed by the prepared corpus, the tokenizer model and the
split, so only the first run of a config tokenizes. Shape legend: B sequences, S tokens per sequence, N items.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.data import SPLITS, cache_root, corpus_stats, load_splits, prepare_corpus
from pipeline.errors import ConfigError, DataError
from pipeline.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer
from pipeline.train.batch import LMBatch, MTBatch

if TYPE_CHECKING:
    from pipeline.config import RunConfig

TOKENS_FORMAT = 1  # bump when what is cached changes, so every tokenized split is rebuilt
BUCKET_BATCHES = 50  # MT: sort by length within chunks of this many global batches (more: less padding, less mixing)
_ENCODE_CHUNK = 1024  # documents or sentences per encode_batch call: bounds the Python lists held at once


# ---- tokenized splits, cached ----------------------------------------------------------------------------------


def _tokens_dir(cfg: RunConfig, tokenizer: Tokenizer, split: str) -> Path:
    corpus_key = corpus_stats(prepare_corpus(cfg.data))["key"]
    identity = {
        "format": TOKENS_FORMAT,
        "corpus": corpus_key,
        "tokenizer": hashlib.sha256(tokenizer.model_proto).hexdigest(),
        "split": split,
        "task": cfg.task,
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return cache_root() / "tokens" / f"{cfg.task}-{split}-{key[:16]}"


def _encode_all(tokenizer: Tokenizer, texts: list[str], eos: bool) -> tuple[np.ndarray, np.ndarray]:
    """All texts' ids in one flat int32 array, plus offsets [N + 1]: text i is flat[offsets[i]:offsets[i + 1]]."""
    ids: list[list[int]] = []
    for start in range(0, len(texts), _ENCODE_CHUNK):
        ids.extend(tokenizer.encode_batch(texts[start : start + _ENCODE_CHUNK], eos=eos))
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=int(offsets[-1]))
    return flat, offsets


def _tokenize(cfg: RunConfig, tokenizer: Tokenizer, split: str) -> dict[str, np.ndarray]:
    rows = load_splits(cfg.data)[split]
    if cfg.task == "lm":
        # Whole documents: the newline is a piece of its own, and an EOS closes every document in the packed stream.
        stream, _ = _encode_all(tokenizer, list(rows["text"]), eos=True)
        return {"stream": stream}
    # Raw ids without EOS/BOS, untruncated: the same cache serves any seq_length.
    src, src_offsets = _encode_all(tokenizer, list(rows["src"]), eos=False)
    tgt, tgt_offsets = _encode_all(tokenizer, list(rows["tgt"]), eos=False)
    return {"src": src, "src_offsets": src_offsets, "tgt": tgt, "tgt_offsets": tgt_offsets}


def tokenized_split(cfg: RunConfig, tokenizer: Tokenizer, split: str) -> dict[str, np.ndarray]:
    """LM: {"stream"}: every document + EOS, concatenated. MT: {"src", "src_offsets", "tgt", "tgt_offsets"}."""
    if split not in SPLITS:
        raise DataError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    directory = _tokens_dir(cfg, tokenizer, split)
    names = ("stream",) if cfg.task == "lm" else ("src", "src_offsets", "tgt", "tgt_offsets")
    if all((directory / f"{n}.npy").is_file() for n in names):
        return {n: np.load(directory / f"{n}.npy") for n in names}
    arrays = _tokenize(cfg, tokenizer, split)
    # Written into a temp dir and renamed, so a killed run never leaves a half-written cache entry behind.
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
    try:
        for name, array in arrays.items():
            np.save(staging / f"{name}.npy", array)
        os.rename(staging, directory)
    except OSError:
        if not directory.is_dir():  # otherwise another rank finished the same entry first: theirs is identical
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return arrays


def _ragged(flat: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]


# ---- the data order --------------------------------------------------------------------------------------------


class _Batches:
    """The order shared by both tasks; subclasses say how items become tensors (`_collate`)."""

    def __init__(
        self,
        num_items: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        shuffle: bool,
        lengths: np.ndarray | None = None,
        bucket_batches: int = BUCKET_BATCHES,
    ):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, dp_size={dp_size}), got {dp_rank}")
        self.num_items = num_items
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.shuffle = seed, shuffle
        self.lengths = lengths  # per item; enables length bucketing when shuffling
        self.bucket_batches = bucket_batches
        self._orders: dict[int, np.ndarray] = {}

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.dp_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Epoch `epoch`'s item order: a permutation of range(num_items)."""
        if epoch not in self._orders:
            if len(self._orders) >= 2:  # a step touches at most two epochs (when N >= G): keep a small memo
                self._orders.pop(min(self._orders))
            self._orders[epoch] = self._make_order(epoch)
        return self._orders[epoch]

    def _boundaries(self, epoch: int) -> tuple[int, int]:
        """(head, tail): the epoch's first items close the global batch the previous epoch left open, its last
        items open the batch the next epoch closes."""
        n, g = self.num_items, self.global_batch
        head = min((-epoch * n) % g, n)
        return head, min(((epoch + 1) * n) % g, n - head)

    def _make_order(self, epoch: int) -> np.ndarray:
        n = self.num_items
        if not self.shuffle:
            return np.arange(n)
        rng = np.random.default_rng((self.seed, epoch))
        perm = rng.permutation(n)
        head, tail = self._boundaries(epoch)
        inner = perm[: n - tail]
        if head and epoch > 0:
            # The head shares a global batch with the previous epoch's tail (the last items of its permutation):
            # take items that are not in it, so no batch holds an item twice. Depends on epoch - 1's permutation
            # only, so the order stays cheap to compute for any epoch.
            prev_tail = np.random.default_rng((self.seed, epoch - 1)).permutation(n)[
                n - self._boundaries(epoch - 1)[1] :
            ]
            clash = np.isin(inner, prev_tail)
            inner = np.concatenate([inner[~clash], inner[clash]])
        body = inner[head:]
        if self.lengths is not None:
            body = self._bucket(body, rng)
        return np.concatenate([inner[:head], body, perm[n - tail :]])

    def _bucket(self, body: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Sort by length within chunks of bucket_batches global batches, cut into global batches, shuffle those:
        little padding, and lengths do not trend through the epoch."""
        g = self.global_batch
        full = len(body) // g * g  # all of it when num_items >= global_batch
        chunk = g * self.bucket_batches
        pieces = [
            c[np.argsort(self.lengths[c], kind="stable")] for c in np.split(body[:full], range(chunk, full, chunk))
        ]
        batches_BG = np.concatenate(pieces).reshape(-1, g)
        batches_BG = batches_BG[rng.permutation(len(batches_BG))]
        return np.concatenate([batches_BG.ravel(), body[full:]])

    def global_items(self, step: int) -> np.ndarray:
        """The G items of global batch `step`, all ranks."""
        if self.num_items == 0:  # only an eval-only split (shuffle=False) gets this far without a full item
            raise DataError("this split has no full sequence to train on: use it for eval_batches() only")
        positions = step * self.global_batch + np.arange(self.global_batch)
        epochs, offsets = np.divmod(positions, self.num_items)
        items = np.empty(self.global_batch, dtype=np.int64)
        for epoch in np.unique(epochs):
            here = epochs == epoch
            items[here] = self.epoch_order(int(epoch))[offsets[here]]
        return items

    def step_items(self, step: int) -> np.ndarray:
        """The micro_batch_size items this rank trains on at `step`."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return self.global_items(step)[self.dp_rank :: self.dp_size]

    def batch(self, step: int) -> LMBatch | MTBatch:
        return self._collate(self.step_items(step))

    def _eval_items(self) -> int:
        return self.num_items

    def eval_batches(self) -> list[LMBatch | MTBatch]:
        """The whole split once in order; rank r takes batches r, r + dp_size, ...; every rank gets the same count.

        The last batch may be short. A rank short of a batch gets a stand-in (the split's first items with loss_mask
        zero, num_tokens 0): MoE all-to-alls need every rank in every forward. Real items rather than padding, so
        attention never sees an all-padding row.
        """
        n, b = self._eval_items(), self.micro_batch_size
        starts = range(0, n, b)
        out = [self._collate(np.arange(start, min(start + b, n))) for start in starts[self.dp_rank :: self.dp_size]]
        while len(out) < math.ceil(len(starts) / self.dp_size):
            out.append(self._collate(np.arange(min(b, n)), in_loss=False))
        return out

    def _collate(self, items: np.ndarray, in_loss: bool = True) -> LMBatch | MTBatch:
        """Tensors for `items`; with in_loss=False the loss_mask is all zero (a stand-in batch)."""
        raise NotImplementedError


# ---- LM: packed sequences --------------------------------------------------------------------------------------


class LMBatches(_Batches):
    """Item i is the window stream[i*S : i*S + S + 1]: tokens w[:-1], labels w[1:].

    Consecutive windows share their boundary token (stride S, as in Megatron and nanoGPT), so every token of the
    stream after the first is a label exactly once. Training uses the full windows; eval_batches also covers the
    remainder as one last window padded with PAD_ID (loss_mask 0 there), so evaluation sees every label.
    """

    def __init__(
        self,
        stream: np.ndarray,
        seq_length: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        shuffle: bool,
        split: str = "train",
    ):
        self.stream = np.asarray(stream)
        self.seq_length = seq_length
        labels = max(len(self.stream) - 1, 0)
        super().__init__(labels // seq_length, micro_batch_size, dp_rank, dp_size, seed, shuffle)
        self.num_eval_items = math.ceil(labels / seq_length)
        g = self.global_batch
        if shuffle and self.num_items < g:
            raise DataError(
                f"split {split!r} has {len(self.stream):,} tokens: one global batch of {g} sequences "
                f"(micro_batch_size {micro_batch_size} x {dp_size} data-parallel ranks) of seq_length {seq_length} "
                f"needs {g * seq_length + 1:,}; use a larger corpus or lower train.micro_batch_size or model.seq_length"
            )
        if self.num_eval_items == 0:
            raise DataError(f"split {split!r} has {len(self.stream):,} tokens: evaluation needs at least 2")
        self.tokens_per_step = g * seq_length

    def _eval_items(self) -> int:
        return self.num_eval_items

    def _collate(self, items: np.ndarray, in_loss: bool = True) -> LMBatch:
        s = self.seq_length
        windows_BW = np.full((len(items), s + 1), PAD_ID, dtype=np.int64)
        loss_mask_BS = np.zeros((len(items), s), dtype=np.float32)
        for row, item in enumerate(items):
            window = self.stream[item * s : item * s + s + 1]
            windows_BW[row, : len(window)] = window
            loss_mask_BS[row, : len(window) - 1] = 1.0 if in_loss else 0.0
        windows = torch.from_numpy(windows_BW)
        return LMBatch(
            tokens=windows[:, :-1].clone(), labels=windows[:, 1:].clone(), loss_mask=torch.from_numpy(loss_mask_BS)
        )


# ---- MT: length-bucketed pairs ---------------------------------------------------------------------------------


# Every MT sequence is its sentence's ids cut to seq_length - 1, plus one special token: src = ids + EOS,
# tgt_in = BOS + ids, labels = ids + EOS. Truncation cuts the ids, never the EOS: a model learns to stop even on a verse
# longer than seq_length. Rows are written straight into the padded arrays: no per-sentence arrays to allocate.


def _pad_rows(rows: list[np.ndarray], before: int | None = None, after: int | None = None):
    """[B, longest + 1] int64: each row `before + ids` or `ids + after`, padded with PAD_ID; and its bool pad mask."""
    lengths = np.fromiter((len(r) + 1 for r in rows), dtype=np.int64, count=len(rows))
    ids_BS = np.full((len(rows), lengths.max()), PAD_ID, dtype=np.int64)
    start = 0 if before is None else 1
    for i, r in enumerate(rows):
        ids_BS[i, start : start + len(r)] = r
    if before is not None:
        ids_BS[:, 0] = before
    else:
        ids_BS[np.arange(len(rows)), lengths - 1] = after
    pad_BS = np.arange(ids_BS.shape[1])[None, :] >= lengths[:, None]
    return torch.from_numpy(ids_BS), torch.from_numpy(pad_BS)


def mt_labels(tgt: np.ndarray, tgt_offsets: np.ndarray, seq_length: int) -> np.ndarray:
    """Every label token of a split (each target cut to seq_length - 1 ids + EOS), concatenated."""
    lengths = np.diff(tgt_offsets)
    position = np.arange(len(tgt)) - np.repeat(tgt_offsets[:-1], lengths)
    kept = tgt[position < seq_length - 1].astype(np.int64)
    return np.insert(kept, np.cumsum(np.minimum(lengths, seq_length - 1)), EOS_ID)


class MTBatches(_Batches):
    """Item i is sentence pair i; training batches are bucketed by length (see `_Batches._bucket`)."""

    def __init__(
        self,
        src_ids: list[np.ndarray],
        tgt_ids: list[np.ndarray],
        seq_length: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        shuffle: bool,
        split: str = "train",
        bucket_batches: int = BUCKET_BATCHES,
    ):
        if len(src_ids) != len(tgt_ids):
            raise DataError(f"split {split!r}: {len(src_ids)} source sentences but {len(tgt_ids)} targets")
        keep = seq_length - 1  # room for the EOS (source, labels) or the BOS (decoder input)
        self.src_ids = [ids[:keep] for ids in src_ids]
        self.tgt_ids = [ids[:keep] for ids in tgt_ids]
        src_len = np.fromiter((len(x) + 1 for x in self.src_ids), dtype=np.int64, count=len(self.src_ids))
        tgt_len = np.fromiter((len(x) + 1 for x in self.tgt_ids), dtype=np.int64, count=len(self.tgt_ids))
        super().__init__(
            len(src_ids), micro_batch_size, dp_rank, dp_size, seed, shuffle, src_len + tgt_len, bucket_batches
        )
        g = self.global_batch
        if (shuffle and self.num_items < g) or self.num_items == 0:
            need = (
                f"one global batch of {g} pairs (micro_batch_size {micro_batch_size} x {dp_size} data-parallel ranks)"
                if shuffle
                else "evaluation needs at least 1 pair"
            )
            raise DataError(
                f"split {split!r} has {self.num_items:,} sentence pairs ({int(src_len.sum() + tgt_len.sum()):,} "
                f"tokens): {need}; use a larger corpus" + (" or lower train.micro_batch_size" if shuffle else "")
            )
        self.tokens_per_step = round(g * tgt_len.mean())  # label tokens (the ones in the loss), on average

    def _collate(self, items: np.ndarray, in_loss: bool = True) -> MTBatch:
        src, src_pad = _pad_rows([self.src_ids[i] for i in items], after=EOS_ID)
        targets = [self.tgt_ids[i] for i in items]
        tgt_in, tgt_pad = _pad_rows(targets, before=BOS_ID)
        labels, _ = _pad_rows(targets, after=EOS_ID)
        loss_mask = (~tgt_pad).float() * in_loss
        return MTBatch(src=src, tgt_in=tgt_in, labels=labels, loss_mask=loss_mask, src_pad=src_pad, tgt_pad=tgt_pad)


# ---- entry points ----------------------------------------------------------------------------------------------


def build_batches(
    cfg: RunConfig, tokenizer: Tokenizer, split: str, dp_rank: int, dp_size: int, shuffle: bool | None = None
) -> LMBatches | MTBatches:
    """The batches of one split for one data-parallel rank; shuffled (and bucketed) by default for "train" only."""
    shuffle = split == "train" if shuffle is None else shuffle
    data = tokenized_split(cfg, tokenizer, split)
    common = dict(
        micro_batch_size=cfg.train.micro_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=cfg.train.seed,
        shuffle=shuffle,
        split=split,
    )
    if cfg.task == "lm":
        return LMBatches(data["stream"], cfg.model.seq_length, **common)
    src, tgt = _ragged(data["src"], data["src_offsets"]), _ragged(data["tgt"], data["tgt_offsets"])
    return MTBatches(src, tgt, cfg.model.seq_length, **common)


def label_tokens(cfg: RunConfig, tokenizer: Tokenizer, split: str) -> np.ndarray:
    """Every token the loss is computed on in a split: LM the packed stream after its first token, MT labels + EOS."""
    data = tokenized_split(cfg, tokenizer, split)
    if cfg.task == "lm":
        return data["stream"][1:]
    return mt_labels(data["tgt"], data["tgt_offsets"], cfg.model.seq_length)


def unigram_cross_entropy(train_labels: np.ndarray, eval_labels: np.ndarray, vocab_size: int) -> float:
    """Nats per token of eval_labels under train_labels' unigram distribution, add-one smoothed over the vocab."""
    counts = np.bincount(train_labels, minlength=vocab_size).astype(np.float64) + 1.0
    log_probs = np.log(counts) - np.log(counts.sum())
    return float(-log_probs[eval_labels].mean())


def unigram_baseline(cfg: RunConfig, tokenizer: Tokenizer) -> float:
    """The valid loss a model that ignores context would get: the floor a trained model must beat."""
    valid = label_tokens(cfg, tokenizer, "valid")
    if len(valid) == 0:
        raise DataError("split 'valid' has no tokens: the unigram baseline needs a valid split")
    return unigram_cross_entropy(label_tokens(cfg, tokenizer, "train"), valid, tokenizer.vocab_size)


def copy_baseline_texts(cfg: RunConfig, split: str = "valid") -> tuple[list[str], list[str]]:
    """(sources, references) of an MT split: scored as they are, the sources give the copy-the-source BLEU floor."""
    if cfg.task != "mt":
        raise ConfigError("task", f"the copy baseline is for translation (task 'mt'), got {cfg.task!r}")
    if split not in SPLITS:
        raise DataError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    rows = load_splits(cfg.data)[split]
    return list(rows["src"]), list(rows["tgt"])
