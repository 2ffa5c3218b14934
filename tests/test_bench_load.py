"""The load generator's arithmetic (moe_infer.bench.load) and the live bench's comparison (moe_infer.bench.live),
without a server: gamma arrivals at the asked rate and burstiness, the same trace for the same seed; latencies,
percentiles, throughput and goodput from request results; each variant against the baseline, within noise when their
ranges overlap. The load generator against a real server: tests/test_serve_http.py."""

import math

import numpy as np
import pytest

from moe_infer.bench import live
from moe_infer.bench.cli import main as bench_main
from moe_infer.bench.load import RequestResult, arrival_times, summarize


def _gaps(times: list[float]) -> np.ndarray:
    return np.diff(times)


def test_arrivals_are_gamma_gaps_at_the_rate_and_the_same_for_a_seed():
    poisson = arrival_times(4000, rate=8.0, burstiness=1.0, seed=3)
    assert poisson[0] == 0.0 and poisson == sorted(poisson)
    gaps = _gaps(poisson)
    assert gaps.mean() == pytest.approx(1 / 8, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.08)  # exponential gaps: CV 1
    regular = _gaps(arrival_times(4000, rate=8.0, burstiness=4.0, seed=3))
    assert regular.mean() == pytest.approx(1 / 8, rel=0.05)
    assert regular.std() / regular.mean() == pytest.approx(0.5, rel=0.08)  # gamma of shape 4: CV 1/2
    assert arrival_times(50, 8.0, 1.0, seed=3) == poisson[:50]
    assert arrival_times(50, 8.0, 1.0, seed=4) != poisson[:50]
    assert arrival_times(5, math.inf, 1.0, seed=0) == [0.0] * 5


def test_summary_latencies_throughput_and_goodput():
    # Three requests of 5 tokens: TTFT 0.1 / 0.2 / 0.4 s, then 4 gaps of 50 ms; one failed request.
    done = [RequestResult(7, 5, ttft, [0.05] * 4, ttft + 0.2, "text") for ttft in (0.1, 0.2, 0.4)]
    failed = RequestResult(error="HTTP 503: the queue is full")
    row = summarize([*done, failed], seconds=2.0, rate=4.0, slos={"ttft": 0.25, "tpot": 0.06})
    assert (row["completed"], row["failed"], row["errors"]) == (3, 1, ["HTTP 503: the queue is full"])
    assert row["req_s"] == 1.5 and row["out_tok_s"] == 7.5 and row["total_tok_s"] == 18.0
    assert row["ttft_p50_ms"] == pytest.approx(200) and row["ttft_mean_ms"] == pytest.approx(700 / 3)
    assert row["ttft_p99_ms"] == pytest.approx(np.percentile([100, 200, 400], 99))
    assert row["tpot_p50_ms"] == pytest.approx(50) and row["itl_p99_ms"] == pytest.approx(50)
    assert row["goodput_req_s"] == 1.0  # two of the three meet TTFT <= 250 ms (and TPOT <= 60 ms)
    assert summarize(done, 2.0, math.inf, {})["goodput_req_s"] is None and row["rate"] == 4.0


def test_a_variant_is_within_noise_when_its_range_overlaps_the_baselines():
    def rows(variant, values):
        return [{"variant": variant, "rate_label": "inf", "rate": math.inf, **dict.fromkeys(live.FIGURES, v)}
                for v in values]  # fmt: skip

    summary = live.aggregate(
        rows("baseline", [10, 11, 12]) + rows(live.NOISE, [11, 12, 13]) + rows("fast", [20, 21, 25]),
        ["baseline", live.NOISE, "fast"],
    )
    by = {s["variant"]: s for s in summary}
    assert by[live.NOISE]["out_tok_s"] == {"median": 12, "min": 11, "max": 13}
    assert by[live.NOISE]["out_tok_s_within_noise"] and by[live.NOISE]["out_tok_s_x_baseline"] == 12 / 11
    assert not by["fast"]["out_tok_s_within_noise"] and by["fast"]["out_tok_s_x_baseline"] == 21 / 11


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["load", "--url", "http://127.0.0.1:1", "--input", "/nonexistent/prompts.txt"], "--input: cannot read"),
        (["load", "--url", "http://127.0.0.1:1", "--input", __file__], "--url: cannot read the served model"),
    ],
)
def test_bad_input_is_one_line(argv, says, capsys):
    assert bench_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and "Traceback" not in err and err.count("\n") == 1


def test_the_outputs_replace_only_a_previous_result(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Fair is foul\n")
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}\n')
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "todo.txt").write_text("mine\n")
    previous = tmp_path / "load.json"
    previous.write_text('{"url": "u", "model": "m", "settings": {}, "rows": []}\n')
    start = ["load", "--url", "http://127.0.0.1:1", "--input", str(prompts)]
    for argv, says in [
        (["--out", str(notes)], "is not a load-generator result"),
        (["--out", str(prompts)], "is --input"),
        (["--run-dir", str(tmp_path / "mine")], "--run-dir adds only to a run directory"),
        (["--out", str(previous)], "--url: cannot read the served model"),  # allowed: it gets as far as the server
    ]:
        assert bench_main(start + argv) == 2
        assert says in capsys.readouterr().err
    assert notes.read_text() == '{"mine": 1}\n' and prompts.read_text() == "Fair is foul\n"
