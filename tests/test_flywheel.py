"""The flywheel on the tiny preset (gold rises across rounds), and people labelling in the
app while the pipeline waits for their labels (feedback: app)."""

from __future__ import annotations

import json
import math
import shutil
import threading
import uuid

import pytest

pytestmark = pytest.mark.smoke


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, _tether_home):
    """Data and SFT of the tiny preset, once for this module."""
    from tether.config import load_config
    from tether.pipeline import Pipeline

    out = tmp_path_factory.mktemp("fw_base")
    Pipeline(load_config(preset="tiny", overrides=[f"out={out}"])).run(["data", "sft"])
    return out


def test_flywheel_with_simulated_labelers_raises_gold_round_after_round(tiny_base, tmp_path):
    from tether.config import load_config
    from tether.flywheel import run_flywheel

    shutil.copytree(tiny_base, tmp_path / "base")
    cfg = load_config(preset="tiny", overrides=[
        f"out={tmp_path}", "flywheel.rounds=3", "prefs.n_prompts=800", "ppo.steps=12", "eval.n_prompts=96",
        "monitor.n_prompts=16", "monitor.checks=2"])
    result = run_flywheel(cfg)
    rounds = result["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert [r["labels_total"] for r in rounds] == [r["labels_new"] * (i + 1) for i, r in enumerate(rounds)]
    gold = [r["gold_mean"] for r in rounds]
    se = [r["gold_stderr"] for r in rounds]
    assert gold[1] > gold[0] and gold[2] > gold[1]
    assert gold[2] - gold[0] > 2 * math.sqrt(se[0] ** 2 + se[2] ** 2)
    assert gold[2] > result["start"]["sft"] + 2 * se[2]
    # the later rounds label the better policy's samples
    assert rounds[2]["sample_gold_mean"] > rounds[0]["sample_gold_mean"]
    on_disk = json.loads((tmp_path / "flywheel.json").read_text())
    assert on_disk["rounds"][-1]["gold_mean"] == gold[2]
    page = (tmp_path / "report.html").read_text()
    assert "<svg" in page and "round-3/report.html" in page
    # a second run finds every round done and runs none of them again
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("round-*/*/stage.json")}
    again = run_flywheel(cfg)
    assert [r["gold_mean"] for r in again["rounds"]] == gold
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("round-*/*/stage.json")} == stamps and len(stamps) == 18
    # rounds take successive slices of the shuffled prompts (wrapping: 800 per round, fewer prompts)
    firsts = [json.loads((tmp_path / f"round-{r}" / "prefs" / "samples.jsonl").read_text().splitlines()[0])["prompt"]
              for r in (1, 2)]
    assert firsts[0] != firsts[1]


def test_the_flywheel_refuses_a_fixed_preference_file(tmp_path):
    from tether.config import ConfigError, load_config
    from tether.flywheel import run_flywheel

    (tmp_path / "p.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(ConfigError, match="flywheel labels each round"):
        run_flywheel(load_config(preset="tiny", overrides=[f"out={tmp_path}", f"prefs.path={tmp_path / 'p.jsonl'}"]))


def test_people_label_in_the_app_while_the_run_waits(tiny_base, tmp_path):
    """feedback: app. The prefs stage puts the SFT policy's samples into the app and waits;
    two labelers rank them over HTTP (one shortest first, the other the exact reverse); the reward model
    trains on what they did."""
    import httpx

    from tether.config import load_config
    from tether.labeling.app import create_app
    from tether.pipeline import Pipeline
    from tether.serve import serve_in_thread

    db = tmp_path / "labels.sqlite"
    app = create_app(str(db), overlap=2)
    tokens = [app.state.store.add_labeler(n) for n in ("short", "long")]
    for stage in ("data", "sft"):
        shutil.copytree(tiny_base / stage, tmp_path / "run" / stage)
    cfg = load_config(preset="tiny", overrides=[
        f"out={tmp_path / 'run'}", "feedback=app", f"prefs.app_db={db}", "prefs.n_prompts=30",
        "prefs.heldout_prompts=16", "prefs.app_timeout=300", "stages=[data,sft,prefs,rm]"])
    stop, labelled, errors = threading.Event(), [], []

    def labeler(token, base, longer):
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30) as c:
            while not stop.is_set():
                item = c.get("/api/next").json()["item"]
                if item is None:
                    stop.wait(0.2)
                    continue
                k = len(item["responses"])
                order = sorted(range(k), key=lambda i: (len(item["responses"][i]), i))
                if longer:
                    order = order[::-1]  # exactly the other labeler's order, reversed
                r = c.post("/api/labels", json={"item_id": item["id"], "submission": uuid.uuid4().hex, "ranking": order})
                (labelled if r.status_code == 201 else errors).append(r.status_code)

    with serve_in_thread(app) as url:
        base = url.removesuffix("/v1")
        threads = [threading.Thread(target=labeler, args=(t, base, i == 1), daemon=True) for i, t in enumerate(tokens)]
        for t in threads:
            t.start()
        try:
            summary = Pipeline(cfg).run()
        finally:
            stop.set()
            for t in threads:
                t.join(10)
    assert errors == [] and len(labelled) == 60
    prefs = summary["preferences"]
    assert prefs["source"].startswith("app") and prefs["labels"] == 60 and prefs["app_items"] == 30
    # the two labelers disagree by construction: agreement is low, and measured
    assert prefs["agreement"]["items_multi"] == 30 and prefs["agreement"]["percent_agreement"] == 0.0
    assert summary["reward_model"]["heldout_pairs"] > 0
    labels = [json.loads(line) for line in (tmp_path / "run" / "prefs" / "labels.jsonl").read_text().splitlines()]
    assert {r["rater"] for r in labels} == {"short", "long"}
