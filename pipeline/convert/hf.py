"""An export -> a Hugging Face directory that `transformers.AutoModelForCausalLM.from_pretrained` loads as
Qwen3MoeForCausalLM (and vLLM / SGLang serve as one), checked against our engine before it is published.

    python -m pipeline.convert.hf exports/lm-qwen3-tiny exports/lm-qwen3-tiny-hf     (make export-hf MODEL=...)

What it writes:
    config.json, model.safetensors   the hub's Qwen3-MoE layout (moe_infer.hf_layout): per-expert gate_proj, up_proj,
                                     down_proj; SwiGLU's fc1 split in megatron's [gate; up] order
    generation_config.json           bos / eos / pad ids, greedy by default
    tokenizer.json, tokenizer_config.json   the export's sentencepiece model as a `tokenizers` BPE with the same ids
    moe-pipeline.json                where it came from (the export, its config, the revision) and the verification

Only a model with Qwen3-MoE's structure is exported: RMSNorm, SwiGLU, RoPE, no linear biases, q/k norms,
decoder-only, a plain softmax router. Any other option is refused in one line naming each one (nothing is written):
another architecture would be a different model under the same weights.

--verify (the default) loads the written directory with transformers and compares it with the export on held-out
text (pipeline.convert.hf_verify): fp32 logits within 1e-4 relative, greedy continuations token-identical, the
tokenizer's ids and round trip. The held-out text is the validation and test split of the corpus the export was
trained on (from its provenance), or --text FILE.

Written like every output of the project: into a temporary directory beside OUT_DIR, renamed into place when
complete. An existing OUT_DIR is replaced only when it is one of ours (it holds moe-pipeline.json with our format tag
and nothing we would not write) and --force is given; anything else there is refused; OUT_DIR may not be, contain or
lie inside EXPORT_DIR.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from pipeline.atomic import staged_directory
from pipeline.errors import ConfigError, PipelineError

FORMAT = "moe-pipeline-hf-export"
PROVENANCE_FILE = "moe-pipeline.json"
GENERATION_CONFIG_FILE = "generation_config.json"
OUR_FILES = {
    "config.json",
    "model.safetensors",
    GENERATION_CONFIG_FILE,
    "tokenizer.json",
    "tokenizer_config.json",
    PROVENANCE_FILE,
}


class HFExportError(PipelineError):
    """An export that cannot be written as a Hugging Face Qwen3-MoE directory, or an output that may not be written."""


def _needs_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise HFExportError(
            "the Hugging Face export needs transformers: pip install -e '.[hf]' (make setup installs it)"
        ) from None


# ---- what may be written over (the project's rule: pipeline.outputs.check_output) --------------------------------


def describe_ours(path: Path) -> str | None:
    """'a Hugging Face export of <source>' when `path` is provably our output, else None."""
    if not path.is_dir() or path.is_symlink():
        return None
    try:
        meta = json.loads((path / PROVENANCE_FILE).read_text())
        names = {p.name for p in path.iterdir()}
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not names <= OUR_FILES:
        return None
    return f"a Hugging Face export of {meta.get('source_export', 'an export')}"


def check_output(out: Path, export_dir: Path, force: bool) -> bool:
    """Whether `out` may be written; True when something is there that is ours to replace. Raises OutputError."""
    from pipeline.outputs import check_output as check

    decision = check(
        out,
        kind="Hugging Face export",
        recognise=describe_ours,
        force=force,
        protected={"EXPORT_DIR": export_dir},
        note="--force replaces only our own Hugging Face exports",
    )
    return decision.replaces is not None


# ---- the held-out text ------------------------------------------------------------------------------------------


def held_out_texts(config: dict[str, Any], text_file: Path | None) -> list[str]:
    """--text's lines, or the validation and test documents of the corpus the export's run was trained on."""
    if text_file is not None:
        try:
            texts = [line for line in text_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            raise HFExportError(f"--text {text_file}: cannot read it ({err})") from None
        if not texts:
            raise HFExportError(f"--text {text_file}: no text in it")
        return texts
    from pipeline.data.prepare import prepare_corpus
    from pipeline.data.spec import DataConfig

    data = ((config.get("provenance") or {}).get("run_config") or {}).get("data")
    if not isinstance(data, dict):
        raise HFExportError("the export does not say what it was trained on: give held-out text with --text FILE")
    known = {f.name for f in fields(DataConfig)}
    try:
        directory = prepare_corpus(DataConfig(**{k: v for k, v in data.items() if k in known}))
    except (PipelineError, ConfigError, TypeError) as err:
        raise HFExportError(f"cannot prepare the export's held-out text ({err}): give it with --text FILE") from None
    rows = []
    for split in ("valid", "test"):
        lines = (directory / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        rows += [json.loads(line) for line in lines if line.strip()]
    texts = [row["text"] for row in rows if row.get("text")]
    if not texts:
        raise HFExportError(f"{directory}: no held-out LM text; give it with --text FILE")
    return texts


# ---- the export ------------------------------------------------------------------------------------------------


def export_hf(
    export_dir: Path,
    out: Path,
    force: bool = False,
    verify: bool = True,
    text_file: Path | None = None,
    log=print,
) -> dict[str, Any]:
    """Write the Hugging Face directory of `export_dir` at `out` (module docstring); returns its provenance."""
    from moe_infer import export_format as fmt
    from moe_infer import hf_layout
    from moe_infer.model import Export, read_expert
    from pipeline.convert.hf_tokenizer import write_tokenizer
    from pipeline.train.checkpoint import git_revision

    start = time.perf_counter()
    export_dir, out = Path(export_dir), Path(out)
    export = Export.open(export_dir)
    problems = hf_layout.mismatches(export.config)
    if problems:
        raise HFExportError(f"{export_dir} has no Qwen3-MoE equivalent: {'; '.join(problems)} (nothing was written)")
    _needs_transformers()
    replaces = check_output(out, export_dir, force)
    texts = held_out_texts(export.config, text_file) if verify else []
    m = export.config["model"]
    meta: dict[str, Any] = {
        "format": FORMAT,
        "architecture": hf_layout.ARCHITECTURE,
        "source_export": str(export_dir.resolve()),
        "source_format_version": export.config["format_version"],
        "source_provenance": {k: v for k, v in export.config["provenance"].items() if k != "run_config"},
        "converter_git_revision": git_revision(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "verification": None,
    }
    with staged_directory(out, replace=replaces) as tmp:
        dense = export.read_tensors("dense.safetensors")
        experts = ((key, read_expert(export, *key)) for key in fmt.expert_keys(export.config))
        hf_layout.write_weights(tmp, export.config, dense, experts)
        tok = export.config["tokenizer"]
        generation = {"bos_token_id": tok["bos_id"], "eos_token_id": tok["eos_id"], "pad_token_id": tok["pad_id"]}
        (tmp / GENERATION_CONFIG_FILE).write_text(json.dumps({**generation, "do_sample": False}, indent=2) + "\n")
        write_tokenizer(tmp, export.tokenizer_bytes(), m["max_positions"])
        if verify:
            from pipeline.convert import hf_verify

            meta["verification"] = hf_verify.verify(tmp, export_dir, texts)
            log(hf_verify.describe(meta["verification"]))
        (tmp / PROVENANCE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    total = sum(p.stat().st_size for p in out.iterdir())
    log(
        f"wrote {out}: {hf_layout.ARCHITECTURE}, {len(OUR_FILES)} files, {total / 2**20:.1f} MiB "
        f"({'verified' if verify else 'NOT verified'}) in {time.perf_counter() - start:.1f} s"
    )
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.convert.hf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("export", type=Path, metavar="EXPORT_DIR", help="an export (python -m pipeline.convert)")
    parser.add_argument("out", type=Path, metavar="OUT_DIR", help="the Hugging Face directory to write")
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR if it is a Hugging Face export of ours")
    parser.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="check the directory against the export with transformers on held-out text (default: on)",
    )
    parser.add_argument("--text", type=Path, metavar="FILE", help="held-out text for --verify, one text per line")
    args = parser.parse_args(argv)
    try:
        from pipeline.platform import quiet_known_warnings

        quiet_known_warnings()
        export_hf(args.export, args.out, force=args.force, verify=args.verify, text_file=args.text)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
