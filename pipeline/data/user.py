"""User corpora: local text/jsonl/json/csv/tsv/parquet files (a path, a directory or a glob) or `hf:NAME`, all read
through `datasets` and turned into the same rows as the built-in corpora: LM {doc_id, text}, MT {doc_id, src, tgt}.

- Plain text is read by paragraph: each blank-line separated block is one document.
- A row's document id is its `doc_id` (or `group`) column when there is one; otherwise a hash of its text (of the
  source side for MT), so duplicated rows always land in the same split.
- Separate train/valid/test files are used as they are, given either as a directory holding `train.*`, `valid.*`
  (or `validation.*`/`dev.*`) and `test.*`, or as `train=PATH,valid=PATH,test=PATH`. An hf dataset with
  train/validation/test splits is used as is too.
"""

import glob
import hashlib
import os
import socket
from pathlib import Path

from pipeline.data.spec import DataConfig
from pipeline.errors import DataError

FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".csv": "csv",
           ".tsv": "csv", ".parquet": "parquet"}  # fmt: skip
ACCEPTED = ", ".join(sorted(FORMATS)) + " (optionally .gz)"
DOC_ID_COLUMNS = ("doc_id", "group")
SPLIT_FILE_NAMES = {"train": ("train",), "valid": ("valid", "validation", "dev"), "test": ("test",)}

Rows = list[dict[str, str]]


def file_format(path: Path) -> str:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    suffix = Path(name).suffix.lower()
    if suffix not in FORMATS:
        raise DataError(f"{path}: unknown corpus format {suffix or '(no extension)'!r}; accepted: {ACCEPTED}")
    return FORMATS[suffix]


def _expand(spec: str) -> list[Path]:
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"corpus {spec!r}: no files match this pattern")
        return files
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DataError(f"{path}: the corpus directory is empty")
        return files
    if not path.exists():
        raise DataError(f"{path}: corpus file not found (expected a file, directory or glob; accepted: {ACCEPTED})")
    return [path]


def resolve_files(corpus: str) -> dict[str, list[Path]]:
    """{"all": files} for one corpus to split by hash, or {"train":, "valid":, "test":} when the user split it."""
    if "=" in corpus and not Path(corpus).exists():
        mapping: dict[str, list[Path]] = {}
        for part in corpus.split(","):
            split, _, spec = part.partition("=")
            split = split.strip()
            if split not in SPLIT_FILE_NAMES or not spec.strip():
                raise DataError(f"corpus {corpus!r}: expected train=PATH,valid=PATH,test=PATH, got {part!r}")
            mapping[split] = _expand(spec.strip())
        missing = [s for s in SPLIT_FILE_NAMES if s not in mapping]
        if missing:
            raise DataError(f"corpus {corpus!r}: split files given but {', '.join(missing)} missing")
        return mapping
    path = Path(corpus).expanduser()
    if path.is_dir():
        by_split = {
            split: [p for p in sorted(path.iterdir()) if p.is_file() and p.name.split(".")[0].lower() in names]
            for split, names in SPLIT_FILE_NAMES.items()
        }
        if by_split["train"]:
            missing = [s for s, files in by_split.items() if not files]
            if missing:
                raise DataError(f"{path}: has train.* but no {' or '.join(missing)} file(s) next to it")
            return by_split
    return {"all": _expand(corpus)}


def fingerprint(corpus: str) -> list:
    """What identifies the input for the cache: each file's path, size and modification time (or the hf name)."""
    if corpus.startswith("hf:"):
        return [corpus]
    return [
        [split, str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns]
        for split, files in resolve_files(corpus).items()
        for p in files
    ]


def _load_files(files: list[Path], hf_cache: Path):
    import datasets

    formats = {file_format(p) for p in files}
    if len(formats) > 1:
        raise DataError(f"{files[0].parent}: files in different formats ({', '.join(sorted(formats))}); use one format")
    fmt = formats.pop()
    kwargs = {"sample_by": "paragraph"} if fmt == "text" else {}
    if fmt == "csv" and all(".tsv" in p.name.lower() for p in files):
        kwargs["delimiter"] = "\t"
    for p in files:
        if p.stat().st_size == 0:
            raise DataError(f"{p}: the corpus file is empty")
    try:
        data_files = [str(p) for p in files]
        data = datasets.load_dataset(fmt, data_files=data_files, split="train", cache_dir=str(hf_cache), **kwargs)
    except Exception as exc:  # datasets raises many types for bad files; none of them should reach the user raw
        raise DataError(f"{', '.join(map(str, files))}: cannot read as {fmt} ({type(exc).__name__}: {exc})") from exc
    return data, ", ".join(map(str, files)), fmt


