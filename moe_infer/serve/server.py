"""Serve an export over HTTP: an OpenAI-compatible server with continuous batching across expert-parallel ranks.

    python launch/infer.py --export exports/lm-tiny --mode serve --port 8000                    one process
    torchrun --nproc-per-node 2 launch/infer.py --export exports/lm-tiny --mode serve
    deepspeed --num_gpus 2 launch/infer.py --export exports/mt-tiny --mode serve --expert-slots 2

    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "lm-tiny", "prompt": "ROMEO:", "max_tokens": 32, "temperature": 0}'

Processes and threads: every rank loads its experts (dense layers replicated, as the batch CLI) and runs the
serving loop (moe_infer.runtime.steploop) on its main thread. Rank 0 also starts the HTTP front end (FastAPI +
uvicorn, moe_infer.serve.app, tokenizing and detokenizing) in a process of its own (moe_infer.serve.api_process), so
that it never holds the serving loop's GIL, and hands each request to the rank with the least outstanding work; the
ranks meet once per step (a small all-gather of plans, tokens and counts) and in the MoE layers' all-to-alls. With
no work anywhere every rank waits, blocked, using no CPU; rank 0 sends a heartbeat well inside --timeout.

Every engine flag of the batch CLI works here (policy, placement, expert buffering, dtype, --timeout). The model
served is named after the export directory (--served-model-name). A request's completion is the same, token for
token, as the batch CLI's for the same prompt and settings (temperature 0, or a fixed seed: see
moe_infer.serve.protocol), whatever else the server is doing, with a dropless policy (dynamic, megatron; static and
deepspeed with drops let a token's neighbours in the batch decide what is dropped).

Ending: SIGTERM (or Ctrl-C) drains: new requests get 503, the ones in flight finish for up to --shutdown-timeout
seconds (the rest get an error), then every rank exits 0; a second signal stops at once. Under torchrun or the
deepspeed launcher, signal the launcher: it passes SIGTERM on and gives the ranks 30 s before SIGKILL. A rank that
dies or hangs ends the server within --timeout: the ranks still alive stop with the cause printed and a non-zero
status, and rank 0 answers its open requests with an error first.
"""

from __future__ import annotations

import argparse
import gc
import signal
import sys
from pathlib import Path

from moe_infer.model.loader import Export
from moe_infer.runtime.batching import Batcher
from moe_infer.runtime.control import ControlPlane
from moe_infer.runtime.engine import Engine
from moe_infer.runtime.metering import MoEMeter
from moe_infer.runtime.rebalance import Rebalancer
from moe_infer.runtime.requests import Mailbox
from moe_infer.runtime.steploop import Coordinator, StepLoop
from moe_infer.serve.api_process import ApiProcess, ApiThread, FrontEndSpec
from moe_infer.serve.flags import (
    DEFAULT_MAX_LEN,
    add_engine_arguments,
    check_engine_flags,
    engine_options,
    flag_record,
    positive_float,
    positive_int,
)
from moe_infer.serve.frontend import ServingLimits
from moe_infer.serve.metrics import MetricsLogger
from moe_infer.serve.process import ArgumentParser, is_collective_failure, launched, progress
from pipeline.errors import PipelineError
from pipeline.tracking import NamedRun, Tracker, check_run_dir

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


class Stopped(PipelineError):
    """A second SIGTERM / Ctrl-C: stop now, without draining."""


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="launch/infer.py --mode serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=("serve",), default="serve", help=argparse.SUPPRESS)
    add_engine_arguments(parser)
    srv = parser.add_argument_group("the server")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free one; default 8000)")
    srv.add_argument("--served-model-name", help="the model's name in the API (default: the export directory's)")
    srv.add_argument("--batch-size", type=positive_int, default=32, help="rows each rank decodes at once (default 32)")
    srv.add_argument(
        "--max-queued-requests",
        type=positive_int,
        default=256,
        help="prompts that may wait at rank 0 for a rank's room; beyond it requests get 503 (default 256)",
    )
    srv.add_argument(
        "--shutdown-timeout",
        type=float,
        default=20.0,
        help="on SIGTERM, seconds the requests in flight get to finish (default 20; launchers kill after 30)",
    )
    srv.add_argument("--run-dir", type=Path, help="log the metrics to a W&B run (offline by default) here")
    srv.add_argument(
        "--metrics-interval", type=positive_float, default=10.0, help="seconds between W&B logs (default 10)"
    )
    srv.add_argument(
        "--frontend-in-thread",
        action="store_true",
        help="run the HTTP front end in a thread of rank 0 rather than a process of its own (it then shares rank 0's "
        "GIL with the serving loop: slower under load; for comparison)",
    )
    return parser


