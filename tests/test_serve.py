"""`tether serve`: the OpenAI-compatible chat API on the tiny model, in process (TestClient)
and, once, over real HTTP with uvicorn in a thread."""

from __future__ import annotations

import argparse
import copy
import json
import threading
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from tether.cli import add_serve_parser
from tether.serve import (
    cmd_serve,
    create_app,
    default_model_name,
    parse_chat_request,
    prompt_ids,
    resolve_checkpoint,
    serve_in_thread,
)

pytestmark = pytest.mark.smoke

HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def app(tiny_path):
    return create_app(tiny_path)


@pytest.fixture(scope="module")
def client(app):
    return TestClient(app)


def chat(client, **body):
    response = client.post("/v1/chat/completions", json={"messages": HELLO, **body})
    assert response.status_code == 200, response.text
    return response.json()


def sse_events(lines) -> list:
    """The decoded ``data:`` payloads of a Server-Sent Events body ("[DONE]" kept as is)."""
    events = []
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def check_stream(events, name: str) -> tuple[str, str, list]:
    """Check the chunk protocol; return (text, finish_reason, logprob entries)."""
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == name for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["delta"] == {}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    entries = [e for c in chunks if c["choices"][0]["logprobs"] for e in c["choices"][0]["logprobs"]["content"]]
    return text, chunks[-1]["choices"][0]["finish_reason"], entries


def direct_logprobs(app, tokens: list[str]) -> torch.Tensor:
    """Log-softmax of one forward pass over prompt + ``tokens``: [len(tokens), vocab], the
    distribution each generated token was drawn from."""
    model = app.state.chat.model
    tok = app.state.chat.tokenizer
    prompt = prompt_ids(tok, HELLO)
    ids = prompt + tok.convert_tokens_to_ids(tokens)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, -1)[len(prompt) - 1 : len(ids) - 1]


def test_models_and_health(client):
    assert client.get("/health").json() == {"status": "ok", "model": "tiny"}
    listing = client.get("/v1/models").json()
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == ["tiny"]
    assert listing["data"][0]["object"] == "model"


