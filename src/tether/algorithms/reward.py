"""Reward model: the SFT backbone with a scalar head, trained on rankings.

Each ranking of K responses is one training example (InstructGPT's trick: all K responses
go through the model once, and every one of the K(K−1)/2 comparisons is used). The loss is
Bradley–Terry over all pairs (``ranking_pairwise_loss``) or Plackett–Luce over the full
ranking. A pair ``chosen ≻ rejected`` is a ranking with K = 2.
"""

from __future__ import annotations

import time

import torch

from tether.config import RMConfig
from tether.data.schemas import Ranking
from tether.data.tokenize import Encoder, pad_left, pad_right
from tether.checkpoint import Checkpointer, LoopState, RNGState
from tether.distributed import all_sum, all_sum_dict, local_micro
from tether.engine import BatchPlan, Engine, MetricsLogger, length_groups, plan_steps, progress_bar, token_budget
from tether.losses import ensemble_ranking_loss, ranking_loss_terms
from tether.models import grouped_token_scalars, grouped_token_states, scalar_head, token_scalars, token_states

__all__ = ["ranking_cost", "collate_rankings", "ranking_scores", "ranking_states", "collect_states", "fit_linear_heads",
           "fit_reward_model", "group_accuracy", "bootstrap_weights", "ensemble_reward", "ensemble_spread", "train_reward", "score_responses", "score_groups", "score_rollout", "pairwise_accuracy"]


def collate_rankings(encoder: Encoder, rankings: list[Ranking], share_prompt: bool = True,
                     split: bool = False) -> dict[str, torch.Tensor]:
    """Flatten rankings (best first) into sequences, ``slots`` [B, Kmax] (row into the N
    sequences, −1 for padding) and ``slot_mask`` [B, Kmax].

    When every ranking has the same K (and ``share_prompt``), the prompt is kept apart:
    ``query_ids``/``query_mask`` [N, P] left-padded (each prompt K times) and
    ``response_ids``/``response_mask`` [N, W] right-padded, so that the model runs each
    prompt once for its K responses. Otherwise ``input_ids``/``attention_mask`` [N, L] hold
    whole right-padded sequences and ``last`` [N] each one's final token — unless ``split``,
    which keeps the query/response layout with ``group`` 1 (each row its own query).
    """
    k_max = max(len(r.responses) for r in rankings)
    grouped = share_prompt and all(len(r.responses) == k_max for r in rankings)
    queries, answers, slots = [], [], []
    for r in rankings:
        row = []
        for response in r.ranked():
            p, resp = encoder.example(r.prompt, response)
            row.append(len(answers))
            queries.append(p)
            answers.append(resp)
        slots.append(row + [-1] * (k_max - len(row)))
    slots_t = torch.tensor(slots, dtype=torch.long)
    out = {"slots": slots_t, "slot_mask": slots_t >= 0}
    out.update(pair_labels(rankings, k_max))
    if (grouped or split) and all(len(a) > 0 for a in answers):
        out["query_ids"], out["query_mask"] = pad_left(queries, encoder.pad_id)
        out["response_ids"], out["response_mask"] = pad_right(answers, encoder.pad_id)
        out["group"] = torch.tensor(k_max if grouped else 1)
        return out
    input_ids, attention_mask = pad_right([q + a for q, a in zip(queries, answers)], encoder.pad_id)
    out.update(input_ids=input_ids, attention_mask=attention_mask, last=attention_mask.sum(dim=1) - 1)
    return out


def ranking_cost(encoder: Encoder, rankings: list[Ranking], share_prompt: bool = True):
    """``cost(i)`` for :func:`tether.engine.length_groups`: the rows ranking i adds to a
    padded pass and the length of the longest.

    Shared prompts (``share_prompt`` and every ranking of one size K, so that every pass is
    collated that way): one row of the prompt plus its K longest-response widths, the tokens
    its query pass and response pass run. Otherwise K rows of prompt + longest response.
    """
    shared = share_prompt and len({len(r.responses) for r in rankings}) == 1

    def cost(i: int) -> tuple[int, int]:
        r = rankings[i]
        p, lengths = encoder.lengths(r.prompt, list(r.responses))
        if shared:
            return 1, p + len(lengths) * max(lengths)
        return len(lengths), p + max(lengths)

    return cost


