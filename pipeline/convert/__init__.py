"""Conversion: a megatron dist_checkpointing checkpoint (LM or MT, any EP degree) -> a verified, EP-agnostic export
directory (format: moe_infer.export_format) that moe_infer serves without megatron-core.

    summary = convert(Path("runs/lm-tiny"))          # its latest checkpoint -> exports/lm-tiny-step<N>

Steps: read the checkpoint in one process (source), map megatron's tensors to the export's names and check their
shapes (names), write everything into a temporary directory (export), load it back with moe_infer and compare its
output with megatron's on a validation batch (verify), then rename it into place. Any failure leaves nothing at the
output path; a killed conversion's temporary directory is removed by the next conversion to the same path.
`python -m pipeline.convert --help` is the command line.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moe_infer import export_format as fmt
from pipeline.atomic import staged_directory
from pipeline.convert.export import describe_export, export_config, write_config, write_export, write_manifest
from pipeline.convert.names import export_tensors
from pipeline.convert.source import load_megatron, open_checkpoint
from pipeline.convert.verify import LIMIT, ParityError, check_parity, describe
from pipeline.outputs import OutputError, check_output, describe_os_error

REPO = Path(__file__).resolve().parents[2]
EXPORTS = REPO / "exports"

__all__ = ["EXPORTS", "LIMIT", "ParityError", "convert", "default_output"]


def default_output(name: str, step: int) -> Path:
    return EXPORTS / f"{name}-step{step}"


def convert(
    ckpt: Path,
    out: Path | None = None,
    force: bool = False,
    verify: bool = True,
    config: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Convert `ckpt` (a checkpoint directory, or a run directory: its latest) into `out`; returns a summary.

    `out` may not overlap the checkpoint; an existing export there is replaced only with `force`, and anything else
    there is never touched (pipeline.outputs.check_output)."""
    start = time.perf_counter()
    source = open_checkpoint(Path(ckpt), config)
    out = Path(out) if out is not None else default_output(source.cfg.name, source.meta["step"])
    protected = {"--ckpt": Path(ckpt), "the checkpoint": source.ckpt}
    decision = check_output(out, kind="export", recognise=describe_export, force=force, protected=protected)
    meta = source.meta
    log(
        f"reading {source.ckpt} ({source.cfg.name}, task {source.cfg.task}, step {meta['step']}, trained with "
        f"EP={meta.get('ep_size')} on {meta.get('world_size')} ranks)"
    )
    parity = None
    try:
        # Staged first, before the slow part: an output place that cannot be written fails at once.
        with staged_directory(out, replace=decision.replaces is not None) as tmp:
            model = load_megatron(source)
            device = next(model.parameters()).device
            config_json = export_config(source, model)
            config_json["provenance"]["parity"] = None
            dense, experts = export_tensors(model.state_dict(), config_json)
            manifest = write_export(tmp, config_json, dense, experts, source.tokenizer.model_proto)
            if verify:
                parity = check_parity(model, tmp, source.cfg, source.tokenizer, device)
                log(describe(parity, source.cfg.task))
                if not parity["passed"]:
                    raise ParityError(f"{describe(parity, source.cfg.task)}: above the limit, nothing was written")
                config_json["provenance"]["parity"] = parity
                write_config(tmp, config_json)
                manifest = write_manifest(tmp)
            # The check again, right before the rename: something may have appeared at `out` meanwhile.
            check_output(out, kind="export", recognise=describe_export, force=force, protected=protected)
    except FileExistsError:
        raise OutputError(f"{out} appeared while the export was being written: nothing was written") from None
    except OSError as err:
        raise OutputError(f"cannot write the export to {out}: {describe_os_error(err)} (nothing was written)") from None
    total = sum(entry["bytes"] for entry in manifest["files"].values())
    seconds = time.perf_counter() - start
    layers = {stack: len(layers) for stack, layers in config_json["moe"]["moe_layers"].items() if layers}
    log(
        f"wrote {out}: {len(manifest['files'])} files, {total / 2**20:.1f} MiB ("
        f"{config_json['moe']['num_experts']} experts x {sum(layers.values())} MoE layers in {fmt.EXPERTS_DIR}/, "
        f"{'verified' if verify else 'NOT verified'}"
        f"{', replacing ' + decision.replaces if decision.replaces else ''}) in {seconds:.1f} s"
    )
    return {"out": str(out), "files": len(manifest["files"]), "bytes": total, "parity": parity, "seconds": seconds}
