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

from tether.advantages import grpo_advantages, process_advantages, rloo_advantages
from tether import distributed
from tether.algorithms.ppo import _pad_to, my_rows, rows_logprobs, shared_rollout
from tether.config import GRPOConfig
from tether.data.tokenize import Encoder
from tether.checkpoint import Checkpointer, LoopState, RNGState
from tether.engine import Engine, MetricsLogger, progress_bar
from tether.losses import grpo_policy_loss
from tether.models import reference_context
from tether.rollout import group_chunks
from tether.rollout.sampler import PolicySampler

__all__ = ["train_grpo", "grpo_update", "group_advantages", "needs_old_logprobs"]


def group_advantages(rewards: torch.Tensor, cfg: GRPOConfig) -> torch.Tensor:
    """Per-sequence advantages [B] from rewards [B] laid out in groups of G adjacent rows."""
    grouped = rewards.view(-1, cfg.samples_per_prompt)
    if cfg.advantage == "rloo":
        return rloo_advantages(grouped).reshape(-1)
    return grpo_advantages(grouped, scale=cfg.scale, eps=cfg.eps).reshape(-1)


@torch.no_grad()
def _logprobs(model, rollout, chunk: int, group: int, rows=None) -> torch.Tensor:
    """Response log-probs [B, R] of the rollout (or of ``rows`` only, the others 0)."""
    device = next(model.parameters()).device
    out = torch.zeros(len(rollout), rollout.response_ids.size(1))
    index = torch.arange(len(rollout)) if rows is None else torch.as_tensor(rows, dtype=torch.long)
    sub = rollout if rows is None else rollout.select(index)
    for part in group_chunks(sub, group, chunk):
        out[index[part]] = _pad_to(rows_logprobs(model, sub, part, device, group).float().cpu(), out.size(1))
    return out


def needs_old_logprobs(cfg: GRPOConfig) -> bool:
    """Whether an update needs the rollout-time log-probs: several updates per rollout, or
    RLOO's KL in the reward (one on-policy update takes them from its own forward pass)."""
    on_policy = cfg.epochs == 1 and cfg.mini_batch_size == cfg.rollout_batch_size
    return not on_policy or (cfg.beta > 0 and cfg.kl_penalty == "reward")


