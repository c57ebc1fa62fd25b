"""Reward models compared on one run's preferences and held-out pairs.

For a finished run folder (its ``prefs/rankings.jsonl``, ``prefs/heldout.jsonl`` and
``sft/checkpoint``), fit each reward model on the first n rankings and score the same
held-out pairs against gold:

- ``frozen``: linear heads on the frozen SFT backbone (``rm.trunk: frozen``), one forward
  pass over all rankings, then a fit per n (the learning curve);
- ``tuned``: the backbone tuned with LoRA and the head (``rm.trunk: tuned``), one training
  per n (slow on a CPU: about 2.6 s per ranking per epoch for SmolLM2-135M, K = 4);
- ``shorter``: no model, the shorter answer wins (the length baseline the RM must beat).

    python bench/rm_heads.py runs/default --n 96,360 --models frozen,tuned,shorter

Prints one line per (model, n) with the held-out accuracy, its binomial s.e., the pairs and
the seconds; ``--json FILE`` writes them too. The settings are the run's own config.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a finished tether run folder")
    ap.add_argument("--n", default="all", help="comma-separated numbers of rankings (or 'all')")
    ap.add_argument("--models", default="frozen,shorter", help="frozen, tuned, shorter (comma-separated)")
    ap.add_argument("--epochs", type=float, default=1.0, help="tuned: passes over the rankings")
    ap.add_argument("--lr", type=float, default=5e-4, help="tuned: learning rate (the tuned default's)")
    ap.add_argument("--batch", type=int, default=8, help="tuned: rankings per step (the tuned default's)")
    ap.add_argument("--seeds", default="0", help="frozen: fit seeds (bootstrap and folds), comma-separated")
    ap.add_argument("--json", help="write the rows to this file")
    args = ap.parse_args()

    import dataclasses

    import torch

    from tether.algorithms.reward import (collect_states, fit_linear_heads, group_accuracy, pair_labels,
                                          score_groups, train_reward)
    from tether.config import load_config
    from tether.data.schemas import load_rankings, parse_ranking
    from tether.data.tokenize import Encoder
    from tether.models import load_scalar_model, load_tokenizer

    run = Path(args.run)
    cfg = load_config(str(run / "config.yaml"))
    enc = Encoder(load_tokenizer(cfg.model.name), cfg.model.max_length, cfg.model.max_prompt_length)
    rankings = load_rankings(run / "prefs" / "rankings.jsonl", allow_empty_responses=True)
    held = [json.loads(line) for line in open(run / "prefs" / "heldout.jsonl")]
    golds = [g["gold"] for g in held]
    sizes = [len(rankings) if x == "all" else min(int(x), len(rankings)) for x in args.n.split(",")]
    sft = str(run / "sft" / "checkpoint")
    rows = []

    def report(model: str, n: int, agree: int, pairs: int, seconds: float, **extra) -> None:
        acc = agree / pairs
        row = {"model": model, "rankings": n, "heldout_accuracy": acc, "stderr": (acc * (1 - acc) / pairs) ** 0.5,
               "pairs": pairs, "seconds": round(seconds, 1), **extra}
        rows.append(row)
        print(f"{model:8s} n={n:4d} seed={extra.get('seed', 0)}  held-out {acc:.3f} ± {row['stderr']:.3f} on {pairs} pairs  {seconds:6.0f} s", flush=True)

    models = args.models.split(",")
    if "shorter" in models:
        scores = torch.tensor([-float(len(r)) for g in held for r in g["responses"]])
        report("shorter", 0, *group_accuracy(scores, golds), 0.0)
    if "frozen" in models:
        t = time.time()
        model = load_scalar_model(sft, cfg.model, None, pad_token_id=enc.pad_id)
        model.requires_grad_(False)
        states, mask = collect_states(model, enc, rankings, desc="features")
        ranked = [parse_ranking({"prompt": g["prompt"], "responses": g["responses"],
                                 "ranking": list(range(len(g["responses"])))}, allow_empty_responses=True) for g in held]
        h_states, h_mask = collect_states(model, enc, ranked, desc="held-out features")
        labels = pair_labels(rankings, states.size(1))
        base = time.time() - t
        for n in sizes:
            for seed in [int(x) for x in args.seeds.split(",")]:
                t = time.time()
                t_n = labels.get("targets")
                w, info = fit_linear_heads(states[:n], mask[:n], cfg.rm.ensemble, loss=cfg.rm.loss, l2s=cfg.rm.head_l2,
                                           steps=cfg.rm.head_steps, folds=cfg.rm.head_folds, bootstrap=cfg.rm.bootstrap,
                                           seed=seed, targets=None if t_n is None else t_n[:n])
                scores = (h_states @ w.T).mean(dim=-1)[h_mask]
                report("frozen", n, *group_accuracy(scores, golds), base * n / len(rankings) + time.time() - t,
                       l2=info["l2"], seed=seed)
    if "tuned" in models:
        optim = dataclasses.replace(cfg.rm.optim, lr=args.lr, batch_size=args.batch, micro_batch_size=args.batch)
        rm = dataclasses.replace(cfg.rm, trunk="tuned", epochs=args.epochs, optim=optim)
        for n in sizes:
            t = time.time()
            model = load_scalar_model(sft, cfg.model, cfg.lora, pad_token_id=enc.pad_id, num_labels=cfg.rm.ensemble)
            train_reward(model, enc, rankings[:n], rm, seed=0)
            scores = score_groups(model, enc, [(g["prompt"], g["responses"]) for g in held])
            scores = scores.mean(dim=-1) if scores.dim() == 2 else scores
            report("tuned", n, *group_accuracy(scores, golds), time.time() - t)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
