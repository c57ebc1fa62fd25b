"""GRPO and RLOO: policy gradients with a group baseline instead of a critic.

One iteration (Shao et al. 2024 for GRPO; Ahmadian et al. 2024 for RLOO):

1. sample G responses for each prompt of a rollout batch (adjacent rows);
2. reward each one (reward model, verifiable checker, any callable or a weighted sum);
   RLOO takes β·Σ_t(logπ − logπ_ref) off each reward here (``kl_penalty: reward``);
3. advantages within each prompt's group: GRPO (r − mean)/(std + ε) (or the batch's std,
   or none: Dr. GRPO), RLOO r − mean of the other G − 1; one value per sequence, given to
   all its tokens;
4. epochs × mini-batches of the clipped ratio loss, plus β·k3 per token to the reference
   for GRPO (``kl_penalty: loss``); β = 0 runs no reference at all.

With one epoch and one mini-batch (the default) the update is on-policy: the rollout-time
log-probs equal the current ones, so no forward pass is spent on them.
"""

from __future__ import annotations

import inspect
import time
from typing import Callable

import torch

from tether.advantages import grpo_advantages, rloo_advantages
from tether.algorithms.ppo import _pad_to, rows_logprobs
from tether.config import GRPOConfig
from tether.data.tokenize import Encoder
from tether.checkpoint import Checkpointer, LoopState, RNGState
from tether.engine import Engine, MetricsLogger, progress_bar
from tether.losses import grpo_policy_loss
from tether.models import reference_context
from tether.rollout import SamplingCopy, active_autocast_dtype, generate, group_chunks

__all__ = ["train_grpo", "group_advantages"]


def group_advantages(rewards: torch.Tensor, cfg: GRPOConfig) -> torch.Tensor:
    """Per-sequence advantages [B] from rewards [B] laid out in groups of G adjacent rows."""
    grouped = rewards.view(-1, cfg.samples_per_prompt)
    if cfg.advantage == "rloo":
        return rloo_advantages(grouped).reshape(-1)
    return grpo_advantages(grouped, scale=cfg.scale, eps=cfg.eps).reshape(-1)


@torch.no_grad()
def _logprobs(model, rollout, chunk: int, group: int) -> torch.Tensor:
    device = next(model.parameters()).device
    out = torch.zeros(len(rollout), rollout.response_ids.size(1))
    for rows in group_chunks(rollout, group, chunk):
        out[rows] = _pad_to(rows_logprobs(model, rollout, rows, device, group).float().cpu(), out.size(1))
    return out


