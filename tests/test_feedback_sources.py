"""Feedback sources: the data schemas (ties, strength, soft labels, chat forms, datasets),
per-pair targets in the losses, aggregation of several labelers, AI judges (local and over
HTTP against `tether serve`, including servers that stall or send malformed JSON), the
critique–revise loop and the `judge`/`constitution`/`data stats` commands."""

from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
import torch.nn.functional as F

from tether.data.io import DataError
from tether.data.schemas import (
    iter_records,
    load_demonstrations,
    load_rankings,
    parse_demonstration,
    parse_ranking,
    ranking_record,
    rankings_to_pairs,
)
from tether.feedback.aggregate import aggregate_rankings, agreement_stats
from tether.feedback.judge import (
    HFJudge,
    HTTPJudge,
    Judge,
    accuracy_against_gold,
    judge_messages,
    load_constitution,
    position_bias,
)
from tether.losses import dpo_loss, ranking_loss_terms, simpo_loss


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ----------------------------------------------------------------------------- schemas


def test_pair_with_tie_strength_and_soft_label():
    r = parse_ranking({"prompt": "p", "chosen": "a", "rejected": "b", "strength": 2, "soft_label": 0.75})
    assert (r.soft_label, r.strength, r.tiers, r.hard) == (0.75, 2.0, None, False)
    assert r.pair_targets() == [0.75]
    t = parse_ranking({"prompt": "p", "chosen": "a", "rejected": "b", "tie": True})
    assert t.tiers == [0, 0] and t.pair_targets() == [0.5] and t.tied(0, 1)
    assert rankings_to_pairs([t])[0]["tie"] is True
    assert rankings_to_pairs([r])[0] | {} == {"prompt": "p", "chosen": "a", "rejected": "b", "rater": None,
                                              "soft_label": 0.75, "strength": 2.0}


def test_ranking_with_ties_round_trips():
    r = parse_ranking({"prompt": "p", "responses": ["r0", "r1", "r2", "r3"], "ranking": [2, [0, 3], 1]})
    assert r.order == [2, 0, 3, 1] and r.tiers == [0, 1, 1, 2]
    # pairs in triu order of positions: (2,0) (2,3) (2,1) (0,3) (0,1) (3,1)
    assert r.pair_targets() == [1.0, 1.0, 1.0, 0.5, 1.0, 1.0]
    again = parse_ranking(ranking_record(r))
    assert (again.order, again.tiers) == (r.order, r.tiers)
    pairs = rankings_to_pairs([r])
    assert len(pairs) == 6 and sum(p.get("tie", False) for p in pairs) == 1


@pytest.mark.parametrize(
    "record, field, match",
    [
        ({"prompt": "p", "chosen": "a", "rejected": "b", "soft_label": 1.5}, "soft_label", r"in \[0.0, 1.0\]"),
        ({"prompt": "p", "chosen": "a", "rejected": "b", "soft_label": "high"}, "soft_label", "must be a finite number"),
        ({"prompt": "p", "chosen": "a", "rejected": "b", "strength": -1}, "strength", ">= 0"),
        ({"prompt": "p", "chosen": "a", "rejected": "b", "tie": "yes"}, "tie", "true or false"),
        ({"prompt": "p", "chosen": "a", "rejected": "b", "tie": True, "soft_label": 0.9}, "soft_label", "tie"),
        ({"prompt": "p", "chosen": "a", "rejected": "b", "strength": float("inf")}, "strength", "finite"),
        ({"prompt": "p", "responses": ["a", "b", "c"], "ranking": [[0, 1], [1, 2]]}, "ranking", "permutation"),
        ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
          "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]},
         "rejected", "share the messages"),
        ({"chosen": [{"role": "user", "content": "q"}], "rejected": "b", "prompt": "q"}, "chosen[0].role", "assistant"),
    ],
)
def test_bad_feedback_records_name_file_line_field(tmp_path, record, field, match):
    path = _write(tmp_path / "prefs.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"}, record])
    with pytest.raises(DataError, match=match) as info:
        load_rankings(path)
    assert info.value.line == 2 and info.value.field == field and str(path) in str(info.value)


