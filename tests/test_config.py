"""Tests for tether.config: presets, dotted overrides, validation and the ``tether config`` CLI."""

from __future__ import annotations

import dataclasses
import re

import pytest
import yaml

from tether.cli import main
from tether.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    describe,
    list_presets,
    load_config,
)


def _leaf_keys(cls=RunConfig, prefix=""):
    """Every dotted leaf key of a config dataclass, read independently of describe()."""
    keys = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys.extend(_leaf_keys(type(default), prefix + f.name + "."))
        else:
            keys.append(prefix + f.name)
    return keys


def _write(path, text: str | bytes):
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- presets


def test_tiny_preset_builds():
    cfg = load_config(preset="tiny")
    assert isinstance(cfg, RunConfig)
    assert cfg.preset == "tiny"
    # values from tiny.yaml, not the dataclass defaults
    assert cfg.ppo.steps == 40
    assert cfg.ppo.mini_batch_size == 32
    assert cfg.rm.optim.lr == pytest.approx(3e-4)


def test_list_presets_contains_tiny_and_default():
    presets = list_presets()
    assert "tiny" in presets and "default" in presets
    assert presets == sorted(presets)


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_builds(name):
    cfg = load_config(preset=name)
    assert isinstance(cfg, RunConfig)
    assert cfg.preset == name


def test_unknown_preset_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown preset 'tny'.*did you mean 'tiny'"):
        load_config(preset="tny")


def test_preset_from_file_key(tmp_path):
    path = _write(tmp_path / "run.yaml", "preset: tiny\nseed: 3\n")
    cfg = load_config(path)
    assert cfg.preset == "tiny"
    assert cfg.ppo.steps == 40
    assert cfg.seed == 3


# ----------------------------------------------------------------------------- overrides


def test_overrides_land_with_right_types():
    cfg = load_config(
        preset="tiny",
        overrides=["ppo.kl.target=3", "seed=7", "rm.optim.lr=3e-4", "lora.enabled=true"],
    )
    assert cfg.ppo.kl.target == 3.0 and type(cfg.ppo.kl.target) is float
    assert cfg.seed == 7 and type(cfg.seed) is int
    # YAML 1.1 reads '3e-4' (no dot) as a string; it must still become a float
    assert cfg.rm.optim.lr == pytest.approx(3e-4) and type(cfg.rm.optim.lr) is float
    assert cfg.lora.enabled is True
    # untouched siblings keep the preset's values
    assert cfg.ppo.kl.init_coef == pytest.approx(0.05)
    assert cfg.rm.optim.batch_size == 32


def test_apply_overrides_later_wins():
    out = apply_overrides({"ppo": {"kl": {"target": 6.0, "horizon": 5}}}, ["ppo.kl.target=1", "ppo.kl.target=2"])
    assert out == {"ppo": {"kl": {"target": 2, "horizon": 5}}}


def test_apply_overrides_does_not_mutate_input():
    # apply_overrides starts from a copy (_deep_merge({}, data)), so the caller's nested
    # dicts must not change.
    base = {"ppo": {"kl": {"target": 6.0}}}
    apply_overrides(base, ["ppo.kl.target=2"])
    assert base == {"ppo": {"kl": {"target": 6.0}}}


def test_override_without_equals_is_error():
    with pytest.raises(ConfigError, match="seed"):
        load_config(preset="tiny", overrides=["seed"])


def test_list_override_from_comma_string():
    cfg = load_config(preset="tiny", overrides=["stages=data,sft"])
    assert cfg.stages == ["data", "sft"]


# ----------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    "override, key, suggestion",
    [
        ("ppo.kl.taget=3", "ppo.kl.taget", "ppo.kl.target"),
        ("rm.optim.lrr=1e-3", "rm.optim.lrr", "rm.optim.lr"),
        ("sed=1", "sed", "seed"),
        # a misspelt top-level section: the message must still name the whole key
        ("rn.epochs=3", "rn.epochs", "rm.epochs"),
    ],
)
def test_unknown_key_in_override(override, key, suggestion):
    with pytest.raises(ConfigError) as info:
        load_config(preset="tiny", overrides=[override])
    msg = str(info.value)
    assert f"'{key}'" in msg, msg
    assert f"did you mean '{suggestion}'" in msg, msg


