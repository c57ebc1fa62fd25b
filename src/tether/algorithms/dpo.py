"""Direct preference optimisation and its family (cDPO, IPO, hinge, SimPO, ORPO) on rankings.

Each ranking of K responses is one example, as for the reward model: the policy scores its K
responses in one forward pass (the prompt once, its KV cache repeated for the K responses:
chosen and rejected never run separately) and every one of the K(K−1)/2 ordered pairs
enters the loss. A pair ``chosen ≻ rejected`` is a ranking with K = 2.

The reference's log-probs are computed once before training (under LoRA: the same model
with its adapters disabled, no second copy) and cached on disk, keyed by the data, the
reference model's files and the tokenisation, so a rerun or a sweep over β reads them back.
SimPO and ORPO are reference-free and compute none.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

from tether.config import DPOConfig
from tether.data.schemas import Ranking
from tether.data.tokenize import Encoder
from tether.checkpoint import Checkpointer, LoopState, RNGState
from tether import distributed
from tether.distributed import all_sum, all_sum_dict, local_micro
from tether.engine import BatchPlan, Engine, MetricsLogger, length_groups, plan_steps, progress_bar, token_budget
from tether.losses import dpo_loss, orpo_loss, simpo_loss
from tether.models import grouped_logprobs, reference_context

__all__ = ["ranking_logps", "preference_loss", "reference_logps", "train_dpo", "REFERENCE_FREE"]

#: losses that need no reference model
REFERENCE_FREE = frozenset({"simpo", "orpo"})


def ranking_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs [B, Kmax] and response lengths [B, Kmax] (EOS included) of
    a batch from :func:`tether.algorithms.reward.collate_rankings` (``split=True``); 0 in
    padded slots."""
    mask = batch["response_mask"]
    tokens = grouped_logprobs(model, batch["query_ids"], batch["query_mask"], batch["response_ids"], mask,
                              int(batch["group"]))
    dtype = torch.promote_types(tokens.dtype, torch.float32)  # sums in float32 at least (float64 stays)
    mask_f = mask.to(dtype)
    seq = (tokens.to(dtype) * mask_f).sum(dim=1)
    slots, slot_mask = batch["slots"].clamp(min=0), batch["slot_mask"].to(dtype)
    return seq[slots] * slot_mask, mask_f.sum(dim=1)[slots] * slot_mask


def _pairs(x: torch.Tensor, slot_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ordered pair (i ranked above j) of each row of x [B, K], as two flat tensors."""
    i, j = torch.triu_indices(x.size(1), x.size(1), offset=1, device=x.device)
    valid = slot_mask[:, i] & slot_mask[:, j]
    return x[:, i][valid], x[:, j][valid]


def n_pairs(slot_mask: torch.Tensor) -> int:
    k = slot_mask.sum(dim=1)
    return int((k * (k - 1) // 2).sum())


def _pair_values(values: torch.Tensor, slot_mask: torch.Tensor) -> torch.Tensor:
    """Per-pair values [B, P] (``triu_indices`` order) of the valid pairs, flat like :func:`_pairs`."""
    i, j = torch.triu_indices(slot_mask.size(1), slot_mask.size(1), offset=1, device=slot_mask.device)
    return values.to(slot_mask.device)[slot_mask[:, i] & slot_mask[:, j]]


def preference_loss(cfg: DPOConfig, policy_logps: torch.Tensor, lengths: torch.Tensor, ref_logps: torch.Tensor | None,
                    slot_mask: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The configured loss over all pairs of a batch of rankings (best first).

    Args: ``policy_logps``, ``lengths`` and ``ref_logps`` [B, K] (summed log-probs, token
    counts); ``slot_mask`` [B, K] bool; ``targets`` [B, P] P(i ≻ j) per pair (ties, soft
    labels; see :func:`tether.algorithms.reward.pair_labels`). IPO is given per-token mean
    log-probs, as in its paper.
    """
    pc, pr = _pairs(policy_logps, slot_mask)
    lc, lr = _pairs(lengths, slot_mask)
    t = None if targets is None else _pair_values(targets, slot_mask)
    if cfg.loss == "simpo":
        return simpo_loss(pc, pr, lc, lr, beta=cfg.beta, gamma=cfg.simpo_gamma, label_smoothing=cfg.label_smoothing,
                          targets=t)
    if cfg.loss == "orpo":
        if t is not None and bool((t != 1).any()):
            raise ValueError("orpo has no form for ties or soft labels; use dpo.loss sigmoid, ipo or simpo, "
                             "or hard labels (prefs.aggregate: majority)")
        return orpo_loss(pc, pr, lc, lr, lam=cfg.orpo_lambda)
    rc, rr = _pairs(ref_logps, slot_mask)
    if cfg.loss == "ipo":
        pc, pr, rc, rr = pc / lc, pr / lr, rc / lc, rr / lr
    return dpo_loss(pc, pr, rc, rr, beta=cfg.beta, variant=cfg.loss, label_smoothing=cfg.label_smoothing, targets=t)


# --------------------------------------------------------------------------- the reference cache


def _fingerprint(model_path: str) -> list:
    """What identifies a model's weights: each file's name, size and modification time
    for a local folder (a rewritten checkpoint gets a new key), the name otherwise."""
    path = Path(model_path)
    if not path.is_dir():
        return [model_path]
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(path.iterdir()) if p.is_file()]


