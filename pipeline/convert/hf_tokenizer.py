"""The export's sentencepiece model as Hugging Face tokenizer files (tokenizer.json, tokenizer_config.json) that give
the same ids: built locally from the model itself, no hub.

    write_tokenizer(directory, model_proto, max_length)

transformers' own sentencepiece converter (`SpmConverter.build_tokenizer_from_spm_proto`) turns the model into a
`tokenizers` BPE: the vocabulary, merges ranked by piece score, byte fallback, the user-defined newline piece kept
whole, and the normalizer spec (our tokenizers: identity normalisation, whitespace kept and escaped as "▁", a dummy
"▁" prefix). Its `legacy=True` branch is the one that matches sentencepiece for text that starts with a space (a
second "▁", as sentencepiece writes it); our models have no added special tokens between which the two branches
would differ otherwise. The tests and `python -m pipeline.convert.hf`'s verification check the ids against
sentencepiece on held-out text.

Special tokens: pad, unk, bos, eos as the model names them (pipeline.tokenizer's fixed ids). Nothing is added to the
ids of a text: an LM's documents are trained as `text EOS`, without BOS, and prompts are encoded the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# The class name both transformers 4.x and 5.x resolve to a tokenizer.json-backed tokenizer (5.x: TokenizersBackend).
TOKENIZER_CLASS = "PreTrainedTokenizerFast"


def build_tokenizer(model_proto: bytes):
    """The `tokenizers.Tokenizer` that encodes like the sentencepiece model `model_proto`."""
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(model_proto)
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    return SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)


def write_tokenizer(directory: Path, model_proto: bytes, max_length: int) -> None:
    """tokenizer.json and tokenizer_config.json into `directory`."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(model_proto)
    special = {
        f"{role}_token": proto.pieces[i].piece
        for role, i in (("pad", PAD_ID), ("unk", UNK_ID), ("bos", BOS_ID), ("eos", EOS_ID))
    }
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(model_proto),
        clean_up_tokenization_spaces=False,  # decode gives the text back as it was
        model_max_length=max_length,
        **special,
    )
    tokenizer.save_pretrained(str(directory))
    path = Path(directory) / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.update(tokenizer_class=TOKENIZER_CLASS, add_bos_token=False, add_eos_token=False)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
