"""The HTTP server end to end: a real server (launch/infer.py --mode serve, 2 gloo ranks under torchrun) driven over
real HTTP with real clients (httpx, the openai package).

Completions equal the batch generation's for the same prompts (greedy, and seeded sampling) whatever the
concurrency, plain or streamed; 32 concurrent clients; a client that disconnects mid-stream frees its rows; malformed
JSON, bad fields, another model's name, an over-long prompt and a full queue get OpenAI-style errors; /health,
/v1/models and /metrics answer; translations (MT, beam search) equal the batch CLI's and SIGTERM drains the server;
a rank killed with SIGKILL ends the whole server, with the cause printed, within the collective timeout + 10 s, the
open requests answered with an error and no process left behind.

The exports are small random models with a real tokenizer (tests/cli_exports.py): 32 learned positions.
"""

import asyncio
import json
import os
import signal
import time

import httpx
import openai
import pytest
from cli_exports import PROMPTS, SOURCES, TEXT, env, make_cli_exports

from moe_infer.bench.cli import main as bench_main
from moe_infer.bench.servers import ServerProcess, serve_command
from moe_infer.model import load_model
from moe_infer.runtime.generate import GenerationSettings, generate
from moe_infer.runtime.translate import TranslationSettings, translate
from moe_infer.serve.server import Server, build_parser
from pipeline.outputs import OutputError

MAX_TOKENS = 8
# 32 different prompts of a few words each (they fit the 32 positions with MAX_TOKENS more).
MANY = [" ".join(line.split()[:4]) for line in TEXT if len(line.split()) >= 4][:32]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_cli_exports(tmp_path_factory.mktemp("http"))


def _serve(export: str, *flags: str, ranks: int = 2, timeout: str = "60") -> ServerProcess:
    return ServerProcess(serve_command([export, "--timeout", timeout, *flags], ranks), env())


LM_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def lm(setup):
    """The LM server: 2 ranks, 4 rows each, at most 40 prompts waiting; its last test kills a rank."""
    flags = ("--batch-size", "4", "--max-queued-requests", "40")
    with _serve(setup["lm"], *flags, timeout=str(LM_TIMEOUT_S)) as server:
        server.model = "lm"
        yield server


def _expected(setup, prompts: list[str], **sampling) -> list[str]:
    """The batch generation's text for the prompts (one process, every expert): what the server must return."""
    tok = setup["tok"]
    settings = GenerationSettings(max_new_tokens=MAX_TOKENS, **sampling)
    return [tok.decode(ids) for ids in generate(load_model(setup["lm"]), tok.encode_batch(prompts), settings)]


def _complete(server, prompt, **fields) -> dict:
    body = {"model": server.model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, **fields}
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


async def _many(server, bodies: list[dict], stream: list[bool]) -> list[httpx.Response | str]:
    """All the requests at once, each on its own connection; a streamed one's text is its chunks joined."""

    async def one(client, body, streamed):
        if not streamed:
            return await client.post(f"{server.url}/v1/completions", json=body)
        text = []
        async with client.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    text += [c["text"] for c in json.loads(line[6:])["choices"]]
        return "".join(text)

    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        return await asyncio.gather(*(one(client, b, s) for b, s in zip(bodies, stream, strict=True)))


def test_completions_equal_the_batch_generation_greedy_and_seeded(setup, lm):
    assert [c["text"] for c in _complete(lm, PROMPTS)["choices"]] == _expected(setup, PROMPTS)
    # Seeded sampling: prompt i of a request samples with seed + i, as line i of the batch CLI with --seed.
    sampled = dict(temperature=0.8, top_p=0.9, top_k=50)
    expected = _expected(setup, PROMPTS, seed=100, **sampled)
    assert [c["text"] for c in _complete(lm, PROMPTS, seed=100, **sampled)["choices"]] == expected
    alone = [_complete(lm, p, seed=100 + i, **sampled)["choices"][0]["text"] for i, p in enumerate(PROMPTS)]
    assert alone == expected
    assert len(set(expected)) > 1