def cache_key(model_path: str, encoder: Encoder, rankings: list[Ranking], extra: str = "") -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"model": _fingerprint(model_path), "max_length": encoder.max_length,
                         "max_prompt_length": encoder.max_prompt_length, "extra": extra}).encode())
    for r in rankings:
        h.update(json.dumps([r.prompt, r.ranked()], ensure_ascii=False).encode())
    return h.hexdigest()[:32]


@torch.no_grad()
def reference_logps(policy, reference, encoder: Encoder, rankings: list[Ranking], *, batch_size: int = 16,
                    share_prompt: bool = True, cache_file: str | Path | None = None) -> torch.Tensor:
    """Summed reference log-probs [N, Kmax] of every ranking's responses (best first).

    ``reference`` None: ``policy`` with its adapters disabled. Read from ``cache_file`` when
    it exists; otherwise computed and written there (atomically: a temporary file, renamed).
    """
    from tether.algorithms.reward import collate_rankings

    if cache_file is not None and Path(cache_file).exists():
        cached = torch.load(cache_file, map_location="cpu", weights_only=True)
        if cached.size(0) == len(rankings):
            return cached
    device = next(policy.parameters()).device
    k_max = max(len(r.responses) for r in rankings)
    out = torch.zeros(len(rankings), k_max)
    was_training = policy.training
    policy.eval()
    # data parallel: each process computes a contiguous block, and the blocks are summed
    world, at = distributed.world_size(), distributed.rank()
    lo, hi = len(rankings) * at // world, len(rankings) * (at + 1) // world
    with reference_context(policy, reference) as ref, progress_bar(hi - lo, "reference log-probs",
                                                                   unit="ranking") as bar:
        for b in range(lo, hi, batch_size):
            batch = collate_rankings(encoder, rankings[b : min(b + batch_size, hi)], share_prompt, split=True)
            batch = {k: v.to(device) for k, v in batch.items()}
            logps, _ = ranking_logps(ref, batch)
            out[b : b + logps.size(0), : logps.size(1)] = logps.cpu()
            bar.update(logps.size(0))
    policy.train(was_training)
    out = distributed.all_sum(out)
    if cache_file is not None and distributed.is_main():
        cache_file = Path(cache_file)
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        torch.save(out, tmp)
        os.replace(tmp, cache_file)
    return out


# --------------------------------------------------------------------------- training


