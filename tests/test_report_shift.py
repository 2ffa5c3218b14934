"""The report's "placement under a shifting workload" section (pipeline.report.shift): shift-*.json as `python -m
moe_infer.bench shift` writes it, read back into the HTML page and the markdown summary; a file missing its
per-variant record is a warning, not a failure."""

import json
import re
from pathlib import Path

import pytest

from moe_infer.bench.shift import summary_rows
from pipeline.report.__main__ import main
from pipeline.report.sources import discover


def per_variant() -> dict:
    """Two rounds, windows of 4 calls, the shift at call 8 (window 2): online recovers after it, offline does not."""
    means = {"contiguous": [0.8, 0.8, 0.7, 0.6, 0.6], "offline": [0.95, 0.95, 0.8, 0.6, 0.6]}
    means["online"] = [0.8, 0.9, 0.8, 0.9, 0.97]
    out = {}
    for i, (variant, mean) in enumerate(means.items()):
        record = {"seconds": [[2.0, 4.0], [2.5, 5.0 + i]], "tokens": [100, 200]}
        record["balancedness"] = {"per_layer": {"decoder.2": mean}, "mean": mean, "shift_calls": {"decoder.2": 8}}
        record["shift_window"] = 2
        if variant == "online":
            record["rebalancing"] = {
                "refits": 3,
                "move_seconds": 0.25,
                "layers": {"decoder.2": {"moves": 6, "bytes_moved": 3_000_000}},
            }
        out[variant] = record
    return out


def write_shift(root: Path, variants: dict) -> Path:
    settings = dict(export="exports/lm-tiny-e64", input="p1.txt", shift_to="p2.txt", max_new_tokens=24, batch_size=8)
    settings |= dict(rebalance_interval=8, rebalance_window=32, repeats=2, run_dir=None)
    doc = {"rows": summary_rows(variants), "variants": variants, "report_window": 4, "settings": settings, "ranks": 2}
    path = root / "bench" / "shift-lm.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def test_the_bench_rows_split_the_windows_at_the_shift():
    rows = {r["variant"]: r for r in summary_rows(per_variant())}
    # Window 2 holds the shift: in neither mean.
    assert rows["online"]["before"] == pytest.approx(0.85) and rows["online"]["after"] == pytest.approx(0.935)
    assert rows["offline"]["before"] == pytest.approx(0.95) and rows["offline"]["after"] == pytest.approx(0.6)
    assert rows["contiguous"]["phase2_tok_s"] == 45.0 and rows["contiguous"]["phase2_tok_s_range"] == [40.0, 50.0]
    assert rows["online"]["moves"] == 6 and rows["online"]["bytes_moved"] == 3_000_000 and rows["offline"]["moves"] == 0


def test_the_shift_section_shows_the_plot_and_the_table(tmp_path):
    write_shift(tmp_path / "runs", per_variant())
    out = tmp_path / "report.html"
    assert main(["--runs", str(tmp_path / "runs"), "--out", str(out)]) == 0
    html = out.read_text()
    section = html[html.index("7. Placement under a shifting workload") :]
    assert re.search(r'<img [^>]*src="data:image/png;base64,', section)
    assert "--shift-to p2.txt" in section and "0.935" in section and "45.0 (40.0-50.0)" in section
    assert "7. Placement under a shifting workload" in (tmp_path / "report.md").read_text()


def test_a_shift_file_without_its_variants_is_a_warning(tmp_path):
    path = write_shift(tmp_path, per_variant())
    doc = json.loads(path.read_text())
    del doc["variants"]["online"]["balancedness"]
    path.write_text(json.dumps(doc))
    found, problems = discover([tmp_path])
    assert not found["shift"] and "missing variants.online.'balancedness'" in problems[0].message
