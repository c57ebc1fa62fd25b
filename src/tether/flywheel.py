"""The flywheel: label the policy's new samples, retrain the reward model, improve the policy, repeat.

``tether flywheel [CONFIG] --flywheel.rounds 3`` lays out ``DIR/`` as

    DIR/base/            data and SFT, once (a plain run folder)
    DIR/round-1/ ...     one run folder per round: prefs → rm → ppo → eval
    DIR/flywheel.json    per round: labels so far, reward-model accuracy, the policy's gold, KL
    DIR/report.html      gold and reward-model accuracy per round, and each round's own report

Round r samples K responses per prompt from the current policy (round 1: the SFT policy)
for the next ``prefs.n_prompts`` of the training prompts (shuffled once; rounds take
successive slices, wrapping round when they run out, with fresh samples), gets them labelled by ``feedback`` (simulated labelers, an AI judge, or
people in the labeling app), trains the reward model on every label so far, and runs the
policy stage starting from the current policy, tethered by the KL penalty to the SFT
policy. Finished rounds are kept and skipped on the next run, like stages.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

from tether.config import RunConfig
from tether.console import say as _say
from tether.data.io import write_json

__all__ = ["run_flywheel", "flywheel_report"]


def run_flywheel(cfg: RunConfig, out_dir: str | Path | None = None) -> dict:
    from tether.pipeline import Pipeline

    from tether.config import ConfigError

    if cfg.policy != "ppo":
        raise ConfigError("policy: the flywheel retrains a reward model each round, so it runs ppo")
    if cfg.feedback == "file":
        raise ConfigError("feedback: the flywheel labels each round's new samples (simulated, judge or app); a fixed "
                          "file (prefs.path) has nothing new to say about them")
    fw = cfg.flywheel
    root = Path(out_dir or cfg.out or f"runs/{cfg.preset}-flywheel")
    root.mkdir(parents=True, exist_ok=True)
    base = Pipeline(cfg, root / "base")
    base.run(["data", "sft"])
    rounds: list[dict] = []
    policy = None  # round 1 starts from SFT
    labels: list[Path] = []
    for r in range(1, fw.rounds + 1):
        folder = root / f"round-{r}"
        _say(f"[bold]◆ flywheel round {r} of {fw.rounds}[/bold]")
        folder.mkdir(exist_ok=True)
        for stage in ("data", "sft"):  # shared: the round reads them as its own (copied whole, then renamed)
            if not (folder / stage).exists():
                tmp = folder / f".{stage}-copy"
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(root / "base" / stage, tmp)
                tmp.rename(folder / stage)
        pipe = Pipeline(copy.deepcopy(cfg), folder)
        pipe.round = r
        pipe.sampler = policy
        pipe.start = policy
        pipe.carried_labels = list(labels)
        pipe.cfg.eval.policies = ["base", "sft", "ppo"] if r == 1 else ["ppo"]
        summary = pipe.run(["prefs", "rm", "ppo", "eval"])
        labels.append(folder / "prefs" / "labels.jsonl")
        policy = pipe.checkpoint("ppo")
        ev = summary.get("eval", {}).get("ppo", {})
        prefs = summary.get("preferences", {})
        rm = summary.get("reward_model", {})
        rounds.append({
            "round": r,
            "labels_new": prefs.get("labels"),
            "labels_total": (prefs.get("labels") or 0) + (prefs.get("labels_carried") or 0),
            "sample_gold_mean": prefs.get("sample_gold_mean"),
            "rm_heldout_accuracy": rm.get("heldout_accuracy"),
            "gold_mean": ev.get("gold_mean"), "gold_stderr": ev.get("gold_stderr"),
            "kl_to_sft": ev.get("kl_to_ref"), "length_mean": ev.get("length_mean"),
            "hacking_detected": (summary.get("monitor") or {}).get("ppo", {}).get("hacking_detected"),
            "run_dir": str(folder),
        })
        if r == 1:
            first = summary.get("eval", {})
            start = {k: first.get(k, {}).get("gold_mean") for k in ("base", "sft")}
        write_json(root / "flywheel.json", {"rounds": rounds, "start": start, "feedback": cfg.feedback})
    result = {"rounds": rounds, "start": start, "feedback": cfg.feedback, "run_dir": str(root)}
    write_json(root / "flywheel.json", result)
    if cfg.report:
        try:
            result["report"] = str(flywheel_report(root))
        except Exception as exc:  # the rounds stand without their report
            _say(f"[yellow]warning: could not write {root / 'report.html'}: {exc}[/yellow]")
    return result


def flywheel_report(root: str | Path) -> Path:
    """``DIR/report.html``: gold and reward-model accuracy per round (one self-contained page)."""
    import html

    from tether.report import _svg  # the run report's inline-SVG plotting

    root = Path(root)
    data = json.loads((root / "flywheel.json").read_text())
    rounds = data["rounds"]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.4))
    xs = [r["round"] for r in rounds]
    gold = [r["gold_mean"] for r in rounds]
    err = [2 * (r["gold_stderr"] or 0) for r in rounds]
    ax[0].errorbar(xs, gold, yerr=err, marker="o", capsize=3, label="policy (± 2 s.e.)")
    for name, style in (("sft", "--"), ("base", ":")):
        if data["start"].get(name) is not None:
            ax[0].axhline(data["start"][name], linestyle=style, color="grey", label=name)
    ax[0].set(title="held-out gold per round", xlabel="round", xticks=xs)
    ax[0].legend(fontsize=8)
    ax[1].plot(xs, [r["rm_heldout_accuracy"] for r in rounds], marker="o")
    ax[1].set(title="reward model held-out accuracy", xlabel="round", xticks=xs)
    ax2 = ax[1].twinx()
    ax2.bar(xs, [r["labels_total"] for r in rounds], alpha=0.2, color="grey")
    ax2.set_ylabel("labels so far")
    fig.tight_layout()
    plot = _svg(fig)
    plt.close(fig)
    rows = "".join(
        f"<tr><td>{r['round']}</td><td>{r['labels_new']}</td><td>{r['labels_total']}</td>"
        f"<td>{_f(r['rm_heldout_accuracy'])}</td><td>{_f(r['gold_mean'])} ± {_f(r['gold_stderr'])}</td>"
        f"<td>{_f(r['kl_to_sft'], 2)}</td><td>{'⚠ alarm' if r['hacking_detected'] else '—'}</td>"
        f"<td><a href='{html.escape(Path(r['run_dir']).name)}/report.html'>report</a></td></tr>" for r in rounds)
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Tether flywheel</title>
<style>body{{font:15px system-ui,sans-serif;margin:2rem auto;max-width:1000px;color:#1d2330}}
table{{border-collapse:collapse}}td,th{{padding:.25rem .8rem;border-bottom:1px solid #d9dee7;text-align:right}}</style>
</head><body><h1>Flywheel: {len(rounds)} rounds, feedback: {html.escape(str(data.get('feedback')))}</h1>
<p>Start: base {_f(data['start'].get('base'))}, SFT {_f(data['start'].get('sft'))} held-out gold.</p>
{plot}
<table><tr><th>round</th><th>new labels</th><th>labels so far</th><th>RM accuracy</th><th>policy gold</th>
<th>KL to SFT</th><th>monitor</th><th></th></tr>{rows}</table></body></html>"""
    out = root / "report.html"
    from tether.data.io import atomic_write_text

    atomic_write_text(out, page)
    return out


def _f(v, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"
