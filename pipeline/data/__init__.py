"""The corpus layer: built-in public-domain corpora (Shakespeare for LM, Bible verse pairs for MT) and user corpora,
cleaned, split by document hash, and prepared once into <cache>/corpora/<name>/{train,valid,test}.jsonl + meta.json.

    cfg = DataConfig(task="mt", corpus="bible", size="full")
    path = prepare_corpus(cfg)        # builds or reuses the cached corpus
    splits = load_splits(cfg)         # datasets.DatasetDict: train / valid / test
    lines = iter_texts(cfg, "train")  # plain text for tokenizer training
"""

from pipeline.data.prepare import cache_root, corpus_stats, iter_texts, load_splits, prepare_corpus
from pipeline.data.spec import DEFAULT_EDITION, PUBLIC_DOMAIN_EDITIONS, DataConfig
from pipeline.data.splits import SPLITS, split_of

__all__ = [
    "DEFAULT_EDITION",
    "PUBLIC_DOMAIN_EDITIONS",
    "SPLITS",
    "DataConfig",
    "cache_root",
    "corpus_stats",
    "iter_texts",
    "load_splits",
    "prepare_corpus",
    "split_of",
]