def test_tied_pairs_and_soft_labels_survive_the_files_stages_read(tmp_path):
    """What stage_prefs writes (ranking_record) the rm and dpo stages read back (parse_ranking)."""
    rs = [parse_ranking({"prompt": "p", "chosen": "a", "rejected": "b", "tie": True}),
          parse_ranking({"prompt": "p", "responses": ["a", "b", "c"], "ranking": [[0, 1, 2]]}),
          parse_ranking({"prompt": "p", "chosen": "a", "rejected": "b", "soft_label": 0.6, "strength": 1})]
    path = _write(tmp_path / "r.jsonl", [ranking_record(r) for r in rs])
    back = load_rankings(path)
    assert [(r.order, r.tiers, r.soft_label, r.strength) for r in back] == [
        ([0, 1], [0, 0], 1.0, None), ([0, 1, 2], [0, 0, 0], 1.0, None), ([0, 1], None, 0.6, 1.0)]
    assert back[1].pair_targets() == [0.5, 0.5, 0.5]


def test_trl_conversational_forms():
    chat = [{"role": "user", "content": "hi"}]
    r = parse_ranking({"chosen": chat + [{"role": "assistant", "content": "hello"}],
                       "rejected": chat + [{"role": "assistant", "content": "go away"}]})
    assert r.prompt == chat and r.ranked() == ["hello", "go away"]
    d = parse_demonstration({"messages": chat + [{"role": "assistant", "content": "hello"}]})
    assert d.prompt == chat and d.response == "hello"
    d = parse_demonstration({"prompt": "hi", "completion": "hello"})
    assert (d.prompt, d.response) == ("hi", "hello")
    with pytest.raises(DataError, match="at least one message"):
        parse_demonstration({"messages": [{"role": "assistant", "content": "x"}]})


def test_hugging_face_dataset_sources(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"prompt": ["p1", "p2"], "chosen": ["a", "c"], "rejected": ["b", "d"]}
    ds = datasets.Dataset.from_dict(rows)
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "prefs.parquet"))
    for source in (tmp_path / "saved", tmp_path / "prefs.parquet"):
        rs = load_rankings(source)
        assert [r.ranked() for r in rs] == [["a", "b"], ["c", "d"]]
    bad = datasets.Dataset.from_dict({"prompt": ["p1", "p2"], "chosen": ["a", ""], "rejected": ["b", "d"]})
    bad.to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(DataError, match="non-empty") as info:
        load_rankings(tmp_path / "bad.parquet")
    assert info.value.line == 2 and info.value.field == "chosen"
    demos = datasets.Dataset.from_dict({"messages": [[{"role": "user", "content": "q"},
                                                      {"role": "assistant", "content": "a"}]]})
    demos.save_to_disk(str(tmp_path / "demos"))
    assert load_demonstrations(tmp_path / "demos")[0].response == "a"
    # a mixed dataset: each row leaves the other form's columns empty (None), which is no error
    mixed = datasets.Dataset.from_list([
        {"prompt": "p", "chosen": "a", "rejected": "b", "responses": None, "ranking": None, "tie": None},
        {"prompt": "q", "chosen": None, "rejected": None, "responses": ["x", "y"], "ranking": [1, 0], "tie": None}])
    mixed.to_parquet(str(tmp_path / "mixed.parquet"))
    assert [r.ranked() for r in load_rankings(tmp_path / "mixed.parquet")] == [["a", "b"], ["y", "x"]]
    with pytest.raises(DataError, match="no dataset here"):
        (tmp_path / "empty").mkdir()
        list(iter_records(tmp_path / "empty"))


# ----------------------------------------------------------------------------- losses


def _naive_bt(scores, targets, margins):
    total = []
    for b in range(scores.size(0)):
        row, p = [], 0
        k = scores.size(1)
        for i in range(k):
            for j in range(i + 1, k):
                delta, m = float(scores[b, i] - scores[b, j]), float(margins[b, p])
                t = float(targets[b, p])
                # i ≻ j with probability t (margin m on that side), j ≻ i otherwise (margin m on that side)
                row.append(-(t * math.log(1 / (1 + math.exp(-(delta - m))))
                             + (1 - t) * math.log(1 / (1 + math.exp(-(-delta - m))))))
                p += 1
        total.append(sum(row))
    return torch.tensor(total, dtype=torch.float64)


