"""The Hugging Face export (pipeline.convert.hf) on small random Qwen3-shaped exports with the real lm-tiny tokenizer:
transformers loads it as Qwen3MoeForCausalLM and computes our engine's logits (every experts implementation it
offers here), greedy continuations and token ids; the layout (per-expert projections, fc1 split [gate; up]); each
option without a Qwen3-MoE equivalent refused in one line; what may be written over.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from random_exports import random_export_config, write_random_export
from safetensors.torch import load_file

from moe_infer import hf_layout
from moe_infer.model import load_model, read_expert
from pipeline.config import load_config
from pipeline.convert import hf_verify
from pipeline.convert.hf import PROVENANCE_FILE, export_hf, main
from pipeline.convert.hf_tokenizer import build_tokenizer
from pipeline.outputs import OutputError
from pipeline.tokenizer import tokenizer_for

QWEN = dict(
    position_embedding="rope",
    norm="rmsnorm",
    activation="swiglu",
    bias=False,
    qk_norm=True,
    tie_embeddings=False,
    max_positions=64,
    norm_eps=1e-6,
)
HF_FILES = {
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    PROVENANCE_FILE,
}


def _export(root: Path, name: str, tokenizer, architecture: str = "decoder", seed: int = 0, **model) -> Path:
    """A random export of `architecture` (Qwen3-shaped unless `model` says otherwise) that says it was trained on the
    bundled Shakespeare fixture (so its held-out text is known)."""
    config = random_export_config(architecture, **{**QWEN, **model})
    config["model"]["vocab_size"] = config["tokenizer"]["vocab_size"] = tokenizer.vocab_size
    config["provenance"]["run_config"] = {"data": {"corpus": "shakespeare", "size": "fixture"}}
    return write_random_export(root / name, config, seed=seed, tokenizer=tokenizer.model_proto)


@pytest.fixture(scope="module")
def tokenizer():
    return tokenizer_for(load_config("lm-tiny"))  # trained once on the fixture, cached


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tokenizer):
    """Two exports converted (and verified) once: untied with norm_topk_prob; tied, every layer MoE, pre-softmax."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, model, moe in (
        ("qwen", {}, {}),
        ("qwen-tied", {"tie_embeddings": True}, {"pre_softmax": True}),
    ):
        config = random_export_config("decoder", **{**QWEN, **model}, **moe)
        if name == "qwen-tied":
            config["moe"].update(interval=1, moe_layers={"decoder": [1, 2, 3, 4]})
        config["model"]["vocab_size"] = config["tokenizer"]["vocab_size"] = tokenizer.vocab_size
        config["provenance"]["run_config"] = {"data": {"corpus": "shakespeare", "size": "fixture"}}
        export = write_random_export(root / name, config, seed=1, tokenizer=tokenizer.model_proto)
        meta = export_hf(export, root / f"{name}-hf", log=lambda line: None)
        out[name] = {"export": export, "hf": root / f"{name}-hf", "meta": meta}
    return out


# ---- transformers computes what our engine computes --------------------------------------------------------------