@pytest.mark.parametrize(
    "text, key, suggestion",
    [
        ("ppo:\n  kl:\n    taget: 3\n", "ppo.kl.taget", "ppo.kl.target"),
        ("rn:\n  epochs: 2\n", "rn.epochs", "rm.epochs"),
    ],
)
def test_unknown_key_in_yaml_file(tmp_path, text, key, suggestion):
    path = _write(tmp_path / "my.yaml", "preset: tiny\n" + text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert str(path) in msg, msg
    assert f"'{key}'" in msg, msg
    assert f"did you mean '{suggestion}'" in msg, msg


# ----------------------------------------------------------------------------- wrong types


@pytest.mark.parametrize(
    "override, key, extra",
    [
        ("seed=abc", "seed", "integer"),
        ("ppo.steps=1.5", "ppo.steps", "integer"),
        ("lora.enabled=maybe", "lora.enabled", "true or false"),
        ("ppo.kl.target=big", "ppo.kl.target", "number"),
        ("rm.loss=bradly_terry", "rm.loss", "did you mean 'bradley_terry'"),
        ("ppo.kl.controller=adaptve", "ppo.kl.controller", "did you mean 'adaptive'"),
        ("model.dtype=float64", "model.dtype", "float32"),
        ("lora.enabled=2", "lora.enabled", "true or false"),
        ("seed=true", "seed", "integer"),
    ],
)
def test_wrong_type_names_key(override, key, extra):
    with pytest.raises(ConfigError) as info:
        load_config(preset="tiny", overrides=[override])
    msg = str(info.value)
    assert msg.startswith(key + ":"), msg
    assert extra in msg, msg


def test_wrong_type_in_yaml_file_names_key(tmp_path):
    path = _write(tmp_path / "t.yaml", "ppo:\n  steps: lots\n")
    with pytest.raises(ConfigError, match=r"ppo\.steps: expected an integer"):
        load_config(path, preset="tiny")


def test_integral_float_is_accepted_for_int():
    cfg = load_config(preset="tiny", overrides=["ppo.steps=2.0", "seed=1e1"])
    assert cfg.ppo.steps == 2 and type(cfg.ppo.steps) is int
    assert cfg.seed == 10 and type(cfg.seed) is int


@pytest.mark.parametrize("raw, expected", [("true", True), ("false", False), ("yes", True), ("no", False), ("True", True)])
def test_bool_spellings(raw, expected):
    assert load_config(preset="tiny", overrides=[f"lora.enabled={raw}"]).lora.enabled is expected


# ----------------------------------------------------------------------------- __post_init__


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["ppo.mini_batch_size=24"], "ppo.mini_batch_size"),
        (["ppo.micro_batch_size=12"], "ppo.micro_batch_size"),
        (["prefs.k=1"], "prefs.k"),
        (["model.max_prompt_length=128"], "model.max_prompt_length"),
        (["model.max_prompt_length=200"], "model.max_prompt_length"),
        (["model.max_prompt_length=0"], "model.max_prompt_length"),
        (["stages=[foo]"], "stages"),
        (["eval.policies=[kto]"], "eval.policies"),
        (["lora.r=0"], "lora.r"),
        (["ppo.kl.target=0"], "ppo.kl.target"),
        (["prefs.labelers_per_item=7"], "prefs.labelers_per_item"),
    ],
)
def test_post_init_validation(overrides, key):
    with pytest.raises(ConfigError) as info:
        load_config(preset="tiny", overrides=overrides)
    msg = str(info.value)
    assert msg.startswith(key + ":"), msg


def test_post_init_messages_are_specific():
    with pytest.raises(ConfigError, match=r"rollout_batch_size \(64\)"):
        load_config(preset="tiny", overrides=["ppo.mini_batch_size=24"])
    with pytest.raises(ConfigError, match=r"unknown stages \['foo'\]"):
        load_config(preset="tiny", overrides=["stages=[foo]"])
    with pytest.raises(ConfigError, match=r"unknown policies \['kto'\]"):
        load_config(preset="tiny", overrides=["eval.policies=[kto]"])


@pytest.mark.parametrize(
    "override, key",
    [
        # Sections used in several places (optim, generation) must report the full key,
        # otherwise "optim.micro_batch_size" could be any of sft/rm/ppo.
        ("sft.optim.micro_batch_size=5", "sft.optim.micro_batch_size"),
        ("ppo.generation.top_p=0", "ppo.generation.top_p"),
    ],
)
def test_post_init_in_shared_section_names_full_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(preset="tiny", overrides=[override])
    msg = str(info.value)
    assert "must" in msg, msg
    assert key in msg, msg


