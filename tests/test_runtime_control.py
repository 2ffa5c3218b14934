"""The serving loop's mailbox (moe_infer.runtime.requests): it hands the front end's requests to the loop and wakes it
at once. The exchange between ranks is tested on two ranks in test_runtime_batching.py, in the same processes as the
serving loop (a spawn of two ranks costs more than everything they test)."""

import threading
import time

from moe_infer.runtime.requests import Decoding, Mailbox, Request


def test_the_mailbox_wakes_the_loop_at_once_and_keeps_draining():
    mailbox = Mailbox()
    assert mailbox.take(0.0).requests == []
    threading.Timer(0.2, mailbox.submit, args=([Request(1, [5], Decoding(2))],)).start()
    start = time.monotonic()
    inbox = mailbox.take(10.0)  # a blocked wait, woken by the submission
    assert [r.id for r in inbox.requests] == [1] and time.monotonic() - start < 5
    mailbox.cancel(1)
    mailbox.drain()
    inbox = mailbox.take(0.0)
    assert inbox.cancel == {1} and inbox.drain
    assert mailbox.take(0.0).drain  # once asked, it stays asked