def test_bradley_terry_with_targets_and_margins_matches_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 4, generator=g, dtype=torch.float64)
    targets = torch.rand(5, 6, generator=g, dtype=torch.float64)
    margins = torch.rand(5, 6, generator=g, dtype=torch.float64)
    mask = torch.ones(5, 4, dtype=torch.bool)
    sums, counts = ranking_loss_terms(scores, mask, "bradley_terry", targets, margins)
    torch.testing.assert_close(sums, _naive_bt(scores, targets, margins), rtol=0, atol=1e-12)
    assert counts.tolist() == [6.0] * 5
    # hard targets and no margin are the default
    hard, _ = ranking_loss_terms(scores, mask, "bradley_terry", torch.ones(5, 6, dtype=torch.float64))
    torch.testing.assert_close(hard, ranking_loss_terms(scores, mask)[0], rtol=0, atol=1e-12)
    # a tie (t = 0.5) pulls both ways: its gradient vanishes where the scores are equal
    s = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    ranking_loss_terms(s, torch.ones(1, 2, dtype=torch.bool), "bradley_terry", torch.full((1, 1), 0.5))[0].sum().backward()
    assert s.grad.abs().max().item() < 1e-12
    # margins apply to each side's own orientation: at t = ½ with a margin, Δ = 0 is still the optimum
    s2 = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    ranking_loss_terms(s2, torch.ones(1, 2, dtype=torch.bool), "bradley_terry", torch.full((1, 1), 0.5),
                       torch.full((1, 1), 2.0))[0].sum().backward()
    assert s2.grad.abs().max().item() < 1e-12
    with pytest.raises(ValueError, match="plackett_luce needs strict"):
        ranking_loss_terms(scores, mask, "plackett_luce", targets)


def _ls(x: float) -> torch.Tensor:
    return F.logsigmoid(torch.tensor(x, dtype=torch.float64))


def test_dpo_family_targets_by_hand():
    pc, pr, rc, rr = (torch.tensor([v], dtype=torch.float64) for v in (-1.0, -2.0, -1.5, -1.5))
    h = 1.0  # (−1 + 1.5) − (−2 + 1.5)
    beta = 0.5
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=beta, targets=torch.tensor([0.8], dtype=torch.float64))
    want = -(0.8 * _ls(beta * h) + 0.2 * _ls(-beta * h))
    assert abs(loss.item() - want.item()) < 1e-12
    # t = 1 is plain DPO; cDPO's ε mixes into the target
    assert dpo_loss(pc, pr, rc, rr, beta=beta, targets=torch.ones(1))[0].item() == dpo_loss(pc, pr, rc, rr, beta=beta)[0].item()
    q = 0.8 * 0.9 + 0.2 * 0.1
    want = -(q * _ls(beta * h) + (1 - q) * _ls(-beta * h))
    got = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=0.1, targets=torch.tensor([0.8], dtype=torch.float64))[0]
    assert abs(got.item() - want.item()) < 1e-12
    # IPO regresses h onto (t − ½)/β: a tie onto 0
    assert abs(dpo_loss(pc, pr, rc, rr, beta=beta, variant="ipo", targets=torch.tensor([0.5], dtype=torch.float64))[0].item() - h**2) < 1e-12
    with pytest.raises(ValueError, match="hinge"):
        dpo_loss(pc, pr, rc, rr, variant="hinge", targets=torch.tensor([0.5], dtype=torch.float64))
    # SimPO: the expected loss over the label, each orientation with its own margin γ
    lc = lr = torch.ones(1, dtype=torch.float64)
    delta = 2.0 * (-1.0) - 2.0 * (-2.0)
    want = -(0.7 * _ls(delta - 1.0) + 0.3 * _ls(-delta - 1.0))
    assert abs(simpo_loss(pc, pr, lc, lr, targets=torch.tensor([0.7], dtype=torch.float64))[0].item() - want.item()) < 1e-12
    # … so a tie's optimum is equal rewards
    eq = torch.tensor([-1.0], dtype=torch.float64, requires_grad=True)
    simpo_loss(eq, torch.tensor([-1.0], dtype=torch.float64), lc, lr, targets=torch.tensor([0.5], dtype=torch.float64))[0].backward()
    assert abs(eq.grad.item()) < 1e-12


