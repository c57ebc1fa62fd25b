"""PPO for RLHF with a per-token KL penalty to the reference policy.

One iteration, as in Ziegler et al. 2019 / Ouyang et al. 2022:

1. sample a response for each prompt of a rollout batch (KV-cached, stops at EOS);
   (``samples_per_prompt`` > 1: several responses per prompt, side by side);
2. score it: reward model (or gold), minus a penalty if it never emitted EOS, and
   optionally minus the mean score of the prompt's other responses (``score_baseline``);
3. with the rollout-time policy, reference and value model: per-token log-probs and values;
4. rewards = −β·(logπ − logπ_ref) per token, plus the score at the last token;
5. GAE advantages (whitened) and returns;
6. several epochs × mini-batches of the clipped policy loss + clipped value loss;
7. the KL controller adapts β towards the target KL.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from tether.advantages import AdaptiveKLController, FixedKLController, gae, group_baseline, kl_penalized_rewards
from tether.config import PPOConfig
from tether.data.tokenize import Encoder
from tether.checkpoint import Checkpointer, LoopState, RNGState
from tether.engine import Engine, MetricsLogger, progress_bar
from tether.losses import ppo_policy_loss, value_loss
from tether.models import (
    grouped_logprobs,
    grouped_token_scalars,
    reference_context,
    sequence_logprobs,
    token_scalars,
)
from tether.ops import entropy_from_logits, masked_mean, masked_whiten
from tether import distributed
from tether.rollout import (
    Rollout,
    group_chunks,
    group_tensors,
    merge_rollouts,
    trimmed_batch,
)
from tether.rollout.sampler import PolicySampler

__all__ = ["train_ppo", "make_kl_controller", "rollout_logprobs_and_values", "rows_logprobs", "ValueHead"]


class ValueHead(torch.nn.Module):
    """A critic without a second backbone: a linear map of the policy's last hidden states
    (detached, so the value loss never moves the policy) to a value per position.

    Starts at zero, so the first advantages are the whitened returns (a batch-mean
    baseline) and the head learns the state values as PPO goes.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return self.linear(hidden.detach().to(self.linear.weight.dtype)).squeeze(-1)


def _logprobs_and_values(policy, value_model, ids, att, start: int, *, return_logits: bool = False):
    """Response log-probs and values [B, W] (and logits): one policy forward pass when the
    critic is a :class:`ValueHead`, a second backbone's forward otherwise."""
    head = isinstance(value_model, ValueHead)
    out = sequence_logprobs(policy, ids, att, start, return_logits=return_logits, return_hidden=head)
    out = out if isinstance(out, tuple) else (out,)
    values = value_model(out[-1]) if head else token_scalars(value_model, ids, att)[:, start - 1 : -1]
    body = out[:-1] if head else out
    return (*body, values)


def _rows_forward(policy, value_model, rollout: Rollout, rows, device, group: int, *, return_logits: bool = False):
    """Log-probs, (logits,) values and the response width W for rollout rows, each [b, W].

    ``group`` > 1: the rows come in groups of ``group`` samples of one prompt, and each
    prompt runs once (:func:`tether.models.grouped_logprobs`)."""
    if group == 1:
        ids, att, start, width = trimmed_batch(rollout, rows, device)
        return (*_logprobs_and_values(policy, value_model, ids, att, start, return_logits=return_logits), width)
    q, qm, r, rm, width = group_tensors(rollout, rows, device)
    head = isinstance(value_model, ValueHead)
    out = grouped_logprobs(policy, q, qm, r, rm, group, return_logits=return_logits, return_hidden=head)
    out = out if isinstance(out, tuple) else (out,)
    if head:
        values = value_model(out[-1])
        out = out[:-1]
    else:
        values = grouped_token_scalars(value_model, q, qm, r, rm, group)[:, :-1]
    return (*out, values, width)


def rows_logprobs(model, rollout: Rollout, rows, device, group: int = 1) -> torch.Tensor:
    """Response log-probs [b, W] of some rollout rows under ``model`` (each prompt run once
    when ``group`` > 1)."""
    if group == 1:
        ids, att, start, _ = trimmed_batch(rollout, rows, device)
        return sequence_logprobs(model, ids, att, start)
    q, qm, r, rm, _ = group_tensors(rollout, rows, device)
    return grouped_logprobs(model, q, qm, r, rm, group)


ScoreFn = Callable[..., torch.Tensor]  # (rollout) or (rollout, group) → [B]
GoldFn = Callable[[list, list], list]


