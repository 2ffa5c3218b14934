"""Tracking: offline W&B runs, the local metrics file, resume truncation, disabled mode, non-main ranks
(pipeline.tracking)."""

import json

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.errors import ConfigError, PipelineError
from pipeline.tracking import Tracker, TrackingConfig, read_metrics, read_table


@pytest.fixture(scope="module")
def cfg():
    return load_config("lm-tiny")


def log_steps(tracker: Tracker, steps) -> None:
    for step in steps:
        tracker.log({"train/loss": 10.0 / step, "lr": np.float32(1e-3), "tokens": torch.tensor(step * 100)}, step=step)


def test_offline_run_logs_metrics_and_tables_and_resumes_the_same_run(cfg, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    with Tracker(cfg, tmp_path, "train") as tracker:
        log_steps(tracker, range(1, 6))
        tracker.log_table("routing/expert_load", ["expert", "tokens"], [[0, 12], [1, np.int64(30)]])
        tracker.summary(final_loss=2.0)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert list(runs[0].glob("files/media/table/**/*.table.json"))
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    assert runs[0].name.endswith(run_id)
    printed = capsys.readouterr().out
    assert str(runs[0]) in printed and "wandb sync" in printed and run_id in printed
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
    assert read_metrics(tmp_path)[1] == {"step": 2, "train/loss": 5.0, "lr": pytest.approx(1e-3), "tokens": 200}
    assert read_table(tmp_path, "routing/expert_load") == (["expert", "tokens"], [[0, 12], [1, 30]])
    assert (tmp_path / "routing_expert_load.table.csv").read_text().splitlines() == ["expert,tokens", "0,12", "1,30"]
    assert json.loads((tmp_path / "summary.json").read_text()) == {"final_loss": 2.0}

    # Killed after step 5, checkpoint at step 3: the resumed run continues the same W&B run id.
    with Tracker(cfg, tmp_path, "train", resume_step=3) as tracker:
        log_steps(tracker, range(4, 7))
    assert (tmp_path / "wandb_id.txt").read_text().strip() == run_id
    assert len(list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))) == 2
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
    # Started again from scratch (a training loop passes its start step, 0): a new W&B run.
    Tracker(cfg, tmp_path, "train", resume_step=0).finish()
    assert (tmp_path / "wandb_id.txt").read_text().strip() != run_id


def test_resume_truncates_later_steps_and_a_cut_last_line(cfg, tmp_path):
    tracker = Tracker(cfg, tmp_path, "train")  # WANDB_MODE=disabled in tests
    log_steps(tracker, range(1, 11))
    tracker.finish()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 11, "train/lo')  # killed mid-write
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 11))
    tracker = Tracker(cfg, tmp_path, "train", resume_step=4)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    log_steps(tracker, [5])
    tracker.finish()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
    # A fresh run in the same directory (resume_step None, or 0: resumed from nothing) starts an empty record.
    for fresh in (None, 0):
        with Tracker(cfg, tmp_path, "train", resume_step=3) as tracker:
            log_steps(tracker, [4])
            tracker.summary(final_loss=1.0)
        Tracker(cfg, tmp_path, "train", resume_step=fresh).finish()
        assert read_metrics(tmp_path) == [] and not (tmp_path / "summary.json").exists()


def test_disabled_mode_writes_local_files_only(cfg, tmp_path):
    with Tracker(cfg, tmp_path, "infer") as tracker:
        log_steps(tracker, [1])
        tracker.log_table("bleu", ["system", "bleu"], [["copy", 3.1]])
        tracker.summary(bleu=12.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bleu.table.csv",
        "bleu.table.json",
        "metrics.jsonl",
        "summary.json",
    ]


def test_environment_mode_wins_over_the_config(cfg, tmp_path, monkeypatch):
    cfg = load_config("lm-tiny")
    cfg.tracking = TrackingConfig(mode="offline")
    Tracker(cfg, tmp_path, "train").finish()  # WANDB_MODE=disabled
    assert not (tmp_path / "wandb").exists()
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ConfigError, match="WANDB_MODE"):
        Tracker(cfg, tmp_path, "train")


def test_non_main_ranks_write_nothing(cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    with Tracker(cfg, tmp_path / "run", "train", is_main=False) as tracker:
        log_steps(tracker, [1, 2])
        tracker.log_table("t", ["a"], [[1]])
        tracker.summary(x=1)
    assert list(tmp_path.iterdir()) == []


def test_a_failing_wandb_init_is_one_clear_error(cfg, tmp_path, monkeypatch):
    import wandb

    def broken_init(**kwargs):
        raise wandb.errors.UsageError("something deep inside wandb")

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(wandb, "init", broken_init)
    with pytest.raises(PipelineError, match=r"W&B \(offline\) could not start a run .*WANDB_MODE=disabled"):
        Tracker(cfg, tmp_path, "train")


def test_tracking_config_validation():
    TrackingConfig().validate()
    with pytest.raises(ConfigError, match="mode"):
        TrackingConfig(mode="cloud").validate()
    with pytest.raises(ConfigError, match="project"):
        TrackingConfig(project=" ").validate()


def test_read_metrics_names_a_missing_run(tmp_path):
    with pytest.raises(PipelineError, match="no metrics at"):
        read_metrics(tmp_path)
