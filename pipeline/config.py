"""Run configs: one YAML file per model/run under `configs/`, loaded into typed dataclasses.

The one config loader of the project. A YAML file maps onto `RunConfig`: every key must name a dataclass field
(unknown keys are errors, so a typo never silently falls back to a default), every value must have the field's type,
and each section then checks its own values (`validate()`), followed by the checks that span sections.
`--set section.key=value` overrides are applied to the raw mapping before any of that, so they are checked exactly
like the file.

Run `python -m pipeline.config configs/lm-tiny.yaml` to print a resolved config with its parameter counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.data.spec import DataConfig
from pipeline.errors import ConfigError, exit_status
from pipeline.tokenizer import TokenizerConfig
from pipeline.tracking import TrackingConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
_FLOAT_LITERAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _require(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ConfigError(field_name, message)


@dataclass
class ModelConfig:
    """The transformer around the MoE layers. For MT, `num_layers` is the decoder depth."""

    num_layers: int = 2
    encoder_layers: int = 0  # MT only: encoder depth; 0 for a decoder-only LM
    hidden_size: int = 64
    ffn_hidden_size: int = 256
    num_attention_heads: int = 4
    seq_length: int = 128  # LM: tokens per packed sequence; MT: max tokens per source/target sentence
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    activation: Literal["gelu", "swiglu"] = "gelu"
    position_embedding: Literal["learned", "rope"] = "learned"
    tie_embeddings: bool = True
    bias: bool = (
        True  # linear biases (attention, FFNs, experts, router); false: none anywhere (megatron add_bias_linear)
    )
    qk_norm: bool = (
        False  # a per-head `norm` on queries and keys of self-attention, before RoPE (megatron qk_layernorm)
    )
    dropout: float = 0.0
    init_std: float = 0.02

    def validate(self) -> None:
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "seq_length"):
            _require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        _require(self.encoder_layers >= 0, "encoder_layers", f"must be >= 0, got {self.encoder_layers}")
        _require(
            self.hidden_size % self.num_attention_heads == 0,
            "num_attention_heads",
            f"must divide hidden_size={self.hidden_size}, got {self.num_attention_heads}",
        )
        _require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        _require(self.init_std > 0, "init_std", f"must be > 0, got {self.init_std}")


@dataclass
class MoEConfig:
    """Which FFNs are MoE layers and how tokens are routed to their experts."""

    num_experts: int = 4  # 0 makes every FFN dense
    topk: int = 2
    interval: int = 2  # every interval-th FFN (layers interval, 2*interval, ... counting from 1) is an MoE layer
    capacity_fraction: float = 1.0  # static gating: each expert gets capacity_fraction * tokens slots (the paper's C)
    router_pre_softmax: bool = False  # softmax before top-k; needed for top-1 (the top-1 prob is then not always 1)
    aux_loss_coeff: float = 0.01  # load-balancing loss
    z_loss_coeff: float = 0.0
    dispatcher: Literal["alltoall", "allgather"] = "alltoall"

    def validate(self) -> None:
        _require(self.num_experts >= 0, "num_experts", f"must be >= 0, got {self.num_experts}")
        if self.num_experts == 0:
            return
        _require(self.topk >= 1, "topk", f"must be >= 1, got {self.topk}")
        _require(self.topk <= self.num_experts, "topk", f"must be <= num_experts={self.num_experts}, got {self.topk}")
        _require(self.interval >= 1, "interval", f"must be >= 1, got {self.interval}")
        _require(self.capacity_fraction > 0, "capacity_fraction", f"must be > 0, got {self.capacity_fraction}")
        _require(self.aux_loss_coeff >= 0, "aux_loss_coeff", f"must be >= 0, got {self.aux_loss_coeff}")
        _require(self.z_loss_coeff >= 0, "z_loss_coeff", f"must be >= 0, got {self.z_loss_coeff}")
        _require(
            self.topk > 1 or self.router_pre_softmax,
            "router_pre_softmax",
            "must be true for top-1 routing (softmax over one selected logit is always 1: no router gradient)",
        )

    def is_moe_layer(self, layer_number: int) -> bool:
        """`layer_number` counts from 1 within a stack (encoder or decoder), as the paper's "every M-th FFN"."""
        return self.num_experts > 0 and layer_number % self.interval == 0


