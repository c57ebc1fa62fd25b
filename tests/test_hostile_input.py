"""Hostile input: every loader, the config parser, the labeling import and the tokenizer
give an error of a documented type naming the file, line and field (or a documented
handling), never a traceback from deep inside a library.

Explicit cases first, then property-based fuzzing (hypothesis) with a fixed, derandomised
budget: random JSON-ish records and raw bytes through every loader, random nested dicts
over the real config keys, random override strings and random chat messages. The only
exceptions allowed out are ours: DataError, ConfigError, ChatFormatError, StoreError."""

from __future__ import annotations

import copy
import json
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tether.data.io as data_io
from tether.cli import _read_groups, main
from tether.config import (
    ConfigError,
    RunConfig,
    _valid_keys,
    config_from_dict,
    load_config,
    parse_override,
)
from tether.data.io import DataError, read_jsonl
from tether.data.schemas import (
    MAX_RESPONSES,
    ChatFormatError,
    check_messages,
    iter_records,
    load_demonstrations,
    load_rankings,
    rankings_to_pairs,
)
from tether.feedback.stats import detect_kind, file_stats
from tether.labeling.store import LabelStore, StoreError


def _write(path: Path, *lines: str | bytes) -> Path:
    path.write_bytes(b"".join((ln if isinstance(ln, bytes) else ln.encode("utf-8")) + b"\n" for ln in lines))
    return path


def _data_error(fn, path: Path, line: int | None, field: str | None = None, match: str | None = None) -> DataError:
    """``fn()`` raises a DataError whose message starts with ``file:line:`` and names the field."""
    with pytest.raises(DataError) as info:
        fn()
    err, msg = info.value, str(info.value)
    assert err.path == str(path) and err.line == line and err.field == field, msg
    assert msg.startswith(f"{path}:{line}:" if line is not None else f"{path}:"), msg
    if field is not None:
        assert f"field '{field}'" in msg, msg
    if match is not None:
        assert re.search(match, msg), msg
    assert len(msg) < 600, msg  # the offending value is quoted short, never whole
    return err


GOOD_DEMO = json.dumps({"prompt": "write three words about fruits", "response": "apple pear fig"})
GOOD_PAIR = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})


# ----------------------------------------------------------------------------- loaders: explicit


@pytest.mark.parametrize("record, field, match", [
    ({"prompt": 5, "response": "x"}, "prompt", "string or a list of chat messages, got int"),
    ({"prompt": "p", "response": ["x"]}, "response[0]", "must be an object with role and content, got str"),
    ({"prompt": "p", "response": None}, "response", "got NoneType"),
    ({"prompt": "", "response": "x"}, "prompt", "non-empty"),
    ({"prompt": "p", "response": "   "}, "response", "non-empty"),
    ({"prompt": "p", "completion": ""}, "completion", "non-empty"),
    ({"messages": "hi"}, "messages", "list of chat messages, got str"),
    ({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]},
     "messages[0].role", "unknown chat role 'wizard'"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]},
     "messages[0].content", "must be a string, got int"),
    ({"messages": [{"role": ["user"], "content": "x"}, {"role": "assistant", "content": "y"}]},
     "messages[0].role", "unknown chat role"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]},
     "messages[1].content", "must not be empty"),
    ({"prompt": [{"role": "tool", "content": "x"}], "response": "y"}, "prompt[0].role", "unknown chat role 'tool'"),
    ({"prompt": [], "response": "y"}, "prompt", "must not be empty"),
])
def test_demonstrations_wrong_types_and_empty_strings(tmp_path, record, field, match):
    path = _write(tmp_path / "d.jsonl", GOOD_DEMO, "", json.dumps(record))
    _data_error(lambda: load_demonstrations(path), path, 3, field, match)