def test_32_concurrent_clients_plain_and_streamed_get_the_batch_generation(setup, lm):
    bodies = [{"model": "lm", "prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0} for p in MANY]
    results = asyncio.run(_many(lm, bodies, [i % 2 == 1 for i in range(len(bodies))]))
    texts = [r if isinstance(r, str) else r.json()["choices"][0]["text"] for r in results]
    assert texts == _expected(setup, MANY)
    metrics = httpx.get(f"{lm.url}/metrics").text
    assert "moe_num_requests_running 0.0" in metrics and "moe_num_requests_waiting 0.0" in metrics


@pytest.mark.slow
def test_online_rebalancing_changes_no_completion_with_requests_in_flight(setup):
    """Re-fits every 2 steps (min gain 0: experts move at most of them) while 32 clients' requests arrive and run."""
    flags = ["--batch-size", "4", "--rebalance-interval", "2", "--rebalance-window", "4", "--rebalance-min-gain", "0"]
    with _serve(setup["lm"], *flags) as server:
        bodies = [{"model": "lm", "prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0} for p in MANY]
        results = asyncio.run(_many(server, bodies, [i % 2 == 1 for i in range(len(bodies))]))
        texts = [r if isinstance(r, str) else r.json()["choices"][0]["text"] for r in results]
        assert texts == _expected(setup, MANY)
        metrics = httpx.get(f"{server.url}/metrics").text
    moves = [float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("moe_placement_moves_total{")]
    assert len(moves) == 2 and sum(moves) >= 2, metrics  # both MoE layers re-fitted, experts moved
    assert "moe_placement_balancedness{layer=" in metrics and "moe_placement_moved_bytes_total{layer=" in metrics


def test_the_openai_client_plain_and_streamed(setup, lm):
    client = openai.OpenAI(base_url=f"{lm.url}/v1", api_key="none")
    assert [m.id for m in client.models.list()] == ["lm"]
    plain = client.completions.create(model="lm", prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0)
    assert plain.choices[0].text == _expected(setup, PROMPTS[1:2])[0]
    assert plain.usage.completion_tokens == MAX_TOKENS or plain.choices[0].finish_reason == "stop"
    chunks = list(
        client.completions.create(
            model="lm", prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"top_k": 0},
        )
    )  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert chunks[-1].usage.total_tokens == plain.usage.total_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason


def test_a_stream_ends_with_done_and_stop_sequences_cut_the_text(setup, lm):
    with httpx.stream(
        "POST", f"{lm.url}/v1/completions", json={"model": "lm", "prompt": PROMPTS[0], "stream": True, "temperature": 0}
    ) as response:
        lines = [line for line in response.iter_lines() if line]
    assert response.headers["content-type"].startswith("text/event-stream") and lines[-1] == "data: [DONE]"
    full = _complete(lm, PROMPTS[0])["choices"][0]["text"]
    stop = full[3:5]
    cut = _complete(lm, PROMPTS[0], stop=[stop])["choices"][0]
    assert cut["text"] == full[: full.index(stop)] and cut["finish_reason"] == "stop"


def test_a_client_that_disconnects_mid_stream_frees_its_rows(lm):
    body = {"model": "lm", "prompt": PROMPTS[2], "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    with httpx.stream("POST", f"{lm.url}/v1/completions", json={**body, "stream": True}) as response:
        next(line for line in response.iter_lines() if line.startswith("data: {"))
    # The connection is closed: the request is cancelled on its rank and counted as a client that went away.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        metrics = httpx.get(f"{lm.url}/metrics").text
        if 'moe_request_errors_total{status="499"} 1.0' in metrics and "moe_num_requests_running 0.0" in metrics:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"the disconnected request was not cancelled:\n{metrics}")
    assert _complete(lm, PROMPTS[2])["choices"][0]["text"]  # and the server goes on


@pytest.mark.parametrize(
    ("body", "status", "param", "says"),
    [
        (b'{"model": "lm", "prompt": "Fair', 400, None, "not valid JSON"),
        (b'{"model": "lm", "prompt": "Fair", "max_tokens": -1}', 400, "max_tokens", "greater than or equal to 1"),
        (b'{"model": "lm", "prompt": "Fair", "max_tokens": "8"}', 400, "max_tokens", "valid integer"),
        (b'{"model": "lm", "prompt": "Fair", "temprature": 0}', 400, "temprature", "unknown field"),
        (b'{"model": "lm", "prompt": 5}', 400, "prompt", "a string or a list of strings"),
        (b'{"model": "lm", "prompt": "Fair", "logprobs": 2}', 400, "logprobs", "not returned"),
        (b'{"model": "lm", "prompt": "Fair", "beam_size": 2}', 400, "beam_size", "MT exports"),
        (b'{"model": "gpt-4", "prompt": "Fair"}', 404, "model", "this server serves 'lm'"),
    ],
)
def test_bad_requests_get_an_openai_style_error_naming_the_field(lm, body, status, param, says):
    response = httpx.post(f"{lm.url}/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and says in error["message"] and error["type"]


def test_a_prompt_that_does_not_fit_the_context_is_refused_not_truncated(lm):
    long = " ".join(["Macbeth"] * 30)  # the random exports have 32 positions
    response = httpx.post(f"{lm.url}/v1/completions", json={"model": "lm", "prompt": long, "max_tokens": 8})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and "context is 32 tokens" in error["message"]


def test_a_full_queue_gets_503(setup, lm):
    # 41 prompts in one request can never wait within --max-queued-requests 40.
    response = httpx.post(f"{lm.url}/v1/completions", json={"model": "lm", "prompt": ["Fair"] * 41, "max_tokens": 2})
    assert response.status_code == 503 and "queue is full" in response.json()["error"]["message"]
    # A burst of 60 while 8 rows run: the ones beyond the queue get 503, every other one its right completion.
    prompts = (MANY * 2)[:60]
    bodies = [{"model": "lm", "prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0} for p in prompts]
    results = asyncio.run(_many(lm, bodies, [False] * len(bodies)))
    codes = [r.status_code for r in results]
    assert 503 in codes and codes.count(200) >= 40, codes
    expected = dict(zip(prompts, _expected(setup, prompts), strict=True))
    assert all(
        r.json()["choices"][0]["text"] == expected[p]
        for p, r in zip(prompts, results, strict=True)
        if r.status_code == 200
    )


def test_the_server_run_dir_adds_only_to_a_tracked_run(setup, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine\n")
    for run_dir, says in [(notes, "is not a tracked run"), (setup["lm"], "is --export")]:
        args = build_parser().parse_args(["--export", setup["lm"], "--run-dir", str(run_dir)])
        with pytest.raises(OutputError, match=says):
            Server(args, rank=0, world=1)
    assert (notes / "todo.txt").read_text() == "mine\n"


def test_health_models_and_metrics(lm):
    assert httpx.get(f"{lm.url}/health").json() == {"status": "ready"}
    card = httpx.get(f"{lm.url}/v1/models").json()["data"][0]
    assert card["id"] == "lm" and card["max_model_len"] == 32
    _complete(lm, PROMPTS[0])
    time.sleep(1.2)  # the ranks send their MoE figures at most once a second
    _complete(lm, PROMPTS[1])
    metrics = httpx.get(f"{lm.url}/metrics").text
    for name in (
        "moe_time_to_first_token_seconds_bucket",
        "moe_inter_token_latency_seconds_count",
        "moe_e2e_request_latency_seconds_sum",
        "moe_request_queue_time_seconds_count",
        "moe_prompt_tokens_total",
        "moe_generation_tokens_total",
        'moe_request_success_total{finished_reason="length"}',
        'moe_layer_expert_pairs_total{expert="0",layer="decoder.layers.2"}',
        'moe_layer_dropped_pairs_total{layer="decoder.layers.4"} 0.0',
        'moe_layer_all_to_all_bytes_total{direction="sent",layer="decoder.layers.2"}',
    ):
        assert name in metrics, name


def test_the_load_generator_drives_the_server(setup, lm, tmp_path):
    out, run_dir = tmp_path / "load.json", tmp_path / "load-run"
    argv = ["load", "--url", lm.url, "--input", str(setup["root"] / "prompts.txt"), "--num-prompts", "8"]
    argv += ["--request-rate", "50,inf", "--max-concurrency", "4", "--max-tokens", "4", "--ignore-eos"]
    argv += ["--goodput", "ttft:600000", "--out", str(out), "--run-dir", str(run_dir)]
    assert bench_main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["model"] == "lm" and [row["rate"] for row in doc["rows"]] == [50.0, "inf"]
    for row in doc["rows"]:
        assert (row["completed"], row["failed"], row["output_tokens"]) == (8, 0, 32)
        assert row["goodput_req_s"] == row["req_s"] > 0 and 0 < row["ttft_p50_ms"] <= row["ttft_p99_ms"]
        assert row["tpot_p50_ms"] > 0 and row["itl_p50_ms"] > 0 and row["e2el_p50_ms"] >= row["ttft_p50_ms"]
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    # Plain completions (--disable-stream): the same tokens and throughput figures, no first-token figures.
    plain = tmp_path / "plain.json"
    argv = argv[: argv.index("--goodput")] + ["--disable-stream", "--out", str(plain)]
    assert bench_main(argv) == 0
    for row in json.loads(plain.read_text())["rows"]:
        assert (row["completed"], row["failed"], row["output_tokens"]) == (8, 0, 32)
        assert row["out_tok_s"] > 0 and row["e2el_p50_ms"] > 0 and row["ttft_p50_ms"] is None


def test_a_rank_killed_with_sigkill_ends_the_server_with_the_cause(lm):
    """The LM server's last test: rank 1 is killed while a stream is open."""
    victim = lm.rank(1)
    # 32 prompts of 24 tokens, 8 rows in all: the stream is still open when the rank dies.
    body = {"model": "lm", "prompt": [PROMPTS[2]] * 32, "max_tokens": 24, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{lm.url}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data: {"))
        killed = time.monotonic()
        victim.kill()
        rest = [line for line in lines if line]
    assert any('"error"' in line and "another rank stopped" in line for line in rest), rest
    code = lm.wait(LM_TIMEOUT_S + 10)
    assert time.monotonic() - killed < LM_TIMEOUT_S + 10
    assert code != 0
    assert "a collective failed" in lm.output and "exitcode: -9" in lm.output
    time.sleep(1)
    assert not lm.alive(), lm.alive()


# ---- MT: translations, and the drain -------------------------------------------------------------------------------


async def _drain_while_streaming(server: ServerProcess, bodies: list[dict]) -> tuple[list[list[str]], int, int]:
    """Open every stream, SIGTERM rank 0 once the first text arrives, then ask for /health and a new completion."""
    started = asyncio.Event()

    async def one(client, body):
        lines = []
        async with client.stream("POST", f"{server.url}/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line:
                    lines.append(line)
                    started.set()
        return lines

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=len(bodies) + 2)) as client:
        streams = [asyncio.create_task(one(client, body)) for body in bodies]
        await started.wait()
        os.kill(server.rank(0).pid, signal.SIGTERM)  # what `kill` of the server does; the launcher sees it end
        # Rank 0 handles the signal between two steps and tells its front end (another process) over the bridge:
        # on a busy machine that can take a moment, so ask until the answer changes (the streams keep it alive).
        deadline = time.monotonic() + 10
        while (health := (await client.get(f"{server.url}/health")).status_code) == 200 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        refused = await client.post(f"{server.url}/v1/completions", json={"model": "mt", "prompt": "So foul"})
        return await asyncio.gather(*streams), health, refused.status_code


def test_translations_equal_the_batch_cli_and_sigterm_drains(setup):
    tok = setup["tok"]
    sources = [ids + [tok.sp.eos_id()] for ids in tok.encode_batch(SOURCES)]
    beam = TranslationSettings(max_len=8, beam_size=2)
    expected = [tok.decode(ids) for ids in translate(load_model(setup["mt"]), sources, beam)]
    with _serve(setup["mt"], "--batch-size", "2") as mt:
        got = httpx.post(
            f"{mt.url}/v1/completions",
            json={"model": "mt", "prompt": SOURCES, "max_tokens": 8, "beam_size": 2},
            timeout=60,
        ).json()
        assert [c["text"] for c in got["choices"]] == expected
        # SIGTERM while 16 streams are queued or running (2 rows per rank): they all finish; new requests and
        # /health get 503 meanwhile; then every rank exits 0 (so the launcher does too).
        body = {"model": "mt", "prompt": SOURCES[1], "max_tokens": 8, "ignore_eos": True, "stream": True}
        streams, health, refused = asyncio.run(_drain_while_streaming(mt, [body] * 16))
        assert health == 503 and refused == 503
        assert all(lines[-1] == "data: [DONE]" and '"error"' not in "".join(lines) for lines in streams)
        assert mt.wait(40) == 0
        assert "draining" in mt.output and "Traceback" not in mt.output
        assert not mt.alive()


# ---- launchers and engine options (slow: a server start each) ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("ranks", "launcher"), [(1, "python"), (2, "deepspeed")])
def test_the_server_as_one_process_and_under_the_deepspeed_launcher(setup, ranks, launcher):
    command = serve_command([setup["lm"], "--timeout", "60"], ranks, launcher)
    with ServerProcess(command, env()) as server:
        server.model = "lm"
        assert [c["text"] for c in _complete(server, PROMPTS)["choices"]] == _expected(setup, PROMPTS)
        os.kill(server.rank(0).pid, signal.SIGTERM)
        assert server.wait(60) == 0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("flags", "dropless"),
    [
        (["--policy", "megatron"], True),
        (["--policy", "deepspeed", "--no-ds-drop-tokens"], True),
        (["--policy", "static", "--capacity-fraction", "4"], True),
        (["--expert-slots", "1", "--eviction", "lru"], True),
        (["--dtype", "bfloat16"], False),
    ],
)
def test_every_engine_option_works_in_the_server(setup, flags, dropless):
    with _serve(setup["lm"], *flags) as server:
        server.model = "lm"
        texts = [c["text"] for c in _complete(server, PROMPTS)["choices"]]
        assert len(texts) == len(PROMPTS)
        if dropless:  # nothing dropped, every expert's output as it is: the batch generation's tokens
            assert texts == _expected(setup, PROMPTS)
        metrics = httpx.get(f"{server.url}/metrics").text
        assert "moe_generation_tokens_total" in metrics


@pytest.mark.slow
def test_a_hung_rank_ends_the_server_within_the_collective_timeout(setup):
    timeout_s = 15
    with _serve(setup["lm"], "--batch-size", "1", timeout=str(timeout_s)) as server:
        server.model = "lm"
        server.rank(1).suspend()  # SIGSTOP: alive, never answering
        stopped = time.monotonic()
        response = httpx.post(
            f"{server.url}/v1/completions", json={"model": "lm", "prompt": PROMPTS[2], "max_tokens": 4}, timeout=120
        )
        assert response.status_code == 500 and "another rank stopped" in response.json()["error"]["message"]
        assert time.monotonic() - stopped < timeout_s + 10
        # Rank 0 has stopped with the cause; the launcher then ends the suspended rank (SIGTERM, SIGKILL after 30 s).
        assert server.wait(timeout_s + 60) != 0
        assert "a collective failed" in server.output
