"""``DIR/report.html``: one self-contained page per run (inline SVG plots, inline CSS, no
scripts, nothing fetched from the network).

It shows the verdict of the reward-hacking monitor for each optimised policy, the summary
table (held-out gold per policy, KL, length, reward-model and labeler accuracy, wall time per
stage), plots — proxy reward vs held-out signal over steps with the first alarm and the best
check marked, the reward-vs-KL frontier, response length, diversity and repetition, KL and
the KL coefficient, ensemble disagreement — and samples of SFT and each policy side by side
for the same held-out prompts. ``tether report DIR`` rebuilds it from the run's files.
"""

from __future__ import annotations

import html
import io
import json
from pathlib import Path

from tether.config import POLICIES

__all__ = ["build_report", "load_run"]

COLORS = {"base": "#8c8c8c", "sft": "#4c72b0", "ppo": "#dd8452", "dpo": "#55a868", "grpo": "#c44e52",
          "rloo": "#8172b3"}


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut off by a stopped run
                continue
    return rows


def load_run(run_dir: str | Path) -> dict:
    """What the report reads from a run folder: summary, per-policy metrics (training rows
    and monitor rows apart), monitor verdicts and the evaluations."""
    d = Path(run_dir)
    summary_file = d / "summary.json"
    if not summary_file.is_file():
        raise FileNotFoundError(f"{summary_file}: no summary.json; is {d} a tether run folder?")
    run = {"dir": d, "summary": json.loads(summary_file.read_text()), "policies": {}, "eval": {}}
    for name in POLICIES:
        folder = d / name
        if not (folder / "stage.json").is_file() and not (folder / "metrics.jsonl").is_file():
            continue
        rows = _read_jsonl(folder / "metrics.jsonl")
        mon = json.loads((folder / "monitor.json").read_text()) if (folder / "monitor.json").is_file() else {}
        run["policies"][name] = {
            "train": [r for r in rows if not any(k.startswith("monitor/") for k in r)],
            "monitor": [r for r in rows if any(k.startswith("monitor/") for k in r)],
            "verdict": mon,
        }
    order = {n: i for i, n in enumerate(("base", "sft", *[x for p in POLICIES for x in (p, f"{p}_best", f"{p}_last")]))}
    files = sorted((d / "eval").glob("*.json"), key=lambda f: (order.get(f.stem, len(order)), f.stem)) \
        if (d / "eval").is_dir() else []
    for f in files:
        if f.name == "stage.json":
            continue
        try:
            run["eval"][f.stem] = json.loads(f.read_text())
        except json.JSONDecodeError:
            continue
    return run


# --------------------------------------------------------------------------- plots