def test_reward_model_collate_carries_pair_targets(tiny_tokenizer):
    from tether.algorithms.reward import collate_rankings
    from tether.data.tokenize import Encoder

    enc = Encoder(tiny_tokenizer, 64, 32)
    rs = [parse_ranking({"prompt": "write", "responses": ["cat", "dog", "cow"], "ranking": [[0, 1], 2]}),
          parse_ranking({"prompt": "write", "chosen": "cat", "rejected": "dog", "soft_label": 0.6, "strength": 1.5})]
    batch = collate_rankings(enc, rs)
    assert batch["targets"].tolist() == [[0.5, 1.0, 1.0], pytest.approx([0.6, 1.0, 1.0])]
    assert batch["margins"].tolist() == [[0.0, 0.0, 0.0], [1.5, 0.0, 0.0]]
    assert "targets" not in collate_rankings(enc, [parse_ranking({"prompt": "w", "chosen": "cat", "rejected": "dog"})])


# ----------------------------------------------------------------------------- several labelers


def _ranking(rater, order, responses=("a", "b", "c"), prompt="p"):
    return parse_ranking({"prompt": prompt, "responses": list(responses), "ranking": order, "rater": rater})


def test_majority_and_soft_aggregation_by_hand():
    rs = [_ranking("x", [0, 1, 2]), _ranking("y", [0, 2, 1]), _ranking("z", [1, 0, 2]),
          parse_ranking({"prompt": "q", "chosen": "u", "rejected": "v", "rater": "x"})]
    soft = {tuple(r.ranked()): r.soft_label for r in aggregate_rankings(rs, "soft")}
    # a ≻ b: x, y (2 of 3); a ≻ c: all; b ≻ c: x, z (2 of 3); the single-rater item stays
    assert soft == {("a", "b"): pytest.approx(2 / 3), ("a", "c"): 1.0, ("b", "c"): pytest.approx(2 / 3), ("u", "v"): 1.0}
    majority = aggregate_rankings(rs, "majority")
    assert sorted(tuple(r.ranked()) for r in majority) == [("a", "b"), ("a", "c"), ("b", "c"), ("u", "v")]
    assert all(r.hard for r in majority)
    # an even split is a tie (soft) and is dropped (majority)
    split = [_ranking("x", [0, 1], ("a", "b")), _ranking("y", [1, 0], ("a", "b"))]
    assert aggregate_rankings(split, "majority") == []
    [tie] = aggregate_rankings(split, "soft")
    assert tie.tiers == [0, 0] and tie.pair_targets() == [0.5]
    assert aggregate_rankings(rs, "none") == rs
    # rankings without a rater are different labelers: two say a ≻ b, one b ≻ a
    anon = [parse_ranking({"prompt": "p", "chosen": c, "rejected": r}) for c, r in (("a", "b"), ("a", "b"), ("b", "a"))]
    [m] = aggregate_rankings(anon, "majority")
    assert m.ranked() == ["a", "b"] and m.meta["votes"] == 3
    # a response given twice counts at its better place
    dup = [_ranking(r, [2, 1, 0], ("x", "y", "x")) for r in ("l1", "l2")]  # the second "x" ranked first
    [d] = aggregate_rankings(dup, "soft")
    assert d.ranked() == ["x", "y"] and d.soft_label == 1.0 and d.tiers is None


def test_agreement_stats_recover_simulated_labelers():
    """Labelers simulated at a known agreement: the measured statistics find it."""
    import random

    from tether.feedback.simulated import SimulatedLabeler, calibrate_temperature

    rng = random.Random(0)
    golds = [[rng.random() for _ in range(4)] for _ in range(300)]
    gaps = [abs(g[i] - g[j]) for g in golds for i in range(4) for j in range(i + 1, 4)]
    tau, expected = calibrate_temperature(gaps, 0.72)
    labelers = [SimulatedLabeler(f"l{i}", tau, 7919 * 11 + i) for i in range(3)]
    rs = []
    for n, g in enumerate(golds):
        for lab in labelers:
            rs.append(_ranking(lab.rater_id, lab.rank(g), (f"r{n}a", f"r{n}b", f"r{n}c", f"r{n}d"), prompt=f"p{n}"))
    stats = agreement_stats(rs)
    assert stats["items_multi"] == 300 and stats["pairs_compared"] == 300 * 6 * 3
    assert abs(stats["percent_agreement"] - expected) < 0.03
    # two-category agreement p_o with balanced labels: κ ≈ α ≈ 2·p_o − 1
    assert abs(stats["krippendorff_alpha"] - (2 * stats["percent_agreement"] - 1)) < 0.03
    assert abs(stats["cohen_kappa_mean"] - (2 * stats["percent_agreement"] - 1)) < 0.05
    assert set(stats["raters"]) == {"l0", "l1", "l2"}