def pair_labels(rankings: list[Ranking], k_max: int) -> dict[str, torch.Tensor]:
    """``targets`` [B, P] (P(i ≻ j) of each pair of positions, ``torch.triu_indices`` order:
    1 for a hard label, 0.5 for a tie, the soft label otherwise) when any ranking is not a
    hard strict one, and ``margins`` [B, P] (``strength`` on every strict pair) when any
    ranking has a strength; nothing for plain rankings (the losses' defaults)."""
    out = {}
    i, j = torch.triu_indices(k_max, k_max, offset=1)
    if any(not r.hard for r in rankings):
        rows = []
        for r in rankings:
            full = torch.ones(k_max, k_max)
            k = len(r.order)
            iu, ju = torch.triu_indices(k, k, offset=1)
            full[iu, ju] = torch.tensor(r.pair_targets(), dtype=torch.float32)
            rows.append(full[i, j])
        out["targets"] = torch.stack(rows)
    if any(r.strength for r in rankings):
        rows = []
        for r in rankings:
            full = torch.zeros(k_max, k_max)
            k = len(r.order)
            iu, ju = torch.triu_indices(k, k, offset=1)
            tiers = r.tiers or list(range(k))
            strict = torch.tensor([tiers[a] != tiers[b] for a, b in zip(iu.tolist(), ju.tolist())], dtype=torch.float32)
            full[iu, ju] = float(r.strength or 0.0) * strict
            rows.append(full[i, j])
        out["margins"] = torch.stack(rows)
    return out


