"""Where the project keeps what it derives and can derive again (prepared corpora, fetched wheels, measured kernel
crossovers, compiled routing kernels) and the record of the results files it wrote: $MOE_CACHE, default
<repo>/.cache."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$MOE_CACHE if set, else <repo>/.cache (the repo root is one level above pipeline/)."""
    env = os.environ.get("MOE_CACHE")
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[1] / ".cache"
