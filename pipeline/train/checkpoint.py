"""Training checkpoints: the model through megatron `dist_checkpointing` (sharded, loadable at any EP degree), the rest
of the training state per rank (exact resume), and the config and tokenizer beside them, written atomically.

A run directory holds:

    checkpoints/step_000100/
        model/                     dist_checkpointing shards: any EP degree loads them (the converter reads these)
        train_state/rank00000.pt   AdamW state, RNG states, step of each rank: resume needs the same world size
        config.yaml                the resolved run config
        tokenizer.model            the tokenizer the model was trained with
        manifest.json              size and sha256 of every file above, checked before a checkpoint is used
        meta.json                  format version, step, task, world/EP size, tokens seen, git revision (written last)
    checkpoints/latest             the name of the newest complete checkpoint

Everything is first written under `checkpoints/.step_000100.partial/` and renamed when every rank has finished, so a run
killed while saving leaves its previous checkpoint as the latest and nothing that looks complete; the next run in that
directory removes the partial one (pipeline.train.run_dir). Checkpoints saved before manifests existed load unverified.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from pipeline.atomic import file_sha256, publish_directory, write_atomic
from pipeline.config import RunConfig
from pipeline.errors import CheckpointError, CorruptCheckpointError
from pipeline.tokenizer import Tokenizer

FORMAT_VERSION = 1
LATEST = "latest"
MANIFEST = "manifest.json"
# The config sections that define the weights: a checkpoint only loads into a model with the same ones.
SHAPE_SECTIONS = ("model", "moe")
SHAPE_EXEMPT = {"moe.capacity_fraction", "moe.aux_loss_coeff", "moe.z_loss_coeff", "moe.dispatcher", "model.dropout"}


def git_revision() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rng_state() -> dict[str, Any]:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: RunConfig,
    tokenizer: Tokenizer,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Collective: every rank calls it at the same step. Returns the complete checkpoint directory."""
    from megatron.core import dist_checkpointing

    from pipeline.train.sharded_save import SynchronousTorchDistSave

    root = run_dir / "checkpoints"
    final = root / f"step_{step:06d}"
    partial = root / f".{final.name}.partial"
    if _rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)  # left by a run killed while saving
        (partial / "model").mkdir(parents=True)
        (partial / "train_state").mkdir()
    _barrier()
    # Written by this process itself: megatron's default strategy starts helper processes that can outlive the rank.
    strategy = SynchronousTorchDistSave()
    dist_checkpointing.save(model.sharded_state_dict(), str(partial / "model"), sharded_strategy=strategy)
    world = dist.get_world_size() if dist.is_initialized() else 1
    state = {"step": step, "world_size": world, "optimizer": optimizer.state_dict(), "rng": _rng_state()}
    torch.save(state, partial / "train_state" / f"rank{_rank():05d}.pt")
    _barrier()
    if _rank() == 0:
        (partial / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        tokenizer.save(partial / "tokenizer.model")
        meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "name": cfg.name,
            "task": cfg.task,
            "world_size": world,
            "ep_size": cfg.parallel.ep_size,
            "git_revision": git_revision(),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **(extra or {}),
        }
        write_manifest(partial)
        (partial / "meta.json").write_text(json.dumps(meta, indent=2))  # last: it marks the checkpoint complete
        # The same step saved again (a resumed run stopped where it started, or --resume-from an older step) replaces
        # it: the old one is set aside until the new one is in place, so a kill at any moment leaves one of them.
        publish_directory(partial, final, replace=True)
        point_latest_at(final)
    _barrier()
    return final


def point_latest_at(ckpt: Path) -> None:
    """Make `checkpoints/latest` name `ckpt` (a checkpoint of that checkpoints directory)."""
    write_atomic(ckpt.parent / LATEST, ckpt.name + "\n")