# ----------------------------------------------------------------------------- judges


class FixedJudge(Judge):
    """Prefers the longer response, with a bias towards the first slot."""

    name = "fixed"

    def __init__(self, bias: float = 0.2):
        super().__init__()
        self.bias = bias

    def first_letter_probs(self, conversations, progress=None):
        out = []
        for conv in conversations:
            text = conv[-1]["content"]
            a = text.split("[Response A]\n")[1].split("\n\n[Response B]")[0]
            b = text.split("[Response B]\n")[1].split("\n\nWhich")[0]
            p = 0.5 + 0.3 * (1 if len(a) > len(b) else -1 if len(a) < len(b) else 0) + self.bias
            out.append((min(max(p, 0.0), 1.0), True))
        return out


def test_both_orders_cancel_position_bias_and_rank_orders_by_wins():
    judge = FixedJudge(bias=0.2)
    [v] = judge.compare([("p", "long answer", "short")])
    assert (v.p_ab, v.p_ba) == pytest.approx((1.0, 0.4))
    assert v.p == pytest.approx(0.8)  # ½(1.0 + 1 − 0.4): the bias is gone
    [res] = judge.rank([("p", ["a", "ccc", "bb"])])
    assert res["order"] == [1, 2, 0] and len(res["pairs"]) == 3
    bias = position_bias([v])
    assert bias["first_slot_rate"] == pytest.approx(0.7) and bias["consistency"] == 1.0
    assert bias["swap_effect"] == pytest.approx(0.4)