def test_transformers_loads_qwen3_moe_with_our_logits_greedy_text_and_ids(converted):
    for name, got in converted.items():
        figures = got["meta"]["verification"]
        assert figures["logits"]["max_relative_difference"] < 1e-4, name
        assert figures["greedy"]["identical"] == figures["greedy"]["prompts"] == 4, name
        assert figures["greedy"]["max_new_tokens"] == 24
        tok = figures["tokenizer"]
        assert tok["same_ids"] == tok["round_trips"] == tok["texts"] == 5 and tok["tokens"] > 4000  # the held-out split
    assert {p.name for p in converted["qwen"]["hf"].iterdir()} == HF_FILES


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm"])
def test_every_experts_implementation_gives_our_logits(converted, implementation):
    from transformers import AutoModelForCausalLM

    for got in converted.values():
        theirs = AutoModelForCausalLM.from_pretrained(
            str(got["hf"]), dtype=torch.float32, experts_implementation=implementation
        )
        assert type(theirs).__name__ == "Qwen3MoeForCausalLM"
        tokens = torch.randint(4, 2000, (3, 40), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            difference = hf_verify.relative_difference(load_model(got["export"])(tokens), theirs(tokens).logits)
        assert difference < 1e-4, (got["hf"].name, implementation, difference)


def test_the_layout_is_the_hubs_qwen3_moe(converted):
    got = converted["qwen"]
    config = json.loads((got["hf"] / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"] and config["model_type"] == "qwen3_moe"
    assert (config["num_experts"], config["num_experts_per_tok"], config["decoder_sparse_step"]) == (4, 2, 2)
    assert (
        config["norm_topk_prob"] is True and config["mlp_only_layers"] == [] and config["tie_word_embeddings"] is False
    )
    assert (config["head_dim"], config["num_key_value_heads"], config["rms_norm_eps"]) == (8, 4, 1e-6)
    tied = json.loads((converted["qwen-tied"]["hf"] / "config.json").read_text())
    assert (tied["norm_topk_prob"], tied["decoder_sparse_step"], tied["tie_word_embeddings"]) == (False, 1, True)
    weights = load_file(str(got["hf"] / "model.safetensors"))
    assert "lm_head.weight" in weights and "lm_head.weight" not in load_file(
        str(converted["qwen-tied"]["hf"] / "model.safetensors")
    )
    assert not [n for n in weights if n.endswith(".bias")]
    assert {n for n in weights if "layers.1.mlp." in n and ".experts." not in n} == {"model.layers.1.mlp.gate.weight"}
    assert {"model.layers.0.mlp.gate_proj.weight", "model.layers.0.self_attn.q_norm.weight"} <= weights.keys()
    expert = read_expert(got["export"], "decoder", 2, 3)  # layer 2 from 1 = transformers' layer 1, expert 3
    prefix = "model.layers.1.mlp.experts.3."
    assert torch.equal(weights[prefix + "gate_proj.weight"], expert["fc1.weight"][:48])  # megatron's [gate; up]
    assert torch.equal(weights[prefix + "up_proj.weight"], expert["fc1.weight"][48:])
    assert torch.equal(weights[prefix + "down_proj.weight"], expert["fc2.weight"])
    generation = json.loads((got["hf"] / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0, "do_sample": False}
    meta = json.loads((got["hf"] / PROVENANCE_FILE).read_text())
    assert meta["format"] == "moe-pipeline-hf-export" and meta["source_export"] == str(got["export"].resolve())


def test_the_tokenizer_gives_sentencepieces_ids_and_text_back(tokenizer):
    hf = build_tokenizer(tokenizer.model_proto)
    texts = [
        "MACBETH: Is this a dagger which I see before me,\nThe handle toward my hand?",
        " a leading space",
        "  two  spaces and a trailing one ",
        "digits 1234 5.67, unicode ünïcödé ☃ 漢字 (byte fallback)",
        "\n\nnew lines\n",
        "tab\there",
        "",
    ]
    for text in texts:
        ids = hf.encode(text, add_special_tokens=False).ids
        assert ids == tokenizer.encode(text), text
        assert hf.decode(ids) == text


# ---- refusals: one line naming each option without a Qwen3-MoE equivalent ------------------------------------------

REFUSALS = {
    "norm": ({"norm": "layernorm"}, ['model.norm "layernorm"']),
    "activation": ({"activation": "gelu"}, ['model.activation "gelu"']),
    "positions": ({"position_embedding": "learned"}, ['model.position_embedding "learned"']),
    "bias": ({"bias": True}, ["model.bias true", "moe.router.bias true"]),  # megatron: one flag for both
    "qk_norm": ({"qk_norm": False}, ["model.qk_norm false"]),
    "lm_head_bias": ({"lm_head_bias": True}, ["model.lm_head_bias true"]),
    "attention_scale": ({"attention_scale": 0.5}, ["model.attention_scale 0.5"]),
    "lm-tiny": ({"norm": "layernorm", "activation": "gelu", "position_embedding": "learned", "bias": True,
                 "qk_norm": False}, ["model.norm", "model.activation", "model.position_embedding", "model.bias",
                                     "moe.router.bias", "model.qk_norm"]),
}  # fmt: skip


@pytest.mark.parametrize("case", [*REFUSALS, "encoder-decoder", "dense"])
def test_an_option_without_a_qwen3_moe_equivalent_is_refused_in_one_line(case, tokenizer, tmp_path, capsys):
    if case == "encoder-decoder":
        export = _export(tmp_path, case, tokenizer, "encoder-decoder", lm_head_bias=False)
        expected = ['architecture "encoder-decoder"']
    elif case == "dense":
        config = random_export_config("decoder", num_experts=0, **QWEN)
        export, expected = write_random_export(tmp_path / case, config), ["moe.num_experts 0"]
    else:
        changes, expected = REFUSALS[case]
        export = _export(tmp_path, case, tokenizer, **changes)
    assert main([str(export), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no Qwen3-MoE equivalent" in err and "nothing was written" in err, err
    for option in expected:
        assert option in err, (option, err)
    assert err.count("; ") == len(expected) - 1  # each option once, with what Qwen3-MoE has
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


# ---- what may be written over ------------------------------------------------------------------------------------


def test_only_our_own_export_is_replaced_and_only_with_force(converted, tmp_path):
    export = converted["qwen"]["export"]
    ours = Path(shutil.copytree(converted["qwen"]["hf"], tmp_path / "ours"))
    with pytest.raises(OutputError, match="already holds a Hugging Face export of .*: pass --force"):
        export_hf(export, ours, verify=False, log=lambda line: None)
    before = (ours / "model.safetensors").stat().st_mtime_ns
    export_hf(export, ours, force=True, verify=False, log=lambda line: None)
    assert (ours / "model.safetensors").stat().st_mtime_ns != before
    assert json.loads((ours / PROVENANCE_FILE).read_text())["verification"] is None

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    for force in (False, True):
        with pytest.raises(OutputError, match="is not a Hugging Face export .*--force replaces only our own"):
            export_hf(export, theirs, force=force, verify=False, log=lambda line: None)
    assert [p.name for p in theirs.iterdir()] == ["notes.txt"]
    shutil.copy(ours / PROVENANCE_FILE, theirs)  # our tag, but a file we never write beside it
    with pytest.raises(OutputError, match="is not a Hugging Face export .*--force replaces only our own"):
        export_hf(export, theirs, force=True, verify=False, log=lambda line: None)
    with pytest.raises(OutputError, match="is inside EXPORT_DIR .*: the output must be somewhere else"):
        export_hf(export, export / "hf", verify=False, log=lambda line: None)
    (tmp_path / "empty").mkdir()
    export_hf(export, tmp_path / "empty", verify=False, log=lambda line: None)
    assert {p.name for p in (tmp_path / "empty").iterdir()} == HF_FILES


def test_a_failed_verification_writes_nothing(converted, tmp_path, monkeypatch):
    monkeypatch.setattr(hf_verify, "LIMIT", 0.0)  # no fp32 computation is that exact
    with pytest.raises(hf_verify.HFParityError, match="logits failed, nothing was written"):
        export_hf(converted["qwen"]["export"], tmp_path / "out", log=lambda line: None)
    assert list(tmp_path.iterdir()) == []


def test_the_layout_module_names_every_tensor(converted):
    export = converted["qwen-tied"]["export"]
    config = json.loads((export / "config.json").read_text())
    assert hf_layout.mismatches(config) == []
    assert hf_layout.hf_config(config)["mlp_only_layers"] == []
    config["moe"]["moe_layers"] = {"decoder": [1, 3]}  # not every interval-th layer: an explicit list
    assert (hf_layout.hf_config(config)["decoder_sparse_step"], hf_layout.hf_config(config)["mlp_only_layers"]) == (
        1,
        [1, 3],
    )