@pytest.mark.parametrize("record, field, match", [
    ({"prompt": "p", "chosen": 1, "rejected": "b"}, "chosen", "got int"),
    ({"prompt": "p", "chosen": "a"}, "rejected", "missing"),
    ({"prompt": "p", "chosen": "", "rejected": "b"}, "chosen", "non-empty"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "tie": "yes"}, "tie", "true or false"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "soft_label": "0.5"}, "soft_label", "finite number"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "soft_label": float("nan")}, "soft_label", "finite number"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "strength": float("inf")}, "strength", "finite number"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "strength": "x" * 100_000}, "strength", r"\.\.\."),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "rater": {"a": 1}}, "rater", "must be a string"),
    ({"prompt": "p", "responses": "ab", "ranking": [0, 1]}, "responses", "at least 2"),
    ({"prompt": "p", "responses": ["a", "b"], "ranking": ["0", "1"]}, "ranking", "permutation"),
    ({"prompt": "p", "responses": ["a", "b"], "ranking": [0, True]}, "ranking", "permutation"),
    ({"prompt": "p", "responses": ["a", "b"], "ranking": list(range(10_000))}, "ranking", r"permutation.*\.\.\."),
    ({"prompt": "p", "responses": ["a", "b"], "ranking": [[], 0, 1]}, "ranking", "permutation"),
    ({"prompt": "p", "responses": ["a"] * (MAX_RESPONSES + 1), "ranking": list(range(MAX_RESPONSES + 1))},
     "responses", f"more than the {MAX_RESPONSES} allowed"),
    ({"prompt": "p", "responses": ["a", {"role": "user"}], "ranking": [0, 1]}, "responses[1]", "got dict"),
])
def test_rankings_wrong_types(tmp_path, record, field, match):
    path = _write(tmp_path / "r.jsonl", GOOD_PAIR, json.dumps(record))
    _data_error(lambda: load_rankings(path), path, 2, field, match)
    if match != "non-empty":  # stats count empty responses rather than refuse them
        _data_error(lambda: file_stats(path), path, 2, field, match)


def test_invalid_utf8_is_named_with_its_line(tmp_path):
    path = _write(tmp_path / "d.jsonl", GOOD_DEMO, GOOD_DEMO, b'{"prompt": "\xc3\x28", "response": "x"}')
    _data_error(lambda: load_demonstrations(path), path, 3, None, "not valid UTF-8")
    _data_error(lambda: file_stats(path), path, 3, None, "not valid UTF-8")


def test_huge_line_is_refused_with_its_line_number_without_reading_it_whole(tmp_path):
    huge = b'{"prompt": "p", "response": "' + b"x" * (50 * 2**20) + b'"}'
    path = _write(tmp_path / "big.jsonl", GOOD_DEMO, huge)
    _data_error(lambda: load_demonstrations(path), path, 2, None, rf"line is {len(huge) + 1} bytes, more than the "
                                                                  rf"{data_io.MAX_LINE_BYTES} allowed")
    path.write_bytes(GOOD_DEMO.encode() + b"\n" + huge[: 20 * 2**20])  # no newline at the end either
    _data_error(lambda: load_demonstrations(path), path, 2, None, "more than the")


def test_a_valid_line_just_under_the_limit_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(data_io, "MAX_LINE_BYTES", 4 * 2**20)
    line = json.dumps({"prompt": "p", "response": "y" * (4 * 2**20 - 40)})
    assert len(line) + 1 <= data_io.MAX_LINE_BYTES
    path = _write(tmp_path / "d.jsonl", line)
    assert len(load_demonstrations(path)[0].response) == 4 * 2**20 - 40


@pytest.mark.parametrize("line, field, match", [
    ('{"prompt": "p", "response": "x", "n": ' + "9" * 5000 + "}", None, "malformed JSON: Exceeds the limit"),
    ('{"prompt": ' + "[" * 50_000 + "]" * 50_000 + "}", None, "nested more than"),
    ('{"prompt": "p", "response": "x", "meta": ' + "[" * 100 + "]" * 100 + "}", ("meta" + "[0]" * 63)[:60] + "…",
     "nested more than 64"),
    ('{"prompt": "\\ud800 half an emoji", "response": "x"}', "prompt", r"lone surrogate \\ud800"),
    ('{"prompt": [{"role": "user", "content": "\\udfff"}], "response": "x"}', "prompt[0].content", "lone surrogate"),
    ('[1, 2]', None, "expected a JSON object, got list"),
    ('"just text"', None, "expected a JSON object, got str"),
    ('{"prompt": "p", "response": "x"', None, "malformed JSON"),
])
def test_json_that_python_would_choke_on(tmp_path, line, field, match):
    path = _write(tmp_path / "d.jsonl", GOOD_DEMO, line)
    _data_error(lambda: load_demonstrations(path), path, 2, field, match)


def test_byte_order_mark_and_surrogate_pairs_are_fine(tmp_path):
    path = _write(tmp_path / "d.jsonl", b"\xef\xbb\xbf" + GOOD_DEMO.encode(), '{"prompt": "\\ud83d\\ude00", "response": "x"}')
    demos = load_demonstrations(path)
    assert demos[0].prompt == "write three words about fruits" and demos[1].prompt == "\U0001F600"