@dataclass
class ParallelConfig:
    ep_size: int = 2  # expert-parallel degree: experts are split across this many ranks

    def validate(self) -> None:
        _require(self.ep_size >= 1, "ep_size", f"must be >= 1, got {self.ep_size}")


@dataclass
class TrainConfig:
    steps: int = 200
    micro_batch_size: int = 8  # sequences (LM) or sentence pairs (MT) per rank per step
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_interval: int = 50
    eval_batches: int = 8
    save_interval: int = 100
    log_interval: int = 10
    seed: int = 1234
    bleu_sentences: int = 200  # MT: validation sentences greedy-decoded for BLEU at the end (0: all of them)
    dtype: Literal["fp32", "bf16"] = "fp32"

    def validate(self) -> None:
        for name in ("steps", "micro_batch_size", "eval_interval", "eval_batches", "save_interval", "log_interval"):
            _require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        _require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _require(0 <= self.min_lr <= self.lr, "min_lr", f"must be in [0, lr={self.lr}], got {self.min_lr}")
        _require(
            0 <= self.warmup_steps < self.steps,
            "warmup_steps",
            f"must be in [0, steps={self.steps}), got {self.warmup_steps}",
        )
        _require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(self.grad_clip > 0, "grad_clip", f"must be > 0, got {self.grad_clip}")
        _require(self.bleu_sentences >= 0, "bleu_sentences", f"must be >= 0, got {self.bleu_sentences}")


