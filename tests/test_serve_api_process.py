"""The HTTP front end in its own process (moe_infer.serve.api_process), end to end: a real server as one plain process
(no launcher) with its API process, driven over real HTTP.

Plain and streamed completions come through the bridge equal to the batch generation; the API process is no rank,
holds no launcher variables and loads no torch; rank 0 killed with SIGKILL takes the API process with it (the
bridge's end and PR_SET_PDEATHSIG), and the stream open at that moment ends with an error event rather than a dropped
connection.
Slow: rank 0's W&B logger (--run-dir) gets the API process's figures over the bridge, and its last ones at the end.
The 2-rank server over the bridge (torchrun: concurrency, disconnects, the SIGTERM drain, a rank killed) is
test_serve_http.py's.
"""

import json
import signal
import time

import httpx
import psutil
import pytest
from cli_exports import PROMPTS, env, make_cli_exports

from moe_infer.bench.servers import ServerProcess, serve_command
from moe_infer.model import load_model
from moe_infer.runtime.generate import GenerationSettings, generate

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_cli_exports(tmp_path_factory.mktemp("api"))


def _gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE  # dead, not yet reaped by its new parent
    except psutil.NoSuchProcess:
        return True


def test_the_api_process_serves_through_the_bridge_and_dies_with_rank_0(setup):
    tok = setup["tok"]
    settings = GenerationSettings(max_new_tokens=MAX_TOKENS)
    expected = [tok.decode(ids) for ids in generate(load_model(setup["lm"]), tok.encode_batch(PROMPTS), settings)]
    with ServerProcess(serve_command([setup["lm"], "--batch-size", "4"], ranks=1), env()) as server:
        rank0, api = server.rank(0), server.api_process()
        assert rank0.pid == server.process.pid and api.ppid() == rank0.pid and "RANK" not in api.environ()
        body = {"model": "lm", "prompt": PROMPTS, "max_tokens": MAX_TOKENS, "temperature": 0}
        plain = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
        assert [c["text"] for c in plain["choices"]] == expected
        streamed = [""] * len(PROMPTS)
        with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    for choice in json.loads(line[6:])["choices"]:
                        streamed[choice["index"]] += choice["text"]
        assert streamed == expected
        # The front end needs no torch (runtime.requests, the export's EOS id instead of its ModelConfig): the API
        # process starts without importing it.
        assert not [m.path for m in api.memory_maps() if "libtorch" in m.path]

        # Rank 0 killed while a long stream is open: the API process answers it with an error and exits.
        long = {**body, "prompt": [PROMPTS[2]] * 16, "max_tokens": 24, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=long, timeout=60) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
            rank0.kill()
            killed = time.monotonic()
            rest = [line for line in lines if line]
        assert any('"error"' in line and "rank 0" in line for line in rest), rest
        while not _gone(api):
            assert time.monotonic() - killed < 10, "the API process outlived rank 0"
            time.sleep(0.05)
        assert not server.alive(), server.alive()


@pytest.mark.slow
def test_the_w_and_b_logger_on_rank_0_gets_the_api_process_figures(setup, tmp_path):
    """The figures live in the API process (its /metrics); rank 0's logger gets them over the bridge, at the interval
    and once more at the end."""
    run_dir = tmp_path / "run"
    flags = ["--run-dir", str(run_dir), "--metrics-interval", "0.5"]
    with ServerProcess(serve_command([setup["lm"], *flags], ranks=1), env()) as server:
        body = {"model": "lm", "prompt": PROMPTS, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
        assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).status_code == 200
        time.sleep(1.5)  # a few intervals
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert records[-1]["moe_generation_tokens_total"] == len(PROMPTS) * MAX_TOKENS
        server.signal(signal.SIGTERM)
        assert server.wait(60) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["moe_generation_tokens_total"] == len(PROMPTS) * MAX_TOKENS