def test_a_folder_or_unreadable_source_is_a_data_error(tmp_path):
    pytest.importorskip("datasets")
    empty = tmp_path / "empty"
    empty.mkdir()
    _data_error(lambda: load_demonstrations(empty), empty, None, None, "no dataset here")
    _data_error(lambda: load_rankings(tmp_path / "nope.jsonl"), tmp_path / "nope.jsonl", None, None, "file not found")


def test_hf_dataset_rows_of_the_wrong_type_are_named_by_row(tmp_path):
    pytest.importorskip("datasets")
    csv = tmp_path / "d.csv"
    csv.write_text("prompt,response\nhello,world\nhi,\n")  # row 2: no response
    _data_error(lambda: load_demonstrations(csv), csv, 2, "response", "missing")
    csv.write_text("prompt,response\n1,world\n2,again\n")  # a column of integers
    _data_error(lambda: load_demonstrations(csv), csv, 1, "prompt", "got int")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(DataError, match=f"^{re.escape(str(bad))}: could not load the dataset"):
        load_demonstrations(bad)


def test_stats_of_odd_but_valid_records(tmp_path):
    path = _write(tmp_path / "r.jsonl",
                  json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "rater": "[/bold]", "item": {"x": [1]}}),
                  json.dumps({"prompt": "p", "chosen": "b", "rejected": "a", "rater": "[red]", "item": {"x": [1]}}))
    stats = file_stats(path)
    assert stats["records"] == 2 and stats["raters"] == 2
    assert main(["data", "stats", str(path)]) == 0  # rater names are text, never rich markup


