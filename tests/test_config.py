import pytest
import yaml

from pipeline.config import CONFIG_DIR, count_parameters, load_config, main
from pipeline.errors import ConfigError

SHIPPED = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def base(**sections):
    raw = yaml.safe_load((CONFIG_DIR / "lm-tiny.yaml").read_text())
    for key, value in sections.items():
        section, _, field = key.partition("__")
        if field:
            raw.setdefault(section, {})[field] = value
        else:
            raw[section] = value
    return yaml.safe_dump(raw)


def test_the_required_configs_ship():
    assert {"lm-tiny", "mt-tiny", "lm-small", "mt-small", "paper-lm", "paper-mt"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_loads(name):
    cfg = load_config(name)
    assert cfg.name == name
    assert cfg.data.task == cfg.task


@pytest.mark.parametrize(
    ("edit", "field", "expected"),
    [
        ({"model__hidden_sise": 64}, "model.hidden_sise", "unknown key"),
        ({"optimiser": {"lr": 1}}, "optimiser", "unknown key"),
        ({"model__hidden_size": "wide"}, "model.hidden_size", "expected int"),
        ({"model__hidden_size": 64.0}, "model.hidden_size", "expected int"),
        ({"moe__num_experts": True}, "moe.num_experts", "expected int"),
        ({"model__norm": "batchnorm"}, "model.norm", "expected one of 'layernorm' | 'rmsnorm'"),
        ({"model": [1, 2]}, "model", "expected a mapping"),
        ({"task": "vision"}, "task", "expected one of 'lm' | 'mt'"),
    ],
)
def test_unknown_keys_and_wrong_types_name_the_field(tmp_path, edit, field, expected):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, base(**edit)))
    assert err.value.field == field
    assert expected in str(err.value)
    assert str(tmp_path / "run.yaml") in str(err.value)


@pytest.mark.parametrize(
    ("edit", "field", "expected"),
    [
        ({"moe__num_experts": 6, "parallel__ep_size": 4}, "parallel.ep_size", "must divide moe.num_experts=6"),
        ({"parallel__tp_size": 0}, "parallel.tp_size", "must be >= 1, got 0"),
        ({"parallel__tp_size": 3}, "parallel.tp_size", "must divide model.num_attention_heads=4, got 3"),
        ({"parallel__tp_size": 4, "model__seq_length": 130}, "parallel.tp_size", "must divide model.seq_length=130"),
        ({"parallel__tp_size": 2, "parallel__ep_size": 1}, "parallel.ep_size", "or set model.bias=false"),
        ({"moe__topk": 9}, "moe.topk", "must be <= num_experts=8"),
        ({"moe__topk": 1}, "moe.router_pre_softmax", "top-1"),
        ({"moe__interval": 5}, "moe.interval", "no MoE layer"),
        ({"moe__capacity_fraction": 0}, "moe.capacity_fraction", "must be > 0"),
        ({"model__num_attention_heads": 3}, "model.num_attention_heads", "must divide hidden_size=128"),
        ({"model__encoder_layers": 2}, "model.encoder_layers", "must be 0 for task 'lm'"),
        ({"model__hidden_size": 0}, "model.hidden_size", "must be >= 1"),
        ({"train__min_lr": 1.0}, "train.min_lr", "must be in [0, lr="),
        ({"train__warmup_steps": 300}, "train.warmup_steps", "must be in [0, steps=300)"),
        ({"tokenizer__vocab_size": 100}, "tokenizer.vocab_size", "must be >= 300"),
        ({"tokenizer__model_file": "/no/such/file.model"}, "tokenizer.model_file", "no tokenizer model"),
        ({"data__valid_fraction": 0.9}, "data.valid_fraction", "expected a number in [0, 0.5), got 0.9"),
        ({"data__corpus": "bible"}, "data.corpus", "'bible' is the built-in mt corpus; task is 'lm'"),
    ],
)
def test_impossible_values_name_the_field(tmp_path, edit, field, expected):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, base(**edit)))
    assert err.value.field == field
    assert expected in str(err.value)


def test_mt_needs_an_encoder(tmp_path):
    raw = yaml.safe_load((CONFIG_DIR / "mt-tiny.yaml").read_text())
    raw["model"]["encoder_layers"] = 0
    with pytest.raises(ConfigError, match="model.encoder_layers: must be >= 1 for task 'mt'"):
        load_config(write(tmp_path, yaml.safe_dump(raw)))