def test_completion_shape_and_greedy_determinism(client):
    out = chat(client, model="anything", max_tokens=6, temperature=0)
    assert out["object"] == "chat.completion"
    assert out["id"].startswith("chatcmpl-")
    assert out["model"] == "tiny" and isinstance(out["created"], int)
    (choice,) = out["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and choice["message"]["content"]
    assert choice["logprobs"] is None
    usage = out["usage"]
    assert usage["prompt_tokens"] == len(prompt_ids(client.app.state.chat.tokenizer, HELLO))
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    again = chat(client, max_tokens=6, temperature=0)
    assert again["choices"][0]["message"] == choice["message"]


def test_max_tokens_gives_length(client):
    for key in ("max_tokens", "max_completion_tokens"):
        out = chat(client, **{key: 3}, temperature=0, logprobs=True)
        assert out["choices"][0]["finish_reason"] == "length"
        assert out["usage"]["completion_tokens"] == 3
        assert len(out["choices"][0]["logprobs"]["content"]) == 3


def test_logprobs_match_a_direct_forward(app, client):
    out = chat(client, max_tokens=5, temperature=0, logprobs=True, top_logprobs=5)
    entries = out["choices"][0]["logprobs"]["content"]
    assert len(entries) == 5
    reference = direct_logprobs(app, [e["token"] for e in entries])
    for entry, ref in zip(entries, reference):
        tops = entry["top_logprobs"]
        assert len(tops) == 5
        values = [t["logprob"] for t in tops]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        assert entry["logprob"] <= 0
        assert tops[0]["token"] == entry["token"]  # greedy picks the most likely token
        assert entry["bytes"] == list(entry["token"].encode())
        token_id = app.state.chat.tokenizer.convert_tokens_to_ids(entry["token"])
        assert entry["logprob"] == pytest.approx(float(ref[token_id]), abs=1e-4)
        ref_top = torch.topk(ref, 5)
        assert values == pytest.approx(ref_top.values.tolist(), abs=1e-4)


def test_logprobs_ignore_temperature_and_sampling_is_seeded(app, client):
    """Sampled at temperature 1.5, the log-probs are still the raw model's; a seed repeats a sample."""
    out = chat(client, max_tokens=8, temperature=1.5, seed=3, logprobs=True, top_logprobs=2)
    entries = out["choices"][0]["logprobs"]["content"]
    reference = direct_logprobs(app, [e["token"] for e in entries])
    tok = app.state.chat.tokenizer
    for entry, ref in zip(entries, reference):
        assert entry["logprob"] == pytest.approx(float(ref[tok.convert_tokens_to_ids(entry["token"])]), abs=1e-4)
    assert chat(client, max_tokens=8, temperature=1.5, seed=3)["choices"][0]["message"] == out["choices"][0]["message"]
    # a vanishing top_p keeps only the most likely token: greedy
    greedy = chat(client, max_tokens=8, temperature=0)["choices"][0]["message"]
    assert chat(client, max_tokens=8, temperature=1.0, top_p=1e-6, seed=5)["choices"][0]["message"] == greedy


def test_stop_strings_cut_the_text(client):
    full = chat(client, max_tokens=20, temperature=1.0, seed=1)["choices"][0]["message"]["content"]
    words = full.split()
    assert len(words) >= 6
    stop = " " + words[4]
    cut = full[: full.index(stop)]
    out = chat(client, max_tokens=20, temperature=1.0, seed=1, stop=[stop, "no such words"], logprobs=True)
    choice = out["choices"][0]
    assert choice["message"]["content"] == cut
    assert choice["finish_reason"] == "stop"
    assert len(choice["logprobs"]["content"]) == len(cut.split())
    with client.stream("POST", "/v1/chat/completions",
                       json={"messages": HELLO, "max_tokens": 20, "temperature": 1.0, "seed": 1, "stop": stop,
                             "stream": True}) as response:
        text, finish, _ = check_stream(sse_events(response.iter_lines()), "tiny")
    assert (text, finish) == (cut, "stop")


def test_end_of_sequence_gives_stop(app, client, monkeypatch):
    chat_model = app.state.chat
    first = chat(client, max_tokens=1, temperature=0, logprobs=True)["choices"][0]["logprobs"]["content"][0]
    monkeypatch.setattr(chat_model, "eos_ids", {chat_model.tokenizer.convert_tokens_to_ids(first["token"])})
    out = chat(client, max_tokens=5, temperature=0, logprobs=True)
    assert out["choices"][0]["message"]["content"] == ""
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["choices"][0]["logprobs"]["content"] == []
    assert out["usage"]["completion_tokens"] == 1


def test_streaming_matches_the_plain_reply(client):
    plain = chat(client, max_tokens=7, temperature=0, logprobs=True, top_logprobs=3)
    body = {"messages": HELLO, "max_tokens": 7, "temperature": 0, "stream": True, "logprobs": True,
            "top_logprobs": 3, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response.iter_lines())
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == plain["usage"]
    text, finish, entries = check_stream(events[:-2] + ["[DONE]"], "tiny")
    assert text == plain["choices"][0]["message"]["content"]
    assert finish == plain["choices"][0]["finish_reason"] == "length"
    assert entries == plain["choices"][0]["logprobs"]["content"]
    assert len(events) >= 7 + 3  # role chunk, a chunk per token here, finish, usage, [DONE]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "bot", "content": "hi"}]}, "messages[0].role"),
        ({"messages": []}, "messages"),
        ({}, "messages"),
        ({"messages": HELLO, "n": 2}, "n"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": HELLO, "max_tokens": 0}, "max_tokens"),
        ({"messages": HELLO, "temperature": -1}, "temperature"),
        ({"messages": HELLO, "top_p": 0}, "top_p"),
        ({"messages": HELLO, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"messages": HELLO, "top_logprobs": 2}, "top_logprobs"),
        ({"messages": HELLO, "stop": ["ok", ""]}, "stop"),
        ({"messages": HELLO, "stream": "yes"}, "stream"),
        ({"messages": [{"role": "user", "content": "hello " * 300}]}, "messages"),  # over the 256-token context
    ],
)
def test_bad_requests_get_openai_errors(client, body, param):
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]


def test_chat_template_errors_are_bad_requests(app, client, monkeypatch):
    monkeypatch.setattr(app.state.chat.tokenizer, "chat_template", "{{ raise_exception('System role not supported') }}")
    response = client.post("/v1/chat/completions", json={"messages": [{"role": "system", "content": "x"}]})
    assert response.status_code == 400
    assert "System role not supported" in response.json()["error"]["message"]


def test_malformed_json_and_unknown_routes(client):
    response = client.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    assert client.post("/v1/chat/completions", json=[1]).status_code == 400
    assert client.get("/v1/nothing").status_code == 404
    assert "error" in client.get("/v1/nothing").json()


def test_text_parts_and_limits(tiny_path):
    limited = TestClient(create_app(tiny_path, model_name="judge", max_new_tokens_limit=3))
    out = limited.post("/v1/chat/completions", json={
        "messages": [{"role": "system", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "hello"}]}],
        "max_tokens": 50, "temperature": 0,
    }).json()
    assert out["model"] == "judge"
    assert out["usage"]["completion_tokens"] == 3 and out["choices"][0]["finish_reason"] == "length"


