"""What a training run may write into (pipeline.train.run_dir): fresh runs, --resume, --resume-from, the run lock,
and the clean-up of what a killed save left. File-system only: these checkpoints are skeletons read_meta accepts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.atomic import temp_prefix
from pipeline.errors import CheckpointError, PipelineError
from pipeline.tracking import describe_tracked_dir
from pipeline.train import checkpoint as ckpt_io
from pipeline.train.run_dir import RunDirLock, choose_start, clean_stale_checkpoints


def _checkpoint(run_dir: Path, step: int) -> Path:
    ckpt = run_dir / "checkpoints" / f"step_{step:06d}"
    (ckpt / "model").mkdir(parents=True)
    (ckpt / "config.yaml").write_text("name: lm-tiny\n")
    (ckpt / "tokenizer.model").write_bytes(b"spm")
    ckpt_io.write_manifest(ckpt)
    (ckpt / "meta.json").write_text(json.dumps({"format_version": ckpt_io.FORMAT_VERSION, "step": step}))
    ckpt_io.point_latest_at(ckpt)
    return ckpt


def test_a_fresh_run_needs_an_empty_or_absent_directory(tmp_path):
    assert choose_start(tmp_path / "new", resume=False, resume_from=None) is None
    assert choose_start(tmp_path, resume=False, resume_from=None) is None  # empty
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(PipelineError, match="holds a run that saved no complete checkpoint .*metrics.jsonl.*--resume"):
        choose_start(tmp_path, resume=False, resume_from=None)
    assert choose_start(tmp_path, resume=True, resume_from=None) is None  # --resume: from step 0 over its own files
    ckpt = _checkpoint(tmp_path, 4)
    with pytest.raises(PipelineError, match="already holds a run \\(latest checkpoint step_000004\\): pass --resume"):
        choose_start(tmp_path, resume=False, resume_from=None)
    assert choose_start(tmp_path, resume=True, resume_from=None) == ckpt


def test_a_directory_that_is_not_a_run_is_never_written(tmp_path):
    (tmp_path / "thesis.tex").write_text("...")
    (tmp_path / "metrics.jsonl").write_text("")
    for resume, resume_from in [(False, None), (True, None), (False, "step_000004")]:
        with pytest.raises(PipelineError, match=f"^{tmp_path} is not a run directory: it holds thesis.tex that no"):
            choose_start(tmp_path, resume=resume, resume_from=resume_from)
    (tmp_path / "file").write_text("")
    with pytest.raises(PipelineError, match="is a file of 0 bytes, not a directory"):
        choose_start(tmp_path / "file", resume=False, resume_from=None)


def test_resume_from_names_a_checkpoint_by_step_or_path(tmp_path):
    old, new = _checkpoint(tmp_path, 4), _checkpoint(tmp_path, 8)
    for name in ("step_000004", "4", str(old)):
        assert choose_start(tmp_path, resume=False, resume_from=name) == old
    assert choose_start(tmp_path, resume=True, resume_from=None) == new
    with pytest.raises(CheckpointError, match="no checkpoint at .*step_000006"):
        choose_start(tmp_path, resume=False, resume_from="6")
    (new / "meta.json").unlink()
    with pytest.raises(
        CheckpointError, match="incomplete: it has no meta.json.*newest intact checkpoint is step_000004"
    ):
        choose_start(tmp_path, resume=False, resume_from="step_000008")


def test_one_training_run_at_a_time_per_directory(tmp_path):
    held = RunDirLock(tmp_path)
    with pytest.raises(PipelineError, match=f"{tmp_path} is being written by another training run \\(pid "):
        RunDirLock(tmp_path)
    held.release()
    RunDirLock(tmp_path).release()


def test_what_a_killed_save_left_is_cleaned_under_the_lock(tmp_path):
    kept = _checkpoint(tmp_path, 4)
    partial = tmp_path / "checkpoints" / ".step_000008.partial"
    (partial / "model").mkdir(parents=True)
    # Killed between setting step 6 aside and renaming its replacement in: the complete old one comes back.
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout)
    gone = tmp_path / "checkpoints" / "step_000006"
    aside = gone.parent / (temp_prefix(gone, "replaced").replace(f"-{os.getpid()}-", f"-{dead}-") + "x")
    aside.mkdir()
    (aside / "meta.json").write_text("{}")
    clean_stale_checkpoints(tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000004", "step_000006"]
    assert (gone / "meta.json").read_text() == "{}" and kept.is_dir()


def test_a_tracked_directory_is_recognised_only_when_it_holds_nothing_else(tmp_path):
    assert describe_tracked_dir(tmp_path) is None  # empty: nothing to replace
    for name in ("metrics.jsonl", "summary.json", "bench.table.json", "wandb"):
        (tmp_path / name).write_text("")
    assert describe_tracked_dir(tmp_path, own=("bench.json",)).startswith("a tracked run (bench.table.json")
    (tmp_path / "bench.json").write_text("")
    assert describe_tracked_dir(tmp_path) is None and describe_tracked_dir(tmp_path, own=("bench.json",))
    (tmp_path / "mine.txt").write_text("")
    assert describe_tracked_dir(tmp_path, own=("bench.json",)) is None