def test_overrides_are_checked_like_the_file():
    cfg = load_config("lm-tiny", ["moe.topk=1", "moe.router_pre_softmax=true", "train.lr=1e-3"])
    assert (cfg.moe.topk, cfg.moe.router_pre_softmax, cfg.train.lr) == (1, True, 1e-3)
    with pytest.raises(ConfigError, match="moe.router_pre_softmax"):
        load_config("lm-tiny", ["moe.topk=1"])
    with pytest.raises(ConfigError, match="moe.topz: unknown key"):
        load_config("lm-tiny", ["moe.topz=1"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config("lm-tiny", ["moe.topk"])
    with pytest.raises(ConfigError, match="'name' is not a section"):
        load_config("lm-tiny", ["name.x=1"])


def test_a_bad_override_says_it_came_from_the_command_line(tmp_path):
    file = str(CONFIG_DIR / "lm-tiny.yaml")
    cases = {
        "moe.num_experts=abc": "--set moe.num_experts=abc: moe.num_experts: expected int, got str 'abc'",
        "tracking.tags=5": "--set tracking.tags=5: tracking.tags: expected a list, got 5",
        "foo.bar=1": "--set foo.bar=1: foo: unknown key",
        "name.x=1": "--set name.x=1: name.x: 'name' is not a section",
        "moe.topk": "--set: moe.topk: an override must look like section.key=value",
        # A check across fields: the file's value with the override the message names.
        "moe.num_experts=7": f"{file} with --set moe.num_experts=7: parallel.ep_size: must divide moe.num_experts=7",
        "train.steps=5": f"{file} with --set train.steps=5: train.warmup_steps: must be in [0, steps=5)",
    }
    for override, expected in cases.items():
        with pytest.raises(ConfigError) as err:
            load_config("lm-tiny", ["train.lr=1.0e-3", override])
        assert str(err.value).startswith(expected), str(err.value)
    # A bad value in the file itself is the file's, whatever else was overridden.
    path = write(tmp_path, base(model__hidden_size=0))
    with pytest.raises(ConfigError, match=f"^{path}: model.hidden_size: must be >= 1"):
        load_config(path, ["train.lr=1.0e-3"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="no config file at .*the shipped configs are: .*lm-tiny"):
        load_config("lm-huge")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed"))
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(write(tmp_path, "- a list"))
    with pytest.raises(ConfigError, match="name: is required"):
        load_config(write(tmp_path, "task: lm"))


@pytest.mark.parametrize(
    ("name", "paper_total"),
    [("paper-lm", 52e9), ("paper-lm-small", 15e9), ("paper-mt", 54.5e9)],
)
def test_paper_shapes_have_the_paper_parameter_counts(name, paper_total):
    counts = count_parameters(load_config(name))
    assert counts["total"] == pytest.approx(paper_total, rel=0.04)
    assert counts["active_per_token"] < counts["total"] / 10


@pytest.mark.parametrize(("name", "dense_total"), [("paper-lm", 355e6), ("paper-mt", 3.3e9)])
def test_dense_counterparts_have_the_paper_sizes(name, dense_total):
    counts = count_parameters(load_config(name, ["moe.num_experts=0"]))
    assert counts["total"] == pytest.approx(dense_total, rel=0.04)
    assert counts["experts"] == 0


def test_cli_prints_the_resolved_config_or_one_error(capsys):
    assert main(["mt-tiny", "--set", "moe.topk=1", "--set", "moe.router_pre_softmax=true"]) == 0
    out = capsys.readouterr().out
    assert "topk: 1" in out and "# parameters: total" in out
    assert main(["mt-tiny", "--set", "moe.num_experts=5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "parallel.ep_size" in err and "Traceback" not in err


def test_the_data_task_follows_the_run_task(tmp_path):
    assert load_config("mt-tiny").data.task == "mt"
    with pytest.raises(ConfigError, match="data.task: is set from the top-level 'task'"):
        load_config(write(tmp_path, base(data__task="mt")))


def test_float_fields_take_yaml_exponent_literals(tmp_path):
    cfg = load_config(write(tmp_path, base(train__lr="2e-3", train__min_lr=1e-4)))
    assert (cfg.train.lr, cfg.train.min_lr) == (2e-3, 1e-4)
    with pytest.raises(ConfigError, match="train.lr: expected float, got str 'fast'"):
        load_config("lm-tiny", ["train.lr=fast"])
    with pytest.raises(ConfigError, match="model.hidden_size: expected int, got str '1e3'"):
        load_config("lm-tiny", ["model.hidden_size=1e3"])


def test_tensor_parallelism_is_refused_for_mt_and_for_a_world_it_does_not_divide():
    with pytest.raises(ConfigError, match="> 1 is supported for task 'lm' only, got 2") as err:
        load_config("mt-tiny", ["parallel.tp_size=2"])
    assert err.value.field == "parallel.tp_size"
    layout = load_config("lm-tiny", ["parallel.tp_size=2", "parallel.ep_size=4"]).parallel
    layout.check_world(4)  # dense 2 x 2 data-parallel, experts 4 x 1: fits
    with pytest.raises(ConfigError, match=r"must divide the number of ranks \(6\), got 4") as err:
        layout.check_world(6)
    assert err.value.field == "parallel.ep_size"
    with pytest.raises(ConfigError, match=r"must divide the number of ranks \(3\), got 2") as err:
        layout.check_world(3)
    assert err.value.field == "parallel.tp_size"


def test_experts_with_biases_train_only_with_expert_parallelism():
    """megatron-core 0.16.1 fails on the first step there (an in-place bias add on a view): refused before any work,
    while conversion (which builds any config at EP=1, forward only) still loads such a config."""
    biased = load_config("lm-tiny", ["parallel.ep_size=1"])
    with pytest.raises(ConfigError, match="parallel.ep_size: must be >= 2 to train experts with biases"):
        biased.parallel.check_trainable(biased.model, biased.moe.num_experts)
    load_config("lm-tiny").parallel.check_trainable(load_config("lm-tiny").model, 8)
    unbiased = load_config("lm-qwen3-tiny", ["parallel.ep_size=1"])
    unbiased.parallel.check_trainable(unbiased.model, unbiased.moe.num_experts)
