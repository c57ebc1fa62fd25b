"""End to end on the tiny preset: the acceptance figures of the foundation, plain-transformers
loading of every checkpoint, and skipping of finished stages."""

from __future__ import annotations

import json
import math
import os

import pytest

pytestmark = pytest.mark.smoke


def _train_rows(path) -> list[dict]:
    """A stage's training rows from its metrics.jsonl (the monitor's rows left out)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in rows if not any(k.startswith("monitor/") for k in r)]


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
    ppo_row = _train_rows(out / "ppo" / "metrics.jsonl")[-1]
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
    names = set(final["eval"])
    assert {"base", "sft", "dpo", "grpo"} <= names  # the earlier DPO evaluation is kept
    assert all(n.endswith(("_best", "_last")) for n in names - {"base", "sft", "dpo", "grpo"})  # monitor's kept ones
    dpo = final["dpo"]
    assert dpo["heldout_accuracy"] > 0.6 and dpo["kl_heldout"] > 0
    row = _train_rows(alt / "dpo" / "metrics.jsonl")[0]
    for key in ("loss/dpo", "rewards/margin", "rewards/accuracy", "logps/chosen", "logps/rejected"):
        assert key in row and math.isfinite(row[key])
    grpo_row = _train_rows(alt / "grpo" / "metrics.jsonl")[-1]
    for key in ("reward/score", "reward/gold", "kl/ref", "groups/flat", "policy/clipfrac"):
        assert key in grpo_row and math.isfinite(grpo_row[key])


def test_monitor_is_quiet_with_the_default_kl(tiny_run):
    out, summary = tiny_run
    m = summary["monitor"]["ppo"]
    assert m["hacking_detected"] is False and m["first_alarm_step"] is None and m["alarms"] == []
    assert m["heldout"] == "gold" and m["last_step"] == 40
    history = json.loads((out / "ppo" / "monitor.json").read_text())["history"]
    assert [r["step"] for r in history] == [0, 5, 10, 15, 20, 25, 30, 35, 40]  # tiny: 8 checks over 40 steps
    for key in ("proxy", "gold", "kl", "entropy", "length", "distinct1", "distinct2", "repeat_rate",
                "refusal_rate", "flattery_rate"):
        assert all(math.isfinite(r[f"monitor/{key}"]) for r in history), key
    assert history[-1]["monitor/proxy"] > history[0]["monitor/proxy"] and history[0]["monitor/kl"] == 0
    assert list((out / "tensorboard" / "ppo").glob("events.out.tfevents.*"))
    assert "no over-optimisation alarm" in (out / "report.html").read_text()


@pytest.fixture(scope="module")
def tiny_hacked(tiny_run, tmp_path_factory):
    """PPO from the same SFT policy and reward model with no KL penalty (β = 0) and three
    times the steps: it games its reward model."""
    import shutil

    from tether.config import load_config
    from tether.pipeline import Pipeline

    out, _ = tiny_run
    hack = tmp_path_factory.mktemp("tiny_b0")
    for stage in ("data", "sft", "prefs", "rm"):
        shutil.copytree(out / stage, hack / stage)
    cfg = load_config(preset="tiny", overrides=[f"out={hack}", "ppo.kl.controller=fixed", "ppo.kl.init_coef=0",
                                                "ppo.steps=120", "monitor.checks=12", "eval.policies=[ppo]"])
    return hack, cfg, Pipeline(cfg).run()


def test_without_kl_the_monitor_catches_reward_hacking(tiny_hacked):
    hack, cfg, summary = tiny_hacked
    m = summary["monitor"]["ppo"]
    assert m["hacking_detected"] is True
    kinds = {a["kind"]: a["step"] for a in m["alarms"]}
    assert "proxy_up_heldout_down" in kinds
    history = {r["step"]: r for r in json.loads((hack / "ppo" / "monitor.json").read_text())["history"]}
    best, alarm = history[m["best_step"]], history[kinds["proxy_up_heldout_down"]]
    assert alarm["monitor/proxy"] > best["monitor/proxy"]  # the proxy still rose ...
    assert alarm["monitor/gold"] < best["monitor/gold"] - 0.03  # ... while gold fell
    assert m["best_step"] < m["last_step"] and m["best_heldout"] > m["last_heldout"]
    assert m["checkpoint"] == "last" and (hack / "ppo" / "best" / "config.json").is_file()
    assert "over-optimisation detected" in (hack / "report.html").read_text()


def test_the_kept_best_checkpoint_beats_the_last_on_heldout_gold(tiny_hacked):
    """Selected on the validation prompts, judged on the held-out ones: the eval stage
    evaluates the kept best checkpoint beside the last one (ppo_best)."""
    from tether.pipeline import Pipeline

    hack, cfg, summary = tiny_hacked
    pipe = Pipeline(cfg)
    assert not set(pipe.validation_prompts()) & set(pipe.task.heldout_prompts())
    assert not set(pipe.validation_prompts()) & set(pipe.train_prompts())
    best, last = summary["eval"]["ppo_best"], summary["eval"]["ppo"]
    combined = math.sqrt(best["gold_stderr"] ** 2 + last["gold_stderr"] ** 2)
    assert best["gold_mean"] - last["gold_mean"] > 2 * combined, (best["gold_mean"], last["gold_mean"])
    assert best["reference"] == "sft" and best["kl_to_ref"] < last["kl_to_ref"]
    assert json.loads((hack / "eval" / "stage.json").read_text())["policies"] == ["ppo", "ppo_best"]


def test_early_stop_ends_the_stage_at_the_alarm(tiny_hacked, tmp_path):
    import shutil

    from tether.config import load_config
    from tether.pipeline import Pipeline

    hack, _, summary = tiny_hacked
    for stage in ("data", "sft", "prefs", "rm"):
        shutil.copytree(hack / stage, tmp_path / stage)
    cfg = load_config(preset="tiny", overrides=[f"out={tmp_path}", "ppo.kl.controller=fixed", "ppo.kl.init_coef=0",
                                                "ppo.steps=120", "monitor.checks=12", "monitor.early_stop=true",
                                                "monitor.select=best", "stages=[ppo]", "report=false"])
    stopped = Pipeline(cfg).run()
    m = stopped["monitor"]["ppo"]
    alarm = next(a["step"] for a in m["alarms"] if a["kind"] == "proxy_up_heldout_down")
    assert m["early_stopped_at"] == alarm < 120  # drift alarms alone do not stop (stop_on: hacking)
    assert json.loads((tmp_path / "ppo" / "stage.json").read_text())["steps"] == alarm
    # select: best -> the checkpoint is the best check's weights, the last ones beside it
    assert m["checkpoint"] == "best" and (tmp_path / "ppo" / "last" / "config.json").is_file()
    assert not (tmp_path / "report.html").exists()


def test_eval_is_stale_once_its_policy_stage_finished_again(tiny_run):
    from tether.config import load_config
    from tether.pipeline import Pipeline

    out, _ = tiny_run
    pipe = Pipeline(load_config(preset="tiny", overrides=[f"out={out}"]))
    assert pipe.is_done("eval")
    stage = out / "ppo" / "stage.json"
    before = stage.stat()
    try:
        os.utime(stage, (before.st_atime, (out / "eval" / "stage.json").stat().st_mtime + 10))
        assert not pipe.is_done("eval")  # ppo ran again after the evaluation
    finally:
        os.utime(stage, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert pipe.is_done("eval")


def _reuse(tiny_run, tmp_path, stages=("data", "sft")):
    """A new run folder holding copies of the tiny run's finished ``stages``."""
    import shutil

    src, _ = tiny_run
    for stage in stages:
        shutil.copytree(src / stage, tmp_path / stage)
    return tmp_path


