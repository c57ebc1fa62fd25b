"""Tests for tether.data: JSONL reading and its errors, record schemas, rankings → pairs,
atomic writing, the token Encoder and ``tether data validate``."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import pytest

import tether.data.io as data_io
from tether.cli import main
from tether.data import (
    DataError,
    Encoder,
    Ranking,
    load_demonstrations,
    load_rankings,
    parse_demonstration,
    parse_ranking,
    rankings_to_pairs,
    read_jsonl,
    write_json,
    write_jsonl,
)
from tether.data.io import atomic_write_text


def _lines(path: Path, *lines: str | bytes) -> Path:
    """Write raw lines (str or bytes), each followed by a newline."""
    raw = b"".join((ln if isinstance(ln, bytes) else ln.encode("utf-8")) + b"\n" for ln in lines)
    path.write_bytes(raw)
    return path


def _jl(path: Path, *records) -> Path:
    return _lines(path, *(json.dumps(r) for r in records))


def _raises(fn, path: Path, line: int | None, field: str | None = None, match: str | None = None) -> DataError:
    """Call ``fn`` and check the DataError names file, line and field."""
    with pytest.raises(DataError) as info:
        fn()
    err = info.value
    msg = str(err)
    assert str(path) in msg, msg
    assert err.path == str(path)
    assert err.line == line, msg
    if line is not None:
        assert msg.startswith(f"{path}:{line}:"), msg
    assert err.field == field, msg
    if field is not None:
        assert f"field '{field}'" in msg, msg
    if match is not None:
        assert re.search(match, msg), msg
    return err


def _demos(path):
    return lambda: load_demonstrations(path)


def _ranks(path, **kw):
    return lambda: load_rankings(path, **kw)


GOOD = {"prompt": "write three words about fruits", "response": "apple pear fig"}


# ----------------------------------------------------------------------------- read_jsonl


def test_read_jsonl_yields_line_numbers_and_skips_blank_lines(tmp_path):
    path = _lines(tmp_path / "d.jsonl", json.dumps({"a": 1}), "", "   ", json.dumps({"a": 2}), "\t")
    assert list(read_jsonl(path)) == [(1, {"a": 1}), (4, {"a": 2})]


def test_malformed_json_line(tmp_path):
    path = _lines(tmp_path / "d.jsonl", json.dumps(GOOD), '{"prompt": "x", "response": ', json.dumps(GOOD))
    _raises(_demos(path), path, 2, match="malformed JSON")


def test_malformed_json_after_blank_lines_counts_them(tmp_path):
    path = _lines(tmp_path / "d.jsonl", json.dumps(GOOD), "", "", "{not json}")
    _raises(_demos(path), path, 4, match="malformed JSON")


def test_line_not_an_object(tmp_path):
    path = _lines(tmp_path / "d.jsonl", json.dumps(GOOD), json.dumps(["prompt", "response"]))
    _raises(_demos(path), path, 2, match="expected a JSON object, got list")


def test_blank_lines_do_not_shift_field_errors(tmp_path):
    path = _lines(tmp_path / "d.jsonl", "", json.dumps(GOOD), "", json.dumps({"prompt": "p", "response": ""}))
    _raises(_demos(path), path, 4, field="response")


def test_invalid_utf8_line(tmp_path):
    path = _lines(tmp_path / "d.jsonl", json.dumps(GOOD), b'{"prompt": "\xff\xfe", "response": "x"}')
    _raises(_demos(path), path, 2, match="not valid UTF-8")


def test_line_over_max_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(data_io, "MAX_LINE_BYTES", 100)
    path = _lines(tmp_path / "d.jsonl", json.dumps(GOOD), json.dumps({"prompt": "p", "response": "x" * 200}), json.dumps(GOOD))
    _raises(_demos(path), path, 2, match=r"line is 232 bytes, more than the 100 allowed")


def test_line_at_max_bytes_is_fine(tmp_path, monkeypatch):
    line = json.dumps(GOOD)
    monkeypatch.setattr(data_io, "MAX_LINE_BYTES", len(line) + 1)  # + the newline
    path = _lines(tmp_path / "d.jsonl", line)
    assert len(load_demonstrations(path)) == 1


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    _raises(_demos(path), path, None, match="file not found")
    _raises(_ranks(path), path, None, match="file not found")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    _raises(_demos(path), path, None, match="no demonstrations")
    _raises(_ranks(path), path, None, match="no rankings")


def test_only_blank_lines_is_empty(tmp_path):
    path = _lines(tmp_path / "blank.jsonl", "", "  ")
    _raises(_demos(path), path, None, match="no demonstrations")


# ----------------------------------------------------------------------------- demonstrations


def test_valid_demonstrations(tmp_path):
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "fruits"}]
    path = _jl(tmp_path / "d.jsonl", GOOD, {"prompt": chat, "response": "fig"})
    demos = load_demonstrations(path)
    assert [d.response for d in demos] == ["apple pear fig", "fig"]
    assert demos[0].prompt == GOOD["prompt"]
    assert demos[1].prompt == chat


@pytest.mark.parametrize(
    "record, field, match",
    [
        ({"prompt": "p"}, "response", "missing"),
        ({"prompt": "p", "response": ""}, "response", "non-empty"),
        ({"prompt": "p", "response": "  \n\t"}, "response", "non-empty"),
        ({"prompt": "p", "response": 3}, "response", "must be a string, got int"),
        ({"prompt": "p", "response": ["a"]}, "response[0]", "must be an object with role and content"),
        ({"prompt": "p", "response": None}, "response", "must be a string"),
        ({"response": "r"}, "prompt", "missing"),
        ({"prompt": "  ", "response": "r"}, "prompt", "non-empty"),
        ({"prompt": 5, "response": "r"}, "prompt", "string or a list of chat messages"),
        ({"prompt": [], "response": "r"}, "prompt", "must not be empty"),
        ({"prompt": [{"role": "robot", "content": "hi"}], "response": "r"}, "prompt[0].role", "unknown chat role 'robot'"),
        ({"prompt": [{"content": "hi"}], "response": "r"}, "prompt[0].role", "unknown chat role None"),
        (
            {"prompt": [{"role": "user", "content": "a"}, "hello"], "response": "r"},
            "prompt[1]",
            "must be an object",
        ),
        ({"prompt": [{"role": "user", "content": 7}], "response": "r"}, "prompt[0].content", "content must be a string"),
        ({"prompt": [{"role": "user"}], "response": "r"}, "prompt[0].content", "content must be a string"),
    ],
)
def test_bad_demonstration(tmp_path, record, field, match):
    path = _jl(tmp_path / "d.jsonl", GOOD, GOOD, record)
    _raises(_demos(path), path, 3, field=field, match=match)


def test_parse_demonstration_without_file():
    with pytest.raises(DataError, match=r"<record>: field 'response': missing"):
        parse_demonstration({"prompt": "p"})
    demo = parse_demonstration({"prompt": [{"role": "user", "content": "x"}], "response": "y"})
    assert demo.response == "y"


# ----------------------------------------------------------------------------- rankings


def test_chosen_rejected_pair(tmp_path):
    path = _jl(tmp_path / "p.jsonl", {"prompt": "p", "chosen": "good", "rejected": "bad", "rater": "labeler-1"})
    [r] = load_rankings(path)
    assert r.responses == ["good", "bad"]
    assert r.order == [0, 1]
    assert r.ranked() == ["good", "bad"]
    assert r.rater == "labeler-1"


def test_responses_and_ranking(tmp_path):
    rec = {"prompt": "p", "responses": ["r0", "r1", "r2", "r3"], "ranking": [2, 0, 3, 1], "rater": "labeler-3"}
    path = _jl(tmp_path / "r.jsonl", rec)
    [r] = load_rankings(path)
    assert r.ranked() == ["r2", "r0", "r3", "r1"]
    assert r.rater == "labeler-3"


def test_integer_rater_becomes_string_and_missing_rater_is_none():
    assert parse_ranking({"prompt": "p", "chosen": "a", "rejected": "b", "rater": 7}).rater == "7"
    assert parse_ranking({"prompt": "p", "chosen": "a", "rejected": "b"}).rater is None


RESP3 = ["a", "b", "c"]


@pytest.mark.parametrize(
    "record, field, match",
    [
        ({"prompt": "p", "responses": RESP3, "ranking": [0, 1, 1]}, "ranking", "permutation of 0..2"),
        ({"prompt": "p", "responses": RESP3, "ranking": [0, 1]}, "ranking", "permutation"),
        ({"prompt": "p", "responses": RESP3, "ranking": [1, 2, 3]}, "ranking", "permutation"),
        ({"prompt": "p", "responses": RESP3, "ranking": "0,1,2"}, "ranking", "permutation"),
        ({"prompt": "p", "responses": ["a", "b"], "ranking": [True, False]}, "ranking", "permutation"),
        ({"prompt": "p", "responses": ["a", "b"], "ranking": [1.0, 0.0]}, "ranking", "permutation"),
        ({"prompt": "p", "responses": RESP3}, "ranking", "missing"),
        ({"prompt": "p", "responses": ["only"], "ranking": [0]}, "responses", "at least 2"),
        ({"prompt": "p", "responses": "ab", "ranking": [0, 1]}, "responses", "at least 2"),
        ({"prompt": "p", "responses": ["a", ""], "ranking": [0, 1]}, "responses[1]", "non-empty"),
        ({"prompt": "p", "responses": ["a", 2], "ranking": [0, 1]}, "responses[1]", "must be a string, got int"),
        ({"prompt": "p", "ranking": [0, 1]}, "responses", "missing"),
        ({"prompt": "p", "chosen": "a"}, "rejected", "missing"),
        ({"prompt": "p", "rejected": "b"}, "chosen", "missing"),
        ({"prompt": "p", "chosen": "a", "rejected": ""}, "rejected", "non-empty"),
        ({"prompt": "p", "chosen": "a", "rejected": "b", "rater": {"id": 1}}, "rater", "must be a string, got dict"),
        ({"prompt": "p", "chosen": "a", "rejected": "b", "rater": ["x"]}, "rater", "must be a string"),
        ({"prompt": [{"role": "bot", "content": "x"}], "chosen": "a", "rejected": "b"}, "prompt[0].role", "unknown chat role"),
    ],
)
def test_bad_ranking(tmp_path, record, field, match):
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    path = _jl(tmp_path / "r.jsonl", good, record)
    _raises(_ranks(path), path, 2, field=field, match=match)


def test_empty_responses_allowed_when_asked(tmp_path):
    path = _jl(tmp_path / "r.jsonl", {"prompt": "p", "responses": ["a", "", " "], "ranking": [0, 2, 1]})
    _raises(_ranks(path), path, 1, field="responses[1]", match="non-empty")
    [r] = load_rankings(path, allow_empty_responses=True)
    assert r.ranked() == ["a", " ", ""]


def test_empty_pair_response_allowed_when_asked(tmp_path):
    # load_rankings: "Empty responses are errors unless allowed" -- pairs included
    # (a policy's own sample may be empty; ranking it low is what labelers should do).
    path = _jl(tmp_path / "p.jsonl", {"prompt": "p", "chosen": "a", "rejected": ""})
    _raises(_ranks(path), path, 1, field="rejected", match="non-empty")
    [r] = load_rankings(path, allow_empty_responses=True)
    assert r.ranked() == ["a", ""]


def test_non_string_response_rejected_even_when_empty_allowed(tmp_path):
    path = _jl(tmp_path / "r.jsonl", {"prompt": "p", "responses": ["a", None], "ranking": [0, 1]})
    _raises(_ranks(path, allow_empty_responses=True), path, 1, field="responses[1]", match="must be a string")


# ----------------------------------------------------------------------------- rankings → pairs


def test_rankings_to_pairs_k4():
    r = Ranking(prompt="p", responses=["r0", "r1", "r2", "r3"], order=[2, 0, 3, 1], rater="labeler-3")
    pairs = rankings_to_pairs([r])
    assert len(pairs) == 4 * 3 // 2
    got = [(p["chosen"], p["rejected"]) for p in pairs]
    assert got == [("r2", "r0"), ("r2", "r3"), ("r2", "r1"), ("r0", "r3"), ("r0", "r1"), ("r3", "r1")]
    best_first = r.ranked()
    for p in pairs:
        assert best_first.index(p["chosen"]) < best_first.index(p["rejected"])
        assert p["rater"] == "labeler-3"
        assert p["prompt"] == "p"
    assert len(set(got)) == len(got)


def test_rankings_to_pairs_several_rankings():
    a = Ranking("pa", ["x", "y"], [1, 0], "r1")
    b = Ranking("pb", ["u", "v", "w"], [0, 1, 2], None)
    pairs = rankings_to_pairs([a, b])
    assert len(pairs) == 1 + 3
    assert pairs[0] == {"prompt": "pa", "chosen": "y", "rejected": "x", "rater": "r1"}
    assert [p["prompt"] for p in pairs[1:]] == ["pb"] * 3
    assert all(p["rater"] is None for p in pairs[1:])


def test_loaded_file_to_pairs(tmp_path):
    path = _jl(
        tmp_path / "r.jsonl",
        {"prompt": "p", "responses": ["r0", "r1", "r2", "r3"], "ranking": [3, 2, 1, 0], "rater": "l0"},
        {"prompt": "q", "chosen": "c", "rejected": "d", "rater": "l1"},
    )
    pairs = rankings_to_pairs(load_rankings(path))
    assert len(pairs) == 6 + 1
    assert pairs[0] == {"prompt": "p", "chosen": "r3", "rejected": "r2", "rater": "l0"}
    assert pairs[-1] == {"prompt": "q", "chosen": "c", "rejected": "d", "rater": "l1"}


# ----------------------------------------------------------------------------- writing


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_write_jsonl_round_trip(tmp_path):
    path = tmp_path / "sub" / "out.jsonl"
    records = [GOOD, {"prompt": "unicode ✓", "response": "ok"}]
    assert write_jsonl(path, records) == path
    assert path.read_text(encoding="utf-8").endswith("\n")
    assert [rec for _, rec in read_jsonl(path)] == records
    assert "✓" in path.read_text(encoding="utf-8")  # ensure_ascii=False
    assert _siblings(path.parent) == ["out.jsonl"]


def test_write_jsonl_failure_keeps_original(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [GOOD])
    before = path.read_bytes()
    with pytest.raises(TypeError):
        write_jsonl(path, [GOOD, {"prompt": "p", "response": object()}])
    assert path.read_bytes() == before
    assert _siblings(tmp_path) == ["out.jsonl"]


def test_write_jsonl_generator_failing_midway_keeps_original(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [GOOD])
    before = path.read_bytes()

    def records():
        yield GOOD
        yield GOOD
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_jsonl(path, records())
    assert path.read_bytes() == before
    assert _siblings(tmp_path) == ["out.jsonl"]


def test_write_json_failure_keeps_original(tmp_path):
    path = tmp_path / "summary.json"
    write_json(path, {"a": Path("x")})
    assert json.loads(path.read_text()) == {"a": "x"}
    before = path.read_bytes()
    with pytest.raises(TypeError):
        write_json(path, {"a": object()})
    assert path.read_bytes() == before
    assert _siblings(tmp_path) == ["summary.json"]


def test_atomic_write_failure_during_write_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    atomic_write_text(path, "original\n")

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(data_io.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "new content that never lands\n")
    assert path.read_text() == "original\n"
    assert _siblings(tmp_path) == ["f.txt"]


def test_atomic_write_failure_at_rename_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    atomic_write_text(path, "original\n")
    real_replace = os.replace

    def broken_replace(src, dst):
        assert Path(src).read_text() == "replacement\n"  # the temp file was complete
        raise OSError("rename failed")

    monkeypatch.setattr(data_io.os, "replace", broken_replace)
    with pytest.raises(OSError, match="rename failed"):
        atomic_write_text(path, "replacement\n")
    monkeypatch.setattr(data_io.os, "replace", real_replace)
    assert path.read_text() == "original\n"
    assert _siblings(tmp_path) == ["f.txt"]


def test_atomic_write_replaces_completely(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write_text(path, "a much longer original text\n" * 10)
    atomic_write_text(path, "short\n")
    assert path.read_text() == "short\n"
    assert _siblings(tmp_path) == ["f.txt"]


# ----------------------------------------------------------------------------- Encoder


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tether import zoo
    from tether.models import load_tokenizer

    old = os.environ.get("TETHER_HOME")
    os.environ["TETHER_HOME"] = str(tmp_path_factory.mktemp("tether_home"))
    try:
        path = zoo.pull("tiny")
        tok = load_tokenizer(str(path))
    finally:
        if old is None:
            os.environ.pop("TETHER_HOME", None)
        else:
            os.environ["TETHER_HOME"] = old
    return tok


def _words(n: int) -> str:
    vocab = ["apple", "pear", "plum", "fig", "cat", "dog", "cow", "fox"]
    return " ".join(vocab[i % len(vocab)] for i in range(n))


def test_encoder_short_example_not_cut(tokenizer):
    enc = Encoder(tokenizer, max_length=64, max_prompt_length=32)
    p, r = enc.example("apple pear", "cat dog")
    assert r[-1] == tokenizer.eos_token_id == enc.eos_id
    assert r[:-1] == tokenizer("cat dog", add_special_tokens=False)["input_ids"]
    expected_prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "apple pear"}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert p == list(expected_prompt)
    assert enc.stats.prompts_cut == 0 and enc.stats.responses_cut == 0
    assert enc.stats.seen == 1
    assert enc.stats.summary() is None


def test_encoder_prompt_cut_from_left(tokenizer):
    full = Encoder(tokenizer, max_length=256, max_prompt_length=200).prompt_ids(_words(40))
    enc = Encoder(tokenizer, max_length=32, max_prompt_length=10)
    assert len(full) > 10
    p, r = enc.example(_words(40), "cat")
    assert p == full[-10:]  # the end of the prompt (the generation prompt) survives
    assert len(p) + len(r) <= 32
    assert enc.stats.prompts_cut == 1
    assert enc.stats.responses_cut == 0
    summary = enc.stats.summary()
    assert summary is not None and "1 of 1 prompts" in summary and "left" in summary
    enc.example("apple", "cat")
    assert enc.stats.prompts_cut == 1 and enc.stats.seen == 2


def test_encoder_response_cut_to_budget(tokenizer):
    enc = Encoder(tokenizer, max_length=16, max_prompt_length=8)
    p, r = enc.example("apple", _words(30))
    assert len(p) + len(r) == 16
    assert r == tokenizer(_words(30), add_special_tokens=False)["input_ids"][: 16 - len(p)]
    assert enc.stats.responses_cut == 1
    assert enc.stats.prompts_cut == 0
    summary = enc.stats.summary()
    assert summary is not None and "1 responses" in summary


def test_encoder_response_exactly_fits(tokenizer):
    enc = Encoder(tokenizer, max_length=64, max_prompt_length=32)
    p = enc.prompt_ids("apple")
    words = tokenizer("cat dog cow", add_special_tokens=False)["input_ids"]
    r = enc.response_ids("cat dog cow", budget=len(words) + 1)
    assert r == words + [enc.eos_id]
    assert enc.stats.responses_cut == 0
    assert p


def test_encoder_decode_stops_at_eos(tokenizer):
    enc = Encoder(tokenizer, max_length=64, max_prompt_length=32)
    _, r = enc.example("apple", "cat dog")
    after = tokenizer("fox cow", add_special_tokens=False)["input_ids"]
    assert enc.decode(r + after) == "cat dog"
    assert enc.decode(r[:-1] + after) == "cat dog fox cow"  # no EOS: everything
    import torch

    assert enc.decode(torch.tensor(r + after)) == "cat dog"


def test_encoder_pad_id_falls_back_to_eos(tokenizer):
    tok = copy.deepcopy(tokenizer)
    assert Encoder(tok, 16, 8).pad_id == tok.pad_token_id
    tok.pad_token = None
    assert Encoder(tok, 16, 8).pad_id == tok.eos_token_id


def test_encoder_without_eos_raises(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.eos_token = None
    assert tok.eos_token_id is None
    with pytest.raises(ValueError, match=r"no eos_token"):
        Encoder(tok, max_length=16, max_prompt_length=8)


def test_encoder_without_chat_template_uses_role_content(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    enc = Encoder(tok, max_length=64, max_prompt_length=32)
    assert not enc.has_template
    ids = enc.prompt_ids("apple pear")
    assert ids == tok("user: apple pear\nassistant: ", add_special_tokens=True)["input_ids"]
    assert ids != Encoder(tokenizer, 64, 32).prompt_ids("apple pear")
    assert tokenizer.chat_template  # the original is unchanged


class _RecordingTokenizer:
    """Minimal tokenizer without a chat template that records the text it is given."""

    chat_template = None
    eos_token_id = 99
    pad_token_id = None

    def __init__(self):
        self.texts = []

    def __call__(self, text, add_special_tokens=True):
        self.texts.append(text)
        return {"input_ids": [ord(c) % 50 for c in text]}


def test_role_content_fallback_text():
    tok = _RecordingTokenizer()
    enc = Encoder(tok, max_length=512, max_prompt_length=256)
    enc.prompt_ids([{"role": "system", "content": "be brief"}, {"role": "user", "content": "fruits"}])
    enc.prompt_ids("hello")
    assert tok.texts == ["system: be brief\nuser: fruits\nassistant: ", "user: hello\nassistant: "]
    assert enc.pad_id == 99


# ----------------------------------------------------------------------------- CLI


def test_cli_validate_demos(tmp_path, capsys):
    path = _jl(tmp_path / "demos.jsonl", GOOD, GOOD, GOOD)
    assert main(["data", "validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{path}: 3 valid demonstrations" in out


def test_cli_validate_rankings(tmp_path, capsys):
    path = _jl(
        tmp_path / "r.jsonl",
        {"prompt": "p", "responses": ["a", "b", "c", "d"], "ranking": [0, 1, 2, 3]},
        {"prompt": "p", "chosen": "a", "rejected": "b"},
    )
    assert main(["data", "validate", str(path)]) == 0
    assert "2 valid rankings (7 pairs)" in capsys.readouterr().out


def test_cli_validate_bad_demos(tmp_path, capsys):
    path = _jl(tmp_path / "demos.jsonl", GOOD, {"prompt": "p", "response": "  "}, GOOD)
    assert main(["data", "validate", str(path)]) == 2
    captured = capsys.readouterr()
    assert f"{path}:2: field 'response'" in captured.err
    assert "valid demonstrations" not in captured.out


def test_cli_validate_forced_kind(tmp_path, capsys):
    path = _jl(tmp_path / "demos.jsonl", GOOD)
    assert main(["data", "validate", str(path), "--kind", "rankings"]) == 2
    assert f"{path}:1: field 'responses'" in capsys.readouterr().err


def test_cli_validate_malformed_and_missing(tmp_path, capsys):
    path = _lines(tmp_path / "bad.jsonl", "{oops")
    assert main(["data", "validate", str(path)]) == 2
    assert f"{path}:1:" in capsys.readouterr().err
    missing = tmp_path / "missing.jsonl"
    assert main(["data", "validate", str(missing)]) == 2
    assert "file not found" in capsys.readouterr().err