def make_kl_controller(cfg: PPOConfig):
    if cfg.kl.controller == "adaptive":
        return AdaptiveKLController(cfg.kl.init_coef, cfg.kl.target, cfg.kl.horizon)
    return FixedKLController(cfg.kl.init_coef)


def _chunks(n: int, size: int):
    for b in range(0, n, size):
        yield slice(b, min(n, b + size))


def _pad_to(x: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.size(1)))


@torch.no_grad()
def rollout_logprobs_and_values(policy, reference, value_model, rollout: Rollout, chunk: int, group: int = 1,
                                rows=None) -> dict:
    """Rollout-time log-probs, reference log-probs, values and entropy, each [B, R].

    Rows go through in chunks of similar length (sorted), each chunk trimmed of padding;
    with ``group`` > 1 in whole groups of one prompt's samples, each prompt run once.

    ``rows``: only these rows (whole groups), the others left 0. When the rollout carries
    the sampler's log-probs (``generate(..., logprobs=True)`` with the policy itself) and
    the critic is a separate model, those are taken and the policy runs no forward pass.
    """
    device = next(policy.parameters()).device
    R = rollout.response_ids.size(1)
    out = {k: torch.zeros(len(rollout), R) for k in ("logprobs", "ref_logprobs", "values", "entropy")}
    index = torch.arange(len(rollout)) if rows is None else torch.as_tensor(rows, dtype=torch.long)
    if not len(index):
        return out
    sub = rollout if rows is None else rollout.select(index)
    from_sampler = sub.logprobs is not None and not isinstance(value_model, ValueHead)
    policy.eval()
    value_model.eval()
    for part in group_chunks(sub, group, chunk):
        at = index[part]
        if from_sampler:
            out["logprobs"][at] = sub.logprobs[part]
            out["entropy"][at] = sub.entropy[part]
            values = _critic_values(value_model, sub, part, device, group)
        else:
            logps, logits, values, _ = _rows_forward(policy, value_model, sub, part, device, group, return_logits=True)
            out["logprobs"][at] = _pad_to(logps.float().cpu(), R)
            out["entropy"][at] = _pad_to(entropy_from_logits(logits).float().cpu(), R)
        with reference_context(policy, reference) as ref:
            out["ref_logprobs"][at] = _pad_to(rows_logprobs(ref, sub, part, device, group).float().cpu(), R)
        out["values"][at] = _pad_to(values.float().cpu(), R)
    policy.train()
    value_model.train()
    return out


def _critic_values(value_model, rollout: Rollout, rows, device, group: int) -> torch.Tensor:
    """A separate value model's values [b, W] of some rollout rows (each prompt once when
    ``group`` > 1)."""
    if group == 1:
        ids, att, start, _ = trimmed_batch(rollout, rows, device)
        return token_scalars(value_model, ids, att)[:, start - 1 : -1]
    q, qm, r, rm, _ = group_tensors(rollout, rows, device)
    return grouped_token_scalars(value_model, q, qm, r, rm, group)[:, :-1]


def _epoch_order(generator: torch.Generator, n: int, group: int) -> torch.Tensor:
    """A shuffled order of the rollout's rows in whole groups of one prompt's samples (a
    micro-batch can then run each prompt once; with share_prompt off the batches are the
    same, only dearer)."""
    perm = torch.randperm(n // group, generator=generator)
    return (perm.unsqueeze(1) * group + torch.arange(group)).reshape(-1)


def my_rows(rows: torch.Tensor, group: int) -> torch.Tensor:
    """This process's share of a mini-batch's rows under data parallel: every ``world``-th
    group of ``group`` adjacent rows (one prompt's samples stay together)."""
    world = distributed.world_size()
    if world == 1:
        return rows
    return rows.view(-1, group)[distributed.rank() :: world].reshape(-1)


def _group_pair_accuracy(scores: list[float], gold: list[float], group: int) -> tuple[int, int]:
    """(agreeing, compared) pairs of samples of the same prompt (adjacent blocks of ``group``
    rows) whose gold differs: how well the optimised score ranks what the policy now writes."""
    from tether.algorithms.reward import pairwise_accuracy

    agree = total = 0
    for b in range(0, len(gold) - group + 1, group):
        a, n = pairwise_accuracy(scores[b : b + group], gold[b : b + group])
        agree, total = agree + a, total + n
    return agree, total


def shared_rollout(local: Rollout, local_scores: torch.Tensor, pad_id: int, dense=None):
    """Every process's rollout and scores, joined in rank order (data parallel: each process
    samples and scores a block of the rollout's prompts; the update needs them all for its
    global statistics). ``dense``: optional ``(step rewards, step mask)`` [B, R] that travel
    with the rows (returned as a third item when given)."""
    if distributed.world_size() == 1:
        return (local, local_scores) if dense is None else (local, local_scores, dense)
    parts = distributed.gather_objects((local, local_scores, dense))
    rollout = merge_rollouts([p[0] for p in parts], pad_id)
    scores = torch.cat([p[1] for p in parts])
    if dense is None:
        return rollout, scores
    width = rollout.response_ids.size(1)
    joined = tuple(torch.cat([_pad_to(p[2][k], width) for p in parts]) for k in range(2))
    return rollout, scores, joined


def dropout_free(*models) -> bool:
    """No module or model config of these drops anything, so that a forward pass in training
    mode gives what the rollout-time (eval mode) pass gives."""
    seen: set[int] = set()
    for model in models:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout) and module.p > 0:
                return False
            config = getattr(module, "config", None)
            if hasattr(config, "to_dict") and id(config) not in seen:
                seen.add(id(config))
                for key, value in config.to_dict().items():
                    if "dropout" in key and isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                        return False
    return True


