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


@pytest.fixture(scope="module")
def tiny_alternatives(tiny_run, tmp_path_factory):
    """DPO and GRPO (on gold) from the same SFT policy and preferences as the PPO run."""
    import shutil

    from tether.config import load_config
    from tether.pipeline import Pipeline

    out, _ = tiny_run
    alt = tmp_path_factory.mktemp("tiny_alt")
    for stage in ("data", "sft", "prefs", "eval"):
        shutil.copytree(out / stage, alt / stage)
    eval_before = os.path.getmtime(alt / "eval" / "sft.json")
    summaries = {}
    for overrides in (["policy=dpo"], ["policy=grpo", "reward=gold"]):
        summaries[overrides[0].split("=")[1]] = Pipeline(
            load_config(preset="tiny", overrides=[f"out={alt}", *overrides])).run()
    return alt, summaries, eval_before


@pytest.mark.parametrize("policy", ["dpo", "grpo"])
def test_dpo_and_grpo_beat_sft(tiny_alternatives, policy):
    _, summaries, _ = tiny_alternatives
    ev = summaries[policy]["eval"]
    sft, new = ev["sft"], ev[policy]
    combined = math.sqrt(sft["gold_stderr"] ** 2 + new["gold_stderr"] ** 2)
    assert new["gold_mean"] - sft["gold_mean"] > 2 * combined, (sft, new)
    assert new["reference"] == "sft" and new["kl_to_ref"] > 0
    assert new["n"] == 128


def test_alternatives_reuse_stages_and_evaluations(tiny_alternatives):
    alt, summaries, eval_before = tiny_alternatives
    assert not (alt / "rm").exists()  # neither DPO nor GRPO on gold needs a reward model
    assert os.path.getmtime(alt / "eval" / "sft.json") == eval_before  # base and SFT evaluated once
    final = summaries["grpo"]
    assert set(final["eval"]) == {"base", "sft", "dpo", "grpo"}  # the earlier DPO evaluation is kept
    dpo = final["dpo"]
    assert dpo["heldout_accuracy"] > 0.6 and dpo["kl_heldout"] > 0
    row = json.loads((alt / "dpo" / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("loss/dpo", "rewards/margin", "rewards/accuracy", "logps/chosen", "logps/rejected"):
        assert key in row and math.isfinite(row[key])
    grpo_row = json.loads((alt / "grpo" / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("reward/score", "reward/gold", "kl/ref", "groups/flat", "policy/clipfrac"):
        assert key in grpo_row and math.isfinite(grpo_row[key])
