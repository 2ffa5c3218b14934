"""Conversion: a megatron dist_checkpointing checkpoint (LM or MT, any EP degree) -> a verified, EP-agnostic export
directory (format: moe_infer.export_format) that moe_infer serves without megatron-core.

    summary = convert(Path("runs/lm-tiny"))          # its latest checkpoint -> exports/lm-tiny-step<N>

Steps: read the checkpoint in one process (source), map megatron's tensors to the export's names and check their
shapes (names), write everything into a temporary directory (export), load it back with moe_infer and compare its
output with megatron's on a validation batch (verify), then rename it into place. Any failure leaves nothing at the
output path. `python -m pipeline.convert --help` is the command line.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moe_infer import export_format as fmt
from pipeline.convert.export import export_config, refuse_existing, staged, write_config, write_export, write_manifest
from pipeline.convert.names import export_tensors
from pipeline.convert.source import load_megatron, open_checkpoint
from pipeline.convert.verify import LIMIT, ParityError, check_parity, describe

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
    """Convert `ckpt` (a checkpoint directory, or a run directory: its latest) into `out`; returns a summary."""
    start = time.perf_counter()
    source = open_checkpoint(Path(ckpt), config)
    out = Path(out) if out is not None else default_output(source.cfg.name, source.meta["step"])
    refuse_existing(out, force)  # before the slow part
    meta = source.meta
    log(
        f"reading {source.ckpt} ({source.cfg.name}, task {source.cfg.task}, step {meta['step']}, trained with "
        f"EP={meta.get('ep_size')} on {meta.get('world_size')} ranks)"
    )
    model = load_megatron(source)
    device = next(model.parameters()).device
    config_json = export_config(source, model)
    config_json["provenance"]["parity"] = None
    dense, experts = export_tensors(model.state_dict(), config_json)
    parity = None
    with staged(out, force) as tmp:
        manifest = write_export(tmp, config_json, dense, experts, source.tokenizer.model_proto)
        if verify:
            parity = check_parity(model, tmp, source.cfg, source.tokenizer, device)
            log(describe(parity, source.cfg.task))
            if not parity["passed"]:
                raise ParityError(f"{describe(parity, source.cfg.task)}: above the limit, nothing was written")
            config_json["provenance"]["parity"] = parity
            write_config(tmp, config_json)
            manifest = write_manifest(tmp)
    total = sum(entry["bytes"] for entry in manifest["files"].values())
    seconds = time.perf_counter() - start
    layers = {stack: len(layers) for stack, layers in config_json["moe"]["moe_layers"].items() if layers}
    log(
        f"wrote {out}: {len(manifest['files'])} files, {total / 2**20:.1f} MiB ("
        f"{config_json['moe']['num_experts']} experts x {sum(layers.values())} MoE layers in {fmt.EXPERTS_DIR}/, "
        f"{'verified' if verify else 'NOT verified'}) in {seconds:.1f} s"
    )
    return {"out": str(out), "files": len(manifest["files"]), "bytes": total, "parity": parity, "seconds": seconds}
