"""The HTTP front end: a FastAPI app served by uvicorn in a thread of its own, with its own event loop (in the API
process, moe_infer.serve.api_process, whose main thread talks to rank 0's serving loop).

    POST /v1/completions   OpenAI completions (moe_infer.serve.protocol), plain or streamed (server-sent events)
    GET  /v1/models        the one model served
    GET  /health           200 when serving; 503 while loading, draining or after a failure
    GET  /metrics          Prometheus text (moe_infer.serve.metrics)

    sock = listen_socket("127.0.0.1", 8000)    bound and listening now (port 0: any free one; in use: ConfigError)
    http = HttpServer(build_app(frontend), sock)
    http.start(); ...; http.stop()

Errors are OpenAI-style JSON bodies ({"error": {"message", "type", "param", "code"}}): 400 for a request that fails
validation (naming the field) or does not fit the context, 404 for another model's name, 503 while loading or
draining and when the queue is full, 500 when the engine failed under a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
import traceback

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from moe_infer.serve.frontend import FrontEnd
from moe_infer.serve.protocol import ApiError, CompletionRequest
from pipeline.errors import ConfigError


def build_app(frontend: FrontEnd) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        frontend.attach(asyncio.get_running_loop())
        yield

    app = FastAPI(title="moe-pipeline", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    started = int(time.time())

    def error(err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            body = CompletionRequest.parse(await request.body())
            completion = frontend.submit(body)
        except ApiError as err:
            frontend.metrics.errors.labels(str(err.status)).inc()
            return error(err)
        if body.stream:
            return StreamingResponse(
                frontend.stream(completion), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        try:
            return JSONResponse(await frontend.result(completion, request))
        except ApiError as err:
            return error(err)

    @app.get("/v1/models")
    async def models():
        card = {
            "id": frontend.model_name,
            "object": "model",
            "created": started,
            "owned_by": "moe-pipeline",
            "max_model_len": frontend.limits.max_positions,
        }
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health():
        return JSONResponse({"status": frontend.state}, status_code=200 if frontend.state == "ready" else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(frontend.metrics.exposition(), media_type=frontend.metrics.content_type)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):  # a bug: say so in the API's own error format
        traceback.print_exception(exc)
        return error(ApiError(500, f"internal error: {type(exc).__name__}: {exc}"))

    return app


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port and listening, so a port in use is one clear error at once, and connections
    wait in its backlog until the HTTP server (perhaps in another process: the socket can be passed on) runs."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # (uvicorn's backlog)
    except OSError as err:
        sock.close()
        raise ConfigError("--port", f"cannot listen on {host}:{port}: {err.strerror}") from None
    return sock


def socket_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class HttpServer:
    """uvicorn on a listening socket (`listen_socket`), in a daemon thread."""

    def __init__(self, app: FastAPI, sock: socket.socket, graceful_s: float = 5.0):
        self.sock = sock
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=graceful_s)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, name="http", daemon=True
        )

    @property
    def url(self) -> str:
        return socket_url(self.sock)

    def start(self, timeout_s: float = 30.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError("--port", f"the HTTP server did not start on {self.url}")
            time.sleep(0.02)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Close the listening socket, let open responses finish (up to the graceful timeout), end the thread."""
        time.sleep(0.2)  # answers just handed to the event loop (FrontEnd.fail_all) go out before it starts closing
        self.server.should_exit = True
        self.thread.join(timeout=timeout_s)