class Server:
    """One rank of the server, from checked flags to its end."""

    def __init__(self, args: argparse.Namespace, rank: int, world: int):
        self.args, self.rank, self.world = args, rank, world
        self.export = Export.open(args.export)
        self.placements = check_engine_flags(args, self.export, world)
        self.name = args.served_model_name or self.export.path.name
        if args.run_dir is not None:  # adds only to a tracked run (an earlier server's), never to the export
            check_run_dir(args.run_dir, protected={"--export": self.export.path})
        self.loop: StepLoop | None = None
        self.api: ApiProcess | ApiThread | None = None  # rank 0: the HTTP front end
        self.mailbox = Mailbox()
        self.signals = 0

    def limits(self) -> ServingLimits:
        cfg, translate = self.export.model_config, self.export.model_config.architecture == "encoder-decoder"
        default = min(DEFAULT_MAX_LEN, cfg.max_positions) if translate else DEFAULT_MAX_TOKENS
        return ServingLimits(cfg.max_positions, default, self.args.batch_size, self.args.max_queued_requests, translate)

    def open_front_end(self) -> None:
        """Rank 0: the HTTP server's port bound and its front end starting (503 "loading") before the engine does."""
        export, args = self.export, self.args
        spec = FrontEndSpec(
            export.tokenizer_bytes(),
            export.path / export.config["tokenizer"]["file"],
            export.model_config.eos_id,
            self.name,
            self.limits(),
            min(1.0, args.metrics_interval) if args.run_dir is not None else None,
        )
        start = ApiThread if args.frontend_in_thread else ApiProcess
        self.api = start(spec, args.host, args.port, self.mailbox)
        progress(args.quiet, 0, f"listening on {self.api.url} (loading {export.path})")

    def run(self) -> None:
        args = self.args
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)
        engine = Engine.start(self.export.path, engine_options(args, args.policy, self.placements))
        batcher = Batcher(engine.model, args.batch_size)
        control = ControlPlane(engine.world_size, cuda=engine.device.type == "cuda", timeout_s=args.timeout)
        hooks = [MoEMeter(engine.moe_layers)]
        if engine.options.rebalance is not None:
            hooks.append(Rebalancer(engine))  # its placement figures reach /metrics like the meter's
        self.loop = StepLoop(batcher, control, self.rank, hooks=hooks)
        self.loop.draining = self.signals > 0
        # Everything loaded so far (modules, the model) lives as long as the server: out of the collector's sight,
        # the full collections while serving (pauses in the step loop) and the one at exit skip it (that one took
        # seconds of CPU per rank here, 220k objects, after every stop).
        gc.freeze()
        coordinator = None
        if self.rank == 0:
            heartbeat = min(5.0, args.timeout / 4)  # well inside the collective timeout
            coordinator = Coordinator(self.mailbox, self.world, args.batch_size, args.shutdown_timeout, heartbeat)
            self.api.wait_up(args.timeout / 2)  # (the other ranks wait in the loop's first collective meanwhile)
            if self.api.state == "loading":
                self.api.state = "ready"
            print(
                f"serving {self.name} on {self.api.url}: {self.world} rank(s), {engine.device}, policy "
                f"{args.policy}, {args.dtype}, {args.batch_size} rows per rank",
                file=sys.stderr,
                flush=True,
            )
        self.loop.run(coordinator)
        if self.api is not None and self.api.failure is not None:
            raise PipelineError(self.api.failure)
        progress(args.quiet, self.rank, "stopped")

    def on_signal(self, signum: int, frame) -> None:
        self.signals += 1
        if self.signals > 1:
            raise Stopped(f"stopped by a second {signal.Signals(signum).name}, without draining")
        progress(
            self.args.quiet,
            self.rank,
            f"{signal.Signals(signum).name}: draining (requests in flight get up to {self.args.shutdown_timeout:g} s)",
        )
        if self.rank == 0:
            if self.api is not None:
                self.api.state = "draining"
            self.mailbox.drain()
        elif self.loop is not None:
            self.loop.draining = True  # rank 0 hears of it in the next step and drains the server

    def close(self, failure: BaseException | None) -> None:
        """Rank 0: answer every open request (an error: the server failed, or stopped before it finished), then stop
        the HTTP front end."""
        if self.api is None:
            return
        if failure is not None:
            self.api.state = "failed"
            why = (
                "another rank stopped or did not answer within --timeout"
                if is_collective_failure(failure, self.world)
                else ""
            )
            self.api.fail_all(f"the server failed and is stopping: {why or _first_line(failure)}")
        else:
            self.api.state = "stopped"
            self.api.fail_all("the server shut down before this request finished", status=503)
        self.api.close()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # bad flags: argparse's message and exit status 2
    with launched(args.quiet) as command:
        server = Server(args, command.rank, command.world)  # every check, the same on every rank
        if command.rank == 0:
            server.open_front_end()
        command.checked()
        logger = None
        if command.rank == 0 and args.run_dir is not None:
            tracker = Tracker(NamedRun(f"{server.name}-serve", flag_record(args)), args.run_dir, "serve")
            logger = MetricsLogger(server.api, tracker, args.metrics_interval)  # the front end's figures
        failure = None
        try:
            server.run()
        except BaseException as err:
            failure = err
            raise
        finally:
            server.close(failure)
            if logger is not None:
                logger.close()
    return command.status


if __name__ == "__main__":
    sys.exit(main())
