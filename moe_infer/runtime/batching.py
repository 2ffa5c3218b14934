"""Continuous batching on one rank: requests wait, join the running batch at the next step (their prefill), leave it
the moment they end (their rows and KV cache freed), and every step decodes one token for every running row.

    batcher = Batcher(model, max_rows=32)
    batcher.submit(request)                 waits for room (moe_infer.runtime.requests.Request)
    admitted = batcher.admit()              the waiting requests that fit now, oldest first
    batcher.prefill(admitted)               their prompts (MT: encoder + BOS step) -> first tokens; they join
    batcher.decode()                        one token for every running row
    events = batcher.take_events()          new tokens and ends since the last call (moe_infer.runtime.requests.Event)
    batcher.cancel({7})                     a waiting or running request dropped (its rows leave at once)

Under expert parallelism every MoE layer exchanges rows with the other ranks, so all ranks must make the same model
calls: a step is a prefill call if any rank admits a request and a decode call if any rank has rows, and a rank
without either makes the call on an empty batch. Who decides: `run_in_lock_step` (the batch CLI: every rank's own
share of a fixed list, one all-reduce of two flags per step) or the serving loop (moe_infer.runtime.steploop: the
flags derived from what the ranks report to each other each step).

A request's rows count against `max_rows` from admission (a beam search reserves beam_size rows); a request is always
admitted into an empty batch, whatever it needs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence

import torch

from moe_infer.model.transformer import DecoderLM, EncoderDecoder
from moe_infer.runtime.batch import RunningBatch, decode, model_device, prefill
from moe_infer.runtime.lockstep import LockStep
from moe_infer.runtime.requests import Event, Request
from moe_infer.runtime.sequences import DecodingState, StepOutput, new_sequence


class Batcher:
    def __init__(self, model: DecoderLM | EncoderDecoder, max_rows: int = 8, use_cache: bool = True):
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        self.model, self.max_rows, self.use_cache = model, max_rows, use_cache
        self.is_mt = isinstance(model, EncoderDecoder)
        self.device = model_device(model)
        self.waiting: deque[Request] = deque()
        self.running: list[DecodingState] = []  # in batch row order, each sequence's rows together
        self.batch = RunningBatch()
        self._events: list[Event] = []

    # ---- requests in and out ----------------------------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        self.waiting.append(request)

    def cancel(self, ids: Iterable[int]) -> None:
        """Drop these requests, waiting or running (an id this rank does not hold is ignored); each gets a
        "cancelled" event."""
        ids = set(ids)
        if not ids:
            return
        for request in [r for r in self.waiting if r.id in ids]:
            self.waiting.remove(request)
            self._events.append(Event(request.id, finish="cancelled"))
        if any(seq.id in ids for seq in self.running):
            keep, first, alive = [], 0, []
            for seq in self.running:
                rows = seq.rows
                if seq.id in ids:
                    seq.end("cancelled")
                    self._emit(seq)
                else:
                    keep += range(first, first + rows)
                    alive.append(seq)
                first += rows
            self.running = alive
            self.batch.select(keep)  # their rows and cache leave now

    def take_events(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    @property
    def reserved_rows(self) -> int:
        return sum(seq.request.decoding.rows for seq in self.running)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ---------------------------------------------------------------------------------------------------

    def admit(self) -> list[Request]:
        """The waiting requests that fit in the free rows, oldest first (one at least into an empty batch)."""
        free, taken = self.max_rows - self.reserved_rows, []
        while self.waiting:
            need = self.waiting[0].decoding.rows
            if need > free and (self.running or taken):
                break
            taken.append(self.waiting.popleft())
            free -= need
        return taken

    def prefill(self, requests: Sequence[Request]) -> None:
        """The admitted requests' first model call(s); they join the running batch (an empty list: the same calls
        with no rows, for the other ranks' sake)."""
        seqs = [new_sequence(r, self.model.cfg.eos_id, self.device) for r in requests]
        batch, logits_BV = prefill(self.model, [r.tokens for r in requests], self.use_cache)
        seqs, batch = self._advance(seqs, batch, logits_BV)
        self.running += seqs
        self.batch = self.batch.join(batch)

    def decode(self) -> None:
        """One token for every running row (no rows: the same call on an empty batch)."""
        logits_BV = decode(self.model, self.batch)
        self.running, self.batch = self._advance(self.running, self.batch, logits_BV)

    # ---- internals --------------------------------------------------------------------------------------------------

    def _advance(
        self, seqs: list[DecodingState], batch: RunningBatch, logits_BV: torch.Tensor
    ) -> tuple[list[DecodingState], RunningBatch]:
        """Every sequence reads its rows of the step; the rows that go on are kept (ended ones leave, beams reorder)
        with their next tokens."""
        step = StepOutput(logits_BV, log_softmax=self.is_mt)
        keep, tokens, alive, first = [], [], [], 0
        for seq in seqs:
            rows = seq.rows
            choices = seq.advance(step, first)
            keep += [first + parent for parent, _ in choices]
            tokens += [token for _, token in choices]
            seq.rows = len(choices)
            first += rows
            self._emit(seq)
            if seq.rows:
                alive.append(seq)
        if keep != list(range(batch.size)):
            batch.select(keep)
        if batch.size:
            batch.next_B = torch.tensor(tokens, dtype=torch.int64, device=self.device)
        return alive, batch

    def _emit(self, seq: DecodingState) -> None:
        event = seq.take_event()
        if event is not None:
            self._events.append(event)


def run_in_lock_step(batcher: Batcher, requests: Sequence[Request], sync: LockStep) -> dict[int, list[int]]:
    """Serve every request to its end, in lock step with the other ranks (each with its own requests, possibly none);
    returns each request's tokens by id. One all-reduce of two flags per step decides the step's calls on every rank;
    then `sync.hooks` run, as the serving loop's step hooks do."""
    outputs: dict[int, list[int]] = {r.id: [] for r in requests}
    steps = 0
    for request in requests:
        batcher.submit(request)
    while True:
        admitted = batcher.admit()
        any_prefill, any_decode = sync.any_each([bool(admitted), bool(admitted or batcher.running)])
        if not (any_prefill or any_decode):
            return outputs
        if any_prefill:
            batcher.prefill(admitted)
        if any_decode:
            batcher.decode()
        steps += 1
        for hook in sync.hooks:
            hook.after_step(steps, True)
        for event in batcher.take_events():
            outputs[event.id] += event.tokens