def test_post_init_error_from_file_names_file(tmp_path):
    path = _write(tmp_path / "bad.yaml", "prefs:\n  k: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, preset="tiny")
    msg = str(info.value)
    assert "prefs.k" in msg and str(path) in msg, msg


def test_valid_batch_sizes_pass():
    cfg = load_config(preset="tiny", overrides=["ppo.mini_batch_size=16", "ppo.micro_batch_size=8", "sft.optim.micro_batch_size=8"])
    assert (cfg.ppo.mini_batch_size, cfg.ppo.micro_batch_size, cfg.sft.optim.micro_batch_size) == (16, 8, 8)


# ----------------------------------------------------------------------------- files


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = _write(tmp_path / "broken.yaml", "seed: 1\nppo:\n  steps: [1\n  kl: 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert str(path) in msg, msg
    assert re.search(r"line 4\b", msg), msg
    assert "invalid YAML" in msg


def test_yaml_top_level_list(tmp_path):
    path = _write(tmp_path / "list.yaml", "- seed\n- 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert str(path) in msg and "mapping" in msg and "list" in msg, msg


def test_yaml_section_not_a_mapping(tmp_path):
    path = _write(tmp_path / "sec.yaml", "ppo: 3\n")
    with pytest.raises(ConfigError, match=r"ppo.*expected a mapping"):
        load_config(path, preset="tiny")


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "not found" in str(info.value) and str(path) in str(info.value)


def test_invalid_utf8_file(tmp_path):
    path = _write(tmp_path / "bin.yaml", b"seed: 1\nout: \"\xff\xfe\"\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert str(path) in msg and "UTF-8" in msg, msg


def test_empty_file_is_preset(tmp_path):
    path = _write(tmp_path / "empty.yaml", "")
    assert load_config(path, preset="tiny") == load_config(preset="tiny")


def test_file_then_overrides_precedence(tmp_path):
    path = _write(tmp_path / "p.yaml", "preset: tiny\nseed: 3\nppo:\n  kl:\n    target: 2\n")
    cfg = load_config(path, overrides=["seed=9"])
    assert cfg.seed == 9
    assert cfg.ppo.kl.target == 2.0
    assert cfg.ppo.steps == 40  # from the tiny preset


# ----------------------------------------------------------------------------- round trip / describe


def test_dict_round_trip():
    cfg = load_config(preset="tiny", overrides=["seed=7", "lora.enabled=true", "sft.demos=d.jsonl", "stages=[data,sft]"])
    data = config_to_dict(cfg)
    assert data["seed"] == 7 and data["ppo"]["kl"]["target"] == 6.0
    back = config_from_dict(data)
    assert back == cfg
    assert back is not cfg


def test_yaml_round_trip(tmp_path):
    cfg = load_config(preset="tiny", overrides=["seed=4", "rm.loss=plackett_luce", "ppo.kl.controller=fixed"])
    path = _write(tmp_path / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    assert load_config(path) == cfg


def test_describe_has_help_for_every_leaf():
    rows = describe()
    keys = [k for k, _, _ in rows]
    assert sorted(keys) == sorted(_leaf_keys())
    assert len(keys) == len(set(keys))
    empty = [k for k, _, h in rows if not h.strip()]
    assert not empty, f"keys without help: {empty}"
    by_key = {k: (d, h) for k, d, h in rows}
    assert by_key["ppo.kl.target"][0] == "6.0"
    assert "ppo.optim.lr" in by_key and "seed" in by_key


# ----------------------------------------------------------------------------- CLI


def test_cli_unknown_key_suggests(capsys):
    rc = main(["config", "--preset", "tiny", "--ppo.kl.taget", "3"])
    captured = capsys.readouterr()
    assert rc == 2
    assert "did you mean 'ppo.kl.target'" in captured.err
    assert "ppo.kl.taget" in captured.err
    assert captured.out == ""


def test_cli_override_prints_yaml(capsys):
    rc = main(["config", "--preset", "tiny", "--seed", "5"])
    out = capsys.readouterr().out
    assert rc == 0
    data = yaml.safe_load(out)
    assert data["seed"] == 5
    assert re.search(r"^seed: 5$", out, re.M)
    assert data["preset"] == "tiny"


def test_cli_equals_override(capsys):
    assert main(["config", "--preset", "tiny", "--ppo.kl.target=2.5"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["ppo"]["kl"]["target"] == 2.5


def test_cli_config_file_positional(tmp_path, capsys):
    path = _write(tmp_path / "my.yaml", "preset: tiny\nseed: 11\nppo:\n  steps: 3\n")
    rc = main(["config", str(path)])
    data = yaml.safe_load(capsys.readouterr().out)
    assert rc == 0
    assert data["seed"] == 11
    assert data["ppo"]["steps"] == 3
    assert data["preset"] == "tiny"


def test_cli_override_without_value(capsys):
    assert main(["config", "--preset", "tiny", "--seed"]) == 2
    assert "--seed needs a value" in capsys.readouterr().err


def test_cli_unexpected_positional(capsys):
    assert main(["config", "--preset", "tiny", "notes.txt"]) == 2
    assert "unexpected argument 'notes.txt'" in capsys.readouterr().err


def test_cli_keys_lists_every_key(capsys):
    assert main(["config", "--keys"]) == 0
    out = capsys.readouterr().out
    for key in ("seed", "ppo.kl.target", "rm.optim.lr", "eval.policies"):
        assert re.search(rf"^{re.escape(key)}\s", out, re.M), key