@pytest.mark.parametrize("content, where", [
    (b"\xff\xfe not utf-8", ":1:"),
    (GOOD_DEMO.encode() + b"\n" + b"[" * 100_000, ":2:"),
    (GOOD_DEMO.encode() + b"\n" + json.dumps({"prompt": "p", "response": 5}).encode(), ":2: field 'response'"),
])
def test_cli_reports_one_line_without_a_traceback(tmp_path, capsys, content, where):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content + b"\n")
    for argv in (["data", "validate", str(path)], ["data", "stats", str(path)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"tether: error: {path}{where}"), err
        assert "Traceback" not in err and err.count("\n") == 1, err


# ----------------------------------------------------------------------------- labeling import


@pytest.mark.parametrize("line, where", [
    (b"\xff", ":2:"),
    (json.dumps({"prompt": "p", "responses": ["only one"]}).encode(), ":2: field 'responses'"),
    (json.dumps({"prompt": "p", "responses": ["a", 7]}).encode(), ":2: field 'responses[1]'"),
    (json.dumps({"prompt": [{"role": "wizard", "content": "x"}], "responses": ["a", "b"]}).encode(),
     ":2: field 'prompt[0].role'"),
    (json.dumps({"prompt": "p", "responses": ["a", "b"], "gold": [1.0, float("nan")]}).encode(), ":2: field 'gold'"),
    (json.dumps({"prompt": "p", "responses": ["a", "b"], "gold": [1.0]}).encode(), ":2: field 'gold'"),
    (json.dumps({"prompt": "p", "responses": ["a", "b"], "gold": [True, 1]}).encode(), ":2: field 'gold'"),
    (json.dumps({"prompt": "", "responses": ["a", "b"]}).encode(), ":2: field 'prompt'"),
    (json.dumps({"prompt": "p", "responses": ["r"] * (MAX_RESPONSES + 1)}).encode(), ":2: field 'responses'"),
])
def test_label_import_of_bad_files(tmp_path, capsys, line, where):
    path = tmp_path / "items.jsonl"
    path.write_bytes(json.dumps({"prompt": "fine", "responses": ["a", "b"]}).encode() + b"\n" + line + b"\n")
    db = str(tmp_path / "labels.sqlite")
    assert main(["label", "import", str(path), "--db", db]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tether: error: {path}{where}") and err.count("\n") == 1, err
    assert LabelStore(db).progress()["items"] == 0  # nothing half imported


def test_label_import_cli_arguments(tmp_path, capsys):
    path = _write(tmp_path / "items.jsonl", json.dumps({"prompt": "p", "responses": ["a", "b"]}))
    db = str(tmp_path / "labels.sqlite")
    assert main(["label", "import", str(path), "--db", db, "--overlap", "0"]) == 2
    assert "overlap" in capsys.readouterr().err
    assert main(["label", "import", str(tmp_path / "missing.jsonl"), "--db", db]) == 2
    assert "file not found" in capsys.readouterr().err


@pytest.mark.parametrize("records, match", [
    (["not an item"], r"records\[0\]: must be an object"),
    ([{"prompt": "p", "responses": ["a", "b"]}, {"responses": ["a", "b"]}], r"records\[1\]\.prompt"),
    ([{"prompt": "p", "responses": ["a"]}], r"records\[0\]\.responses"),
    ([{"prompt": "p", "responses": ["a", None]}], r"records\[0\]\.responses"),
    ([{"prompt": [{"role": "user"}], "responses": ["a", "b"]}], r"records\[0\]\.prompt"),
    ([{"prompt": "p", "responses": ["a", "b"], "gold": [1, float("inf")]}], r"records\[0\]\.gold"),
])
def test_store_add_items_checks_what_it_stores(tmp_path, records, match):
    store = LabelStore(tmp_path / "labels.sqlite")
    with pytest.raises(StoreError, match=match):
        store.add_items(records)
    assert store.progress()["items"] == 0


# ----------------------------------------------------------------------------- config: explicit


def _config_error(fn, *parts: str) -> str:
    with pytest.raises(ConfigError) as info:
        fn()
    msg = str(info.value)
    for part in parts:
        assert part in msg, msg
    assert len(msg) < 600, msg
    return msg


@pytest.mark.parametrize("text, parts", [
    (b"seed: 1\nppo:\n  steps: [\n", ["line 4", "invalid YAML"]),
    (b"seed: 1\nppo:\n\tsteps: 3\n", ["line 3", "invalid YAML"]),
    (b"- seed\n- 1\n", ["top level must be a mapping", "got list"]),
    (b"just text\n", ["top level must be a mapping", "got str"]),
    (b"seed: 1\nout: \xff\xfe\n", ["line 2", "not valid UTF-8"]),
    (b"seed: 1\nout: a\x00b\n", ["line 2, column 7", "character #x0000 is not allowed"]),
    (b"seed: 1\nppo:\n  steps: many\n", ["ppo.steps: expected an integer, got 'many'", "line 3"]),
    (b"seed: 1\nppo:\n  kl:\n    target: .nan\n", ["ppo.kl.target: expected a number, got NaN", "line 4"]),
    (b"seed: " + b"9" * 5000 + b"\n", ["invalid YAML", "4300 digits"]),
    (b"seed: 99999999999999999999\n", ["seed", "out of range", "line 1"]),
    (b"seed: " + b"[" * 1500 + b"]" * 1500 + b"\n", ["nested more than"]),
    (b"out: " + b"[" * 30 + b"]" * 30 + b"\n", ["out[0]", "nested more than 16"]),
    (b"trackers: &a [tensorboard, *a]\n", ["trackers[1]", "refers to itself"]),
    (b"seed: 1\nppo: 0\n", ["ppo in", "line 2", "expected a mapping, got 0"]),
    (b"seed: 1\nppo:\n  stepz: 3\n", ["unknown config key 'ppo.stepz'", "line 3", "did you mean 'ppo.steps'"]),
    (b"out: \"a\\0b\"\n", ["out: must not hold a NUL", "line 1"]),
    (b"out: \"\\ud800\"\n", ["out: holds a lone surrogate", "line 1"]),
    (b"model:\n  name: [a, b]\n", ["model.name: expected a string", "line 2"]),
    (b"policy: [ppo]\n", ["policy:", "is not one of"]),
    (b"policy: " + b"p" * 10_000 + b"\n", ["policy:", "is not one of"]),
    (b"sft:\n  optim:\n    betas: [0.9, fast]\n", ["sft.optim.betas[1]: expected a number", "line 3"]),
    (b"monitor:\n  refusal_phrases: [[sorry]]\n", ["monitor.refusal_phrases[0]: expected a string", "line 2"]),
    (b"preset: ../configs/tiny\n", ["unknown preset '../configs/tiny'"]),
    (b"preset: [tiny]\n", ["unknown preset"]),
    (b"x" * 300 + b": 1\n", ["unknown config key", "(300 characters)"]),
])
def test_bad_config_files(tmp_path, text, parts):
    path = tmp_path / "my.yaml"
    path.write_bytes(text)
    msg = _config_error(lambda: load_config(path), *parts)
    assert str(path) in msg or "preset" in msg, msg


def test_config_file_that_is_a_folder_or_missing(tmp_path):
    _config_error(lambda: load_config(tmp_path), str(tmp_path), "cannot read")
    _config_error(lambda: load_config(tmp_path / "nope.yaml"), "not found", "nope.yaml")


@pytest.mark.parametrize("overrides, parts", [
    (["seed"], ["'seed' must look like section.key=value"]),
    (["=3"], ["has no key"]),
    (["seed=[[["], ["seed: expected an integer, got '[[['"]),
    (["seed=" + "[" * 1500], ["seed: expected an integer"]),
    (["seed=" + "9" * 5000], ["seed: expected an integer"]),
    (["seed=1e300"], ["seed", "out of range"]),
    (["ppo.kl.target=.nan"], ["expected a number, got NaN"]),
    (["ppo=3"], ["ppo: expected a mapping, got 3"]),
    (["seed.x=1"], ["seed: expected an integer"]),
    (["ppo..steps=1"], ["unknown config key 'ppo..steps'"]),
    (["sft.optim.betas=0.9,x"], ["sft.optim.betas[1]: expected a number"]),
    (["out=a\x00b"], ["out: must not hold a NUL"]),
])
def test_malformed_overrides(overrides, parts):
    _config_error(lambda: load_config(preset="tiny", overrides=overrides), *parts)


def test_override_of_a_file_key_names_no_file_line(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text("seed: 1\nppo:\n  steps: 5\n")
    msg = _config_error(lambda: load_config(path, overrides=["ppo.steps=lots"]), "ppo.steps: expected an integer")
    assert "line 3" not in msg, msg
    assert load_config(path, overrides=["ppo.steps=7"]).ppo.steps == 7


def test_parse_override_of_non_text():
    _config_error(lambda: parse_override(5), "must be text")
    _config_error(lambda: load_config(overrides="seed=1"), "must be a list")


@pytest.mark.parametrize("argv", [["config", "BAD"], ["config", "--seed", "x"], ["config", "--seed"]])
def test_cli_config_errors_are_one_line(tmp_path, capsys, argv):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"seed: [\n")
    argv = [str(bad) if a == "BAD" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("tether: error: ") and err.count("\n") == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("content, line, match", [
    (b"- Be kind.\n- Be \xff brief.\n", 2, "not valid UTF-8"),
    (b"- Be kind.\n- a: [\n", 3, "not valid YAML"),
    (b"- Be kind.\n- \x00\n", None, "not valid YAML"),
    (b"- " + b"9" * 5000 + b"\n", None, "not valid YAML: Exceeds the limit"),
    (b"- " + b"[" * 1500 + b"]" * 1500 + b"\n", None, "nested too deeply"),
    (b"a: 1\n", None, "non-empty YAML list"),
])
def test_constitution_files(tmp_path, content, line, match):
    from tether.feedback.judge import load_constitution

    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    err = _data_error(lambda: load_constitution(path), path, line, None, match)
    assert "\n" not in str(err)


# ----------------------------------------------------------------------------- tokenizer: explicit


def _no_template(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    return tok


@pytest.mark.parametrize("messages, field, match", [
    ([{"role": "wizard", "content": "x"}], "messages[0].role", "unknown chat role 'wizard'"),
    ([{"role": "user", "content": "x"}, {"role": None, "content": "y"}], "messages[1].role", "unknown chat role None"),
    ([{"role": "user", "content": None}], "messages[0].content", "must be a string, got NoneType"),
    ([{"role": "user", "content": [{"type": "text", "text": "x"}]}], "messages[0].content", "got list"),
    ([{"role": "user"}], "messages[0].content", "must be a string"),
    (["hello"], "messages[0]", "must be an object"),
    ([], "messages", "must not be empty"),
    ("hello", "messages", "list of chat messages, got str"),
    ([{"role": "user", "content": "\ud800"}], "messages[0].content", "lone surrogate"),
])
@pytest.mark.parametrize("template", [True, False])
def test_chat_prompt_ids_refuses_bad_messages(tiny_tokenizer, messages, field, match, template):
    from tether.data.tokenize import chat_prompt_ids

    tok = tiny_tokenizer if template else _no_template(tiny_tokenizer)
    with pytest.raises(ChatFormatError) as info:
        chat_prompt_ids(tok, messages)
    assert info.value.field == field and str(info.value).startswith(f"{field}: "), str(info.value)
    assert re.search(match, str(info.value)), str(info.value)


def test_tokenizer_without_chat_template_renders_role_lines_and_empty_content(tiny_tokenizer):
    from tether.data.tokenize import Encoder, chat_prompt_ids

    tok = _no_template(tiny_tokenizer)
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": "hi"}]
    expected = tok("system: \nuser: hi\nassistant: ", add_special_tokens=True)["input_ids"]
    assert chat_prompt_ids(tok, messages) == list(expected)
    enc = Encoder(tok, max_length=64, max_prompt_length=32)
    assert enc.prompt_ids("") == list(tok("user: \nassistant: ", add_special_tokens=True)["input_ids"])
    assert enc.response_ids("", budget=8) == [enc.eos_id]


def test_a_chat_template_that_rejects_the_messages(tiny_tokenizer):
    from tether.data.tokenize import chat_prompt_ids

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}" \
                        "{% endif %}{{ messages[0]['content'] }}"
    with pytest.raises(ChatFormatError, match="chat template rejected these messages: System role not supported"):
        chat_prompt_ids(tok, [{"role": "system", "content": "x"}])
    assert chat_prompt_ids(tok, [{"role": "user", "content": "x"}])


def test_encoder_refuses_prompts_and_responses_of_the_wrong_type(tiny_tokenizer):
    from tether.data.tokenize import Encoder

    enc = Encoder(tiny_tokenizer, max_length=64, max_prompt_length=32)
    with pytest.raises(ChatFormatError, match="^prompt: must be a string or a list of chat messages, got int"):
        enc.prompt_ids(5)
    with pytest.raises(ChatFormatError, match="^response: must be a string, got NoneType"):
        enc.response_ids(None, budget=8)
    with pytest.raises(ChatFormatError, match="^messages\\[0\\].role: unknown chat role 'wizard'"):
        enc.example([{"role": "wizard", "content": "x"}], "y")
    tok = copy.deepcopy(tiny_tokenizer)
    tok.eos_token = None
    with pytest.raises(ConfigError, match="has no eos_token"):
        Encoder(tok, max_length=64, max_prompt_length=32)


# ----------------------------------------------------------------------------- tokenizer mismatch


def test_check_same_tokenizer(tiny_path, tiny_tokenizer, tmp_path):
    from tether.models import check_same_tokenizer, load_tokenizer

    assert check_same_tokenizer(tiny_tokenizer, tiny_path, "monitor.heldout_rm").get_vocab() == tiny_tokenizer.get_vocab()
    policy = load_tokenizer(tiny_path)
    other = copy.deepcopy(policy)
    other.add_tokens(["<wizard>"])
    folder = tmp_path / "other_rm"
    shutil.copytree(tiny_path, folder)  # a model folder, with another tokenizer saved over the tiny one's
    other.save_pretrained(folder)
    with pytest.raises(ConfigError) as info:
        check_same_tokenizer(policy, str(folder), "monitor.heldout_rm")
    msg = str(info.value)
    assert msg.startswith(f"monitor.heldout_rm ({folder}) does not use the policy's tokenizer ({tiny_path})"), msg
    assert "its vocabulary has 65 tokens, the policy's 64" in msg, msg
    swapped = copy.deepcopy(policy)
    swapped.eos_token = swapped.convert_ids_to_tokens(5)
    with pytest.raises(ConfigError, match=r"eos_token_id is 5 there and \d+ in the policy's"):
        check_same_tokenizer(policy, swapped, "the judge")
    with pytest.raises(ConfigError, match=r"^monitor\.heldout_rm: cannot load a tokenizer from"):
        check_same_tokenizer(policy, str(tmp_path / "no_such_model"), "monitor.heldout_rm")


def test_pipeline_refuses_a_heldout_rm_on_another_tokenizer(tiny_path, tmp_path):
    """The monitor's held-out reward model scores the policy's token ids: one built on
    another tokenizer is refused before any training, naming the setting."""
    from tether.config import load_config
    from tether.models import load_tokenizer
    from tether.pipeline import Pipeline

    other = load_tokenizer(tiny_path)
    other.add_tokens(["<wizard>"])
    folder = tmp_path / "other_rm"
    shutil.copytree(tiny_path, folder)
    other.save_pretrained(folder)
    p = Pipeline(load_config(preset="tiny", overrides=[f"out={tmp_path / 'run'}", f"monitor.heldout_rm={folder}"]))
    with pytest.raises(ConfigError, match=r"monitor\.heldout_rm .* does not use the policy's tokenizer"):
        p.make_monitor("ppo", None, None, 10, None)


# ----------------------------------------------------------------------------- fuzzing

FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])
WORKDIR = Path(tempfile.mkdtemp(prefix="tether-fuzz-"))  # one file rewritten per example (no tmp_path per example)


@pytest.fixture(scope="module", autouse=True)
def _remove_workdir():
    yield
    shutil.rmtree(WORKDIR, ignore_errors=True)

RECORD_FIELDS = ["prompt", "response", "completion", "messages", "chosen", "rejected", "responses", "ranking",
                 "rater", "tie", "strength", "soft_label", "gold", "item", "source", "role", "content"]
ROLES = ["system", "user", "assistant", "wizard", "", "USER"]

_text = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", " ", "\n", "\x00", "\u202e", "[/bold]", "\ufeff"]),
    st.builds(lambda a, c, b: a + c + b, st.text(max_size=4), st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
              st.text(max_size=4)),  # a lone surrogate
)
_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=-(10**30), max_value=10**30),
                    st.floats(allow_nan=True, allow_infinity=True), _text)
