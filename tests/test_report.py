"""The run report: built from a run folder's files, self-contained, shows the verdicts."""

from __future__ import annotations

import json
import re

import pytest

from tether.cli import main
from tether.report import build_report


def _write_run(d, hacked: bool):
    d.mkdir(parents=True, exist_ok=True)
    (d / "summary.json").write_text(json.dumps({
        "run_dir": str(d), "preset": "tiny", "task": "tiny", "model": "tiny",
        "stages": {"sft": {"seconds": 3.0}, "ppo": {"seconds": 12.0}},
        "reward_model": {"heldout_accuracy": 0.8, "heldout_pairs": 100, "labeler_heldout_accuracy": 0.82},
    }))
    ppo = d / "ppo"
    ppo.mkdir()
    gold = [0.5, 0.6, 0.5, 0.4] if hacked else [0.5, 0.55, 0.6, 0.62]
    rows = []
    for t, g in enumerate(gold):
        rows.append({"step": 5 * t, "reward/score": t * 1.0, "kl/ref": t * 2.0, "kl/coef": 0.1})
        rows.append({"step": 5 * t, "monitor/proxy": t * 1.0, "monitor/gold": g, "monitor/heldout": g,
                     "monitor/kl": t * 2.0, "monitor/length": 10.0 + t, "monitor/distinct2": 0.8,
                     "monitor/repeat_rate": 0.01 * t, "monitor/entropy": 2.0, "monitor/ensemble_std": 0.1 * (t + 1)})
    (ppo / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{\"cut off")
    alarms = [{"step": 15, "kind": "proxy_up_heldout_down", "message": "reward hacking: <proxy> up"}] if hacked else []
    (ppo / "monitor.json").write_text(json.dumps({
        "hacking_detected": hacked, "first_alarm_step": 15 if hacked else None, "alarms": alarms, "checks": 4,
        "heldout": "gold", "best_step": 5 if hacked else 15, "best_heldout": max(gold), "last_step": 15,
        "last_heldout": gold[-1], "prompts": 32}))
    (ppo / "stage.json").write_text("{}")
    ev = d / "eval"
    ev.mkdir()
    for name, g in (("sft", 0.5), ("ppo", gold[-1])):
        (ev / f"{name}.json").write_text(json.dumps({
            "gold_mean": g, "gold_stderr": 0.01, "gold_ci95": [g - 0.02, g + 0.02], "n": 64, "length_mean": 9.0,
            **({"kl_to_ref": 6.0, "reference": "sft"} if name == "ppo" else {}),
            "samples": [{"prompt": "write <three> words", "response": f"{name} & answer", "gold": g}]}))
    (ev / "stage.json").write_text(json.dumps({"policies": ["sft", "ppo"]}))


@pytest.mark.parametrize("hacked", [True, False])
def test_report_is_self_contained_and_shows_the_verdict(tmp_path, hacked):
    run = tmp_path / "run"
    _write_run(run, hacked)
    path = build_report(run)
    assert path == run / "report.html"
    page = path.read_text()
    assert page.count("<svg") >= 5  # proxy/held-out, frontier, length..., KL, ensemble, eval bars
    assert "<script" not in page
    # nothing fetched: no src= and no link to another resource (SVG's xmlns is a name, not a fetch)
    assert not re.search(r"\bsrc\s*=", page)
    assert not re.search(r"<link\b", page)
    assert "over-optimisation detected" in page if hacked else "no over-optimisation alarm" in page
    assert ("&lt;proxy&gt;" in page) == hacked  # messages are escaped
    assert "write &lt;three&gt; words" in page and "sft &amp; answer" in page and "ppo &amp; answer" in page
    assert "0.800" in page  # RM accuracy in the summary


def test_report_command_rebuilds_it(tmp_path, capsys):
    run = tmp_path / "run"
    _write_run(run, True)
    assert main(["report", str(run)]) == 0
    assert str(run / "report.html") in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nothing")]) == 2


def test_report_shows_paired_differences_and_the_instruction_table(tmp_path):
    run = tmp_path / "run"
    _write_run(run, hacked=False)
    summary = json.loads((run / "summary.json").read_text())
    summary["eval"] = {"sft": {}, "ppo": {"vs_sft": {"mean": 0.12, "stderr": 0.03, "ci95": [0.06, 0.18], "n": 64,
                                                      "z": 4.0, "combined_stderr": 0.05, "z_combined": 2.4}}}
    summary["reward_model"]["on_policy_accuracy"] = {
        "sft_samples": {"accuracy": 0.7, "stderr": 0.05, "pairs": 80, "steps": [0]},
        "ppo_samples": {"accuracy": 0.6, "stderr": 0.04, "pairs": 160, "steps": [2, 3]}}
    (run / "summary.json").write_text(json.dumps(summary))
    for name, share in (("sft", 0.25), ("ppo", 0.75)):
        f = run / "eval" / f"{name}.json"
        res = json.loads(f.read_text())
        res["breakdown"] = {"change_case:lowercase": share}
        res["breakdown_n"] = {"change_case:lowercase": 21}
        f.write_text(json.dumps(res))
    page = build_report(run).read_text()
    assert "+0.120 ± 0.030 vs sft (4.0) [+0.060, +0.180], n 64" in page
    assert "What changed, by kind of instruction" in page
    assert re.search(r"change_case:lowercase</td><td class='num'>21</td><td class='num'>0.25</td>"
                     r"<td class='num'>0.75</td>", page)
    assert "0.700 ± 0.050 on SFT's samples (80 pairs), 0.600 ± 0.040 on PPO's (160 pairs)" in page
