"""Data parallel equals one process: SFT, reward model, DPO and PPO trained by 2 processes
(gloo, CPU) give the weights one process gives on the same global batches.

Everything runs in float64, so the only difference is the order of float sums (each
process sums its share of a step before the gradients are added up): the tolerance is
1e-9 on weights that training moves by more than 1e-4. Batches are odd-sized so that the
two processes get unequal shares.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

from tether.config import GenerationConfig, ModelConfig, OptimConfig

MODEL = ModelConfig(max_length=64, max_prompt_length=32)
TRAINERS = ("sft", "rm", "dpo", "ppo", "ppo-critic", "grpo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(trainer: str, tiny_path: str):
    """One trainer's final weights (float64), the same code on any number of processes."""
    from tether.data.tokenize import Encoder
    from tether.models import frozen_copy, load_policy, load_scalar_model, load_tokenizer
    from test_invariants import _demos, _rankings

    torch.manual_seed(0)
    encoder = Encoder(load_tokenizer(tiny_path), MODEL.max_length, MODEL.max_prompt_length)
    optim = OptimConfig(lr=1e-3, batch_size=9, micro_batch_size=3)
    if trainer == "sft":
        from tether.algorithms.sft import train_sft
        from tether.config import SFTConfig

        model = load_policy(tiny_path, MODEL).double()
        train_sft(model, encoder, _demos(27), SFTConfig(max_steps=3, optim=optim), seed=11)
    elif trainer == "rm":
        from tether.algorithms.reward import train_reward
        from tether.config import RMConfig

        model = load_scalar_model(tiny_path, MODEL, pad_token_id=encoder.pad_id).double()
        train_reward(model, encoder, _rankings(27), RMConfig(max_steps=3, optim=optim), seed=11)
    elif trainer == "dpo":
        from tether.algorithms.dpo import train_dpo
        from tether.config import DPOConfig

        model = load_policy(tiny_path, MODEL).double()
        train_dpo(model, frozen_copy(model), encoder, _rankings(27), DPOConfig(max_steps=3, optim=optim), seed=11)
    elif trainer == "grpo":
        # the update on a given rollout: each process samples the whole batch with the same
        # seed and weights (so the same samples), then trains its share of each mini-batch
        from tether.algorithms.grpo import grpo_update
        from tether.config import GRPOConfig
        from tether.engine import Engine
        from tether.rollout import generate
        from tether.tasks import get_task

        task = get_task("tiny")
        model = load_policy(tiny_path, MODEL).double()
        reference = frozen_copy(model)
        cfg = GRPOConfig(steps=2, rollout_batch_size=12, samples_per_prompt=4, mini_batch_size=12,
                         micro_batch_size=4, epochs=2, beta=0.05, generation=GenerationConfig(max_new_tokens=6),
                         optim=OptimConfig(lr=1e-3))
        engine = Engine(model.parameters(), cfg.optim, 4)
        generator = torch.Generator().manual_seed(2)
        prompts = task.train_prompts()[:3]
        for step in range(cfg.steps):
            rollout = generate(model, encoder, [p for p in prompts for _ in range(4)], cfg.generation, seed=10 + step)
            raw = torch.tensor(task.gold_batch(rollout.prompts, rollout.texts)) + 0.1 * rollout.lengths.float()
            grpo_update(model, reference, engine, rollout, raw, cfg, generator)
    else:
        from tether.algorithms.ppo import train_ppo
        from tether.config import PPOConfig
        from tether.tasks import get_task

        task = get_task("tiny")
        model = load_policy(tiny_path, MODEL).double()
        if trainer == "ppo":  # the default critic: a value head on the policy's hidden states
            from tether.algorithms.ppo import ValueHead

            value = ValueHead(model.config.hidden_size).double()
        else:  # a second backbone
            value = load_scalar_model(tiny_path, MODEL, pad_token_id=encoder.pad_id).double()
        # greedy sampling: each process's block of prompts decodes to what one process's whole batch does
        cfg = PPOConfig(steps=2, rollout_batch_size=12, mini_batch_size=6, micro_batch_size=2, epochs=2,
                        samples_per_prompt=2, generation=GenerationConfig(max_new_tokens=6, temperature=0.0),
                        optim=OptimConfig(lr=1e-3))

        def score(rollout):
            return torch.tensor(task.gold_batch(rollout.prompts, rollout.texts), dtype=torch.float64) + \
                0.1 * rollout.lengths.double()

        train_ppo(model, value, frozen_copy(model), encoder, task.train_prompts()[:40], score, cfg, seed=3)
        return {**{f"policy.{k}": v for k, v in model.state_dict().items()},
                **{f"value.{k}": v for k, v in value.state_dict().items()}}
    return model.state_dict()