_json = st.recursive(_scalar, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                     st.dictionaries(st.one_of(st.sampled_from(RECORD_FIELDS), _text),
                                                                     kids, max_size=4)),
                     max_leaves=12)
_message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": st.one_of(_text, _scalar)}),
    st.fixed_dictionaries({"role": st.sampled_from(ROLES)}),
    _json,
)
_messages = st.lists(_message, max_size=4)
_turns = st.one_of(_text, _messages, _json)
_ranking = st.lists(st.one_of(st.integers(-1, 4), st.lists(st.integers(-1, 4), max_size=3), _scalar), max_size=6)
_field_value = {
    "prompt": _turns, "response": _turns, "completion": _turns, "messages": _messages, "chosen": _turns,
    "rejected": _turns, "responses": st.lists(_turns, max_size=6), "ranking": _ranking,
    "gold": st.lists(_scalar, max_size=6), "tie": _scalar, "strength": _scalar, "soft_label": _scalar,
}
_record = st.lists(
    st.one_of(st.sampled_from(RECORD_FIELDS).flatmap(lambda k: st.tuples(st.just(k), _field_value.get(k, _json))),
              st.tuples(_text, _json)),
    max_size=7,
).map(dict)


TEMPLATES = [
    {"prompt": "p", "response": "r"},
    {"prompt": "p", "completion": "r"},
    {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "q"},
                  {"role": "assistant", "content": "a"}]},
    {"prompt": "p", "chosen": "a", "rejected": "b", "rater": "x", "strength": 1, "soft_label": 0.7},
    {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
     "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}], "tie": True},
    {"prompt": [{"role": "user", "content": "q"}], "responses": ["a", "b", "c"], "ranking": [2, [0, 1]], "gold": [1, 0, 2]},
]
DELETE = object()


