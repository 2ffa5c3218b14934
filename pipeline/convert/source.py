"""Read a training checkpoint in one process: its config, tokenizer, and the megatron model at EP=1.

The checkpoint's own config.yaml describes the model (a `--config` the user names is only checked against it). The
model is built at EP=1 on a world of one (gloo, or nccl with a GPU) and dist_checkpointing loads the experts of any
EP degree into it; the same model is then the reference the export is verified against.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from pipeline.config import RunConfig, load_config
from pipeline.errors import CheckpointError, ConfigError, CorruptCheckpointError
from pipeline.tokenizer import MODEL_FILENAME, Tokenizer
from pipeline.train import checkpoint as ckpt_io


@dataclass
class Source:
    ckpt: Path
    meta: dict[str, Any]
    cfg: RunConfig  # the checkpoint's config at EP=1
    saved: dict[str, Any]  # config.yaml as written by training
    tokenizer: Tokenizer


def open_checkpoint(path: Path, config: str | None = None) -> Source:
    """Resolve and check a checkpoint (or a run directory's latest one) without loading weights."""
    ckpt = ckpt_io.resolve_checkpoint(Path(path))
    try:
        ckpt_io.verify_checkpoint(ckpt)  # every file against the checkpoint's manifest, before anything reads them
    except CorruptCheckpointError as err:
        raise _with_older(err, ckpt) from None
    meta = ckpt_io.read_meta(ckpt)
    saved = ckpt_io.saved_config(ckpt)
    if not isinstance(saved, dict):
        raise CheckpointError(f"{ckpt / 'config.yaml'}: expected a mapping of config sections")
    raw = yaml.safe_load(yaml.safe_dump(saved))  # a copy to adjust
    if isinstance(raw.get("data"), dict):
        raw["data"].pop("task", None)  # written by training, set from the top-level task when loaded
    raw.setdefault("parallel", {})["ep_size"] = 1
    # The reference (and the export) in fp32 whatever the training dtype: megatron's bf16 layers cast activations
    # back to bf16, and bf16 weights are exact in fp32.
    raw.setdefault("train", {})["dtype"] = "fp32"
    raw.setdefault("tokenizer", {})["model_file"] = str(ckpt / MODEL_FILENAME)
    with tempfile.TemporaryDirectory() as tmp:
        resolved = Path(tmp) / "config.yaml"
        resolved.write_text(yaml.safe_dump(raw, sort_keys=False))
        try:
            cfg = load_config(resolved)
        except ConfigError as err:
            raise CheckpointError(f"{ckpt / 'config.yaml'}: {err.field}: {err.reason}") from None
    if meta.get("task") != cfg.task:
        raise CheckpointError(
            f"{ckpt}: meta.json says task {meta.get('task')!r} but config.yaml says {cfg.task!r}: the checkpoint is "
            "inconsistent"
        )
    if config is not None:
        ckpt_io.check_compatible(ckpt, load_config(config))
    return Source(ckpt=ckpt, meta=meta, cfg=cfg, saved=saved, tokenizer=Tokenizer.load(ckpt / MODEL_FILENAME))


def load_megatron(source: Source) -> torch.nn.Module:
    """The megatron model with the checkpoint's weights, in eval mode, on this process's device (a world of one)."""
    from pipeline.platform import detect_platform, init_distributed
    from pipeline.train.model import build_model, init_model_parallel

    info = init_distributed(detect_platform())
    if info.world_size != 1:
        raise CheckpointError(f"the converter runs in one process; it was started on {info.world_size} ranks")
    init_model_parallel(source.cfg)
    model = build_model(source.cfg, source.tokenizer.vocab_size)
    with warnings.catch_warnings():
        # torch deprecations inside dist_checkpointing's loader: nothing a user can act on.
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"(torch|megatron)\..*")
        _check_stored_tensors(model, source.ckpt)
        try:
            ckpt_io.load_model(model, source.ckpt)
        except CorruptCheckpointError as err:
            raise _with_older(err, source.ckpt) from None
    return model.eval()


def _with_older(err: CorruptCheckpointError, ckpt: Path) -> CorruptCheckpointError:
    """The damage, and the newest intact older checkpoint of the same run to convert instead."""
    return ckpt_io.with_intact_hint(err, ckpt_io.run_dir_of(ckpt), ckpt, how="convert it with --ckpt {path}")


def _check_stored_tensors(model: torch.nn.Module, ckpt: Path) -> None:
    """The checkpoint holds exactly the model's tensors: dist_checkpointing itself ignores stored tensors the model
    lacks, so a GPT built over a T5 checkpoint of the same dims would load its decoder silently."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    def sharded_tensors(value):  # factories (swiglu's fc1 is saved as two halves) expand to what they save
        if isinstance(value, ShardedTensorFactory):
            yield from sharded_tensors(value.build())
        elif isinstance(value, ShardedTensor):
            yield value
        elif isinstance(value, dict | list | tuple):
            for item in value.values() if isinstance(value, dict) else value:
                yield from sharded_tensors(item)

    try:
        stored = dist_checkpointing.load_tensors_metadata(str(ckpt / "model"))
    except Exception as err:
        raise _with_older(
            CorruptCheckpointError(
                f"corrupt checkpoint: cannot read the tensor index of {ckpt / 'model'} ({ckpt_io.one_line_cause(err)})"
            ),
            ckpt,
        ) from None
    wanted = {t.key: t for t in sharded_tensors(model.sharded_state_dict())}
    missing = sorted(set(wanted) - set(stored))
    extra = sorted(set(stored) - set(wanted))
    if missing or extra:
        detail = "; ".join(
            part
            for part in (
                f"it lacks {len(missing)} tensor(s) of the model, e.g. {missing[0]}" if missing else "",
                f"it holds {len(extra)} tensor(s) the model does not have, e.g. {extra[0]}" if extra else "",
            )
            if part
        )
        raise CheckpointError(f"{ckpt / 'model'} is not a checkpoint of the model its config.yaml describes: {detail}")
    for key, tensor in wanted.items():
        if tuple(stored[key].global_shape) != tuple(tensor.global_shape):
            raise CheckpointError(
                f"{ckpt / 'model'}: tensor {key} has shape {list(stored[key].global_shape)}, the model described by "
                f"config.yaml expects {list(tensor.global_shape)}"
            )