def read_meta(ckpt: Path) -> dict[str, Any]:
    """The checkpoint's meta.json, checked: a missing or unreadable one means the checkpoint is not usable."""
    meta_path = ckpt / "meta.json"
    if not ckpt.is_dir():
        raise CheckpointError(f"no checkpoint at {ckpt}")
    if not meta_path.is_file():
        raise CheckpointError(f"{ckpt} is incomplete: it has no meta.json (a save that did not finish?)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{meta_path} is corrupt: {err}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path}: checkpoint format version {meta.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    for name in ("model", "config.yaml", "tokenizer.model"):
        if not (ckpt / name).exists():
            raise CheckpointError(f"{ckpt} is incomplete: {name} is missing")
    return meta


def write_manifest(ckpt: Path) -> None:
    files = {
        path.relative_to(ckpt).as_posix(): {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        for path in sorted(ckpt.rglob("*"))
        if path.is_file() and path.name not in (MANIFEST, "meta.json")
    }
    (ckpt / MANIFEST).write_text(json.dumps({"format_version": FORMAT_VERSION, "files": files}, indent=1))


def verify_checkpoint(ckpt: Path) -> bool:
    """Check every file against the checkpoint's manifest.json; raise CheckpointError naming the first damaged one.
    Returns False for a checkpoint saved before manifests existed (nothing to check against)."""
    path = ckpt / MANIFEST
    if not path.is_file():
        return False
    try:
        files = json.loads(path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CorruptCheckpointError(f"corrupt checkpoint: {path} is unreadable ({err})") from None
    for rel, entry in files.items():
        file, expected = ckpt / rel, entry["bytes"]
        if not file.is_file():
            raise CorruptCheckpointError(f"corrupt checkpoint: {file} is missing ({MANIFEST} lists {expected} bytes)")
        size = file.stat().st_size
        if size != expected:
            raise CorruptCheckpointError(f"corrupt checkpoint: {file} has {size} bytes, {MANIFEST} expects {expected}")
        if file_sha256(file) != entry["sha256"]:
            raise CorruptCheckpointError(f"corrupt checkpoint: {file} does not match its sha256 in {MANIFEST}")
    return True


def newest_intact(run_dir: Path, before: Path | None = None) -> Path | None:
    """The newest complete checkpoint of `run_dir` that passes its manifest, older than `before` when given."""
    root = run_dir / "checkpoints"
    steps = sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True) if root.is_dir() else []
    for ckpt in steps:
        if before is not None and ckpt.name >= before.name:
            continue
        try:
            read_meta(ckpt)
            verify_checkpoint(ckpt)
        except CheckpointError:
            continue
        return ckpt
    return None


def run_dir_of(ckpt: Path) -> Path | None:
    """The run directory a checkpoint directory belongs to (runs/X for runs/X/checkpoints/step_N)."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None


def with_intact_hint(
    err: CheckpointError, run_dir: Path | None, damaged: Path | None, how: str | None = None
) -> CheckpointError:
    """`err` (same type) with the newest intact checkpoint of the run, older than `damaged`, and how to use it: `how`
    formats {name} and {path} (default: resume from it with --resume-from)."""
    intact = newest_intact(run_dir, before=damaged) if run_dir is not None else None
    if intact is None:
        return type(err)(f"{err}; {run_dir} has no older intact checkpoint" if run_dir else str(err))
    use = (how or "resume from it with --resume-from {name}").format(name=intact.name, path=intact)
    return type(err)(f"{err}. The newest intact checkpoint is {intact.name}: {use}")


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None when it has none."""
    root = run_dir / "checkpoints"
    pointer = root / LATEST
    if pointer.is_file():
        ckpt = root / pointer.read_text().strip()
        read_meta(ckpt)
        return ckpt
    complete = sorted(p for p in root.glob("step_*") if (p / "meta.json").is_file()) if root.is_dir() else []
    return complete[-1] if complete else None


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory, or a run directory (its latest checkpoint)."""
    if (path / "meta.json").is_file() or path.name.startswith("step_"):
        read_meta(path)
        return path
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise CheckpointError(f"no checkpoint in {path}: expected a checkpoints/step_* directory from training")
    return ckpt


def saved_config(ckpt: Path) -> dict[str, Any]:
    try:
        return yaml.safe_load((ckpt / "config.yaml").read_text())
    except (OSError, yaml.YAMLError) as err:
        raise CheckpointError(f"{ckpt / 'config.yaml'} is unreadable: {err}") from None


def check_compatible(ckpt: Path, cfg: RunConfig) -> None:
    """Refuse a checkpoint of another model than `cfg` describes, naming the fields that differ."""
    saved = saved_config(ckpt)
    current = cfg.to_dict()
    if saved.get("task") != cfg.task:
        raise CheckpointError(f"{ckpt} is a {saved.get('task')!r} checkpoint; the config is for task {cfg.task!r}")
    differ = []
    for section in SHAPE_SECTIONS:
        for key, value in current[section].items():
            name = f"{section}.{key}"
            if name not in SHAPE_EXEMPT and saved.get(section, {}).get(key) != value:
                differ.append(f"{name} (checkpoint {saved.get(section, {}).get(key)!r}, config {value!r})")
    if differ:
        raise CheckpointError(f"{ckpt} holds another model than the config describes: {'; '.join(differ)}")


def load_model(model: torch.nn.Module, ckpt: Path) -> None:
    """Load the weights into `model`, whatever EP degree saved them (collective over the model's ranks: a read that
    fails on any rank fails on every rank)."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        state = dist_checkpointing.load(model.sharded_state_dict(), str(ckpt / "model"))
        model.load_state_dict(state)
    # Damaged shards raise many types; torch.distributed.checkpoint wraps them in a BaseException subclass.
    except (Exception, CheckpointException) as err:
        short = find_short_shard(ckpt / "model")
        if short is not None:
            raise CorruptCheckpointError(f"corrupt checkpoint: {short}") from None
        raise CorruptCheckpointError(
            f"corrupt checkpoint: cannot load the model weights from {ckpt / 'model'} ({one_line_cause(err)}); "
            "its shards are damaged, incomplete or of another model"
        ) from None


def find_short_shard(model_dir: Path) -> str | None:
    """A shard file shorter than the byte ranges the checkpoint's own index (.metadata) places in it, described; None
    when every file is long enough (or the index is unreadable). Names the damaged file of a checkpoint saved before
    manifests existed."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        storage = FileSystemReader(str(model_dir)).read_metadata().storage_data
        needed: dict[str, int] = {}
        for info in storage.values():
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    except Exception:  # an unreadable index is reported by the caller's own error
        return None
    for name, size in sorted(needed.items()):
        path = model_dir / name
        have = path.stat().st_size if path.is_file() else None
        if have is None or have < size:
            got = "is missing" if have is None else f"has {have} bytes"
            return f"{path} {got}, the checkpoint's index (.metadata) places {size} bytes in it"
    return None


def one_line_cause(err: BaseException, limit: int = 240) -> str:
    """`Type: message` on one line; for torch.distributed.checkpoint's CheckpointException, the first rank's own error
    (it wraps every rank's exception with its traceback)."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        wrapped = failures[min(failures)]
        err = wrapped[0] if isinstance(wrapped, tuple) else wrapped
    text = " ".join(str(err).split())
    if len(text) > limit // 2 and ". " in text:  # torch appends paragraphs of advice to the error itself
        text = text.split(". ")[0]
    return f"{type(err).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def load_train_state(optimizer: torch.optim.Optimizer, ckpt: Path) -> int:
    """Restore this rank's optimizer and RNG states; returns the step the checkpoint was saved at."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    meta = read_meta(ckpt)
    if meta["world_size"] != world:
        raise CheckpointError(
            f"{ckpt} was saved by {meta['world_size']} ranks; resuming needs the same number, got {world} "
            "(the model weights alone load at any EP degree: convert the checkpoint instead)"
        )
    path = ckpt / "train_state" / f"rank{_rank():05d}.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CorruptCheckpointError(
            f"corrupt checkpoint: cannot read the training state {path} ({one_line_cause(err)})"
        ) from None
    try:
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
    except Exception as err:
        raise CheckpointError(f"{path}: cannot restore the training state ({one_line_cause(err)})") from None
    return int(state["step"])