def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _plots(run: dict) -> list[tuple[str, str, str]]:
    """(title, caption, svg) for each plot that has data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "font.size": 9, "axes.spines.top": False,
                         "axes.spines.right": False})
    out = []
    pols = {n: p for n, p in run["policies"].items() if p["monitor"]}

    # 1. proxy vs held-out over steps
    if pols:
        fig, axes = plt.subplots(1, len(pols), figsize=(4.6 * len(pols), 3.2), squeeze=False)
        for ax, (name, p) in zip(axes[0], pols.items()):
            v = p["verdict"]
            x, y = _series(p["monitor"], "monitor/proxy")
            ax.plot(x, y, "-o", color=COLORS.get(name, "k"), ms=3, label="proxy (optimised)")
            ax.set_xlabel("step")
            ax.set_ylabel("proxy reward")
            key = v.get("heldout") or next((k for k in ("gold", "judge", "heldout_rm")
                                           if _series(p["monitor"], f"monitor/{k}")[0]), None)
            if key:
                ax2 = ax.twinx()
                ax2.spines["right"].set_visible(True)
                x2, y2 = _series(p["monitor"], f"monitor/{key}")
                ax2.plot(x2, y2, "-s", color="#2a9d8f", ms=3, label=f"held-out {key}")
                ax2.set_ylabel(f"held-out {key}", color="#2a9d8f")
                if v.get("best_step") is not None and v.get("best_heldout") is not None:
                    ax2.plot([v["best_step"]], [v["best_heldout"]], "*", color="#2a9d8f", ms=12, label="best check")
                h1, l1 = ax.get_legend_handles_labels()
                h2, l2 = ax2.get_legend_handles_labels()
                ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="lower left")
            if v.get("first_alarm_step") is not None:
                ax.axvline(v["first_alarm_step"], color="#d62728", ls="--", lw=1)
                ax.text(v["first_alarm_step"], ax.get_ylim()[1], " first alarm", color="#d62728", va="top", fontsize=7)
            ax.set_title(name)
        out.append(("Proxy reward vs held-out signal", "The optimised reward against a signal the policy never "
                    "sees, on the validation prompts. Reward hacking: the proxy keeps rising while the held-out "
                    "signal falls. ★ the best check (kept as a checkpoint); dashed: the first alarm.", _svg(fig)))

    # 2. reward-vs-KL frontier
    if pols or run["eval"]:
        fig, axes = plt.subplots(1, 2, figsize=(9.2, 3.4))
        for name, p in pols.items():
            kx, _ = _series(p["monitor"], "monitor/kl")
            kl = [r.get("monitor/kl") for r in p["monitor"]]
            for ax, key in ((axes[0], "monitor/heldout"), (axes[1], "monitor/proxy")):
                pts = [(k, r.get(key)) for k, r in zip(kl, p["monitor"]) if k is not None and r.get(key) is not None]
                if pts:
                    ax.plot([a for a, _ in pts], [b for _, b in pts], "-o", ms=3, color=COLORS.get(name, "k"),
                            label=f"{name} (validation, over steps)")
        for name, res in run["eval"].items():
            if name == "base" or res.get("gold_mean") is None:
                continue
            kl = res.get("kl_to_ref", 0.0 if name == "sft" else None)
            if kl is None:
                continue
            axes[0].errorbar([kl], [res["gold_mean"]], yerr=[res.get("gold_stderr") or 0], fmt="D",
                             color=COLORS.get(name, "k"), ms=6, capsize=3, label=f"{name} (final eval)")
        axes[0].set_xlabel("KL to reference (nats / response)")
        axes[0].set_ylabel("held-out gold")
        axes[0].set_title("held-out gold vs KL")
        axes[1].set_xlabel("KL to reference (nats / response)")
        axes[1].set_ylabel("proxy reward")
        axes[1].set_title("proxy reward vs KL")
        for ax in axes:
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        out.append(("Reward vs KL frontier", "How much reward each nat of KL to the reference buys. The proxy "
                    "usually keeps climbing with KL; the held-out gold bends over where over-optimisation "
                    "starts (Gao et al. 2023).", _svg(fig)))

    # 3. length, diversity, entropy
    if pols:
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.0))
        for name, p in pols.items():
            c = COLORS.get(name, "k")
            axes[0].plot(*_series(p["monitor"], "monitor/length"), "-o", ms=3, color=c, label=name)
            axes[1].plot(*_series(p["monitor"], "monitor/distinct2"), "-o", ms=3, color=c, label=f"{name} distinct-2")
            axes[1].plot(*_series(p["monitor"], "monitor/repeat_rate"), "--x", ms=3, color=c,
                         label=f"{name} repeated 3-grams")
            axes[2].plot(*_series(p["monitor"], "monitor/entropy"), "-o", ms=3, color=c, label=name)
        for ax, t in zip(axes, ("response length (tokens)", "diversity / repetition", "entropy (nats / token)")):
            ax.set_title(t)
            ax.set_xlabel("step")
            ax.legend(fontsize=7)
        out.append(("Length, diversity and entropy", "Verbosity, mode collapse and degeneration are the usual "
                    "forms of reward hacking; the monitor raises an alarm when they drift past their bounds.",
                    _svg(fig)))

    # 4. KL and the KL coefficient (training rollouts)
    trained = {n: p for n, p in run["policies"].items() if _series(p["train"], "kl/ref")[0]}
    if trained:
        fig, axes = plt.subplots(1, 2, figsize=(9.2, 3.0))
        for name, p in trained.items():
            c = COLORS.get(name, "k")
            axes[0].plot(*_series(p["train"], "kl/ref"), "-", color=c, label=name)
            if _series(p["train"], "kl/coef")[0]:
                axes[1].plot(*_series(p["train"], "kl/coef"), "-", color=c, label=f"{name} β")
        axes[0].set_title("KL to reference on training rollouts")
        axes[1].set_title("KL coefficient β")
        for ax in axes:
            ax.set_xlabel("step")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        out.append(("KL and KL coefficient", "The per-token KL penalty holds the policy near the SFT "
                    "reference; PPO's adaptive controller moves β towards its KL target.", _svg(fig)))

    # 5. ensemble disagreement
    ens = {n: p for n, p in pols.items() if _series(p["monitor"], "monitor/ensemble_std")[0]}
    if ens:
        fig, ax = plt.subplots(figsize=(4.6, 3.0))
        for name, p in ens.items():
            ax.plot(*_series(p["monitor"], "monitor/ensemble_std"), "-o", ms=3, color=COLORS.get(name, "k"), label=name)
        ax.set_title("reward-model ensemble disagreement (std of heads)")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        out.append(("Ensemble disagreement", "When the policy leaves the reward model's training data the "
                    "ensemble's heads disagree more.", _svg(fig)))

    # 6. final held-out gold per policy
    ev = {n: r for n, r in run["eval"].items() if r.get("gold_mean") is not None}
    if ev:
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(ev), 3.0))
        names = list(ev)
        means = [ev[n]["gold_mean"] for n in names]
        lo = [ev[n]["gold_mean"] - ev[n].get("gold_ci95", [ev[n]["gold_mean"]] * 2)[0] for n in names]
        hi = [ev[n].get("gold_ci95", [ev[n]["gold_mean"]] * 2)[1] - ev[n]["gold_mean"] for n in names]
        ax.bar(names, means, yerr=[lo, hi], capsize=4, color=[COLORS.get(n, "#999") for n in names])
        ax.set_ylabel("held-out gold (95% bootstrap CI)")
        out.append(("Held-out gold per policy", f"Final evaluation on {next(iter(ev.values())).get('n')} held-out "
                    "prompts.", _svg(fig)))

    # 7. the reward model's learning curve
    curve = [c for c in ((run["summary"].get("reward_model") or {}).get("learning_curve") or [])
             if c.get("heldout_accuracy") is not None]
    if len(curve) > 1:
        rm = run["summary"]["reward_model"]
        fig, ax = plt.subplots(figsize=(4.6, 3.2))
        x = [c["rankings"] for c in curve]
        y = [c["heldout_accuracy"] for c in curve]
        e = [1.96 * (c.get("stderr") or 0) for c in curve]
        ax.errorbar(x, y, yerr=e, fmt="-o", ms=3, color="#264653", capsize=3)
        ax.axhline(0.5, color="#999", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_xticks(x)
        ax.set_xticklabels([str(v) for v in x])
        ax.set_xlabel("rankings of K (reward model trained on the first n)")
        ax.set_ylabel("held-out pairwise accuracy vs gold")
        out.append(("Reward model learning curve", f"Held-out pairwise accuracy against gold on "
                    f"{rm.get('heldout_pairs')} pairs of responses to held-out prompts, for a reward model fitted on the "
                    "first n rankings (each size chooses its own regularisation by its own cross-validation); bars: "
                    "95% intervals (binomial s.e. over pairs). Where it still climbs at the right, more rankings "
                    "would buy accuracy.", _svg(fig)))
    return out


# --------------------------------------------------------------------------- page

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;color:#222;padding:0 16px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#666;font-size:13px} table{border-collapse:collapse;font-size:13px;margin:8px 0}
td,th{border:1px solid #ddd;padding:4px 8px;vertical-align:top} th{background:#f5f5f5;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.alarm{background:#fde2e1;border-left:5px solid #d62728;padding:8px 12px;margin:8px 0}
.ok{background:#e3f4e8;border-left:5px solid #2a9d8f;padding:8px 12px;margin:8px 0}
.caption{color:#555;font-size:13px;margin:2px 0 8px} .plot svg{max-width:100%;height:auto}
.sample{white-space:pre-wrap;font-family:ui-monospace,Menlo,monospace;font-size:12px;max-width:360px}
.gold{color:#666;font-size:11px}
"""


