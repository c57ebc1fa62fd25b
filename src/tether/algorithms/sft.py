"""Supervised fine-tuning on demonstrations: next-token loss on the response tokens only.

Read top to bottom: batches of demonstrations → chat-templated prompt + response + EOS →
``sft_loss`` over response tokens, normalised by the response-token count of the whole
optimiser batch (so gradient accumulation equals one big batch) → ``engine.step()``.
"""

from __future__ import annotations

import time

import torch

from tether.config import SFTConfig
from tether.data.schemas import Demonstration
from tether.data.tokenize import Encoder, pad_right
from tether.checkpoint import Checkpointer, LoopState, RNGState
from tether.distributed import all_sum, local_micro
from tether.engine import BatchPlan, Engine, MetricsLogger, length_groups, plan_steps, progress_bar, token_budget
from tether.losses import sft_loss
from tether.models import policy_logits

__all__ = ["collate_sft", "sft_micro_loss", "train_sft"]


def collate_sft(encoder: Encoder, demos: list[Demonstration]) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``loss_mask`` (1 on response tokens)."""
    seqs, masks = [], []
    for d in demos:
        p, r = encoder.example(d.prompt, d.response)
        seqs.append(p + r)
        masks.append([0] * len(p) + [1] * len(r))
    input_ids, attention_mask = pad_right(seqs, encoder.pad_id)
    loss_mask, _ = pad_right(masks, 0, width=input_ids.size(1))
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def sft_micro_loss(model, batch: dict[str, torch.Tensor], normalizer: float | None = None) -> torch.Tensor:
    """SFT loss of one micro-batch; ``normalizer`` = response tokens of the whole optimiser batch."""
    ids, loss_mask = batch["input_ids"], batch["loss_mask"]
    # logits only from the position before the earliest response token on (prompts need none)
    first = int(loss_mask.float().argmax(dim=1).min()) if bool(loss_mask.any()) else ids.size(1) - 1
    begin = max(first - 1, 0)
    logits = policy_logits(model, ids, batch["attention_mask"], keep=ids.size(1) - begin)
    return sft_loss(logits[:, :-1], ids[:, begin + 1 :], loss_mask[:, begin + 1 :], normalizer=normalizer)


def train_sft(
    model,
    encoder: Encoder,
    demos: list[Demonstration],
    cfg: SFTConfig,
    *,
    seed: int = 0,
    logger: MetricsLogger | None = None,
    log_every: int = 10,
    checkpointer: Checkpointer | None = None,
) -> dict:
    """Train ``model`` in place; returns a summary (steps, final loss, throughput).

    ``checkpointer``: saves the training state as it goes and resumes from its newest
    checkpoint (the weights then continue exactly as an uninterrupted run's)."""
    optim = cfg.optim
    total = plan_steps(len(demos), optim.batch_size, cfg.epochs, cfg.max_steps)
    engine = Engine(model.parameters(), optim, total, name="sft")
    plan = BatchPlan(len(demos), optim.batch_size, optim.micro_batch_size, torch.Generator().manual_seed(seed))
    device = next(model.parameters()).device
    model.train()

    loop = LoopState(tokens_seen=0, last={})
    state = {"policy": model, "engine": engine, "data": plan, "rng": RNGState(), "loop": loop,
             "truncation": encoder.stats}
    if logger is not None:
        state["metrics"] = logger
    start = checkpointer.resume(state) if checkpointer is not None else 0
    start_time, tokens0 = time.time(), loop["tokens_seen"]
    bar = progress_bar(total, "sft")
    bar.update(start)
    budget = token_budget(optim.micro_batch_tokens, device)

    def cost(i: int) -> tuple[int, int]:
        p, (r,) = encoder.lengths(demos[i].prompt, [demos[i].response])
        return 1, p + r

    for step in range(start, total):
        # data parallel: this process's share of the step, normalised by the global token count
        groups = length_groups(local_micro(plan.next(), optim.micro_batch_size), cost, optim.micro_batch_size, budget)
        micro = [collate_sft(encoder, [demos[i] for i in idx]) for idx in groups]
        n_tokens = int(all_sum(sum(int(m["loss_mask"][:, 1:].sum()) for m in micro)))
        loss_total = 0.0
        for m in micro:
            m = {k: v.to(device) for k, v in m.items()}
            loss = sft_micro_loss(model, m, normalizer=n_tokens)
            loss.backward()
            loss_total += loss.detach().item()
        loss_total = all_sum(loss_total)
        info = engine.step(loss_total)
        loop["tokens_seen"] += n_tokens
        loop["last"] = last = {"loss/sft": loss_total, "tokens": n_tokens, **{f"optim/{k}": v for k, v in info.items()}}
        if logger is not None and (step % log_every == 0 or step == total - 1):
            logger.log(step, last)
        bar.set_postfix(loss=f"{loss_total:.3f}")
        bar.update(1)
        if checkpointer is not None:
            checkpointer.step(step + 1, state, final=step + 1 == total)
    bar.close()
    elapsed = time.time() - start_time
    out = {
        "steps": total,
        "final_loss": loop["last"].get("loss/sft"),
        "tokens_per_s": (loop["tokens_seen"] - tokens0) / max(elapsed, 1e-9),  # all processes'
        "skipped_steps": engine.skipped_steps,
        "seconds": elapsed,
    }
    if start:
        out["resumed_from_step"] = start
    return out