def _load_hf(name: str, hf_cache: Path):
    import datasets

    if not datasets.config.HF_HUB_OFFLINE:  # read from HF_HUB_OFFLINE when datasets is imported
        try:  # datasets retries for ~25 s when the hub is unreachable; fail at once instead
            socket.create_connection(("huggingface.co", 443), timeout=5).close()
        except OSError as exc:
            raise DataError(
                f"hf:{name}: the Hugging Face hub is not reachable ({exc}); this machine is offline. Use a local "
                "file, or set HF_HUB_OFFLINE=1 if the dataset is already in the local Hugging Face cache"
            ) from exc
    try:
        return datasets.load_dataset(name, cache_dir=str(hf_cache))
    except Exception as exc:
        raise DataError(
            f"hf:{name}: cannot load the dataset ({type(exc).__name__}: {exc}); the name may be wrong, or the hub "
            "not reachable (offline)"
        ) from exc


def _text_id(text: str) -> str:
    return "sha1:" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def _value(row: dict, column: str) -> str:
    value = row.get(column)
    return "" if value is None else str(value).strip()


def to_rows(data, cfg: DataConfig, where: str, text_column: str | None = None) -> Rows:
    """A `datasets.Dataset` -> prepared rows; checks the fields the task needs and drops empty rows.

    `text_column` overrides cfg.text_field for plain text files, whose one column is always 'text'."""
    columns = set(data.column_names)
    needed = [cfg.src_field, cfg.tgt_field] if cfg.task == "mt" else [text_column or cfg.text_field]
    for field in needed:
        if field not in columns:
            setting = "src_field/tgt_field" if cfg.task == "mt" else "text_field"
            raise DataError(f"{where}: no {field!r} column (columns: {', '.join(sorted(columns))}); set data.{setting}")
    id_column = next((c for c in DOC_ID_COLUMNS if c in columns), None)
    rows: Rows = []
    for row in data:
        if cfg.task == "mt":
            src, tgt = _value(row, cfg.src_field), _value(row, cfg.tgt_field)
            if src and tgt:
                doc_id = (_value(row, id_column) if id_column else "") or _text_id(src)
                rows.append({"doc_id": doc_id, "src": src, "tgt": tgt})
        else:
            text = _value(row, needed[0])
            if text:
                doc_id = (_value(row, id_column) if id_column else "") or _text_id(text)
                rows.append({"doc_id": doc_id, "text": text})
    if not rows:
        raise DataError(f"{where}: no non-empty rows in the {', '.join(needed)} column(s)")
    return rows


def load_user_rows(cfg: DataConfig, hf_cache: Path) -> dict[str, Rows]:
    """{"all": rows} to split by hash, or {"train":, "valid":, "test":} rows as the user split them."""
    if cfg.corpus.startswith("hf:"):
        name = cfg.corpus[3:]
        loaded = _load_hf(name, hf_cache)
        renamed = {{"validation": "valid", "dev": "valid"}.get(s, s): d for s, d in loaded.items()}
        if all(s in renamed for s in SPLIT_FILE_NAMES):
            return {s: to_rows(renamed[s], cfg, f"hf:{name}[{s}]") for s in SPLIT_FILE_NAMES}
        return {"all": [r for s, d in loaded.items() for r in to_rows(d, cfg, f"hf:{name}[{s}]")]}
    out = {}
    for split, files in resolve_files(cfg.corpus).items():
        if cfg.task == "mt" and any(file_format(p) == "text" for p in files):
            fields = f"{cfg.src_field!r}/{cfg.tgt_field!r}"
            raise DataError(f"{files[0]}: plain text has no {fields} pairs for mt; use jsonl, csv or parquet")
        data, where, fmt = _load_files(files, hf_cache)
        out[split] = to_rows(data, cfg, where, "text" if fmt == "text" else None)
    return out
