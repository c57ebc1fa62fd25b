"""GRPO/RLOO with rollout and training on separate Ray workers, in the manner of OpenRLHF
and veRL: a placement group reserves one bundle for the trainer (policy, reference,
optimiser) and one per rollout worker (a sampling copy of the policy and the reward
function), on one machine or across a cluster's nodes.

One iteration:

1. the trainer draws the rollout's prompts (the same generator :func:`train_grpo` uses);
2. each rollout worker samples and rewards a block of them, all at once;
3. the trainer runs :func:`tether.algorithms.grpo.grpo_update` on the joined rollout;
4. the trainer's new weights go to every rollout worker through Ray's object store (one
   copy, read by all; LoRA adapters are merged into the base weights first).

With one rollout worker this is :func:`train_grpo` step for step: the same prompts, the
same sampling seeds, the same update (``tests/test_scale.py`` checks it).

Ray is an optional extra (``pip install 'tether[ray]'``); ``ray.init`` joins the cluster at
``address`` (or ``RAY_ADDRESS``), or starts a local one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from tether.config import GRPOConfig, LoRAConfig, ModelConfig

__all__ = ["Placement", "train_grpo_ray", "ModelReward", "TaskReward"]


@dataclass
class Placement:
    """Where the workers go: resources per bundle and how bundles spread over nodes."""

    rollout_workers: int = 1
    rollout_cpus: float = 1.0
    rollout_gpus: float = 0.0
    trainer_cpus: float = 1.0
    trainer_gpus: float = 0.0
    strategy: str = "PACK"  # PACK: as few nodes as possible; SPREAD: one bundle per node where possible
    address: str | None = None  # a running cluster (None: RAY_ADDRESS, or a local one)

    def bundles(self) -> list[dict]:
        def bundle(cpus, gpus):
            return {"CPU": cpus, **({"GPU": gpus} if gpus else {})}

        return [bundle(self.trainer_cpus, self.trainer_gpus)] + \
            [bundle(self.rollout_cpus, self.rollout_gpus)] * self.rollout_workers


class ModelReward:
    """A reward model as a picklable reward function: the checkpoint loads in the process
    that first calls it (a rollout worker), not in the driver."""

    def __init__(self, path: str, model_cfg: ModelConfig, chunk: int = 32, penalty: float = 0.0):
        self.path, self.model_cfg, self.chunk, self.penalty = path, model_cfg, chunk, penalty
        self._model = None

    def __getstate__(self):
        return {**self.__dict__, "_model": None}

    def __call__(self, rollout, group: int = 1) -> torch.Tensor:
        from tether.algorithms.reward import ensemble_reward, score_rollout
        from tether.models import load_scalar_model

        if self._model is None:
            self._model = load_scalar_model(self.path, self.model_cfg, num_labels=None).to(_device())
            self._model.requires_grad_(False)
        return ensemble_reward(score_rollout(self._model, rollout, self.chunk, group), self.penalty)


class TaskReward:
    """A built-in task's gold score as a picklable reward function (e.g. a verifiable
    checker, run on the rollout workers)."""

    def __init__(self, task: str, n_heldout: int = 128):
        self.task, self.n_heldout = task, n_heldout

    def __call__(self, rollout) -> torch.Tensor:
        from tether.tasks import get_task

        return torch.tensor(get_task(self.task, n_heldout=self.n_heldout).gold_batch(rollout.prompts, rollout.texts),
                            dtype=torch.float32)


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _encoder(path: str, model_cfg: ModelConfig):
    from tether.data.tokenize import Encoder
    from tether.models import load_tokenizer

    return Encoder(load_tokenizer(path), model_cfg.max_length, model_cfg.max_prompt_length)


def _plain_weights(policy) -> dict[str, torch.Tensor]:
    """The policy's weights as a plain causal LM's state dict on the CPU (LoRA merged)."""
    if hasattr(policy, "merge_and_unload"):
        import copy

        policy = copy.deepcopy(policy).merge_and_unload()
    return {k: v.detach().to("cpu", copy=True) for k, v in policy.state_dict().items()}


class RolloutWorker:
    """Samples and rewards blocks of prompts with its own copy of the policy."""

    def __init__(self, path: str, model_cfg: ModelConfig, cfg: GRPOConfig, reward_fn: Callable, threads: int = 0):
        import inspect

        from tether.models import load_policy

        if threads:
            torch.set_num_threads(threads)
        self.cfg, self.model_cfg = cfg, model_cfg
        self.encoder = _encoder(path, model_cfg)
        self.model = load_policy(path, model_cfg, trainable=False)
        self.reward_fn = reward_fn
        self.takes_group = len(inspect.signature(reward_fn).parameters) >= 2
        self.engine = None
        if cfg.rollout_backend == "vllm":  # a vLLM engine on this worker's GPU samples
            from tether.rollout.vllm import VLLMEngine

            self.engine = VLLMEngine(self.model, self.encoder, memory=cfg.vllm_memory)

    def rollout(self, prompts: list, seed: int, logprobs: bool):
        from tether.rollout import generate

        G = self.cfg.samples_per_prompt
        share = G if self.cfg.share_prompt else 1
        t0 = time.time()
        if self.engine is not None:  # the trainer computes the rollout-time log-probs itself
            rollout = self.engine.generate(prompts, self.cfg.generation, seed=seed)
        else:
            from tether.models import autocast_context

            with autocast_context(self.model_cfg.autocast, _device()):
                rollout = generate(self.model, self.encoder, prompts, self.cfg.generation, seed=seed,
                                   logprobs=logprobs)
        t_gen = time.time() - t0
        rewards = (self.reward_fn(rollout, share) if self.takes_group else self.reward_fn(rollout)).float().cpu()
        return rollout, rewards, t_gen

    def load_weights(self, state: dict) -> int:
        self.model.load_state_dict(state)
        if self.engine is not None:
            self.engine.sync(self.model)
        return len(state)

    def weights(self) -> dict:
        return _plain_weights(self.model)


class Trainer:
    """Holds the policy, its reference and the optimiser; runs one update per rollout."""

    def __init__(self, path: str, model_cfg: ModelConfig, lora: LoRAConfig | None, cfg: GRPOConfig, seed: int,
                 threads: int = 0, name: str = "grpo"):
        from tether.engine import Engine
        from tether.models import frozen_copy, load_policy

        if threads:
            torch.set_num_threads(threads)
        self.cfg, self.model_cfg = cfg, model_cfg
        self.policy = load_policy(path, model_cfg, lora)
        self.reference = frozen_copy(self.policy) if cfg.beta > 0 and not (lora and lora.enabled) else None
        updates = cfg.steps * cfg.epochs * (cfg.rollout_batch_size // cfg.mini_batch_size)
        self.engine = Engine([p for p in self.policy.parameters() if p.requires_grad], cfg.optim, updates, name=name)
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def next_prompts(self, n_prompts: int, n_total: int) -> list[int]:
        """The next rollout's prompt indices, drawn as :func:`train_grpo` draws them."""
        if len(self.order) < n_prompts:
            self.order += torch.randperm(n_total, generator=self.generator).tolist()
        idx, self.order = self.order[:n_prompts], self.order[n_prompts:]
        return idx

    def update(self, rollout, rewards: torch.Tensor) -> dict:
        from tether.algorithms.grpo import grpo_update

        from tether.models import autocast_context

        t0 = time.time()
        with autocast_context(self.model_cfg.autocast, _device()):
            row = grpo_update(self.policy, self.reference, self.engine, rollout, rewards, self.cfg, self.generator)
        row["time/train"] = time.time() - t0
        return row

    def weights(self) -> dict:
        return _plain_weights(self.policy)

    def save(self, dest: str, tokenizer_from: str) -> str:
        from tether.models import load_tokenizer, save_checkpoint

        return str(save_checkpoint(self.policy, load_tokenizer(tokenizer_from), dest))