def _mutate(template: dict, changes: list) -> dict:
    record = copy.deepcopy(template)
    for key, value in changes:
        if value is DELETE:
            record.pop(key, None)
        else:
            record[key] = value
    return record


# a valid record with a field or two changed or removed: reaches the checks after the first
_near_valid = st.builds(_mutate, st.sampled_from(TEMPLATES), st.lists(
    st.sampled_from(RECORD_FIELDS).flatmap(lambda k: st.tuples(st.just(k), st.one_of(
        st.just(DELETE), _field_value.get(k, _json)))), min_size=0, max_size=2))


def _line(record, ensure_ascii: bool) -> bytes:
    return json.dumps(record, ensure_ascii=ensure_ascii, allow_nan=True).encode("utf-8", "surrogatepass")


_lines = st.lists(
    st.one_of(
        st.tuples(_record, st.booleans()).map(lambda t: _line(*t)),
        st.tuples(_near_valid, st.booleans()).map(lambda t: _line(*t)),
        _json.map(lambda v: _line(v, True)),
        st.binary(max_size=40).map(lambda b: b.replace(b"\n", b" ")),
        st.sampled_from([b"", b"   ", b"\xef\xbb\xbf{}", b"NaN", b"{" * 2000, b'{"prompt": 1e999}']),
    ),
    min_size=1, max_size=5,
)