def train_grpo(
    policy,
    reference,
    encoder: Encoder,
    prompts: list,
    reward_fn: Callable[..., torch.Tensor],
    cfg: GRPOConfig,
    *,
    seed: int = 0,
    gold_fn: Callable[[list, list], list] | None = None,
    logger: MetricsLogger | None = None,
    name: str = "grpo",
    monitor=None,
    checkpointer: Checkpointer | None = None,
) -> dict:
    """Optimise ``policy`` in place.

    Args:
        reference: frozen reference policy, or None for ``policy`` with adapters disabled
            (unused when ``cfg.beta`` is 0).
        prompts: training prompts, cycled in shuffled order.
        reward_fn: ``(rollout)`` or ``(rollout, group)`` → rewards [B]; ``group`` is the number
            of adjacent rows sharing a prompt.
        gold_fn: optional (prompts, texts) → gold scores, logged as ``reward/gold``.
        monitor: optional :class:`tether.monitor.Monitor` (checked before the first step and
            as it asks; it can stop training early).
        checkpointer: saves the training state every few rollouts and resumes from its
            newest checkpoint.
    """
    G = cfg.samples_per_prompt
    n_prompts = cfg.rollout_batch_size // G
    share = G if cfg.share_prompt else 1
    use_ref = cfg.beta > 0
    on_policy = cfg.epochs == 1 and cfg.mini_batch_size == cfg.rollout_batch_size
    need_old = not on_policy or (use_ref and cfg.kl_penalty == "reward")  # rollout-time log-probs
    reward_takes_group = len(inspect.signature(reward_fn).parameters) >= 2
    updates = cfg.steps * cfg.epochs * (cfg.rollout_batch_size // cfg.mini_batch_size)
    engine = Engine([p for p in policy.parameters() if p.requires_grad], cfg.optim, updates, name=name)
    generator = torch.Generator().manual_seed(seed)
    device = next(policy.parameters()).device
    low = active_autocast_dtype(device)
    is_peft = hasattr(policy, "merge_and_unload")
    sampler = SamplingCopy(policy, low or next(policy.parameters()).dtype) if low is not None or is_peft else None
    loop = LoopState(order=[], first={}, last={}, steps_done=0, stopped=False)
    state = {"policy": policy, "engine": engine, "rng": RNGState(data=generator), "loop": loop}
    if logger is not None:
        state["metrics"] = logger
    if monitor is not None:
        state["monitor"] = monitor
    start = checkpointer.resume(state) if checkpointer is not None else 0
    start_time = time.time()
    bar = progress_bar(cfg.steps, name, unit="rollout")
    bar.update(start)
    if monitor is not None:
        monitor.sampler = sampler
        if not start:
            monitor.check(0)
    for step in range(start, 0 if loop["stopped"] else cfg.steps):
        # 1. rollout: n_prompts prompts × G samples in adjacent rows
        if len(loop["order"]) < n_prompts:
            loop["order"] += torch.randperm(len(prompts), generator=generator).tolist()
        idx, loop["order"] = loop["order"][:n_prompts], loop["order"][n_prompts:]
        t0 = time.time()
        if sampler is not None:
            sampler.sync()
        # sampling with the policy itself keeps its log-probs: the rollout-time log-probs
        # (several updates per rollout, or RLOO's KL in the reward) need no forward pass
        rollout = generate(sampler.model if sampler is not None else policy, encoder,
                           [prompts[i] for i in idx for _ in range(G)], cfg.generation, seed=seed * 1_000_003 + step,
                           logprobs=sampler is None and need_old)
        t_gen = time.time() - t0
        mask = rollout.response_mask.float()

        # 2. rewards (and RLOO's KL in the reward)
        raw = (reward_fn(rollout, share) if reward_takes_group else reward_fn(rollout)).float().cpu()
        rewards = raw - cfg.missing_eos_penalty * (~rollout.ended).float() if cfg.missing_eos_penalty else raw.clone()
        policy.eval()
        old_logprobs = None
        if need_old:
            old_logprobs = rollout.logprobs if rollout.logprobs is not None else \
                _logprobs(policy, rollout, cfg.micro_batch_size, share)
        ref_logprobs = None
        if use_ref:
            with reference_context(policy, reference) as ref:
                ref_logprobs = _logprobs(ref, rollout, cfg.micro_batch_size, share)
        policy.train()
        seq_kl = None
        if old_logprobs is not None and ref_logprobs is not None:
            seq_kl = ((old_logprobs - ref_logprobs) * mask).sum(dim=1)
        if use_ref and cfg.kl_penalty == "reward":
            rewards = rewards - cfg.beta * seq_kl

        # 3. group-relative advantages, one per sequence
        advantages = group_advantages(rewards, cfg)
        spread = rewards.view(-1, G)
        flat_groups = float((spread.amax(dim=1) == spread.amin(dim=1)).float().mean())

        # 4. clipped policy loss (+ β·k3 to the reference), whole groups per micro-batch
        stats: dict[str, list[float]] = {k: [] for k in ("loss/policy", "policy/clipfrac", "policy/approx_kl",
                                                         "kl/k3", "optim/grad_norm")}
        kl_in_loss = use_ref and cfg.kl_penalty == "loss"
        live_kl = torch.zeros(len(rollout))
        t0 = time.time()
        for epoch in range(cfg.epochs):
            perm = torch.randperm(len(rollout) // G, generator=generator)
            perm = (perm.unsqueeze(1) * G + torch.arange(G)).reshape(-1)
            for b in range(0, len(rollout), cfg.mini_batch_size):
                mb = perm[b : b + cfg.mini_batch_size]
                mb_tokens = float(mask[mb].sum())
                mb_loss = 0.0
                for c in range(0, len(mb), cfg.micro_batch_size):
                    j = mb[c : c + cfg.micro_batch_size]
                    logps = rows_logprobs(policy, rollout, j, device, share)
                    w = logps.size(1)
                    m = mask[j][:, :w].to(device)
                    old = logps.detach() if old_logprobs is None else old_logprobs[j][:, :w].to(device)
                    ref = ref_logprobs[j][:, :w].to(device) if ref_logprobs is not None else None
                    loss, st = grpo_policy_loss(logps, old, advantages[j].to(device), m, clip=cfg.clip,
                                                ref_logprobs=ref if kl_in_loss else None,
                                                beta=cfg.beta if kl_in_loss else 0.0, aggregation=cfg.aggregation)
                    # micro-batch means → the mini-batch's mean (over tokens or over sequences)
                    weight = float(m.sum()) / mb_tokens if cfg.aggregation == "token" else len(j) / len(mb)
                    (loss * weight).backward()
                    mb_loss += loss.detach().item() * weight
                    stats["loss/policy"].append(loss.detach().item())
                    stats["policy/clipfrac"].append(float(st["clipfrac"]))
                    stats["policy/approx_kl"].append(float(st["approx_kl"]))
                    if "kl_ref" in st:
                        stats["kl/k3"].append(float(st["kl_ref"]))
                    if epoch == 0 and ref is not None:
                        live_kl[j] = ((logps.detach() - ref) * m).sum(dim=1).float().cpu()
                info = engine.step(mb_loss)
                stats["optim/grad_norm"].append(info["grad_norm"])
        t_train = time.time() - t0
        if seq_kl is None and ref_logprobs is not None:
            seq_kl = live_kl

        row = {
            "reward/score": float(raw.mean()),
            "reward/advantaged": float(rewards.mean()),
            "groups/flat": flat_groups,
            "response/length": float(rollout.lengths.float().mean()),
            "response/ended": float(rollout.ended.float().mean()),
            "time/generate": t_gen,
            "time/train": t_train,
            **{k: sum(v) / len(v) for k, v in stats.items() if v},
        }
        if seq_kl is not None:
            row["kl/ref"] = float(seq_kl.mean())
        if gold_fn is not None:
            gold = gold_fn(rollout.prompts, rollout.texts)
            row["reward/gold"] = sum(gold) / len(gold)
        if logger is not None:
            logger.log(step, row)
        loop["first"] = loop["first"] or row
        loop["last"] = row
        bar.set_postfix(reward=f"{row['reward/score']:.3f}",
                        **({"kl": f"{row['kl/ref']:.2f}"} if "kl/ref" in row else {}),
                        **({"gold": f"{row['reward/gold']:.3f}"} if "reward/gold" in row else {}))
        bar.update(1)
        loop["steps_done"] = steps_done = step + 1
        if monitor is not None and monitor.due(steps_done) and monitor.check(steps_done):
            loop["stopped"] = True
        if checkpointer is not None:
            checkpointer.step(steps_done, state, final=loop["stopped"] or steps_done == cfg.steps)
        if loop["stopped"]:
            break
    bar.close()
    out = {
        "steps": loop["steps_done"],
        "planned_steps": cfg.steps,
        "advantage": cfg.advantage,
        "seconds": time.time() - start_time,
        "skipped_steps": engine.skipped_steps,
        "first": loop["first"],
        "last": loop["last"],
    }
    if start:
        out["resumed_from_step"] = start
    return out