def train_grpo_ray(path: str, model_cfg: ModelConfig, prompts: list, reward_fn: Callable, cfg: GRPOConfig, *,
                   lora: LoRAConfig | None = None, placement: Placement | None = None, seed: int = 0,
                   gold_fn: Callable[[list, list], list] | None = None, logger=None, save_to: str | None = None,
                   name: str = "grpo") -> dict:
    """GRPO/RLOO from the causal-LM checkpoint at ``path`` with Ray workers.

    Args:
        reward_fn: picklable ``(rollout)`` or ``(rollout, group)`` → rewards [B], run on the
            rollout workers (e.g. a task's gold checker, or :class:`ModelReward`).
        placement: the workers' resources and spread (default: one rollout worker and the
            trainer, one CPU each).
        save_to: write the trained policy there as a plain checkpoint.

    Returns a summary: steps, seconds, the first and last rollouts' metrics, where the
    workers ran (node ids), and the largest difference between the trainer's weights and
    a rollout worker's after the last sync (0 when the sync works).
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from tether.algorithms.grpo import needs_old_logprobs
    from tether.engine import progress_bar
    from tether.rollout import merge_rollouts

    placement = placement or Placement()
    started = False
    if not ray.is_initialized():
        ray.init(address=placement.address, include_dashboard=False, log_to_driver=False,
                 **({} if placement.address else {"num_cpus": max(2, int(sum(b["CPU"] for b in placement.bundles())))}))
        started = True
    pg = placement_group(placement.bundles(), strategy=placement.strategy)
    ray.get(pg.ready(), timeout=600)
    start_time = time.time()
    try:
        def at(index: int, cpus: float, gpus: float):
            return dict(num_cpus=cpus, num_gpus=gpus, scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=index))

        trainer = ray.remote(Trainer).options(**at(0, placement.trainer_cpus, placement.trainer_gpus)).remote(
            path, model_cfg, lora, cfg, seed, int(placement.trainer_cpus), name)
        workers = [ray.remote(RolloutWorker).options(**at(1 + k, placement.rollout_cpus, placement.rollout_gpus)).remote(
            path, model_cfg, cfg, reward_fn, int(placement.rollout_cpus)) for k in range(placement.rollout_workers)]
        nodes = ray.get([a.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id())
                         for a in [trainer, *workers]])
        G = cfg.samples_per_prompt
        n_prompts = cfg.rollout_batch_size // G
        n = len(workers)
        pad_id = _encoder(path, model_cfg).pad_id
        first, last = {}, {}
        bar = progress_bar(cfg.steps, f"{name} (ray)", unit="rollout")
        for step in range(cfg.steps):
            idx = ray.get(trainer.next_prompts.remote(n_prompts, len(prompts)))
            blocks = [idx[n_prompts * k // n : n_prompts * (k + 1) // n] for k in range(n)]
            parts = ray.get([w.rollout.remote([prompts[i] for i in block for _ in range(G)],
                                              seed * 1_000_003 + step + 7_919_993 * k, needs_old_logprobs(cfg))
                             for k, (w, block) in enumerate(zip(workers, blocks)) if block])
            rollout = merge_rollouts([p[0] for p in parts], pad_id)
            rewards = torch.cat([p[1] for p in parts])
            row = ray.get(trainer.update.remote(rollout, rewards))
            row["time/generate"] = max(p[2] for p in parts)
            weights = trainer.weights.remote()  # one object, read by every worker
            ray.get([w.load_weights.remote(weights) for w in workers])
            if gold_fn is not None:
                gold = gold_fn(rollout.prompts, rollout.texts)
                row["reward/gold"] = sum(gold) / len(gold)
            if logger is not None:
                logger.log(step, row)
            first = first or row
            last = row
            bar.set_postfix(reward=f"{row['reward/score']:.3f}")
            bar.update(1)
        bar.close()
        trained, sampled = ray.get([trainer.weights.remote(), workers[0].weights.remote()])
        sync_error = max(float((trained[k].float() - sampled[k].float()).abs().max()) for k in trained)
        out = {"steps": cfg.steps, "seconds": time.time() - start_time, "first": first, "last": last,
               "nodes": {"trainer": nodes[0], "rollout": nodes[1:]}, "sync_max_abs_diff": sync_error,
               "rollout_workers": n, "bundles": placement.bundles()}
        if save_to is not None:
            out["checkpoint"] = ray.get(trainer.save.remote(save_to, path))
        out["weights"] = trained
        return out
    finally:
        remove_placement_group(pg)
        if started:
            ray.shutdown()

