"""Sentencepiece tokenizers: trained on a corpus's train split, cached by a hash of corpus + settings, loadable.

One tokenizer per run; MT uses one shared vocabulary trained on both languages (the data layer yields source and
target sentences alike). Special ids are fixed so every stage agrees on them without reading the model: pad 0, unk 1,
bos 2, eos 3. A newline piece lets an LM learn (and generate) line breaks of verse; byte fallback makes encoding
lossless for any text.

Run `python -m pipeline.tokenizer lm-tiny` to train (or reuse) the tokenizer of a config and print token counts
(__main__.py). This module imports neither the run config nor the data stage at its top: the config imports it (and
moe_infer loads a served model's tokenizer with it).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import sentencepiece as spm

from pipeline.atomic import write_atomic
from pipeline.errors import ConfigError, TokenizerError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
NEWLINE = "\n"
MODEL_FILENAME = "tokenizer.model"
_TOO_LARGE = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")
_TOO_SMALL = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


@dataclass
class TokenizerConfig:
    model_type: Literal["bpe", "unigram"] = "bpe"
    vocab_size: int = 2000
    character_coverage: float = 1.0
    byte_fallback: bool = True
    model_file: str | None = None  # use this trained model instead of training one

    def validate(self) -> None:
        if self.vocab_size < 300:
            # The 4 special ids, the newline piece and 256 byte pieces must fit with room for real pieces.
            raise ConfigError("vocab_size", f"must be >= 300, got {self.vocab_size}")
        if not 0.9 <= self.character_coverage <= 1.0:
            raise ConfigError("character_coverage", f"must be in [0.9, 1.0], got {self.character_coverage}")
        if self.model_file is not None and not Path(self.model_file).is_file():
            raise ConfigError("model_file", f"no tokenizer model at {self.model_file}")


class Tokenizer:
    """A loaded sentencepiece model with the project's fixed special ids."""

    def __init__(self, model_proto: bytes, path: Path | None = None):
        self.path = path
        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_proto)
        except (RuntimeError, OSError) as err:
            raise TokenizerError(f"{path or 'tokenizer'}: not a valid sentencepiece model ({err})") from None
        ids = (self.sp.pad_id(), self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id())
        if ids != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise TokenizerError(
                f"{path or 'tokenizer'}: special ids (pad, unk, bos, eos) are {ids}, expected "
                f"{(PAD_ID, UNK_ID, BOS_ID, EOS_ID)}: train it with pipeline.tokenizer"
            )

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"no tokenizer model at {path}")
        return cls(path.read_bytes(), path)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        # One text: no thread pool (encode_batch's threads cost more than the encoding; the server encodes one
        # prompt per request).
        return self.sp.encode(text, add_bos=bos, add_eos=eos)

    def encode_batch(self, texts: list[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        return self.sp.encode(texts, add_bos=bos, add_eos=eos, num_threads=os.cpu_count() or 1)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        return write_atomic(path, self.model_proto)


def _trainer_args(cfg: TokenizerConfig) -> dict:
    return dict(
        model_type=cfg.model_type,
        vocab_size=cfg.vocab_size,
        character_coverage=cfg.character_coverage,
        byte_fallback=cfg.byte_fallback,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        user_defined_symbols=[NEWLINE],
        # Identity normalisation and kept whitespace: decode(encode(text)) gives the text back, byte for byte.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig, cache_dir: Path) -> Tokenizer:
    """Train on `texts` (one sentence or line each), or reuse the model cached for the same texts and settings."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    settings = json.dumps({**_trainer_args(cfg), "num_threads": None, "spm": spm.__version__}, sort_keys=True)
    digest = hashlib.sha256(settings.encode())
    with tempfile.NamedTemporaryFile("w", dir=cache_dir, prefix=".corpus.", suffix=".txt", delete=False) as corpus:
        lines = 0
        for text in texts:
            # A sentence holds no newline: the newline piece is learned from the line structure, not from the input.
            for line in text.split(NEWLINE):
                if line.strip():
                    corpus.write(line + NEWLINE)
                    digest.update(line.encode() + b"\n")
                    lines += 1
    try:
        if lines == 0:
            raise TokenizerError("cannot train a tokenizer: the training text is empty")
        out_dir = cache_dir / digest.hexdigest()[:16]
        model_path = out_dir / MODEL_FILENAME
        if model_path.is_file():
            return Tokenizer.load(model_path)
        writer = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(input=corpus.name, model_writer=writer, **_trainer_args(cfg))
        except RuntimeError as err:
            too_large = _TOO_LARGE.search(str(err))
            if too_large:
                raise TokenizerError(
                    f"tokenizer.vocab_size={cfg.vocab_size} is too large for this corpus ({lines:,} lines): "
                    f"the maximum is {too_large.group(2)}"
                ) from None
            too_small = _TOO_SMALL.search(str(err))
            if too_small:
                raise TokenizerError(
                    f"tokenizer.vocab_size={cfg.vocab_size} is too small for this corpus: it needs at least "
                    f"{too_small.group(2)} pieces for its characters, the byte pieces and the special pieces "
                    "(raise vocab_size, or lower character_coverage)"
                ) from None
            raise TokenizerError(f"sentencepiece training failed: {err}") from None
        # Written under a temporary name and renamed, so a crash never leaves a model that looks complete.
        staging = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".staging."))
        (staging / MODEL_FILENAME).write_bytes(writer.getvalue())
        (staging / "meta.json").write_text(json.dumps({"settings": asdict(cfg), "lines": lines}, indent=2))
        try:
            staging.rename(out_dir)
        except OSError:  # another process finished the same model first: theirs is identical
            shutil.rmtree(staging, ignore_errors=True)
        return Tokenizer.load(model_path)
    finally:
        os.unlink(corpus.name)


class RunSettings(Protocol):
    """What tokenizer_for reads of a run config: pipeline.config.RunConfig, which imports this module (so it is not
    imported here)."""

    tokenizer: TokenizerConfig
    data: Any  # pipeline.data.DataConfig


def tokenizer_for(cfg: RunSettings) -> Tokenizer:
    """The run's tokenizer: the configured model file, or one trained (once, then cached) on the train split."""
    from pipeline.data import cache_root, iter_texts

    if cfg.tokenizer.model_file:
        return Tokenizer.load(cfg.tokenizer.model_file)
    return train_tokenizer(iter_texts(cfg.data, "train"), cfg.tokenizer, cache_root() / "tokenizers")


def count_tokens(tok: Tokenizer, texts: Iterable[str], batch: int = 4096) -> int:
    total, pending = 0, []
    for text in texts:
        pending.append(text)
        if len(pending) == batch:
            total += sum(map(len, tok.encode_batch(pending)))
            pending = []
    return total + sum(map(len, tok.encode_batch(pending)))
