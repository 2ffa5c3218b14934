"""One request as the runtime decodes it: what was asked (Request, Decoding: moe_infer.runtime.requests), its decoding
state (DecodingState: greedy or sampled, or a beam search), and what it reports back (Event).

    request = Request(id=7, tokens=prompt_ids, decoding=Decoding(max_tokens=32, temperature=0.8, seed=7))
    seq = new_sequence(request, cfg, device)     Sampled (one row) or BeamSearch (up to beam_size rows)
    choices = seq.advance(step, first_row)       after a model call: (parent row, next token) per row that goes on
    event = seq.take_event()                     the tokens since the last event, and why it ended (if it did)

A DecodingState reads only its own rows of a step's logits, so its tokens do not depend on which other requests share
the batch: greedy takes the argmax, sampling draws from the request's own generator (seeded with Decoding.seed, one
draw per token), beam search ranks its own candidates. The batcher (moe_infer.runtime.batching) keeps each request's
rows together and in order.

Tokens never include EOS. A sequence ends with "stop" (it produced EOS: `stop_at_eos`), "length" (max_tokens reached;
MT: max_len decoder steps, EOS included) or "cancelled" (by the caller). Beam search reports its best hypothesis once,
when it ends (fairseq / Hugging Face style: each step keeps the 2k best (beam, token) extensions by summed log-prob; an
EOS among the first k is a finished hypothesis scored sum / length**length_penalty, length counting the EOS; the
search ends once it has k finished hypotheses none of its running beams can beat at their current length, or at
max_len, where its running beams finish as they are).

Shape legend: R this sequence's rows, V vocabulary.
"""

from __future__ import annotations

import torch

from moe_infer.runtime.requests import Event, Request
from moe_infer.runtime.sampling import request_generator, sampling_probs


class StepOutput:
    """One model call's next-token logits for every row of a batch, with what several sequences read computed once:
    the greedy choice of every row and (MT) the log-probabilities."""

    def __init__(self, logits_BV: torch.Tensor, log_softmax: bool):
        self.logits_BV, self.log_softmax = logits_BV, log_softmax
        self._greedy: list[int] | None = None
        self._logprobs_BV: torch.Tensor | None = None

    @property
    def logprobs_BV(self) -> torch.Tensor:
        if self._logprobs_BV is None:
            self._logprobs_BV = torch.log_softmax(self.logits_BV.float(), dim=-1)
        return self._logprobs_BV

    def greedy(self, row: int) -> int:
        """The row's argmax: of the logits (LM), of the log-probabilities (MT, as translation always ranked them)."""
        if self._greedy is None:
            scores_BV = self.logprobs_BV if self.log_softmax else self.logits_BV.float()
            self._greedy = scores_BV.argmax(dim=-1).tolist()
        return self._greedy[row]


class DecodingState:
    """The state every decoding strategy shares: the request, its rows in the batch, its output and its events."""

    def __init__(self, request: Request, eos_id: int):
        self.request, self.eos_id = request, eos_id
        self.rows = 1  # rows it holds in the batch (0 once ended)
        self.output: list[int] = []
        self.finish: str | None = None
        self._pending: list[int] = []
        self._reported = False

    @property
    def id(self) -> int:
        return self.request.id

    def advance(self, step: StepOutput, first: int) -> list[tuple[int, int]]:
        """Read this sequence's rows (first .. first + rows - 1) of the step; return (parent row, token) for each row
        it keeps, parents counted from `first` (none: it ended)."""
        raise NotImplementedError

    def end(self, reason: str) -> None:
        self.finish, self.rows = reason, 0

    def take_event(self) -> Event | None:
        """The tokens since the last event and the end, if anything happened since."""
        if self._reported or not (self._pending or self.finish):
            return None
        event = Event(self.id, self._pending, self.finish)
        self._pending, self._reported = [], self.finish is not None
        return event