def grpo_update(policy, reference, engine: Engine, rollout, raw: torch.Tensor, cfg: GRPOConfig,
                generator: torch.Generator, step_rewards: torch.Tensor | None = None,
                step_mask: torch.Tensor | None = None) -> dict:
    """One rollout's update: penalties, group advantages, epochs × mini-batches of the
    clipped loss (steps 2–4 above). Returns the rollout's metrics.

    ``rollout``: the whole rollout batch (G adjacent samples per prompt) with ``raw``
    rewards [B]. Under data parallel every process holds the same rollout and trains its
    share of each mini-batch's groups (:func:`tether.algorithms.ppo.my_rows`); the
    gradients are summed in ``engine.step``. ``generator`` draws the epochs' orders.

    ``step_rewards``/``step_mask`` [B, R]: per-step rewards (a process reward model's) at
    each step's last token; their process advantages
    (:func:`tether.advantages.process_advantages`) are added to each token's advantage.
    """
    G = cfg.samples_per_prompt
    share = G if cfg.share_prompt else 1
    use_ref = cfg.beta > 0
    device = next(policy.parameters()).device
    world = distributed.world_size()
    mask = rollout.response_mask.float()
    rewards = raw - cfg.missing_eos_penalty * (~rollout.ended).float() if cfg.missing_eos_penalty else raw.clone()
    perms = []
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(rollout) // G, generator=generator)
        perms.append((perm.unsqueeze(1) * G + torch.arange(G)).reshape(-1))
    # this process's rows (all rows with one process); the processes' log-probs are summed
    mine = None
    if world > 1:
        mine = torch.cat([my_rows(perms[0][b : b + cfg.mini_batch_size], G)
                          for b in range(0, len(rollout), cfg.mini_batch_size)]).sort().values
    policy.eval()
    old_logprobs = None
    if needs_old_logprobs(cfg):
        old_logprobs = rollout.logprobs if rollout.logprobs is not None else \
            distributed.all_sum(_logprobs(policy, rollout, cfg.micro_batch_size, share, rows=mine))
    ref_logprobs = None
    if use_ref:
        with reference_context(policy, reference) as ref:
            ref_logprobs = distributed.all_sum(_logprobs(ref, rollout, cfg.micro_batch_size, share, rows=mine))
    policy.train()
    seq_kl = None
    if old_logprobs is not None and ref_logprobs is not None:
        seq_kl = ((old_logprobs - ref_logprobs) * mask).sum(dim=1)
    if use_ref and cfg.kl_penalty == "reward":
        rewards = rewards - cfg.beta * seq_kl

    # 3. group-relative advantages, one per sequence
    advantages = group_advantages(rewards, cfg)
    if step_rewards is not None:  # process supervision: an advantage per token
        advantages = advantages.unsqueeze(1) + process_advantages(step_rewards, step_mask, G, cfg.eps)
    spread = rewards.view(-1, G)
    flat_groups = float((spread.amax(dim=1) == spread.amin(dim=1)).float().mean())

    # 4. clipped policy loss (+ β·k3 to the reference), whole groups per micro-batch
    stats: dict[str, list[float]] = {k: [] for k in ("loss/policy", "policy/clipfrac", "policy/approx_kl",
                                                     "kl/k3", "optim/grad_norm")}
    kl_in_loss = use_ref and cfg.kl_penalty == "loss"
    live_kl = torch.zeros(len(rollout))
    for epoch, perm in enumerate(perms):
        for b in range(0, len(rollout), cfg.mini_batch_size):
            mb = perm[b : b + cfg.mini_batch_size]
            mb_tokens = float(mask[mb].sum())
            mine_mb = my_rows(mb, G)
            mb_loss = 0.0
            for c in range(0, len(mine_mb), cfg.micro_batch_size):
                j = mine_mb[c : c + cfg.micro_batch_size]
                logps = rows_logprobs(policy, rollout, j, device, share)
                w = logps.size(1)
                m = mask[j][:, :w].to(device)
                old = logps.detach() if old_logprobs is None else old_logprobs[j][:, :w].to(device)
                ref = ref_logprobs[j][:, :w].to(device) if ref_logprobs is not None else None
                adv = advantages[j] if advantages.dim() == 1 else advantages[j][:, :w]
                loss, st = grpo_policy_loss(logps, old, adv.to(device), m, clip=cfg.clip,
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
            info = engine.step(distributed.all_sum(mb_loss))
            stats["optim/grad_norm"].append(info["grad_norm"])
    if seq_kl is None and ref_logprobs is not None:
        seq_kl = distributed.all_sum(live_kl)
    # micro-batch statistics averaged over every process's micro-batches
    means = distributed.all_sum_dict({**{f"{k}:sum": sum(v) for k, v in stats.items()},
                                      **{f"{k}:n": len(v) for k, v in stats.items()}})
    row = {
        "reward/score": float(raw.mean()),
        "reward/advantaged": float(rewards.mean()),
        "groups/flat": flat_groups,
        "response/length": float(rollout.lengths.float().mean()),
        "response/ended": float(rollout.ended.float().mean()),
        **{k: means[f"{k}:sum"] / means[f"{k}:n"] for k in stats if means[f"{k}:n"]},
    }
    if seq_kl is not None:
        row["kl/ref"] = float(seq_kl.mean())
    if step_rewards is not None:
        row["reward/step"] = float(step_rewards[step_mask].mean()) if bool(step_mask.any()) else 0.0
    return row


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
    step_reward_fn: Callable | None = None,
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
        step_reward_fn: optional ``(rollout) -> (rewards [B, R], step_mask [B, R])``, dense
            per-step rewards (a process reward model) added as process advantages.
    """
    G = cfg.samples_per_prompt
    n_prompts = cfg.rollout_batch_size // G
    share = G if cfg.share_prompt else 1
    world, rank = distributed.world_size(), distributed.rank()
    reward_takes_group = len(inspect.signature(reward_fn).parameters) >= 2
    updates = cfg.steps * cfg.epochs * (cfg.rollout_batch_size // cfg.mini_batch_size)
    engine = Engine([p for p in policy.parameters() if p.requires_grad], cfg.optim, updates, name=name)
    generator = torch.Generator().manual_seed(seed)
    sampler = PolicySampler(policy, encoder, cfg.rollout_backend, vllm_memory=cfg.vllm_memory, seed=seed)
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
        monitor.sampler = sampler.copy
        if not start:
            monitor.check(0)
    for step in range(start, 0 if loop["stopped"] else cfg.steps):
        # 1. rollout: n_prompts prompts × G samples in adjacent rows; data parallel: each
        # process samples and rewards a block of the prompts
        if len(loop["order"]) < n_prompts:
            loop["order"] += torch.randperm(len(prompts), generator=generator).tolist()
        idx, loop["order"] = loop["order"][:n_prompts], loop["order"][n_prompts:]
        idx = idx[n_prompts * rank // world : n_prompts * (rank + 1) // world]
        t0 = time.time()
        # sampling with the policy itself keeps its log-probs: the rollout-time log-probs
        # (several updates per rollout, or RLOO's KL in the reward) need no forward pass
        rollout = sampler.sample([prompts[i] for i in idx for _ in range(G)], cfg.generation,
                                 seed=seed * 1_000_003 + step + 7_919_993 * rank, logprobs=needs_old_logprobs(cfg))
        t_gen = time.time() - t0

        # 2. rewards
        raw = (reward_fn(rollout, share) if reward_takes_group else reward_fn(rollout)).float().cpu()
        dense = step_reward_fn(rollout)[:2] if step_reward_fn is not None else None
        rollout, raw, *rest = shared_rollout(rollout, raw, encoder.pad_id, dense)
        dense = rest[0] if rest else None

        # 3.–4. advantages and the update
        t0 = time.time()
        row = grpo_update(policy, reference, engine, rollout, raw, cfg, generator,
                          *(dense if dense is not None else ()))
        row.update({"time/generate": t_gen, "time/train": time.time() - t0})
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
        stop = monitor is not None and monitor.due(steps_done) and monitor.check(steps_done)
        if distributed.broadcast_object(bool(stop)):  # the monitor runs on the first process
            loop["stopped"] = True
        if checkpointer is not None:
            checkpointer.step(steps_done, state, final=loop["stopped"] or steps_done == cfg.steps)
        if loop["stopped"]:
            break
    bar.close()
    sampler.close()
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