def _last_states(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[N, D] the backbone's final state at each of the batch's N sequences' last token."""
    if "group" in batch:
        lengths = batch["response_mask"].sum(dim=1)
        states = grouped_token_states(model, batch["query_ids"], batch["query_mask"], batch["response_ids"],
                                      batch["response_mask"], int(batch["group"]))
        return states[torch.arange(states.size(0), device=states.device), lengths]
    states = token_states(model, batch["input_ids"], batch["attention_mask"])
    return states[torch.arange(states.size(0), device=states.device), batch["last"]]


def _to_slots(seq: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[N, ...] per sequence → [B, Kmax, ...] per ranking slot, 0 in padded slots."""
    mask = batch["slot_mask"].to(seq.dtype)
    return seq[batch["slots"].clamp(min=0)] * mask.view(*mask.shape, *([1] * (seq.dim() - 1)))


def ranking_scores(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Scores [B, Kmax] of a collated ranking batch (0 in padded slots); [B, Kmax, H] for a
    model with H reward heads."""
    return _to_slots(scalar_head(model, _last_states(model, batch)), batch)


def ranking_states(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The backbone's final states [B, Kmax, D] at each response's last token (what
    :func:`ranking_scores` puts the head on; 0 in padded slots)."""
    return _to_slots(_last_states(model, batch), batch)


def bootstrap_weights(n: int, heads: int, generator: torch.Generator, bootstrap: bool = True) -> torch.Tensor:
    """[n, heads] weights of each ranking for each head: Poisson(1) counts (the bootstrap
    resample of a large dataset), all ones without bootstrap or with a single head."""
    if heads == 1 or not bootstrap:
        return torch.ones(n, heads)
    return torch.poisson(torch.ones(n, heads), generator=generator)


def train_reward(
    model,
    encoder: Encoder,
    rankings: list[Ranking],
    cfg: RMConfig,
    *,
    seed: int = 0,
    logger: MetricsLogger | None = None,
    log_every: int = 10,
    checkpointer: Checkpointer | None = None,
) -> dict:
    """Train the reward model in place on ``rankings``; returns a summary. ``checkpointer``:
    saves the training state as it goes and resumes from its newest checkpoint."""
    optim = cfg.optim
    total = plan_steps(len(rankings), optim.batch_size, cfg.epochs, cfg.max_steps)
    engine = Engine(model.parameters(), optim, total, name="reward model")
    plan = BatchPlan(len(rankings), optim.batch_size, optim.micro_batch_size, torch.Generator().manual_seed(seed))
    heads = getattr(getattr(model, "config", None), "num_labels", 1) if cfg.ensemble > 1 else 1
    weights = bootstrap_weights(len(rankings), heads, torch.Generator().manual_seed(seed + 1), cfg.bootstrap)
    device = next(model.parameters()).device
    model.train()
    loop = LoopState(last={})
    state = {"model": model, "engine": engine, "data": plan, "rng": RNGState(), "loop": loop}
    if logger is not None:
        state["metrics"] = logger
    start = checkpointer.resume(state) if checkpointer is not None else 0
    start_time = time.time()
    bar = progress_bar(total, "reward model" if heads == 1 else f"reward model ({heads} heads)")
    bar.update(start)
    budget = token_budget(optim.micro_batch_tokens, device)
    cost = ranking_cost(encoder, rankings, cfg.share_prompt)
    for step in range(start, total):
        # data parallel: this process's share of the step (the normaliser is the global batch's)
        groups = length_groups(local_micro(plan.next(), optim.micro_batch_size), cost, optim.micro_batch_size, budget)
        micro = [(idx, collate_rankings(encoder, [rankings[i] for i in idx], cfg.share_prompt)) for idx in groups]
        # Σ weight·terms per head over the whole batch: micro-batch losses add up to its mean
        normaliser = all_sum(sum((weights[idx] * ranking_loss_terms(torch.zeros(*m["slot_mask"].shape, heads),
                                                                    m["slot_mask"], cfg.loss)[1]).sum(dim=0)
                                 for idx, m in micro) + torch.zeros(heads))
        loss_total, correct, pairs = 0.0, 0, 0
        for idx, m in micro:
            m = {k: v.to(device) for k, v in m.items()}
            scores = ranking_scores(model, m)
            if scores.dim() == 2:
                scores = scores.unsqueeze(-1)
            margins = m.get("margins")
            loss = ensemble_ranking_loss(scores, m["slot_mask"], weights[idx].to(device), loss=cfg.loss,
                                         normaliser=normaliser.to(device), targets=m.get("targets"),
                                         margins=None if margins is None else cfg.margin_scale * margins)
            loss.backward()
            loss_total += loss.detach().item()
            with torch.no_grad():
                mean = scores.mean(dim=-1)
                i, j = torch.triu_indices(mean.size(1), mean.size(1), offset=1)
                valid = m["slot_mask"][:, i] & m["slot_mask"][:, j]
                if "targets" in m:  # accuracy on the pairs with a preference (soft: its majority side)
                    t = m["targets"]
                    valid = valid & (t != 0.5)
                    correct += int((((mean[:, i] > mean[:, j]) == (t > 0.5)) & valid).sum())
                else:
                    correct += int(((mean[:, i] > mean[:, j]) & valid).sum())
                pairs += int(valid.sum())
        summed = all_sum_dict({"loss": loss_total, "correct": correct, "pairs": pairs})
        loss_total, correct, pairs = summed["loss"], int(summed["correct"]), int(summed["pairs"])
        info = engine.step(loss_total)
        loop["last"] = last = {"loss/rm": loss_total, "rm/train_accuracy": correct / max(pairs, 1),
                               **{f"optim/{k}": v for k, v in info.items()}}
        if logger is not None and (step % log_every == 0 or step == total - 1):
            logger.log(step, last)
        bar.set_postfix(loss=f"{loss_total:.3f}", acc=f"{last['rm/train_accuracy']:.2f}")
        bar.update(1)
        if checkpointer is not None:
            checkpointer.step(step + 1, state, final=step + 1 == total)
    bar.close()
    out = {"steps": total, "final_loss": loop["last"].get("loss/rm"), "skipped_steps": engine.skipped_steps,
           "heads": heads, "bootstrap": bool(heads > 1 and cfg.bootstrap), "seconds": time.time() - start_time}
    if start:
        out["resumed_from_step"] = start
    return out


@torch.no_grad()
def score_responses(model, encoder: Encoder, prompts: list, responses: list[str], batch_size: int = 64) -> torch.Tensor:
    """Reward of each (prompt, response) text pair: [N] float32 ([N, H] for H heads)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        for b in range(0, len(prompts), batch_size):
            seqs = []
            for p, r in zip(prompts[b : b + batch_size], responses[b : b + batch_size]):
                pi, ri = encoder.example(p, r)
                seqs.append(pi + ri)
            ids, mask = pad_right(seqs, encoder.pad_id)
            per_token = token_scalars(model, ids.to(device), mask.to(device))
            out.append(per_token[torch.arange(ids.size(0)), (mask.sum(1) - 1).to(device)].cpu())
    finally:
        model.train(was_training)
    return torch.cat(out).float() if out else torch.zeros(0)


@torch.no_grad()
def score_groups(model, encoder: Encoder, groups: list[tuple], batch_size: int = 16) -> torch.Tensor:
    """Rewards of groups of responses to one prompt each, ``groups`` = [(prompt, [response, ...])]:
    [N] float32 ([N, H] for H heads) in the order given, N the number of responses. Each
    prompt runs once for its group (as in training), about half the tokens of
    :func:`score_responses` at K = 4; the same scores."""
    from tether.data.schemas import parse_ranking

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        for b in range(0, len(groups), batch_size):
            chunk = [parse_ranking({"prompt": p, "responses": list(rs), "ranking": list(range(len(rs)))},
                                   allow_empty_responses=True) for p, rs in groups[b : b + batch_size]]
            batch = {k: v.to(device) for k, v in collate_rankings(encoder, chunk).items()}
            scores = ranking_scores(model, batch).cpu()  # [b, Kmax(, H)]
            for i, (_, rs) in enumerate(groups[b : b + batch_size]):
                out.append(scores[i, : len(rs)])
    finally:
        model.train(was_training)
    return torch.cat(out).float() if out else torch.zeros(0)


@torch.no_grad()
def score_rollout(model, rollout, chunk: int = 64, group: int = 1) -> torch.Tensor:
    """Reward of each sampled response, read from the rollout's own token ids: [B] float32.

    The score sits at each response's last token (its EOS when it ended), so no text is
    re-tokenised between the policy and the reward model (they share a tokenizer). With
    ``group`` > 1 the rows come in groups of ``group`` samples of one prompt, and each
    prompt runs once for its group.
    """
    from tether.rollout import group_chunks, group_tensors, trimmed_batch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores = None
    try:
        for rows in group_chunks(rollout, group, chunk):  # similar lengths share a forward pass
            lengths = rollout.response_mask[rows].sum(1).to(device)
            at = torch.arange(len(rows), device=device)
            if group > 1:
                q, qm, r, rm, _ = group_tensors(rollout, rows, device)
                out = grouped_token_scalars(model, q, qm, r, rm, group)[at, lengths]
            else:
                ids, att, start, _ = trimmed_batch(rollout, rows, device)
                out = token_scalars(model, ids, att)[at, start + lengths - 1]
            if scores is None:
                scores = torch.zeros(len(rollout), *out.shape[1:])
            scores[rows] = out.float().cpu()
    finally:
        model.train(was_training)
    return scores if scores is not None else torch.zeros(0)


def pairwise_accuracy(scores: list[float], gold: list[float]) -> tuple[int, int]:
    """(agreeing pairs, pairs) between two score lists over all pairs with distinct gold."""
    agree = total = 0
    for i in range(len(gold)):
        for j in range(i + 1, len(gold)):
            if gold[i] == gold[j]:
                continue
            total += 1
            agree += (scores[i] - scores[j]) * (gold[i] - gold[j]) > 0
    return agree, total


def ensemble_spread(scores: torch.Tensor) -> torch.Tensor:
    """[B] disagreement of H reward heads on each of B responses: the std over heads of each
    head's scores centred on the batch. A Bradley-Terry head is only defined up to an offset,
    so the heads' raw offsets say nothing; what they disagree on is how the responses compare.
    """
    if scores.dim() == 1 or scores.size(-1) == 1 or scores.size(0) < 2:
        return torch.zeros(scores.size(0))
    return (scores - scores.mean(dim=0, keepdim=True)).std(dim=-1)


def ensemble_reward(scores: torch.Tensor, penalty: float = 0.0) -> torch.Tensor:
    """[B] reward from [B] or [B, H] head scores: the heads' mean minus ``penalty`` × their
    disagreement (:func:`ensemble_spread`), an uncertainty-penalised reward (Coste et al.
    2024; Eisenstein et al. 2023). A single head is returned as it is."""
    if scores.dim() == 1 or scores.size(-1) == 1:
        return scores.reshape(scores.size(0))
    return scores.mean(dim=-1) - penalty * ensemble_spread(scores)


# --------------------------------------------------------------------------- frozen trunk
#
# rm.trunk = frozen: the SFT backbone as it is, linear heads fitted on its last-token states
# (ArmoRM's linear heads on frozen features, Wang et al. 2024). The forward pass over the
# rankings is the whole cost; each fit takes seconds, so the L2 strength is cross-validated
# and a learning curve costs a few more fits.


@torch.no_grad()
def collect_states(model, encoder: Encoder, rankings: list[Ranking], *, share_prompt: bool = True,
                   batch_size: int = 16, desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(states [B, Kmax, D] float32, mask [B, Kmax])`` of every ranking (responses best
    first), one forward pass of the backbone in eval mode (each prompt once for its K)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    k_max = max((len(r.responses) for r in rankings), default=1)
    parts, masks = [], []
    bar = progress_bar(len(rankings), desc, unit="ranking") if desc else None
    try:
        for b in range(0, len(rankings), batch_size):
            chunk = rankings[b: b + batch_size]
            batch = {k: v.to(device) for k, v in collate_rankings(encoder, chunk, share_prompt).items()}
            st = ranking_states(model, batch).float().cpu()  # [b, k, D]
            pad = k_max - st.size(1)
            parts.append(torch.nn.functional.pad(st, (0, 0, 0, pad)))
            masks.append(torch.nn.functional.pad(batch["slot_mask"].cpu(), (0, pad)))
            if bar is not None:
                bar.update(len(chunk))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    if not parts:
        return torch.zeros(0, k_max, 0), torch.zeros(0, k_max, dtype=torch.bool)
    return torch.cat(parts), torch.cat(masks)


def fit_linear_heads(states: torch.Tensor, mask: torch.Tensor, heads: int = 1, *, loss: str = "bradley_terry",
                     l2s: tuple[float, ...] | list[float] = (1e-3, 1e-2, 1e-1), steps: int = 300, folds: int = 5,
                     bootstrap: bool = True, seed: int = 0, lr: float = 1e-2,
                     targets: torch.Tensor | None = None, margins: torch.Tensor | None = None):
    """Linear reward heads on frozen features, fitted on rankings (best first).

    ``states`` [B, K, D] and ``mask`` [B, K]; ``targets``/``margins`` [B, P] as in
    :func:`tether.losses.ranking_loss_terms`. Features are standardised; each head h minimises
    ``ensemble_ranking_loss`` (its bootstrap weights when ``heads`` > 1) + ``l2·|w_h|²`` by
    ``steps`` full-batch Adam steps. The L2 strength is the one with the lowest
    ``folds``-fold cross-validated ranking loss (one head per fold fit; the folds split the
    rankings); the heads are then fitted on all of them with it. (Early stopping on a small
    split was tried and chose 2–26 steps from a noisy minimum: 0.60–0.66 held-out accuracy
    against 0.67 at convergence on the default's features.)

    Returns ``(weight [H, D], info)``: ``states @ weight.T`` are the heads' scores up to a
    constant per head (the standardisation folded in), so ``weight`` loads straight into a
    sequence-classification model's bias-free ``score`` head.
    """
    b = states.size(0)
    valid = mask.unsqueeze(-1).to(states.dtype)
    count = valid.sum().clamp(min=1)
    mu = (states * valid).sum(dim=(0, 1)) / count  # [D]
    sd = (((states - mu) * valid) ** 2).sum(dim=(0, 1)).div(count).sqrt().clamp(min=1e-6)
    x = (states - mu) / sd * valid  # [B, K, D]
    gen = torch.Generator().manual_seed(seed)
    weights = bootstrap_weights(b, heads, gen, bootstrap)  # [B, H]
    order = torch.randperm(b, generator=gen)

    def rows(t, idx):
        return None if t is None else t[idx]

    def objective(w, idx, wts):
        scores = x[idx] @ w.T  # [b, K, H]
        return ensemble_ranking_loss(scores, mask[idx], wts, loss=loss, targets=rows(targets, idx),
                                     margins=rows(margins, idx))

    def run(idx, l2, wts):
        w = torch.zeros(wts.size(1), x.size(-1), requires_grad=True)
        opt = torch.optim.Adam([w], lr=lr)
        for _ in range(steps):
            obj = objective(w, idx, wts) + l2 * (w ** 2).sum(dim=1).mean()
            opt.zero_grad()
            obj.backward()
            opt.step()
        return w.detach()

    folds = min(folds, b // 2)
    info = {"rankings": b, "folds": folds if folds >= 2 else 0, "steps": steps}
    if folds >= 2:
        parts = order.chunk(folds)
        cv = {}
        for l2 in l2s:
            total = 0.0
            for f, val in enumerate(parts):
                fit_rows = torch.cat([p for g, p in enumerate(parts) if g != f])
                w = run(fit_rows, l2, torch.ones(len(fit_rows), 1))
                with torch.no_grad():
                    total += float(objective(w, val, torch.ones(len(val), 1))) * len(val) / b
            cv[l2] = total
        l2 = min(cv, key=cv.get)
        info.update(l2=l2, cv_loss=cv[l2], cv_loss_per_l2={str(k): v for k, v in cv.items()})
    else:  # too few rankings to hold some out: the middle strength
        l2 = sorted(l2s)[len(l2s) // 2]
        info["l2"] = l2
    return run(torch.arange(b), l2, weights) / sd, info


def group_accuracy(scores: torch.Tensor, groups: list[list[float]]) -> tuple[int, int]:
    """(agreeing pairs, pairs with distinct gold) of flat ``scores`` [N] over consecutive
    groups whose gold values are ``groups``."""
    flat = scores.tolist()
    agree = total = pos = 0
    for gold in groups:
        a, n = pairwise_accuracy(flat[pos: pos + len(gold)], gold)
        agree, total, pos = agree + a, total + n, pos + len(gold)
    return agree, total


def fit_reward_model(model, encoder: Encoder, rankings: list[Ranking], cfg: RMConfig, *, seed: int = 0,
                     heldout: list[dict] | None = None, logger: MetricsLogger | None = None) -> dict:
    """``rm.trunk = frozen``: the backbone's last-token states of every ranking once, then
    :func:`fit_linear_heads`; the heads are written into ``model.score`` in place.

    ``heldout``: groups ``{prompt, responses, gold}`` scored against gold (the heads' mean),
    with a learning curve (held-out accuracy of heads fitted on the first n rankings for each
    n in ``cfg.learning_curve`` below the total, and on all) — each size chooses its own L2
    strength by its own cross-validation; the held-out groups choose nothing.
    """
    from tether.data.schemas import parse_ranking

    start = time.time()
    heads = getattr(getattr(model, "config", None), "num_labels", 1) if cfg.ensemble > 1 else 1
    states, mask = collect_states(model, encoder, rankings, share_prompt=cfg.share_prompt,
                                  desc="reward model: features")
    labels = pair_labels(rankings, states.size(1))
    targets, margins = labels.get("targets"), labels.get("margins")
    if margins is not None:
        margins = cfg.margin_scale * margins
    kw = dict(loss=cfg.loss, l2s=cfg.head_l2, steps=cfg.head_steps, folds=cfg.head_folds,
              bootstrap=cfg.bootstrap, seed=seed)
    feature_seconds = time.time() - start
    weight, info = fit_linear_heads(states, mask, heads, targets=targets, margins=margins, **kw)
    with torch.no_grad():
        model.score.weight.copy_(weight.to(model.score.weight.dtype))
    out = {"steps": info["steps"], "trunk": "frozen", "heads": heads, "bootstrap": bool(heads > 1 and cfg.bootstrap),
           "head_fit": info, "feature_seconds": feature_seconds}
    if heldout:
        held = [parse_ranking({"prompt": g["prompt"], "responses": list(g["responses"]),
                               "ranking": list(range(len(g["responses"])))}, allow_empty_responses=True)
                for g in heldout]
        h_states, h_mask = collect_states(model, encoder, held, share_prompt=cfg.share_prompt,
                                          desc="reward model: held-out")
        golds = [list(g["gold"]) for g in heldout]

        def heldout_accuracy(w: torch.Tensor) -> tuple[float | None, int, list[float]]:
            sc = h_states @ w.T  # [G, K, H]
            per_head = [group_accuracy(sc[..., h][h_mask], golds) for h in range(sc.size(-1))]
            a, n = group_accuracy(sc.mean(dim=-1)[h_mask], golds)
            return (a / n if n else None), n, [x / max(m, 1) for x, m in per_head]

        acc, n, per_head = heldout_accuracy(weight)
        out.update(heldout_accuracy=acc, heldout_pairs=n)
        if heads > 1:
            out["heldout_accuracy_per_head"] = per_head
        curve = []
        for size in [m for m in cfg.learning_curve if m < len(rankings)] + [len(rankings)]:
            if size == len(rankings):
                a_n = acc
            else:
                w_n, _ = fit_linear_heads(states[:size], mask[:size], heads,
                                          targets=None if targets is None else targets[:size],
                                          margins=None if margins is None else margins[:size], **kw)
                a_n = heldout_accuracy(w_n)[0]
            se = None if a_n is None else (a_n * (1 - a_n) / max(n, 1)) ** 0.5
            curve.append({"rankings": size, "heldout_accuracy": a_n, "stderr": se})
        out["learning_curve"] = curve
    out["seconds"] = time.time() - start
    if logger is not None:
        logger.log(info["steps"], {"rm/cv_loss": info.get("cv_loss"), "rm/heldout_accuracy": out.get("heldout_accuracy")})
    return out
