"""Serving: requests in, results out.

cli.py          the batch serving command line (launch/infer.py): read and check every request, start the engine,
                serve, write the outputs in input order
server.py       the HTTP server (launch/infer.py --mode serve): one rank's life, from checked flags to its end
api_process.py  its front end's own process, started by rank 0 and bridged to its serving loop's mailbox
app.py          the front end's FastAPI app (completions, models, health, metrics) under uvicorn
frontend.py     HTTP requests to the serving loop's requests and back: checks, tokens to text, streams, drain
protocol.py     the OpenAI completions protocol: request body, response and chunk bodies, errors
text.py         one choice's text as its tokens arrive: incremental detokenization and stop sequences
metrics.py      the Prometheus metrics (/metrics) and their W&B logger
requests.py     reading, encoding and checking requests; formatting outputs
flags.py        the flags every command that serves an export shares, and what they turn into
process.py      one launched rank: results on stdout, one clear message per error, the process group closed
"""


def is_serve_mode(argv: list[str]) -> bool:
    """`launch/infer.py ... --mode serve ...`: the HTTP server rather than the batch CLI."""
    return any(a == "serve" and i > 0 and argv[i - 1] == "--mode" for i, a in enumerate(argv)) or "--mode=serve" in argv
