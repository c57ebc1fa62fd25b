"""End to end on the tiny preset: the acceptance figures of the foundation, plain-transformers
loading of every checkpoint, and skipping of finished stages."""

from __future__ import annotations

import json
import math
import os

import pytest

pytestmark = pytest.mark.smoke


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, _tether_home):
    from tether.config import load_config
    from tether.pipeline import Pipeline

    out = tmp_path_factory.mktemp("tiny_run")
    cfg = load_config(preset="tiny", overrides=[f"out={out}"])
    summary = Pipeline(cfg).run()
    return out, summary


def test_reward_model_and_ppo_beat_the_bars(tiny_run):
    _, summary = tiny_run
    assert summary["reward_model"]["heldout_accuracy"] >= 0.75
    sft, ppo = summary["eval"]["sft"], summary["eval"]["ppo"]
    combined = math.sqrt(sft["gold_stderr"] ** 2 + ppo["gold_stderr"] ** 2)
    assert ppo["gold_mean"] - sft["gold_mean"] > 2 * combined
    assert summary["eval"]["sft"]["gold_mean"] > summary["eval"]["base"]["gold_mean"]
    assert ppo["kl_to_ref"] > 0 and ppo["reference"] == "sft"
    for name in ("base", "sft", "ppo"):
        assert summary["eval"][name]["n"] == 128
    prefs = summary["preferences"]
    assert 0.65 <= prefs["labeler_agreement"] <= 0.80  # target 0.72, measured on the overlap


def test_summary_file_and_stage_artifacts(tiny_run):
    out, summary = tiny_run
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["reward_model"]["heldout_accuracy"] == summary["reward_model"]["heldout_accuracy"]
    for stage in ("data", "sft", "prefs", "rm", "ppo", "eval"):
        assert (out / stage / "stage.json").is_file()
        assert (out / stage / "config.yaml").is_file()
    for stage in ("sft", "rm", "ppo"):
        lines = (out / stage / "metrics.jsonl").read_text().splitlines()
        assert lines and all(json.loads(line)["step"] >= 0 for line in lines)
    ppo_row = json.loads((out / "ppo" / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("reward/score", "kl/ref", "kl/coef", "policy/entropy", "ppo/clipfrac", "ppo/approx_kl",
                "loss/value", "response/length"):
        assert key in ppo_row and math.isfinite(ppo_row[key])
    # no temporary folders left behind
    assert not [p for p in out.rglob(".*") if p.is_dir()]


def test_checkpoints_load_with_plain_transformers(tiny_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    out, _ = tiny_run
    for stage in ("sft", "ppo"):
        model = AutoModelForCausalLM.from_pretrained(out / stage / "checkpoint")
        tok = AutoTokenizer.from_pretrained(out / stage / "checkpoint")
        ids = tok.apply_chat_template([{"role": "user", "content": "write three words about fruits"}],
                                      add_generation_prompt=True, return_tensors="pt", return_dict=True)
        gen = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
        assert gen.shape[1] > ids["input_ids"].shape[1]
    rm = AutoModelForSequenceClassification.from_pretrained(out / "rm" / "checkpoint")
    assert rm.config.num_labels == 1
    tok = AutoTokenizer.from_pretrained(out / "rm" / "checkpoint")
    batch = tok(["apple pear fig", "cat cat cat"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert rm(**batch).logits.shape == (2, 1)


def test_second_run_skips_finished_stages(tiny_run):
    from tether.config import load_config
    from tether.pipeline import Pipeline

    out, summary = tiny_run
    before = {s: os.path.getmtime(out / s / "stage.json") for s in ("sft", "rm", "ppo")}
    again = Pipeline(load_config(preset="tiny", overrides=[f"out={out}"])).run()
    after = {s: os.path.getmtime(out / s / "stage.json") for s in ("sft", "rm", "ppo")}
    assert before == after
    assert again["eval"]["ppo"]["gold_mean"] == summary["eval"]["ppo"]["gold_mean"]
