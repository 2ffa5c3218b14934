"""Rank 0's front end on its own, without a server: what a stream writes when the event loop has fallen behind the
steps (several updates queued at once: one write carrying them all, the same events as one write each), and a choice's
text decoded once at its end when nobody reads it as it grows (the same text as decoding every prefix).

The real server, its streams and its plain completions over HTTP: tests/test_serve_http.py.
"""

import asyncio
import json

import pytest
from cli_exports import TEXT

from moe_infer.runtime.requests import Mailbox
from moe_infer.serve.frontend import Completion, FrontEnd, ServingLimits
from moe_infer.serve.metrics import ServerMetrics
from moe_infer.serve.protocol import ApiError, CompletionRequest
from moe_infer.serve.text import ChoiceText
from pipeline.tokenizer import TokenizerConfig, train_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(TEXT, TokenizerConfig(vocab_size=400), tmp_path_factory.mktemp("tok"))


def _frontend(tok) -> FrontEnd:
    limits = ServingLimits(max_positions=64, default_max_tokens=16, max_rows=4, max_queued=8, translate=False)
    return FrontEnd(tok, 2, "lm", Mailbox(), ServerMetrics(), limits)


def _stream(frontend: FrontEnd, updates: list, include_usage: bool = True) -> list[str]:
    """The writes of a streamed completion whose updates were all queued before the stream first looked."""
    body = {"model": "lm", "prompt": "x", "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}

    async def run() -> list[str]:
        completion = Completion("cmpl-1", CompletionRequest.parse(json.dumps(body).encode()))
        for item in updates:
            completion.updates.put_nowait(item)
        completion.done.set()
        return [write async for write in frontend.stream(completion)]

    return asyncio.run(run())


def _events(writes: list[str]) -> list[str]:
    return [event for write in writes for event in write.split("\n\n") if event]


def test_queued_updates_leave_in_one_write_as_the_same_events(tok):
    frontend = _frontend(tok)
    writes = _stream(frontend, [(0, "To", None), (0, " be", None), (0, "", "length"), None])
    assert len(writes) == 1  # one send for everything that was waiting
    events = _events(writes)
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert [c["choices"][0]["text"] for c in chunks[:3]] == ["To", " be", ""]
    assert chunks[2]["choices"][0]["finish_reason"] == "length"
    assert chunks[3]["choices"] == [] and chunks[3]["usage"]["completion_tokens"] == 0  # no choices were opened here
    assert events[-1] == "data: [DONE]"


def test_an_error_after_queued_text_ends_the_stream_with_the_text_first(tok):
    writes = _stream(_frontend(tok), [(0, "To", None), ApiError(500, "the server failed"), None])
    events = _events(writes)
    assert json.loads(events[0][6:])["choices"][0]["text"] == "To"
    assert json.loads(events[1][6:])["error"]["message"] == "the server failed"
    assert len(events) == 2  # no [DONE] after an error


@pytest.mark.parametrize("line", TEXT[:20])
def test_a_choice_decoded_once_at_its_end_has_the_streamed_text(tok, line):
    ids = tok.encode(line)
    streamed, deferred = ChoiceText(tok), ChoiceText(tok, stream=False)
    pieces = [streamed.add([i]) for i in ids] + [streamed.finish()]
    assert all(deferred.add([i]) == "" for i in ids)  # nothing decoded while it grows
    assert deferred.finish() == "".join(pieces) == tok.decode(ids)
    assert deferred.text == streamed.text


def test_stop_sequences_are_watched_even_when_not_streamed(tok):
    text = ChoiceText(tok, stops=["be"], stream=False)
    assert not text.deferred
    sent = "".join(text.add([i]) for i in tok.encode("To be or not to be")) + text.finish()
    assert text.stopped and sent == text.text == "To "
