"""`python -m moe_infer.serve ...`: the same as `launch/infer.py ...` for generate and translate (see cli.py)."""

import sys

from moe_infer.serve.cli import main

if __name__ == "__main__":
    sys.exit(main())