def test_prompt_fallback_without_chat_template(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    messages = [{"role": "system", "content": "red"}, {"role": "user", "content": "blue"}]
    expected = tok("system: red\nuser: blue\nassistant: ", add_special_tokens=True)["input_ids"]
    assert prompt_ids(tok, messages) == list(expected)
    assert prompt_ids(tiny_tokenizer, messages) != list(expected)  # the tiny model has a template


def test_parse_defaults():
    req = parse_chat_request({"messages": HELLO, "stop": "x", "model": "whatever", "frequency_penalty": 0})
    assert (req.max_tokens, req.temperature, req.top_p, req.stop, req.stream, req.logprobs) == (
        None, 1.0, 1.0, ["x"], False, False)


def test_checkpoint_resolution_parser_and_cmd(tiny_path, tmp_path, monkeypatch, capsys):
    stage = tmp_path / "runs" / "default" / "ppo"
    stage.mkdir(parents=True)
    (stage / "checkpoint").symlink_to(tiny_path, target_is_directory=True)
    assert resolve_checkpoint(str(stage)) == str(stage / "checkpoint")
    assert default_model_name(str(stage)) == "ppo"
    assert default_model_name("tiny") == "tiny"
    with pytest.raises(FileNotFoundError, match="checkpoint/"):
        resolve_checkpoint(str(tmp_path / "runs"))

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", str(stage), "--port", "8123"])
    assert (args.command, args.checkpoint, args.host, args.port, args.model_name) == (
        "serve", str(stage), "127.0.0.1", 8123, None)

    import uvicorn

    ran = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: ran.update(app=app, host=host, port=port))
    assert cmd_serve(args) == 0
    assert (ran["host"], ran["port"], ran["app"].state.model_name) == ("127.0.0.1", 8123, "ppo")
    printed = capsys.readouterr().out
    assert "http://127.0.0.1:8123/v1" in printed and "curl http://127.0.0.1:8123/v1/chat/completions" in printed


class _Gate:
    """Wraps the model: its third forward pass waits (up to 10 s) for the client to have
    received streamed text, which only happens if the server streams as it generates."""

    def __init__(self, model):
        self.model = model
        self.calls = 0
        self.released = threading.Event()
        self.streamed_before_done: bool | None = None

    def __call__(self, **kwargs):
        self.calls += 1
        if self.calls == 3:
            self.streamed_before_done = self.released.wait(10)
        return self.model(**kwargs)


class _Counter:
    """Wraps the model: counts forward passes, each slowed down a little."""

    def __init__(self, model):
        self.model = model
        self.calls = 0

    def __call__(self, **kwargs):
        self.calls += 1
        time.sleep(0.01)
        return self.model(**kwargs)


def test_real_http_server(app, monkeypatch):
    greedy = {"messages": HELLO, "max_tokens": 6, "temperature": 0}
    with serve_in_thread(app) as base_url:
        assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1")
        with httpx.Client(base_url=base_url, timeout=60) as http:
            assert http.get("/models").json()["data"][0]["id"] == "tiny"
            response = http.post("/chat/completions", json=greedy)
            assert response.status_code == 200
            expected = response.json()["choices"][0]["message"]["content"]
            assert http.post("/chat/completions", json={"messages": []}).json()["error"]["param"] == "messages"

            # two clients at once: the lock serialises them, both get the greedy reply
            replies = []
            threads = [threading.Thread(target=lambda: replies.append(
                httpx.post(f"{base_url}/chat/completions", json=greedy, timeout=60).json())) for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert [r["choices"][0]["message"]["content"] for r in replies] == [expected, expected]

            gate = _Gate(app.state.chat.model)
            monkeypatch.setattr(app.state.chat, "model", gate)
            lines = []
            with http.stream("POST", "/chat/completions", json={**greedy, "stream": True}) as stream:
                assert stream.status_code == 200
                for line in stream.iter_lines():
                    lines.append(line)
                    if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                        gate.released.set()
            assert gate.streamed_before_done is True
            text, finish, _ = check_stream(sse_events(lines), "tiny")
            assert (text, finish) == (expected, "length")

            # a client that leaves mid-stream stops its generation and frees the model
            counter = _Counter(gate.model)
            monkeypatch.setattr(app.state.chat, "model", counter)
            with http.stream("POST", "/chat/completions", json={**greedy, "max_tokens": 200, "stream": True}) as stream:
                next(line for line in stream.iter_lines() if '"content": "' in line and '"role"' not in line)
            after = http.post("/chat/completions", json=greedy, timeout=30)
            assert after.json()["choices"][0]["message"]["content"] == expected
            assert counter.calls < 100