# a few valid records too, so the fuzz also walks the success paths to the end
_valid = st.one_of(
    st.builds(lambda p, r: {"prompt": p, "response": r}, st.text(min_size=1).filter(str.strip),
              st.text(min_size=1).filter(str.strip)),
    st.builds(lambda p, k, rater: {"prompt": p, "responses": [f"r{i}" for i in range(k)], "ranking": list(range(k))[::-1],
                                   "rater": rater},
              st.text(min_size=1).filter(str.strip), st.integers(2, 5), st.one_of(st.none(), st.text(max_size=5))),
)


def _fuzz_file(lines: list[bytes]) -> Path:
    path = WORKDIR / "fuzz.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


OURS = (DataError, ChatFormatError, StoreError, ConfigError)


def _ours_only(fn):
    """Call ``fn``; only our documented errors may come out, each naming the file."""
    try:
        return fn()
    except OURS as exc:
        assert str(exc), "an error without a message"
        return exc


@FUZZ
@given(lines=_lines, valid=st.lists(_valid, max_size=2))
def test_fuzz_loaders(lines, valid):
    path = _fuzz_file([json.dumps(v).encode() for v in valid] + lines)
    for load in (lambda: list(read_jsonl(path)), lambda: list(iter_records(path)), lambda: detect_kind(path),
                 lambda: load_demonstrations(path), lambda: file_stats(path, "demos"), lambda: file_stats(path, "rankings"),
                 lambda: rankings_to_pairs(load_rankings(path)), lambda: load_rankings(path, allow_empty_responses=True),
                 lambda: _read_groups(path)):
        out = _ours_only(load)
        if isinstance(out, DataError):
            assert out.path == str(path), str(out)
            assert str(out).startswith(str(path)), str(out)


