"""Train a megatron-core MoE model with expert parallelism (parallel.ep_size) and tensor parallelism (parallel.tp_size).

    torchrun --standalone --nproc_per_node 2 launch/train.py --config lm-tiny
    deepspeed --num_gpus 2 launch/train.py --config mt-tiny --set train.steps=100
    torchrun --standalone --nproc_per_node 2 launch/train.py --config lm-tiny --set parallel.tp_size=2
    python launch/train.py --config lm-qwen3-tiny --set parallel.ep_size=1      (one process; no expert biases)
    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint HOST:29500 launch/train.py
        --config lm-tiny        (and --node-rank 1 on a second machine: README "More than one machine")

Checkpoints, metrics and the W&B run go to runs/<config name>/ (or --run-dir), which must not hold another run
unless --resume or --resume-from is given. SIGINT/SIGTERM save a checkpoint and exit (so does a rank whose launcher
is gone); --resume continues from the latest checkpoint with the same data order, --resume-from step_N from an
older one (after a damaged checkpoint, say).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from pipeline.config import add_override_argument, load_config  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402

_QUIET_RANK_DELAY_S = 3.0


class _ArgumentParser(argparse.ArgumentParser):
    """A usage error in one short line, printed once per job: every rank parses the same arguments, so under a
    launcher only rank 0 prints; the others wait a moment before exiting, so that the launcher does not stop rank 0
    (on seeing another rank fail) before it has printed."""

    def error(self, message: str):
        if os.environ.get("RANK", "0") == "0":
            sys.stderr.write(f"error: {message} (launch/train.py --help lists the options)\n")
            sys.stderr.flush()
        else:
            time.sleep(_QUIET_RANK_DELAY_S)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    parser = _ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a config name (lm-tiny) or a YAML path")
    add_override_argument(parser)
    parser.add_argument("--run-dir", type=Path, help="where checkpoints and metrics go (default runs/<config name>)")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    start.add_argument(
        "--resume-from",
        metavar="CHECKPOINT",
        help="continue from this checkpoint: step_N (or N) of the run directory, or a checkpoint directory's path; "
        "the run's newer checkpoints are replaced as it reaches their steps",
    )
    parser.add_argument(
        "--record-traces",
        metavar="SPLIT",
        choices=("valid", "test"),
        help="after training, record each token's selected experts on SPLIT (routing traces, .npz)",
    )
    # The deepspeed launcher passes --local_rank=N; the rank comes from the environment (LOCAL_RANK) either way.
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if not cfg.trainable_here:
            raise PipelineError(
                f"{cfg.name} is the paper's shape, for planners and benchmarks: too large to train here"
            )
        run_dir = args.run_dir or REPO / "runs" / cfg.name
        from pipeline.platform import quiet_known_warnings
        from pipeline.train.loop import train

        quiet_known_warnings()

        summary = train(cfg, run_dir, resume=args.resume, trace_split=args.record_traces, resume_from=args.resume_from)
    except PipelineError as err:
        # Every rank that fails says why, in one write: the launcher may stop this rank as soon as another one exits.
        sys.stderr.write(f"error: {err}\n")
        sys.stderr.flush()
        return 2
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        shown = {k: v for k, v in summary.items() if k not in ("examples", "bleu_signature")}
        print(json.dumps(shown, indent=2))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