def test_judge_accuracy_by_hand():
    pairs = [(1.0, 0.0, 0.9, 0.3),  # right both ways
             (1.0, 0.0, 0.8, 0.9),  # first slot wins twice: first order right, averaged 0.45 wrong
             (0.0, 1.0, 0.6, 0.6),  # first slot: first order wrong; averaged 0.5 counts half
             (0.5, 0.5, 0.9, 0.1)]  # equal gold: not counted
    acc = accuracy_against_gold(pairs)
    assert acc["pairs"] == 3
    assert acc["first_order"] == pytest.approx(2 / 3)
    assert acc["swapped"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert acc["consistent_share"] == pytest.approx(1 / 3) and acc["swapped_when_consistent"] == 1.0


def test_judge_prompt_has_rubric_principles_and_labels(tmp_path):
    principles = load_constitution()
    assert len(principles) >= 4 and all(p.critique and p.revision for p in principles)
    msgs = judge_messages("say hi", "hi", "bye", ["helpfulness", "Be funny."], principles[:1], ("X", "Y"))
    text = msgs[-1]["content"]
    assert "Helpfulness:" in text and "Be funny." in text and principles[0].revision in text
    assert "[Response X]\nhi" in text and "[Response Y]\nbye" in text and text.endswith("X or Y.")
    bad = tmp_path / "c.yaml"
    bad.write_text("- name: x\n  critique: ok\n")
    with pytest.raises(DataError, match=r"\[0\].revision"):
        load_constitution(bad)
    bad.write_text("- a: [\n")
    with pytest.raises(DataError, match="not valid YAML"):
        load_constitution(bad)
    (tmp_path / "s.yaml").write_text("- Be kind.\n- Be brief.\n")
    assert [p.name for p in load_constitution(tmp_path / "s.yaml")] == ["principle-0", "principle-1"]


@pytest.fixture(scope="module")
def tiny_judge(tiny_path):
    return HFJudge(tiny_path, labels=("the", "so"), batch_size=4)


def test_hf_judge_is_symmetric_under_swapping(tiny_judge):
    items = [("write three words about fruits", "apple pear fig", "rain snow"),
             ("write four words about tools", "saw drill", "saw drill axe hammer")]
    fwd = tiny_judge.compare(items)
    back = tiny_judge.compare([(p, y, x) for p, x, y in items])
    for f in fwd:
        assert 0 < f.p_ab < 1 and 0 < f.p_ba < 1 and f.valid
        assert f.p == pytest.approx(0.5 * (f.p_ab + 1 - f.p_ba))
    # the second order is a real second question: its answer is the first's, with the slots swapped
    assert [b.p_ab for b in back] == pytest.approx([f.p_ba for f in fwd], abs=1e-6)
    # batching and padding do not change a probability
    single = [HFJudge.first_letter_probs(tiny_judge, [judge_messages(p, x, y, labels=("the", "so"))])[0][0]
              for p, x, y in items]
    assert [f.p_ab for f in fwd] == pytest.approx(single, abs=1e-5)
    with pytest.raises(ValueError, match="no single token"):
        HFJudge("tiny", labels=("A", "B"), model_obj=tiny_judge.model, tokenizer=tiny_judge.tokenizer)


# ----------------------------------------------------------------------------- over HTTP


@pytest.fixture(scope="module")
def served(tiny_path):
    from tether.serve import create_app, serve_in_thread

    with serve_in_thread(create_app(tiny_path)) as base_url:
        yield base_url


def test_http_judge_against_tether_serve_matches_the_local_judge(served, tiny_judge, tmp_path):
    items = [("write three words about fruits", "apple pear fig", "rain snow"),
             ("write five words about sports", "golf polo judo ski", "golf"),
             ("write three words about animals", "cat dog cow", "the cat"),
             ("write four words about music", "drum harp horn flute", "drum drum")]
    cache = tmp_path / "cache.sqlite"
    # labels the tiny model puts in its top 20 here, so the server's top_logprobs list both
    labels = ("the", "city")
    judge = HTTPJudge(served, "tiny", labels=labels, cache=cache, concurrency=3, timeout=30)
    remote = judge.compare(items)
    local = HFJudge("tiny", labels=labels, model_obj=tiny_judge.model, tokenizer=tiny_judge.tokenizer).compare(items)
    for r, lo in zip(remote, local):
        assert r.valid and (r.p_ab, r.p_ba) == pytest.approx((lo.p_ab, lo.p_ba), abs=1e-4)
    assert judge.client.stats["requests"] == 8 and len(judge.client.cache) == 8
    # a rerun never pays twice
    again = HTTPJudge(served, "tiny", labels=labels, cache=cache)
    assert [v.p for v in again.compare(items)] == [v.p for v in remote]
    assert again.client.stats == {"requests": 0, "cached": 8, "retries": 0, "failed": 0}


class _Handler(BaseHTTPRequestHandler):
    """A misbehaving chat server: ``mode`` is stall, malformed, flaky, bad_request or slow."""

    def log_message(self, *args):  # quiet
        pass

    def do_POST(self):  # noqa: N802
        server = self.server
        self.rfile.read(int(self.headers.get("content-length", 0)))
        with server.lock:
            server.calls += 1
            server.in_flight += 1
            server.max_in_flight = max(server.max_in_flight, server.in_flight)
            call = server.calls
        try:
            mode = server.mode
            if mode == "stall":
                time.sleep(2.0)
            if mode == "slow":
                time.sleep(0.2)
            if mode == "malformed":
                body, status = b'{"choices": [ {"message": ', 200
            elif mode == "flaky" and call <= 2:
                body, status = b'{"error": "overloaded"}', 503
            elif mode == "bad_request":
                body, status = b'{"error": {"message": "unknown model"}}', 404
            else:
                body, status = json.dumps({"choices": [{"message": {"role": "assistant", "content": "A"}}]}).encode(), 200
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass
        finally:
            with server.lock:
                server.in_flight -= 1


@pytest.fixture()
def bad_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.lock, server.calls, server.in_flight, server.max_in_flight, server.mode = threading.Lock(), 0, 0, 0, "ok"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def _conv(i):
    return judge_messages(f"prompt {i}", "x", "y")


def test_http_judge_errors_retries_and_an_intact_cache(bad_server, tmp_path):
    from tether.feedback.client import ChatError

    server, url = bad_server
    cache = tmp_path / "cache.sqlite"

    def judge(**kw):
        return HTTPJudge(url, "m", cache=cache, backoff=0.01, **kw)

    ok = judge(max_retries=0)
    assert ok.first_letter_probs([_conv(0), _conv(1)]) == [(1.0, True), (1.0, True)]  # read from the letter
    assert len(ok.client.cache) == 2
    # a server that stalls past the timeout: retried, then a clear error
    server.mode, server.calls = "stall", 0
    stalled = judge(timeout=0.3, max_retries=2)
    start = time.time()
    with pytest.raises(ChatError, match=r"timed out after 0.3 s \(gave up after 3 attempts\)") as info:
        stalled.first_letter_probs([_conv(2)])
    assert url in str(info.value) and server.calls == 3 and time.time() - start < 5
    # malformed JSON: retried, then an error quoting what came back
    server.mode, server.calls = "malformed", 0
    with pytest.raises(ChatError, match="malformed JSON"):
        judge(max_retries=1).first_letter_probs([_conv(3)])
    assert server.calls == 2
    # a client error is not retried
    server.mode, server.calls = "bad_request", 0
    with pytest.raises(ChatError, match="HTTP 404 \\(not retried\\)"):
        judge(max_retries=3).first_letter_probs([_conv(4)])
    assert server.calls == 1
    # nothing half written: the cache holds the two good answers and still serves them
    assert len(ok.client.cache) == 2
    server.mode, server.calls = "stall", 0
    cached = judge(timeout=0.3, max_retries=0)
    assert cached.first_letter_probs([_conv(0), _conv(1)]) == [(1.0, True), (1.0, True)]
    assert server.calls == 0
    # overloaded twice (503), then fine: retries succeed
    server.mode, server.calls = "flaky", 0
    flaky = judge(max_retries=3)
    assert flaky.first_letter_probs([_conv(5)]) == [(1.0, True)]
    assert flaky.client.stats["retries"] == 2 and server.calls == 3


def test_http_client_keeps_to_its_concurrency_limit(bad_server, tmp_path):
    server, url = bad_server
    server.mode = "slow"
    judge = HTTPJudge(url, "m", cache=False, concurrency=3)
    out = judge.first_letter_probs([_conv(i) for i in range(12)])
    assert len(out) == 12 and server.calls == 12
    assert 2 <= server.max_in_flight <= 3


def test_http_judge_reads_logprobs_and_unreadable_answers():
    judge = HTTPJudge.__new__(HTTPJudge)
    Judge.__init__(judge)
    top = [{"token": " A", "logprob": math.log(0.6)}, {"token": "B", "logprob": math.log(0.2)},
           {"token": "The", "logprob": math.log(0.1)}]
    resp = {"choices": [{"message": {"content": "A"}, "logprobs": {"content": [{"top_logprobs": top}]}}]}
    assert judge.read(resp) == (pytest.approx(0.75), True)
    # a label outside the list is given the list's smallest log-prob (a bound)
    resp["choices"][0]["logprobs"]["content"][0]["top_logprobs"] = top[:1] + top[2:]
    assert judge.read(resp) == (pytest.approx(6 / 7), True)
    # … or what the list leaves over, when that is less
    resp["choices"][0]["logprobs"]["content"][0]["top_logprobs"] = [{"token": "A", "logprob": math.log(0.99)}]
    assert judge.read(resp) == (pytest.approx(0.99), True)
    resp["choices"][0]["logprobs"]["content"][0]["top_logprobs"] = [{"token": "A", "logprob": math.log(0.9)},
                                                                      {"token": "C", "logprob": math.log(0.09)}]
    assert judge.read(resp) == (pytest.approx(0.9 / 0.91), True)
    assert judge.read({"choices": [{"message": {"content": "B, because"}}]}) == (0.0, True)
    assert judge.read({"choices": [{"message": {"content": "Neither"}}]}) == (0.5, False)


# ----------------------------------------------------------------------------- constitution and commands


def test_critique_revise_loop_writes_demos_and_pairs():
    from tether.feedback.constitution import critique_revise
    from tether.feedback.judge import Principle

    class Echo:
        name = "echo"

        def __init__(self):
            self.calls = []

        def generate(self, conversations, *, max_tokens, temperature, seed, progress=None):
            self.calls.append(conversations)
            last = [c[-1]["content"] for c in conversations]
            if len(self.calls) == 1:
                return ["draft" for _ in last]
            if "Critique request" in last[0]:
                return ["too short" for _ in last]
            return ["revised draft" if "p0" in json.dumps(c) else "draft" for c in conversations]

    principles = [Principle("brief", "Is it short?", "Make it short.")]
    chat = Echo()
    res = critique_revise(chat, ["p0", "p1"], principles, rounds=2, seed=1)
    assert len(chat.calls) == 5  # answer, then critique + revision per round
    critique_conv = chat.calls[1][0]
    assert critique_conv[-2] == {"role": "assistant", "content": "draft"}
    assert "Is it short?" in critique_conv[-1]["content"]
    assert "Make it short." in chat.calls[2][0][-1]["content"]
    assert res.demos == [{"prompt": "p0", "response": "revised draft"}, {"prompt": "p1", "response": "draft"}]
    assert res.pairs == [{"prompt": "p0", "chosen": "revised draft", "rejected": "draft", "rater": "constitution:echo"}]
    assert [r["principle"] for r in res.trace[0]["rounds"]] == ["brief", "brief"]


@pytest.mark.smoke
def test_judge_constitution_and_stats_commands(tiny_path, tmp_path, served, capsys):
    from tether.cli import main

    groups = _write(tmp_path / "groups.jsonl", [
        {"prompt": "write three words about fruits", "responses": ["apple pear fig", "rain", "apple pear"],
         "gold": [1.0, 0.0, 0.6]},
        {"prompt": [{"role": "user", "content": "write two words about colors"}], "responses": ["red blue", "red"]},
    ])
    assert main(["judge", str(groups), "--out", str(tmp_path / "j"), "--model", tiny_path, "--labels", "the", "so"]) == 0
    summary = json.loads((tmp_path / "j" / "summary.json").read_text())
    assert summary["comparisons"] == 4 and summary["accuracy"]["pairs"] == 3
    assert len(load_rankings(tmp_path / "j" / "rankings.jsonl")) == 2
    assert len((tmp_path / "j" / "pairs.jsonl").read_text().splitlines()) == 4
    # the same through the HTTP judge, against tether serve
    assert main(["judge", str(groups), "--out", str(tmp_path / "h"), "--judge", "http", "--base-url", served,
                 "--model", "tiny", "--labels", "the", "so", "--cache", str(tmp_path / "c.sqlite")]) == 0
    assert json.loads((tmp_path / "h" / "summary.json").read_text())["requests"]["requests"] == 8
    # bad input names the file, line and field
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "p", "responses": ["a", "b"], "gold": [1]}])
    assert main(["judge", str(bad), "--out", str(tmp_path / "x"), "--model", tiny_path]) == 2
    assert f"{bad}:1: field 'gold'" in capsys.readouterr().err
    # constitution: local model, and over HTTP
    prompts = _write(tmp_path / "prompts.jsonl", [{"prompt": "write three words about fruits"},
                                                  {"prompt": "write four words about tools"}])
    assert main(["constitution", "--prompts", str(prompts), "--out", str(tmp_path / "cai"), "--model", tiny_path,
                 "--max-tokens", "8", "--rounds", "1"]) == 0
    trace = [json.loads(x) for x in (tmp_path / "cai" / "trace.jsonl").read_text().splitlines()]
    assert len(trace) == 2 and len(trace[0]["rounds"]) == 1 and "final" in trace[0]
    assert main(["constitution", "--prompts", str(prompts), "--out", str(tmp_path / "cai2"), "--base-url", served,
                 "--max-tokens", "8", "--cache", str(tmp_path / "c2.sqlite")]) == 0
    assert (tmp_path / "cai2" / "summary.json").is_file()
    # data stats
    prefs = _write(tmp_path / "prefs.jsonl", [
        {"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 1, 2], "rater": "x"},
        {"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 2, 1], "rater": "y"},
        {"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 2, 1], "rater": "y"},
        {"prompt": "q", "chosen": "u", "rejected": "u", "tie": True, "rater": "x"},
    ])
    capsys.readouterr()
    assert main(["data", "stats", str(prefs), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["records"], stats["duplicate_records"], stats["with_ties"], stats["identical_responses"]) == (4, 1, 1, 1)
    assert stats["agreement"]["items_multi"] == 1 and stats["agreement"]["percent_agreement"] == pytest.approx(2 / 3)
    assert main(["data", "stats", str(prefs)]) == 0
    assert "krippendorff alpha" in capsys.readouterr().out