def _fmt(x, nd: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return html.escape(str(x))


def _verdicts(run: dict) -> str:
    parts = []
    for name, p in run["policies"].items():
        v = p["verdict"]
        if not v:
            continue
        if v.get("hacking_detected"):
            items = "".join(f"<li>step {a['step']}: {html.escape(a['message'])}</li>" for a in v.get("alarms", []))
            parts.append(f"<div class='alarm'><b>{name}: over-optimisation detected</b> (first alarm at step "
                         f"{v.get('first_alarm_step')}; best held-out {_fmt(v.get('heldout'))} "
                         f"{_fmt(v.get('best_heldout'))} at step {v.get('best_step')}, last "
                         f"{_fmt(v.get('last_heldout'))} at step {v.get('last_step')})<ul>{items}</ul></div>")
        else:
            parts.append(f"<div class='ok'><b>{name}: no over-optimisation alarm</b> over {v.get('checks')} checks "
                         f"on {v.get('prompts')} validation prompts (held-out {_fmt(v.get('heldout'))} "
                         f"{_fmt(v.get('last_heldout'))} at the last check, best {_fmt(v.get('best_heldout'))} "
                         f"at step {v.get('best_step')})</div>")
    return "".join(parts)


def _paired(r: dict) -> str:
    """A policy's paired difference to SFT (SFT's to the base model) on the same prompts
    (``r`` the policy's entry in summary.json's ``eval``)."""
    against = "sft" if r.get("vs_sft") else "base"
    vs = r.get(f"vs_{against}")
    if not vs:
        return "—"
    return (f"{vs['mean']:+.3f} ± {_fmt(vs['stderr'])} vs {against} ({vs['z']:.1f}) "
            f"[{vs['ci95'][0]:+.3f}, {vs['ci95'][1]:+.3f}], n {vs['n']}")


def _breakdown_table(run: dict) -> str:
    """What RLHF changed: for each kind of instruction, the share of held-out responses that
    satisfy it, per policy (the task's ``breakdown``), with how many prompts carry that kind."""
    ev = {n: r for n, r in run["eval"].items() if r.get("breakdown")}
    if not ev:
        return ""
    kinds = sorted({k for r in ev.values() for k in r["breakdown"]})
    counts = next((r.get("breakdown_n") for r in ev.values() if r.get("breakdown_n")), {}) or {}
    head = "".join(f"<th>{html.escape(n)}</th>" for n in ev)
    rows = []
    for k in kinds:
        cells = "".join(f"<td class='num'>{_fmt(r['breakdown'].get(k), 2)}</td>" for r in ev.values())
        rows.append(f"<tr><td>{html.escape(k)}</td><td class='num'>{counts.get(k, '')}</td>{cells}</tr>")
    return ("<h2>What changed, by kind of instruction</h2><p>Share of held-out responses that satisfy each "
            "kind of instruction (n: prompts carrying it; a small n is a noisy share).</p>"
            f"<table><tr><th>instruction</th><th>n</th>{head}</tr>{''.join(rows)}</table>")


def _summary_table(run: dict) -> str:
    s = run["summary"]
    rows = []
    for name, r in run["eval"].items():
        ci = r.get("gold_ci95") or [None, None]
        kl = r.get("kl_to_ref")
        rows.append(f"<tr><td>{html.escape(name)}</td><td class='num'>{_fmt(r.get('gold_mean'))} ± "
                    f"{_fmt(r.get('gold_stderr'))}</td><td class='num'>[{_fmt(ci[0])}, {_fmt(ci[1])}]</td>"
                    f"<td class='num'>{_fmt(kl, 2)}{' vs ' + html.escape(r['reference']) if r.get('reference') else ''}"
                    f"</td><td class='num'>{_fmt(r.get('length_mean'), 1)}</td><td class='num'>{_paired((s.get('eval') or {}).get(name) or {})}</td></tr>")
    table = ("<table><tr><th>policy</th><th>held-out gold ± s.e.</th><th>95% CI</th><th>KL to reference</th>"
             "<th>length</th><th>paired Δ ± s.e. (z) [95% CI], same prompts</th></tr>" + "".join(rows)
             + "</table>") if rows else "<p>No evaluation yet.</p>"
    facts = []
    rm = s.get("reward_model")
    if rm:
        facts.append(f"reward model held-out pairwise accuracy vs gold: <b>{_fmt(rm.get('heldout_accuracy'))}</b> on "
                     f"{rm.get('heldout_pairs')} pairs" + (f" (a simulated labeler: {_fmt(rm.get('labeler_heldout_accuracy'))})"
                                                           if rm.get("labeler_heldout_accuracy") is not None else ""))
        shift = rm.get("on_policy_accuracy")
        if shift:
            a, b = shift["sft_samples"], shift["ppo_samples"]
            facts.append(f"reward model on the policy's own rollouts (distribution shift): {_fmt(a['accuracy'])} ± "
                         f"{_fmt(a['stderr'])} on SFT's samples ({a['pairs']} pairs), {_fmt(b['accuracy'])} ± "
                         f"{_fmt(b['stderr'])} on PPO's ({b['pairs']} pairs)")
        if rm.get("heldout_accuracy_per_head"):
            facts.append("ensemble heads: " + ", ".join(_fmt(a) for a in rm["heldout_accuracy_per_head"]))
    prefs = s.get("preferences") or {}
    if prefs.get("labeler_agreement") is not None:
        alpha = (prefs.get("agreement") or {}).get("krippendorff_alpha")
        facts.append(f"labeler agreement: {_fmt(prefs['labeler_agreement'])} on {prefs.get('labeler_agreement_pairs')} "
                     f"overlapping pairs ({prefs.get('labels', prefs.get('rankings'))} rankings of K={prefs.get('k')})"
                     + (f"; Krippendorff's α {_fmt(alpha)}" if alpha is not None else ""))
    acc = prefs.get("judge_accuracy") or {}
    if acc.get("pairs"):
        bias = prefs.get("judge_position_bias") or {}
        facts.append(f"AI judge {html.escape(str(prefs.get('judge')))}: accuracy vs gold <b>{_fmt(acc.get('swapped'))}</b> "
                     f"on {acc['pairs']} pairs (one order only: {_fmt(acc.get('first_order'))}); first-slot rate "
                     f"{_fmt(bias.get('first_slot_rate'))}, consistent under swapping {_fmt(bias.get('consistency'))}")
    stages = s.get("stages", {})
    if stages:
        facts.append("wall time: " + ", ".join(f"{html.escape(k)} {v['seconds']:.0f} s" for k, v in stages.items()
                                               if v.get("seconds") is not None))
    return table + "".join(f"<p class='meta'>{f}</p>" for f in facts)


def _samples(run: dict) -> str:
    ev = {n: r for n, r in run["eval"].items() if r.get("samples")}
    if not ev:
        return "<p>No samples.</p>"
    names = list(ev)  # base, sft, then each policy (and its other kept checkpoint)
    by_prompt: dict[str, dict] = {}
    for n in names:
        for smp in ev[n]["samples"]:
            by_prompt.setdefault(json.dumps(smp["prompt"]), {})[n] = smp
    head = "<tr><th>prompt</th>" + "".join(f"<th>{n}</th>" for n in names) + "</tr>"
    rows = []
    for key, cells in by_prompt.items():
        prompt = json.loads(key)
        if not isinstance(prompt, str):
            prompt = json.dumps(prompt, ensure_ascii=False)
        tds = "".join(
            f"<td><div class='sample'>{html.escape(cells[n]['response'])}</div>"
            f"<div class='gold'>gold {_fmt(cells[n].get('gold'))}</div></td>" if n in cells else "<td></td>"
            for n in names)
        rows.append(f"<tr><td><div class='sample'>{html.escape(prompt)}</div></td>{tds}</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def build_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``run_dir/report.html`` (or ``out``) and return its path; written atomically."""
    import os

    run = load_run(run_dir)
    s = run["summary"]
    plots = "".join(f"<h3>{html.escape(t)}</h3><p class='caption'>{html.escape(c)}</p><div class='plot'>{svg}</div>"
                    for t, c, svg in _plots(run))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>tether report · {html.escape(str(s.get('run_dir')))}</title>
<style>{_CSS}</style></head><body>
<h1>tether run report</h1>
<div class="meta">{html.escape(str(s.get('run_dir')))} · task <b>{html.escape(str(s.get('task')))}</b> · model
<b>{html.escape(str(s.get('model')))}</b> · preset {html.escape(str(s.get('preset')))}</div>
<h2>Reward hacking monitor</h2>{_verdicts(run) or "<p>No policy stage was monitored.</p>"}
<h2>Summary</h2>{_summary_table(run)}
{_breakdown_table(run)}
<h2>Plots</h2>{plots or "<p>Nothing to plot yet.</p>"}
<h2>Samples: the same held-out prompts, before and after</h2>{_samples(run)}
</body></html>
"""
    dest = Path(out) if out else Path(run_dir) / "report.html"
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, dest)
    return dest
