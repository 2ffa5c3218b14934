import os
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.data import iter_texts
from pipeline.errors import TokenizerError
from pipeline.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    Tokenizer,
    TokenizerConfig,
    tokenizer_for,
    train_tokenizer,
)
from pipeline.tokenizer.__main__ import main

# Raw play text (markdown and all) is enough to exercise training and caching without the corpus layer.
SAMPLE = (
    (Path(__file__).parent.parent / "pipeline/data/fixtures/shakespeare/macbeth.md").read_text().splitlines()[:2000]
)


@pytest.fixture(scope="module")
def lm_tok():
    return tokenizer_for(load_config("lm-tiny"))


@pytest.fixture(scope="module")
def mt_tok():
    return tokenizer_for(load_config("mt-tiny", ["data.size=fixture"]))


def test_lm_tokenizer_round_trips_held_out_text(lm_tok):
    docs = list(iter_texts(load_config("lm-tiny").data, "valid"))
    assert docs
    for text in docs[:200] + ["  odd   spacing\n\nand ünïcödé ✓ 1234", "line one\nline two"]:
        assert lm_tok.decode(lm_tok.encode(text)) == text
    assert lm_tok.vocab_size == 2000


def test_mt_vocabulary_is_shared_by_both_languages(mt_tok):
    cfg = load_config("mt-tiny", ["data.size=fixture"])
    texts = list(iter_texts(cfg.data, "valid"))
    ids = [i for text in texts for i in mt_tok.encode(text)]
    assert UNK_ID not in ids
    english = mt_tok.encode("And God said, Let there be light.")
    french = mt_tok.encode("Dieu dit: Que la lumière soit!")
    # Whole common words of both languages are single pieces, so both were in the training text.
    pieces = {mt_tok.sp.id_to_piece(i) for i in english + french}
    assert {"▁God", "▁Dieu"} <= pieces


def test_special_ids_are_fixed(lm_tok):
    assert (lm_tok.sp.pad_id(), lm_tok.sp.unk_id(), lm_tok.sp.bos_id(), lm_tok.sp.eos_id()) == (0, 1, 2, 3)
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)
    ids = lm_tok.encode("Macbeth", bos=True, eos=True)
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID


def test_training_is_cached_by_text_and_settings(tmp_path, monkeypatch):
    cfg = TokenizerConfig(vocab_size=600)
    first = train_tokenizer(SAMPLE, cfg, tmp_path)
    mtime = os.path.getmtime(first.path)

    import sentencepiece as spm

    def no_training(*args, **kwargs):
        raise AssertionError("trained again although the text and settings did not change")

    monkeypatch.setattr(spm.SentencePieceTrainer, "train", no_training)
    again = train_tokenizer(SAMPLE, cfg, tmp_path)
    assert again.path == first.path and os.path.getmtime(again.path) == mtime
    monkeypatch.undo()
    other_text = train_tokenizer(SAMPLE + ["Double, double toil and trouble"], cfg, tmp_path)
    other_settings = train_tokenizer(SAMPLE, TokenizerConfig(vocab_size=600, model_type="unigram"), tmp_path)
    assert len({first.path, other_text.path, other_settings.path}) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left behind


def test_a_vocabulary_too_large_says_the_maximum(tmp_path):
    with pytest.raises(TokenizerError, match=r"vocab_size=50000 is too large for this corpus .* the maximum is \d+"):
        train_tokenizer(SAMPLE, TokenizerConfig(vocab_size=50000), tmp_path)
    assert not any(p.is_dir() for p in tmp_path.iterdir())


def test_a_vocabulary_too_small_says_the_minimum(tmp_path):
    with pytest.raises(TokenizerError, match=r"vocab_size=300 is too small for this corpus: it needs at least \d+"):
        train_tokenizer(SAMPLE, TokenizerConfig(vocab_size=300), tmp_path)


def test_empty_text_is_refused(tmp_path):
    with pytest.raises(TokenizerError, match="training text is empty"):
        train_tokenizer(["", "   "], TokenizerConfig(vocab_size=600), tmp_path)


def test_loading_a_model_file(tmp_path, lm_tok):
    path = lm_tok.save(tmp_path / "copy.model")
    loaded = Tokenizer.load(path)
    assert loaded.encode("Out, damned spot!") == lm_tok.encode("Out, damned spot!")
    cfg = load_config("lm-tiny", [f"tokenizer.model_file={path}"])
    assert tokenizer_for(cfg).path == path
    with pytest.raises(TokenizerError, match="no tokenizer model at"):
        Tokenizer.load(tmp_path / "missing.model")
    (tmp_path / "corrupt.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(TokenizerError, match="corrupt.model: not a valid sentencepiece model"):
        Tokenizer.load(tmp_path / "corrupt.model")


def test_cli_prints_token_counts(capsys):
    assert main(["lm-tiny"]) == 0
    out = capsys.readouterr().out
    assert "vocab 2,000" in out and "tokens/word" in out
    assert main(["lm-tiny", "--set", "tokenizer.vocab_size=1000000"]) == 2
    assert "the maximum is" in capsys.readouterr().err