def test_rlaif_run_with_the_ai_judge_completes(tiny_run, tmp_path):
    """`tether run --feedback judge` on the tiny preset: the judge labels, the RM trains on
    its rankings, PPO and the evaluation run, and the judge's figures reach the summary."""
    from tether.cli import main

    out = _reuse(tiny_run, tmp_path)
    rc = main(["run", "--preset", "tiny", "--out", str(out), "--feedback", "judge", "--prefs.n_prompts", "200",
               "--ppo.steps", "4", "--eval.n_prompts", "16", "--monitor.n_prompts", "8", "--monitor.checks", "1"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    prefs = summary["preferences"]
    assert prefs["source"] == "judge (hf:tiny)" and prefs["rankings"] == 200
    assert prefs["judge_accuracy"]["pairs"] > 1000 and 0 <= prefs["judge_accuracy"]["swapped"] <= 1
    assert 0 <= prefs["judge_position_bias"]["first_slot_rate"] <= 1
    verdicts = (out / "prefs" / "verdicts.jsonl").read_text().splitlines()
    assert len(verdicts) == 200 * 6
    assert {"base", "sft", "ppo"} <= set(summary["eval"])
    assert "AI judge hf:tiny" in (out / "report.html").read_text()


def test_soft_labels_from_several_labelers_train_the_reward_model(tiny_run, tmp_path):
    from tether.config import load_config
    from tether.data.schemas import load_rankings
    from tether.pipeline import Pipeline

    out = _reuse(tiny_run, tmp_path)
    # two labelers per shared item: where they split, the pair is a tie
    cfg = load_config(preset="tiny", overrides=[f"out={out}", "prefs.aggregate=soft", "prefs.overlap=0.5",
                                                "prefs.labelers_per_item=2", "prefs.n_prompts=1500",
                                                "stages=[data,sft,prefs,rm]"])
    summary = Pipeline(cfg).run()
    prefs = summary["preferences"]
    train = load_rankings(out / "prefs" / "rankings.jsonl", allow_empty_responses=True)
    ties = [r for r in train if r.tiers]
    assert len(ties) > 100 and all(r.pair_targets() == [0.5] for r in ties)
    assert all(r.soft_label == 1.0 for r in train)  # two votes: agreement (1) or a tie
    assert prefs["labels"] == 750 * 2 + 750 and prefs["rankings"] == len(train)
    assert 0.6 <= prefs["agreement"]["percent_agreement"] <= 0.85
    assert summary["reward_model"]["heldout_accuracy"] >= 0.7