class Sampled(DecodingState):
    """Greedy (temperature 0) or sampled decoding: one row."""

    def __init__(self, request: Request, eos_id: int, device: torch.device):
        super().__init__(request, eos_id)
        d = request.decoding
        self.generator = request_generator(d.seed, device) if d.temperature > 0 else None

    def advance(self, step: StepOutput, first: int) -> list[tuple[int, int]]:
        d = self.request.decoding
        if self.generator is None:
            token = step.greedy(first)
        else:
            probs_1V = sampling_probs(step.logits_BV[first : first + 1], d.temperature, d.top_k, d.top_p)
            token = int(torch.multinomial(probs_1V[0], 1, generator=self.generator))
        if d.stop_at_eos and token == self.eos_id:
            self.end("stop")
            return []
        self.output.append(token)
        self._pending.append(token)
        if len(self.output) >= d.max_tokens:
            self.end("length")
            return []
        return [(0, token)]


def normalized_score(log_prob: float, length: int, length_penalty: float) -> float:
    """The score hypotheses are ranked by: summed log-prob / length ** length_penalty (length counting the EOS)."""
    return log_prob / max(length, 1) ** length_penalty


class BeamSearch(DecodingState):
    """Beam search (MT): one row before the first step, up to beam_size after it."""

    def __init__(self, request: Request, eos_id: int):
        super().__init__(request, eos_id)
        self.beams: list[tuple[list[int], float]] = [([], 0.0)]  # running: (tokens, summed log-prob), row order
        self.finished: list[tuple[float, list[int], bool]] = []  # (normalized score, tokens, ended on EOS), best first
        self.steps = 0

    def _keep_finished(self, tokens: list[int], log_prob: float, length: int, eos: bool) -> None:
        d = self.request.decoding
        self.finished.append((normalized_score(log_prob, length, d.length_penalty), tokens, eos))
        self.finished.sort(key=lambda f: f[0], reverse=True)
        del self.finished[d.beam_size :]

    def _extend(self, scores_C: list[float], flat_C: list[int], vocab: int) -> list[int]:
        """Take this step's candidates (best first; flat index = beam * V + token); return the beam each new running
        beam comes from."""
        k, length = self.request.decoding.beam_size, self.steps + 1
        sources, beams = [], []
        for rank, (score, flat) in enumerate(zip(scores_C, flat_C, strict=True)):
            beam, token = divmod(flat, vocab)
            if token == self.eos_id:
                if rank < k:  # an EOS outside the first k would not have survived as a beam either
                    self._keep_finished(self.beams[beam][0], score, length, eos=True)
                continue
            sources.append(beam)
            beams.append((self.beams[beam][0] + [token], score))
            if len(beams) == k:
                break
        self.beams = beams
        return sources

    def _done(self) -> bool:
        """A full finished list that no running beam beats at its current length (HF's heuristic), or max_len."""
        d, length = self.request.decoding, self.steps + 1
        if length >= d.max_tokens:
            for tokens, score in self.beams:  # cut at max_len: finished as they are, no EOS
                self._keep_finished(tokens, score, length, eos=False)
            return True
        if len(self.finished) < d.beam_size:
            return False
        best_running = max(normalized_score(score, length, d.length_penalty) for _, score in self.beams)
        return self.finished[-1][0] >= best_running

    def advance(self, step: StepOutput, first: int) -> list[tuple[int, int]]:
        k = self.request.decoding.beam_size
        logprobs_RV = step.logprobs_BV[first : first + self.rows]
        vocab = logprobs_RV.shape[-1]
        scores_R = torch.tensor([score for _, score in self.beams], dtype=torch.float32, device=logprobs_RV.device)
        candidates_1C = (scores_R[:, None] + logprobs_RV).view(1, self.rows * vocab)
        top = torch.topk(candidates_1C, min(2 * k, self.rows * vocab), dim=-1)
        origins = self._extend(top.values[0].tolist(), top.indices[0].tolist(), vocab)
        if self._done():
            _, tokens, eos = self.finished[0]
            self.output = list(tokens)
            self._pending = list(tokens)
            self.end("stop" if eos else "length")
            return []
        self.steps += 1
        return [(origin, tokens[-1]) for origin, (tokens, _) in zip(origins, self.beams, strict=True)]


def new_sequence(request: Request, eos_id: int, device: torch.device) -> DecodingState:
    """Beam search for beam_size > 1, else greedy / sampled decoding."""
    if request.decoding.beam_size > 1:
        return BeamSearch(request, eos_id)
    return Sampled(request, eos_id, device)