@dataclass
class RunConfig:
    name: str
    task: Literal["lm", "mt"]
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    trainable_here: bool = (
        True  # false for the paper's shapes: usable by planners and benchmarks, far too big to train here
    )

    def validate(self) -> None:
        # data.task is never written in a config file: it follows the run's task, so the two cannot disagree.
        self.data.task = self.task
        for section in ("model", "moe", "parallel", "data", "tokenizer", "train", "tracking"):
            try:
                getattr(self, section).validate()
            except ConfigError as err:
                raise ConfigError(f"{section}.{err.field}", err.reason) from None
        if self.task == "lm":
            _require(self.model.encoder_layers == 0, "model.encoder_layers", "must be 0 for task 'lm' (decoder-only)")
        else:
            _require(self.model.encoder_layers >= 1, "model.encoder_layers", "must be >= 1 for task 'mt'")
        if self.moe.num_experts:
            _require(
                self.moe.num_experts % self.parallel.ep_size == 0,
                "parallel.ep_size",
                f"must divide moe.num_experts={self.moe.num_experts} (each rank holds the same number of experts), "
                f"got {self.parallel.ep_size}",
            )
            stacks = [self.model.num_layers] + ([self.model.encoder_layers] if self.task == "mt" else [])
            _require(
                any(n >= self.moe.interval for n in stacks),
                "moe.interval",
                f"={self.moe.interval} leaves no MoE layer in a stack of {max(stacks)} layers",
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- loading: YAML mapping -> typed dataclasses -------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, building nested dataclasses; raise ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(where, f"expected a mapping of {tp.__name__} fields, got {type(value).__name__}")
        return _build(tp, value, where)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(where, f"expected one of {_type_name(tp)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(where, f"expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(where, f"expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is type(None):
        if value is not None:
            raise ConfigError(where, f"expected null, got {value!r}")
        return None
    # bool is a subclass of int in Python: `num_experts: true` must not pass as 1.
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    # YAML 1.1 (PyYAML) reads `1e-3` as a string: it needs `1.0e-3`. Nobody means the string.
    if tp is float and isinstance(value, str) and _FLOAT_LITERAL.fullmatch(value.strip()):
        return float(value)
    if tp is str and isinstance(value, str):
        return value
    raise ConfigError(where, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _build(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(where, f"unknown key; expected one of: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        where = f"{prefix}.{name}" if prefix else name
        if name in raw:
            kwargs[name] = _coerce(raw[name], hints[name], where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(where, "is required")
    return cls(**kwargs)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (values parsed as YAML) to a raw config mapping, in place."""
    for item in overrides:
        key, sep, text = item.partition("=")
        where = f"--set {item}"
        if not sep or not key.strip():
            raise ConfigError(item, "an override must look like section.key=value", source="--set")
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(key, f"'{part}' is not a section", source=where)
        try:
            node[parts[-1]] = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(key, f"the value {text!r} is not valid YAML ({err})", source=where) from None
    return raw


def _source_of(err: ConfigError, path: Path, overrides: list[str]) -> str:
    """Where a bad value came from: the `--set` that set the field (or one it contains), else the file, naming the
    overrides the message mentions by full name or as `name=` in the field's section (a check across fields)."""
    if err.source is not None:
        return err.source
    field, keys = err.field, {item: item.partition("=")[0].strip() for item in overrides}
    for item, key in keys.items():
        if key == field or field.startswith((f"{key}.", f"{key}[")) or key.startswith(f"{field}."):
            return f"--set {item}"
    named = [
        item
        for item, key in keys.items()
        if re.search(rf"\b{re.escape(key)}\b", err.reason)
        or (key.partition(".")[0] == field.partition(".")[0] and f"{key.rpartition('.')[2]}=" in err.reason)
    ]
    return f"{path} with " + " ".join(f"--set {item}" for item in named) if named else str(path)


def add_override_argument(parser: argparse.ArgumentParser) -> None:
    """The `--set KEY=VALUE` option every command that loads a config offers (parsed by `load_config`)."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set moe.topk=1 (repeatable)",
    )


def resolve_config_path(name_or_path: str | Path) -> Path:
    """`lm-tiny` means configs/lm-tiny.yaml; anything with a suffix or a slash is a path."""
    path = Path(name_or_path)
    if path.suffix == "" and len(path.parts) == 1:
        path = CONFIG_DIR / f"{path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise ConfigError("config", f"no config file at {path}; the shipped configs are: {known}")
    return path


def load_config(name_or_path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    path = resolve_config_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError("config", f"not valid YAML: {err}", source=str(path)) from None
    if not isinstance(raw, dict):
        raise ConfigError("config", "expected a mapping of sections at the top level", source=str(path))
    try:
        apply_overrides(raw, overrides or [])
        if isinstance(raw.get("data"), dict) and "task" in raw["data"]:
            raise ConfigError("data.task", "is set from the top-level 'task'; remove it")
        cfg = _build(RunConfig, raw)
        cfg.validate()
    except ConfigError as err:
        raise ConfigError(err.field, err.reason, source=_source_of(err, path, overrides or [])) from None
    return cfg


# ---- sizes: parameter counts for planners and for checking the paper's shapes -----------------------------------


def count_parameters(cfg: RunConfig) -> dict[str, int]:
    """Weights of the model the config describes (biases and norms included): total, in experts, active per token."""
    m, moe = cfg.model, cfg.moe
    d, f = m.hidden_size, m.ffn_hidden_size
    vocab = cfg.tokenizer.vocab_size
    fc1_rows = 2 * f if m.activation == "swiglu" else f
    norm = 2 * d if m.norm == "layernorm" else d
    head_norm = (2 if m.norm == "layernorm" else 1) * (d // m.num_attention_heads)
    attention = 4 * d * d + 4 * d * m.bias
    self_attention = attention + 2 * head_norm * m.qk_norm
    ffn = (fc1_rows + f) * d + (fc1_rows + d) * m.bias
    router = moe.num_experts * (d + m.bias)

    def stack(num_layers: int, cross_attention: bool) -> tuple[int, int, int]:
        total = expert = active = 0
        for layer in range(1, num_layers + 1):
            base = self_attention + 2 * norm + (attention + norm if cross_attention else 0)
            if moe.is_moe_layer(layer):
                total += base + router + moe.num_experts * ffn
                expert += moe.num_experts * ffn
                active += base + router + moe.topk * ffn
            else:
                total += base + ffn
                active += base + ffn
        return total, expert, active

    embeddings = vocab * d + (m.seq_length * d if m.position_embedding == "learned" else 0)
    output = 0 if m.tie_embeddings else vocab * d
    dec = stack(m.num_layers, cross_attention=cfg.task == "mt")
    enc = stack(m.encoder_layers, cross_attention=False)
    final_norms = norm * (2 if cfg.task == "mt" else 1)
    dense_extra = embeddings + output + final_norms
    return {
        "total": dec[0] + enc[0] + dense_extra,
        "experts": dec[1] + enc[1],
        "active_per_token": dec[2] + enc[2] + dense_extra,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.config",
        description="Load and validate a run config, print it resolved with its parameter counts.",
    )
    parser.add_argument("config", help="a config name (lm-tiny) or a path to a YAML file")
    add_override_argument(parser)
    args = parser.parse_args(argv)
    return exit_status(show, args)


def show(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    counts = count_parameters(cfg)
    print("# parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
