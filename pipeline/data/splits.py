"""The split rule: a document lands in train/valid/test by a stable hash of its id, never by shuffling rows.

Each document id is hashed (sha256, so the answer is the same in every process and Python version, unlike `hash()`)
to a point u in [0, 1). With fractions t (test) and v (valid):

    u < t        -> test
    u < t + v    -> valid
    otherwise    -> train

So a given id always lands in the same split, whatever else is in the corpus, and every row of a document (all lines
of a scene, all verses of a chapter) goes with it: nothing leaks across splits.

Small-corpus fallback: a split whose fraction is > 0 (train always) must not be empty. If hashing leaves one empty,
the document nearest to that split's interval [lo, hi) is moved into it, taken from the split that has the most
documents (ties: train, valid, test). Test is filled first, then valid, then train. Only tiny corpora (a few dozen
documents at 5%) ever need this; it is deterministic and recorded in meta.json.
"""

import hashlib
from collections.abc import Iterable

from pipeline.errors import DataError

SPLITS = ("train", "valid", "test")

SPLIT_RULE = (
    "sha256(doc_id) -> u in [0,1): u < test_fraction -> test, u < test_fraction + valid_fraction -> valid, else train; "
    "an empty split (fraction > 0) takes the document nearest to its interval from the largest split"
)


def hash_unit(doc_id: str) -> float:
    """The id's point in [0, 1): the first 8 bytes of its sha256, as a fraction of 2**64."""
    digest = hashlib.sha256(doc_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(doc_id: str, valid_fraction: float, test_fraction: float) -> str:
    """The split of one document by the hash rule alone (no small-corpus fallback)."""
    u = hash_unit(doc_id)
    if u < test_fraction:
        return "test"
    if u < test_fraction + valid_fraction:
        return "valid"
    return "train"


def _interval(split: str, valid_fraction: float, test_fraction: float) -> tuple[float, float]:
    return {
        "test": (0.0, test_fraction),
        "valid": (test_fraction, test_fraction + valid_fraction),
        "train": (test_fraction + valid_fraction, 1.0),
    }[split]


def _distance(u: float, interval: tuple[float, float]) -> float:
    lo, hi = interval
    return 0.0 if lo <= u < hi else (lo - u if u < lo else u - hi)


def assign_splits(doc_ids: Iterable[str], valid_fraction: float, test_fraction: float) -> dict[str, str]:
    """Map each distinct document id to its split, applying the small-corpus fallback (see module doc)."""
    ids = sorted(set(doc_ids))
    required = [s for s, f in (("test", test_fraction), ("valid", valid_fraction), ("train", 1.0)) if f > 0]
    if len(ids) < len(required):
        raise DataError(
            f"the corpus has {len(ids)} document(s); at least {len(required)} are needed to fill the "
            f"{'/'.join(required)} splits (add documents, or set valid_fraction/test_fraction to 0)"
        )
    assignment = {doc_id: split_of(doc_id, valid_fraction, test_fraction) for doc_id in ids}
    for empty in required:
        members = {s: [d for d in ids if assignment[d] == s] for s in SPLITS}
        if members[empty]:
            continue
        donor = max((s for s in SPLITS if len(members[s]) > 1), key=lambda s: (len(members[s]), -SPLITS.index(s)))
        interval = _interval(empty, valid_fraction, test_fraction)
        nearest = min(members[donor], key=lambda d: (_distance(hash_unit(d), interval), d))
        assignment[nearest] = empty
    return assignment
