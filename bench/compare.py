"""Tether against TRL, side by side: the same model, data, hyperparameters and seed, each
measurement in a fresh process, the two sides alternating, medians of ``--repeats`` runs.

    python bench/compare.py --model smollm2-135m-instruct --run runs/default \
        [--tasks sft,rm,dpo,grpo] [--repeats 3] [--steps 12] [--out bench/results/cpu.md]

Prints (and writes, with ``--out``) a table of throughput ratios (Tether / TRL), peak
memory, model FLOP utilisation against the fp32 matmul peak measured in the same runs, and
the held-out quality each side reaches on the same budget. ``pip install -e ".[bench]"``
installs TRL (never a runtime dependency of Tether).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
UNITS = {"sft": "examples/s", "rm": "pairs/s", "dpo": "pairs/s", "grpo": "samples/s", "ppo": "samples/s",
         "ppo-head": "samples/s"}


def run_one(impl: str, task: str, args) -> dict:
    extra = []
    if task == "ppo-head":  # Tether's PPO with its value head instead of a second backbone
        task, extra = "ppo", ["--ppo-critic", "head"]
    cmd = [sys.executable, str(HERE / "workers.py"), "--impl", impl, "--task", task, "--model", args.model,
           "--run", args.run, "--steps", str({"grpo": args.grpo_steps, "ppo": args.ppo_steps}.get(task, args.steps)),
           "--batch", str(args.batch), "--lr", str(args.lr), "--max-length", str(args.max_length),
           "--task-name", args.task_name, "--threads", str(args.threads), "--new-tokens", str(args.new_tokens)]
    cmd += extra
    if task == "ppo" and impl == "trl":
        cmd += ["--trl-path", args.trl_ppo_path]
    if args.trl_gc:
        cmd += ["--trl-gc"]
    if args.device != "cpu":
        cmd += ["--device", args.device]
    if args.no_quality:
        cmd += ["--no-quality"]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH ")), None)
    if proc.returncode or line is None:
        print(f"{impl} {task} failed ({proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr, flush=True)
        return None
    out = json.loads(line[len("BENCH "):])
    out["wall"] = time.time() - t0
    return out


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def quality(rows: list[dict]) -> tuple[str, float, float]:
    """(name, median value, the standard error of the run with the median value)."""
    q = rows[0]["quality"]
    name = next(k for k in q if k != "se")
    ranked = sorted(rows, key=lambda r: r["quality"][name])
    mid = ranked[(len(ranked) - 1) // 2]["quality"]
    return name, mid[name], mid.get("se", float("nan"))


def quality_cells(t: list[dict], r: list[dict]) -> str:
    name, tv, ts = quality(t)
    _, rv, rs = quality(r)
    if tv != tv or rv != rv:  # not measured (--no-quality)
        return "n/a | n/a | n/a"
    noise = 2 * (ts**2 + rs**2) ** 0.5
    verdict = "yes" if abs(tv - rv) <= noise else ("better" if (tv < rv) == (name == "heldout_nll") else "no")
    return f"{name}: {tv:.3f} ± {ts:.3f} | {rv:.3f} ± {rs:.3f} | {verdict}"


def table(results: dict, args) -> str:
    lines = [f"model: {args.model}; data: {args.run}; batch {args.batch}; fp32, full fine-tuning; "
             f"device {args.device}; TRL gradient checkpointing {'on' if args.trl_gc else 'off'}; "
             f"medians of {args.repeats} runs per side, alternating; threads {args.threads or 'default'}", "",
             f"| task | Tether | TRL | ratio | {'peak GPU memory' if args.device != 'cpu' else 'peak RSS'} GB (Tether / TRL) | MFU (Tether / TRL) | held-out, Tether | "
             "held-out, TRL | within 2 SE |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for task, sides in results.items():
        t, r = sides["tether"], sides["trl"]
        ratio = median(t, "per_s") / median(r, "per_s")
        memory = "peak_gpu_gb" if "peak_gpu_gb" in t[0] else "peak_rss_gb"
        lines.append(f"| {task} ({UNITS[task]}) | {median(t, 'per_s'):.2f} | {median(r, 'per_s'):.2f} | {ratio:.2f}× | "
                     f"{median(t, memory):.2f} / {median(r, memory):.2f} | "
                     f"{median(t, 'mfu'):.1%} / {median(r, 'mfu'):.1%} | {quality_cells(t, r)} |")
    peaks = [x["peak_gflops"] for sides in results.values() for rows in sides.values() for x in rows]
    lines += ["", f"fp32 2048² matmul peak measured in the runs: median {statistics.median(peaks):.0f} GFLOP/s "
                  f"(range {min(peaks):.0f}–{max(peaks):.0f})"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--run", required=True, help="a finished `tether run` folder whose data the bench trains on")
    ap.add_argument("--tasks", default="sft,rm,dpo,grpo,ppo")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--grpo-steps", type=int, default=4)
    ap.add_argument("--ppo-steps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32, help="GRPO/PPO: tokens sampled per response")
    ap.add_argument("--trl-ppo-path", default="",
                    help="PPO: a folder holding trl==1.10.0 (pip install --no-deps --target DIR trl==1.10.0)")
    ap.add_argument("--trl-gc", action="store_true", help="TRL with gradient checkpointing (its default)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (both sides)")
    ap.add_argument("--no-quality", action="store_true", help="skip held-out quality (random-weight models)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--task-name", default="instruct")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", help="also write the table (Markdown) and the raw runs (JSON beside it)")
    ap.add_argument("--update", action="store_true",
                    help="with --out: keep the other tasks' rows of its JSON (same settings), rerun only --tasks")
    args = ap.parse_args(argv)
    tasks = args.tasks.split(",")
    if "ppo-head" in tasks and ("ppo" not in tasks or tasks.index("ppo") > tasks.index("ppo-head")):
        raise SystemExit("ppo-head is compared with TRL's ppo rows: list ppo before it in --tasks")
    if "ppo" in tasks and not args.trl_ppo_path:
        raise SystemExit("ppo needs --trl-ppo-path: TRL 1.16 has no PPO; "
                         "pip install --no-deps --target DIR trl==1.10.0 and pass DIR")
    results: dict = {}
    args.previous = {}
    if args.update:
        if not args.out or not Path(args.out).with_suffix(".json").exists():
            raise SystemExit("--update needs --out naming an earlier table (its .json beside it)")
        args.previous = json.loads(Path(args.out).with_suffix(".json").read_text())
    for task in args.tasks.split(","):
        results[task] = {"tether": [], "trl": []}
        for i in range(args.repeats):
            order = ("tether", "trl") if i % 2 == 0 else ("trl", "tether")
            for impl in order:
                if task == "ppo-head" and impl == "trl":
                    continue  # TRL has one PPO: its rows are the ppo task's
                row = run_one(impl, task, args)
                if row is None:
                    continue
                results[task][impl].append(row)
                if args.out:
                    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                    # every run as it ends (the table and its JSON follow each task)
                    Path(args.out).with_suffix(".runs.json").write_text(json.dumps(results, indent=1))
                print(f"{task} {impl} run {i + 1}: {row['per_s']:.2f} {UNITS[task]}, {row['peak_rss_gb']:.2f} GB, "
                      f"MFU {row['mfu']:.1%}, {row['quality']}", file=sys.stderr, flush=True)
        if task == "ppo-head":
            results[task]["trl"] = results.get("ppo", {}).get("trl", [])
        write(results, args)  # after each task: a run cut short keeps what it measured
    print(write(results, args))
    return 0 if all(rows for sides in results.values() for rows in sides.values()) else 1


def write(results: dict, args) -> str:
    done = {t: s for t, s in results.items() if s["tether"] and s["trl"]}
    # --update: the earlier table's rows, each replaced once its rerun has both sides
    results = {**getattr(args, "previous", {}), **done}
    text = table({t: s for t, s in results.items() if s["tether"] and s["trl"]}, args)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    return text


if __name__ == "__main__":
    sys.exit(main())
