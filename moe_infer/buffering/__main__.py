"""`python -m moe_infer.buffering replay|prefetch ...`: the cache studies, kept under their old name. They are
benchmarks, moe_infer.bench.replay and moe_infer.bench.prefetch: this is `python -m moe_infer.bench replay|prefetch`.

An entry point, not a module anything imports: it may name a package above its own (tests/test_imports.py).
"""

import sys

from moe_infer.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