def train_ppo(
    policy,
    value_model,
    reference,
    encoder: Encoder,
    prompts: list,
    score_fn: ScoreFn,
    cfg: PPOConfig,
    *,
    seed: int = 0,
    gold_fn: GoldFn | None = None,
    logger: MetricsLogger | None = None,
    monitor=None,
    checkpointer: Checkpointer | None = None,
    step_reward_fn: Callable | None = None,
) -> dict:
    """Optimise ``policy`` in place with PPO.

    Args:
        policy: causal LM (peft model under LoRA).
        value_model: sequence-classification model whose head gives per-token values, or a
            :class:`ValueHead` on the policy's own hidden states.
        reference: frozen reference policy, or None to use ``policy`` with adapters disabled.
        encoder: tokenisation shared by every model (same tokenizer).
        prompts: training prompts, cycled in shuffled order.
        score_fn: sequence scores [B] of a rollout (reward model or gold); called as
            ``score_fn(rollout, group)`` when it takes two arguments, ``group`` being the
            number of adjacent rows that share a prompt (so a reward model can run each
            prompt once).
        gold_fn: optional (prompts, texts) → gold scores, logged as ``reward/gold`` (never optimised).
        monitor: optional :class:`tether.monitor.Monitor`, checked before the first step and
            as it asks; training stops early when it says so.
        checkpointer: saves the training state (policy, critic, optimiser, KL controller,
            monitor, data order, RNG) every few rollouts and resumes from its newest checkpoint.
        step_reward_fn: optional ``(rollout) -> (rewards [B, R], step_mask [B, R], ...)``:
            dense per-step rewards (a process reward model's) added to the per-token rewards
            at each step's last token, beside the final score.
    """
    kl_ctl = make_kl_controller(cfg)
    updates_per_rollout = cfg.epochs * (cfg.rollout_batch_size // cfg.mini_batch_size)
    groups = [{"params": [p for p in policy.parameters() if p.requires_grad]}]
    value_params = [p for p in value_model.parameters() if p.requires_grad]
    groups.append({"params": value_params, "lr": cfg.value_lr or cfg.optim.lr})
    engine = Engine(groups, cfg.optim, cfg.steps * updates_per_rollout, name="ppo")
    generator = torch.Generator().manual_seed(seed)
    device = next(policy.parameters()).device
    loop = LoopState(order=[], first={}, last={}, steps_done=0, stopped=False)
    state = {"policy": policy, "engine": engine, "kl": kl_ctl, "rng": RNGState(data=generator), "loop": loop}
    if value_params:
        state["value"] = value_model
    if logger is not None:
        state["metrics"] = logger
    if monitor is not None:
        state["monitor"] = monitor
    start = checkpointer.resume(state) if checkpointer is not None else 0
    start_time = time.time()
    sampler = PolicySampler(policy, encoder, cfg.rollout_backend, vllm_memory=cfg.vllm_memory, seed=seed)
    bar = progress_bar(cfg.steps, "ppo", unit="rollout")
    bar.update(start)
    G = cfg.samples_per_prompt
    n_prompts = cfg.rollout_batch_size // G
    share = G if (cfg.share_prompt and G > 1) else 1  # rows per shared-prompt forward group
    import inspect

    score_takes_group = len(inspect.signature(score_fn).parameters) >= 2
    # train- and eval-mode passes agree without dropout: the first update's forward pass can
    # then stand for the rollout-time pass of its rows
    reuse_first = dropout_free(policy, value_model)
    world, rank = distributed.world_size(), distributed.rank()
    if monitor is not None:
        monitor.sampler = sampler.copy
        if not start:
            monitor.check(0)
    for step in range(start, 0 if loop["stopped"] else cfg.steps):
        # 1. rollout: n_prompts prompts × G samples, each prompt's samples in adjacent rows
        if len(loop["order"]) < n_prompts:
            loop["order"] += torch.randperm(len(prompts), generator=generator).tolist()
        idx, loop["order"] = loop["order"][:n_prompts], loop["order"][n_prompts:]
        # data parallel: each process samples and scores a block of the prompts
        idx = [i for i in idx[n_prompts * rank // world : n_prompts * (rank + 1) // world] for _ in range(G)]
        t0 = time.time()
        # sampling with the policy itself (no low-precision copy) keeps its log-probs: with a
        # separate critic, the rollout-time log-probs need no other policy forward pass
        rollout = sampler.sample([prompts[i] for i in idx], cfg.generation,
                                 seed=seed * 1_000_003 + step + 7_919_993 * rank,
                                 logprobs=not isinstance(value_model, ValueHead))
        t_gen = time.time() - t0

        # 2.–3. scores, log-probs, values
        scores = (score_fn(rollout, share) if score_takes_group else score_fn(rollout)).float().cpu()
        dense = step_reward_fn(rollout)[:2] if step_reward_fn is not None else None
        rollout, scores, *rest = shared_rollout(rollout, scores, encoder.pad_id, dense)
        dense = rest[0] if rest else None
        mask = rollout.response_mask.float()
        raw_scores = scores.clone()
        if cfg.missing_eos_penalty:
            scores = scores - cfg.missing_eos_penalty * (~rollout.ended).float()
        if cfg.score_baseline != "none":
            scores = scores - group_baseline(scores.view(n_prompts, G), cfg.score_baseline).reshape(-1)
        # the first update's micro-batch runs at the rollout-time weights: its training forward
        # pass (kept for its backward) also gives those rows' rollout-time log-probs and values
        order = _epoch_order(generator, len(rollout), G)
        # this process's rows of epoch 0 (all rows with one process): it computes their
        # rollout-time values, and the processes' results are summed
        shares = [my_rows(order[mb], G) for mb in _chunks(len(rollout), cfg.mini_batch_size)]
        mine = torch.cat(shares) if world > 1 else None
        first = None
        rest = None if mine is None else mine.sort().values
        if reuse_first and len(shares[0]):
            j0 = shares[0][: cfg.micro_batch_size]
            logps0, logits0, values0, w0 = _rows_forward(policy, value_model, rollout, j0, device, share,
                                                         return_logits=True)
            first = (j0, logps0, values0, w0)
            taken = set(j0.tolist())
            rest = torch.tensor([i for i in (order if mine is None else mine).tolist() if i not in taken],
                                dtype=torch.long).sort().values
        fwd = rollout_logprobs_and_values(policy, reference, value_model, rollout, cfg.micro_batch_size, share,
                                          rows=rest)
        if first is not None:
            R = rollout.response_ids.size(1)
            with torch.no_grad():
                fwd["logprobs"][j0] = _pad_to(logps0.detach().float().cpu(), R)
                fwd["entropy"][j0] = _pad_to(entropy_from_logits(logits0.detach()).float().cpu(), R)
                fwd["values"][j0] = _pad_to(values0.detach().float().cpu(), R)
                with reference_context(policy, reference) as ref:
                    fwd["ref_logprobs"][j0] = _pad_to(rows_logprobs(ref, rollout, j0, device, share).float().cpu(), R)
            del logits0
        if world > 1:
            fwd = {k: distributed.all_sum(v) for k, v in fwd.items()}
        old_logprobs, ref_logprobs, old_values = fwd["logprobs"], fwd["ref_logprobs"], fwd["values"] * mask

        # 4.–5. KL-penalised rewards, GAE
        beta = kl_ctl.value
        rewards = kl_penalized_rewards(scores, old_logprobs, ref_logprobs, mask, beta)
        if dense is not None:  # process rewards at each step's last token
            rewards = rewards + dense[0] * mask
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False) * mask
        advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        advantages = masked_whiten(advantages, mask) * mask
        seq_kl = ((old_logprobs - ref_logprobs) * mask).sum(dim=1)

        # 6. PPO epochs over mini-batches, gradient accumulation over micro-batches
        stats: dict[str, list[float]] = {k: [] for k in ("loss/policy", "loss/value", "ppo/clipfrac",
                                                         "ppo/approx_kl", "value/clipfrac", "optim/grad_norm")}
        t0 = time.time()
        for epoch in range(cfg.epochs):
            perm = order if epoch == 0 else _epoch_order(generator, len(rollout), G)
            for mb in _chunks(len(rollout), cfg.mini_batch_size):
                mb_idx = perm[mb]
                mine_mb = my_rows(mb_idx, G)
                mb_loss = 0.0
                for mc in _chunks(len(mine_mb), cfg.micro_batch_size):
                    j = mine_mb[mc]
                    if first is not None:
                        _, logps, values, w = first
                        first = None
                    else:
                        logps, values, w = _rows_forward(policy, value_model, rollout, j, device, share)
                    m = mask[j][:, :w].to(device)
                    pl, pstats = ppo_policy_loss(logps, old_logprobs[j][:, :w].to(device),
                                                 advantages[j][:, :w].to(device), m, cfg.clip)
                    vl, vstats = value_loss(values, old_values[j][:, :w].to(device), returns[j][:, :w].to(device),
                                            m, cfg.value_clip)
                    weight = len(j) / len(mb_idx)
                    micro_loss = (pl + cfg.vf_coef * vl) * weight
                    micro_loss.backward()
                    mb_loss += micro_loss.detach().item()
                    stats["loss/policy"].append(pl.detach().item())
                    stats["loss/value"].append(vl.detach().item())
                    stats["ppo/clipfrac"].append(float(pstats["clipfrac"]))
                    stats["ppo/approx_kl"].append(float(pstats["approx_kl"]))
                    stats["value/clipfrac"].append(float(vstats["clipfrac"]))
                info = engine.step(distributed.all_sum(mb_loss))
                stats["optim/grad_norm"].append(info["grad_norm"])
        t_train = time.time() - t0
        # micro-batch statistics averaged over every process's micro-batches
        means = distributed.all_sum_dict({**{f"{k}:sum": sum(v) for k, v in stats.items()},
                                          **{f"{k}:n": len(v) for k, v in stats.items()}})

        # 7. adapt β
        mean_kl = float(seq_kl.mean())
        kl_ctl.update(mean_kl, len(rollout))

        row = {
            "reward/score": float(raw_scores.mean()),
            "reward/penalised": float(scores.mean()),
            "reward/kl_penalty": float((-beta * (old_logprobs - ref_logprobs) * mask).sum(1).mean()),
            "kl/ref": mean_kl,
            "kl/coef": beta,
            "policy/entropy": float(masked_mean(fwd["entropy"], mask)),
            "response/length": float(rollout.lengths.float().mean()),
            "response/ended": float(rollout.ended.float().mean()),
            "value/mean": float(masked_mean(old_values, mask)),
            **({"reward/step": float(dense[0][dense[1]].mean()) if bool(dense[1].any()) else 0.0}
               if dense is not None else {}),
            "returns/mean": float(masked_mean(returns, mask)),
            "time/generate": t_gen,
            "time/train": t_train,
            **{k: means[f"{k}:sum"] / max(means[f"{k}:n"], 1) for k in stats},
        }
        if gold_fn is not None:
            gold = gold_fn(rollout.prompts, rollout.texts)
            row["reward/gold"] = sum(gold) / len(gold)
            if G > 1:  # the score's pairwise accuracy against gold on the policy's own samples
                agree, pairs = _group_pair_accuracy(raw_scores.tolist(), gold, G)
                row["reward/pair_accuracy"] = agree / pairs if pairs else float("nan")
                row["reward/pairs"] = pairs
        if logger is not None:
            logger.log(step, row)
        loop["first"] = loop["first"] or row
        loop["last"] = row
        bar.set_postfix(score=f"{row['reward/score']:.3f}", kl=f"{mean_kl:.2f}",
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
        "seconds": time.time() - start_time,
        "final_kl_coef": kl_ctl.value,
        "skipped_steps": engine.skipped_steps,
        "first": loop["first"],
        "last": loop["last"],
    }
    if start:
        out["resumed_from_step"] = start
    return out
