"""GRPO on a local Ray cluster (CPU): a trainer and rollout workers in a placement group.

With one rollout worker, the Ray run is train_grpo step for step (same prompts, seeds and
update), so its weights must match an in-process run's; with two rollout workers the run
must complete, train, and leave the workers holding the trainer's weights.
"""

from __future__ import annotations

import pytest
import torch

from tether.config import GenerationConfig, GRPOConfig, ModelConfig, OptimConfig

ray = pytest.importorskip("ray")

MODEL = ModelConfig(max_length=64, max_prompt_length=32, autocast="off")  # fp32 on both sides


def _cfg(**kw) -> GRPOConfig:
    base = dict(steps=3, rollout_batch_size=8, samples_per_prompt=4, mini_batch_size=4, micro_batch_size=4,
                epochs=1, beta=0.05, generation=GenerationConfig(max_new_tokens=6), optim=OptimConfig(lr=1e-3))
    base.update(kw)
    return GRPOConfig(**base)


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.smoke
def test_ray_grpo_with_one_rollout_worker_equals_train_grpo(tiny_path, ray_cluster, monkeypatch):
    from tether.algorithms.grpo import train_grpo
    from tether.data.tokenize import Encoder
    from tether.models import frozen_copy, load_policy, load_tokenizer
    from tether.scale import Placement, TaskReward, train_grpo_ray
    from tether.tasks import get_task

    monkeypatch.setenv("TETHER_QUIET", "1")
    prompts = get_task("tiny").train_prompts()[:24]
    cfg = _cfg()
    out = train_grpo_ray(tiny_path, MODEL, prompts, TaskReward("tiny"), cfg, seed=4,
                         placement=Placement(rollout_workers=1, rollout_cpus=1, trainer_cpus=1))
    assert out["steps"] == 3 and out["sync_max_abs_diff"] == 0.0

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the Ray workers (one CPU each): the same float sums
    try:
        policy = load_policy(tiny_path, MODEL)
        encoder = Encoder(load_tokenizer(tiny_path), MODEL.max_length, MODEL.max_prompt_length)
        train_grpo(policy, frozen_copy(policy), encoder, prompts, TaskReward("tiny"), cfg, seed=4)
    finally:
        torch.set_num_threads(threads)
    start = load_policy(tiny_path, MODEL).state_dict()
    local = policy.state_dict()
    moved = max(float((local[k] - start[k]).abs().max()) for k in local)
    diff = max(float((local[k] - out["weights"][k]).abs().max()) for k in local)
    print(f"ray (1 rollout worker) vs train_grpo: max |weight difference| {diff:.3g}, moved {moved:.3g}")
    assert moved > 1e-4
    assert diff < 1e-5


@pytest.mark.smoke
def test_ray_grpo_places_two_rollout_workers_and_trains(tiny_path, ray_cluster, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from tether.engine import MetricsLogger
    from tether.scale import Placement, TaskReward, train_grpo_ray
    from tether.tasks import get_task

    monkeypatch.setenv("TETHER_QUIET", "1")
    task = get_task("tiny")
    logger = MetricsLogger(tmp_path / "metrics.jsonl")
    out = train_grpo_ray(tiny_path, MODEL, task.train_prompts()[:24], TaskReward("tiny"), _cfg(epochs=2), seed=1,
                         placement=Placement(rollout_workers=2, rollout_cpus=1, trainer_cpus=1),
                         gold_fn=task.gold_batch, logger=logger, save_to=str(tmp_path / "policy"))
    logger.close()
    assert out["steps"] == 3 and len(out["nodes"]["rollout"]) == 2
    assert out["sync_max_abs_diff"] == 0.0  # the workers sample with the trainer's weights
    assert [row["step"] for row in logger.history] == [0, 1, 2]
    assert all("reward/gold" in row and "loss/policy" in row for row in logger.history)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    diff = max(float((saved.state_dict()[k] - out["weights"][k]).abs().max()) for k in out["weights"])
    assert diff == 0.0


@pytest.mark.smoke
def test_pipeline_grpo_stage_on_ray(ray_cluster, tmp_path, monkeypatch):
    """`ray.enabled: true`: the grpo stage of a run places its trainer and rollout workers
    with Ray, writes its metrics and a plain checkpoint, and the eval stage measures it."""
    import json

    from tether.config import load_config
    from tether.pipeline import run_pipeline

    monkeypatch.setenv("TETHER_QUIET", "1")
    cfg = load_config(None, preset="tiny", overrides=[
        "policy=grpo", "reward=gold", "ray.enabled=true", "ray.rollout_workers=2", "grpo.steps=2",
        "grpo.rollout_batch_size=16", "grpo.samples_per_prompt=4", "grpo.mini_batch_size=16",
        "grpo.micro_batch_size=16", "sft.epochs=1", "eval.n_prompts=16", "prefs.n_prompts=400", "rm.epochs=1"])
    summary = run_pipeline(cfg, tmp_path / "run")
    stage = json.loads((tmp_path / "run" / "grpo" / "stage.json").read_text())
    assert stage["steps"] == 2 and stage["rollout_workers"] == 2 and stage["sync_max_abs_diff"] == 0.0
    assert (tmp_path / "run" / "grpo" / "checkpoint" / "config.json").is_file()
    rows = [json.loads(line) for line in (tmp_path / "run" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    assert "grpo" in summary["eval"]