def _worker(rank: int, world: int, port: int, tiny_path: str, out_dir: str) -> None:
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), TETHER_QUIET="1")
    torch.set_num_threads(1)
    from tether import distributed

    assert distributed.init_from_env()
    try:
        for trainer in TRAINERS:
            state = _train(trainer, tiny_path)
            if rank == 0:
                torch.save(state, os.path.join(out_dir, f"{trainer}.pt"))
    finally:
        distributed.shutdown()


@pytest.fixture(scope="module")
def two_process_weights(tiny_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), tiny_path, str(out)), nprocs=2, join=True)
    return {t: torch.load(out / f"{t}.pt", weights_only=True) for t in TRAINERS}


@pytest.mark.smoke
@pytest.mark.parametrize("trainer", TRAINERS)
def test_two_processes_give_the_weights_of_one(tiny_path, two_process_weights, trainer, monkeypatch):
    monkeypatch.setenv("TETHER_QUIET", "1")
    one = _train(trainer, tiny_path)
    two = two_process_weights[trainer]
    assert one.keys() == two.keys()
    from tether.models import load_policy

    start = load_policy(tiny_path, MODEL).double().state_dict()
    moved = max(float((one[k] - start[k.removeprefix("policy.")]).abs().max())
                for k in one if k.removeprefix("policy.") in start and one[k].is_floating_point()
                and one[k].shape == start[k.removeprefix("policy.")].shape)
    assert moved > 1e-4, "training did not move the weights; the comparison would be vacuous"
    diff = max(float((one[k] - two[k]).abs().max()) for k in one if one[k].is_floating_point())
    # with a second-backbone critic, PPO takes the rollout-time log-probs from the sampling
    # steps, which hold them in float32: one process decodes 6 prompts per batch, two decode
    # 3 each, and the padding changes their last bits (1e-7), which Adam's first steps
    # amplify on weights whose gradient is about 0 (see tests/test_ppo.py)
    tolerance = 1e-4 if trainer == "ppo-critic" else 1e-9
    print(f"{trainer}: 2 processes vs 1, max |weight difference| {diff:.3g} (training moved weights by {moved:.3g})")
    assert diff < tolerance, f"{trainer}: 2 processes differ from 1 by {diff:.3g}"


def test_sharing_helpers_split_and_sum_as_documented():
    from tether import distributed

    assert distributed.shard(list(range(7)), world=2, at=0) == [0, 2, 4, 6]
    assert distributed.shard(list(range(7)), world=2, at=1) == [1, 3, 5]
    # one process: the identity
    assert distributed.local_micro([[0, 1], [2]], 2) == [[0, 1], [2]]
    assert distributed.all_sum(2.5) == 2.5
    assert distributed.all_sum_dict({"a": 1.0}) == {"a": 1.0}


@pytest.mark.smoke
def test_tether_run_nproc_2_runs_the_pipeline_data_parallel(tmp_path, _tether_home):
    """`tether run --nproc 2`: torchrun starts 2 processes; the training stages run on both
    (stage.json says so), the first process alone writes the run directory."""
    import json
    import subprocess
    import sys

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "tether.cli", "run", "--preset", "tiny", "--nproc", "2", "--out", str(out),
           "--sft.epochs", "1", "--prefs.n_prompts", "400", "--rm.epochs", "1", "--ppo.steps", "4",
           "--monitor.checks", "2", "--eval.n_prompts", "32"]
    env = {**os.environ, "TETHER_QUIET": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for stage in ("sft", "rm", "ppo"):
        assert json.loads((out / stage / "stage.json").read_text())["processes"] == 2
    assert "processes" not in json.loads((out / "prefs" / "stage.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["eval"]) >= {"base", "sft", "ppo"}
    rows = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward/score" in r] == [0, 1, 2, 3]  # one writer, no duplicates