@FUZZ
@given(record=_near_valid, ensure_ascii=st.booleans())
def test_fuzz_one_near_valid_record(record, ensure_ascii):
    """One record, a valid one with a field or two changed: every check past the first is reached."""
    path = _fuzz_file([_line(record, ensure_ascii)])
    for load in (lambda: load_demonstrations(path), lambda: rankings_to_pairs(load_rankings(path)),
                 lambda: file_stats(path), lambda: _read_groups(path)):
        out = _ours_only(load)
        if isinstance(out, DataError):
            assert str(out).startswith(f"{path}:1:") or str(out).startswith(f"{path}: no "), str(out)


@FUZZ
@given(lines=_lines)
def test_fuzz_label_import_cli(lines):
    path = _fuzz_file(lines)
    db = WORKDIR / "labels.sqlite"
    before = LabelStore(db).progress()["items"]
    rc = main(["label", "import", str(path), "--db", str(db)])
    after = LabelStore(db).progress()["items"]
    assert rc in (0, 2)
    assert (after > before) == (rc == 0)


VALID_KEYS = _valid_keys(RunConfig)
_config_value = st.one_of(_json, st.sampled_from(["ppo", "dpo", "tiny", "off", "rm", "true", "1e-3", "0.9,0.99", "-1"]))


def _nested(pairs) -> dict:
    out: dict = {}
    for key, value in pairs:
        node = out
        parts = str(key).split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return out


_config_dict = st.lists(st.tuples(st.one_of(st.sampled_from(VALID_KEYS), _text), _config_value), max_size=6).map(_nested)


@FUZZ
@given(data=_config_dict)
def test_fuzz_config_from_dict(data):
    out = _ours_only(lambda: config_from_dict(data))
    assert isinstance(out, (RunConfig, ConfigError))


@FUZZ
@given(data=_config_dict, raw=st.binary(max_size=60), as_yaml=st.booleans())
def test_fuzz_config_files(data, raw, as_yaml):
    path = WORKDIR / "fuzz.yaml"
    if as_yaml:
        path.write_text(yaml.safe_dump(data, allow_unicode=False), encoding="utf-8")
    else:
        path.write_bytes(raw)
    out = _ours_only(lambda: load_config(path))
    assert isinstance(out, (RunConfig, ConfigError))


_override = st.one_of(
    st.text(max_size=30),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(VALID_KEYS), st.text(max_size=20)),
    st.builds(lambda k, v: f"--{k}={json.dumps(v, allow_nan=True)}", st.sampled_from(VALID_KEYS), _json),
)


@FUZZ
@given(items=st.lists(_override, max_size=3))
def test_fuzz_overrides(items):
    for item in items:
        out = _ours_only(lambda: parse_override(item))
        assert isinstance(out, (tuple, ConfigError))
    out = _ours_only(lambda: load_config(preset="tiny", overrides=items))
    assert isinstance(out, (RunConfig, ConfigError))


@pytest.fixture(scope="module")
def no_template_tokenizer(tiny_tokenizer):
    return _no_template(tiny_tokenizer)


@FUZZ
@given(messages=st.one_of(_messages, _json), template=st.booleans())
def test_fuzz_chat_messages(tiny_tokenizer, no_template_tokenizer, messages, template):
    from tether.data.tokenize import chat_prompt_ids

    tok = tiny_tokenizer if template else no_template_tokenizer
    try:
        checked = check_messages(messages)
    except ChatFormatError:
        with pytest.raises(ChatFormatError):
            chat_prompt_ids(tok, messages)
        return
    ids = chat_prompt_ids(tok, messages)
    assert ids and all(isinstance(i, int) for i in ids) and len(checked) == len(messages)
