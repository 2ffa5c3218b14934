"""MT evaluation after training: greedy-decode the validation sources and score them with sacrebleu, next to the
copy-the-source baseline (a translation model that has learned nothing beats it only by chance)."""

from __future__ import annotations

import sacrebleu
import torch.distributed as dist

from pipeline.config import RunConfig
from pipeline.tokenizer import Tokenizer
from pipeline.train.batches import copy_baseline_texts
from pipeline.train.decode import greedy_translate


def bleu_report(cfg: RunConfig, model, tok: Tokenizer, dp_rank: int, dp_size: int, split: str = "valid") -> dict:
    """Collective over the DP group: each rank translates every dp_size-th sentence; every rank gets the report."""
    sources, references = copy_baseline_texts(cfg, split)
    if cfg.train.bleu_sentences:  # a fixed prefix of the split: the same sentences every run
        sources, references = sources[: cfg.train.bleu_sentences], references[: cfg.train.bleu_sentences]
    all_src_ids = [ids[: cfg.model.seq_length - 1] for ids in tok.encode_batch(sources)]
    # Translations run about as long as their source: capping the output at twice the longest source keeps a model
    # that loops from decoding to seq_length. Every rank computes the same cap from the same sentences.
    max_len = min(cfg.model.seq_length, 2 * max(map(len, all_src_ids)) + 10)
    mine = list(range(dp_rank, len(sources), dp_size))
    src_ids = [all_src_ids[i] for i in mine]
    was_training = model.training
    model.eval()
    out_ids = greedy_translate(model, src_ids, max_len=max_len)
    model.train(was_training)
    gathered: list[list[tuple[int, str]]] = [None] * dp_size  # type: ignore[list-item]
    dist.all_gather_object(gathered, [(i, tok.decode(ids)) for i, ids in zip(mine, out_ids, strict=True)])
    hypotheses = [text for _, text in sorted(pair for part in gathered for pair in part)]
    bleu = sacrebleu.corpus_bleu(hypotheses, [references])
    copy = sacrebleu.corpus_bleu(sources, [references])
    return {
        "bleu": round(bleu.score, 2),
        "copy_baseline_bleu": round(copy.score, 2),
        "bleu_signature": str(bleu),
        "bleu_sentences": len(sources),
        "examples": [
            {"source": s, "reference": r, "hypothesis": h}
            for s, r, h in list(zip(sources, references, hypotheses, strict=True))[:5]
        ],
    }