def train_dpo(
    policy,
    reference,
    encoder: Encoder,
    rankings: list[Ranking],
    cfg: DPOConfig,
    *,
    seed: int = 0,
    ref_logps: torch.Tensor | None = None,
    logger: MetricsLogger | None = None,
    log_every: int = 5,
    monitor=None,
    checkpointer: Checkpointer | None = None,
) -> dict:
    """Optimise ``policy`` in place on ``rankings`` with ``cfg.loss``.

    Args:
        reference: the frozen reference, or None for ``policy`` with adapters disabled.
        ref_logps: [N, Kmax] precomputed reference log-probs (see :func:`reference_logps`);
            computed here when None and the loss needs them.
        monitor: optional :class:`tether.monitor.Monitor` (checked before the first step and
            as it asks; it can stop training early).
        checkpointer: saves the training state as it goes and resumes from its newest
            checkpoint.
    """
    from tether.algorithms.reward import collate_rankings, ranking_cost

    optim = cfg.optim
    if cfg.loss not in REFERENCE_FREE and ref_logps is None:
        ref_logps = reference_logps(policy, reference, encoder, rankings, batch_size=optim.micro_batch_size,
                                    share_prompt=cfg.share_prompt)
    total = plan_steps(len(rankings), optim.batch_size, cfg.epochs, cfg.max_steps)
    engine = Engine([p for p in policy.parameters() if p.requires_grad], optim, total, name=f"dpo ({cfg.loss})")
    plan = BatchPlan(len(rankings), optim.batch_size, optim.micro_batch_size, torch.Generator().manual_seed(seed))
    device = next(policy.parameters()).device
    policy.train()
    loop = LoopState(first={}, last={}, steps_done=0, stopped=False)
    state = {"policy": policy, "engine": engine, "data": plan, "rng": RNGState(), "loop": loop}
    if logger is not None:
        state["metrics"] = logger
    if monitor is not None:
        state["monitor"] = monitor
    start = checkpointer.resume(state) if checkpointer is not None else 0
    start_time = time.time()
    bar = progress_bar(total, cfg.loss if cfg.loss in REFERENCE_FREE else f"dpo ({cfg.loss})")
    bar.update(start)
    if monitor is not None and not start:
        monitor.check(0)
    budget = token_budget(optim.micro_batch_tokens, device)
    cost = ranking_cost(encoder, rankings, cfg.share_prompt)
    for step in range(start, 0 if loop["stopped"] else total):
        # data parallel: this process's share of the step, weighted by the global pair count
        groups = length_groups(local_micro(plan.next(), optim.micro_batch_size), cost, optim.micro_batch_size, budget)
        micro = [(idx, collate_rankings(encoder, [rankings[i] for i in idx], cfg.share_prompt, split=True))
                 for idx in groups]
        n_global = all_sum(sum(n_pairs(m["slot_mask"]) for _, m in micro))
        sums: dict[str, float] = {}
        for idx, m in micro:
            m = {k: v.to(device) for k, v in m.items()}
            logps, lengths = ranking_logps(policy, m)
            ref = None
            if ref_logps is not None:
                ref = ref_logps[torch.as_tensor(idx)][:, : logps.size(1)].to(device)
            loss, metrics = preference_loss(cfg, logps, lengths, ref, m["slot_mask"], m.get("targets"))
            weight = n_pairs(m["slot_mask"]) / n_global  # micro-batch means → the global batch mean
            (loss * weight).backward()
            sums["loss/dpo"] = sums.get("loss/dpo", 0.0) + loss.detach().item() * weight
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * weight
        sums = all_sum_dict(sums)
        info = engine.step(sums.get("loss/dpo"))
        last = {**sums, **{f"optim/{k}": v for k, v in info.items()}}
        loop["first"] = loop["first"] or last
        loop["last"] = last
        if logger is not None and (step % log_every == 0 or step == total - 1):
            logger.log(step, last)
        bar.set_postfix(loss=f"{last['loss/dpo']:.3f}", acc=f"{last.get('rewards/accuracy', float('nan')):.2f}",
                        margin=f"{last.get('rewards/margin', float('nan')):.2f}")
        bar.update(1)
        loop["steps_done"] = steps_done = step + 1
        stop = monitor is not None and monitor.due(steps_done) and monitor.check(steps_done)
        if distributed.broadcast_object(bool(stop)):  # the monitor runs on the first process
            loop["stopped"] = True
        if checkpointer is not None:
            checkpointer.step(steps_done, state, final=loop["stopped"] or steps_done == total)
        if loop["stopped"]:
            break
    bar.close()
    out = {"steps": loop["steps_done"], "planned_steps": total, "loss": cfg.loss, "beta": cfg.beta,
           "final_loss": loop["last"].get("loss/dpo"), "skipped_steps": engine.skipped_steps,
           "seconds": time.time() - start_time, "first": loop["first"], "last": loop["last"]}
    if start:
        out["resumed_from_step"] = start
    return out
