"""`python -m moe_infer.bench --help`: the benchmarks (moe_infer.bench.cli)."""

import sys

from moe_infer.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
