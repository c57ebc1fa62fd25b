"""The ``tether`` command.

    tether run [CONFIG.yaml] [--preset NAME] [--out DIR] [--section.key value ...]
    tether sft|prefs|rm|ppo|dpo|grpo|rloo|eval [same options]   one stage (and what it needs)
    tether models list | pull NAME
    tether data validate FILE [--kind demos|rankings]
    tether config [--preset NAME]                  every key, its value and what it does
    tether report DIR                              rebuild DIR/report.html
"""

from __future__ import annotations

import argparse
import os
import sys
import time

__all__ = ["main"]

STAGE_COMMANDS = ("sft", "prefs", "rm", "ppo", "dpo", "grpo", "rloo", "eval")


def stages_for(command: str, cfg) -> list[str]:
    """The stages ``tether COMMAND`` runs: COMMAND and those it needs, in order."""
    if command in ("sft", "prefs", "rm"):
        chain = ["data", "sft", "prefs", "rm"]
        return chain[: chain.index(command) + 1]
    plan = cfg.stage_list()
    return plan if command == "eval" else plan[: plan.index(command) + 1]


def _split_overrides(extra: list[str]) -> tuple[str | None, list[str]]:
    """``['my.yaml', '--ppo.kl.target', '6', '--seed=1']`` → ``('my.yaml', ['ppo.kl.target=6', 'seed=1'])``."""
    from tether.config import ConfigError

    out, i, config = [], 0, None
    while i < len(extra):
        item = extra[i]
        if not item.startswith("--"):
            if config is None and item.endswith((".yaml", ".yml")):
                config = item
                i += 1
                continue
            raise ConfigError(f"unexpected argument '{item}' (a config file ends in .yaml; overrides look like --section.key value)")
        item = item[2:]
        if "=" in item:
            out.append(item)
            i += 1
        else:
            if i + 1 >= len(extra) or extra[i + 1].startswith("--"):
                raise ConfigError(f"--{item} needs a value")
            out.append(f"{item}={extra[i + 1]}")
            i += 2
    return config, out


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="built-in preset to start from (default: 'default')")
    p.add_argument("--out", help="run directory (default: runs/<preset>)")


def _load(args, extra):
    from tether.config import load_config

    config, overrides = _split_overrides(extra)
    if args.out:
        overrides.append(f"out={args.out}")
    return load_config(config, preset=args.preset, overrides=overrides)


def _print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"tether run · {summary.get('task')} · {summary.get('model')}")
    table.add_column("policy")
    table.add_column("held-out gold (± s.e.)", justify="right")
    table.add_column("95% CI", justify="right")
    table.add_column("KL to ref", justify="right")
    table.add_column("length", justify="right")
    for name, res in summary.get("eval", {}).items():
        kl = res.get("kl_to_ref")
        table.add_row(
            name,
            f"{res['gold_mean']:.3f} ± {res['gold_stderr']:.3f}",
            f"[{res['gold_ci95'][0]:.3f}, {res['gold_ci95'][1]:.3f}]",
            "—" if kl is None else f"{kl:.2f} (vs {res.get('reference')})",
            f"{res['length_mean']:.1f}",
        )
    console.print(table)
    rm = summary.get("reward_model")
    if rm:
        acc = rm.get("heldout_accuracy")
        lab = rm.get("labeler_heldout_accuracy")
        console.print(
            f"reward model held-out pairwise accuracy vs gold: {acc:.3f} on {rm.get('heldout_pairs')} pairs"
            + (f" (a simulated labeler: {lab:.3f})" if lab is not None else "")
        )
    prefs = summary.get("preferences")
    if prefs and prefs.get("labeler_agreement") is not None:
        console.print(
            f"labeler agreement: {prefs['labeler_agreement']:.3f} on {prefs['labeler_agreement_pairs']} "
            f"overlapping pairs ({prefs['rankings']} rankings of K={prefs['k']})"
        )
    stages = summary.get("stages", {})
    console.print("wall time: " + ", ".join(f"{k} {v['seconds']:.0f}s" for k, v in stages.items() if v.get("seconds") is not None))
    for name, m in (summary.get("monitor") or {}).items():
        if m.get("hacking_detected"):
            console.print(f"[bold red]⚠ {name}: over-optimisation alarm at step {m.get('first_alarm_step')} "
                          f"({', '.join(a['kind'] for a in m.get('alarms') or [])}); best held-out "
                          f"{m.get('heldout')} at step {m.get('best_step')}[/bold red]")
        else:
            console.print(f"{name}: no over-optimisation alarm")
    console.print(f"run directory: {summary['run_dir']}  (summary.json)")
    if summary.get("report"):
        console.print(f"report: {summary['report']}")


def cmd_run(args, extra, command: str | None = None) -> int:
    from tether.config import POLICIES
    from tether.pipeline import Pipeline

    if command in POLICIES:
        extra = [*extra, f"--policy={command}"]
    cfg = _load(args, extra)
    stages = stages_for(command, cfg) if command else None
    start = time.time()
    pipe = Pipeline(cfg)
    summary = pipe.run(stages)
    _print_summary(summary)
    print(f"done in {time.time() - start:.0f}s")
    return 0


def cmd_models(args, extra) -> int:
    from tether import zoo

    if extra:
        raise SystemExit(f"unexpected arguments: {extra}")
    if args.action == "list":
        cached = {name: (path, size) for name, path, size in zoo.cached_models()}
        print(f"cache: {zoo.tether_home() / 'models'}")
        for entry in zoo.list_zoo():
            state = f"cached, {cached[entry.name][1] / 1e6:.1f} MB" if entry.name in cached else "not pulled"
            print(f"  {entry.name:28s} {state:22s} {entry.description}")
        return 0
    if not args.name:
        raise SystemExit("tether models pull NAME")
    path = zoo.pull(args.name, force=args.force)
    print(path)
    return 0


def cmd_data(args, extra) -> int:
    from tether.data.io import read_jsonl
    from tether.data.schemas import load_demonstrations, load_rankings

    if extra:
        raise SystemExit(f"unexpected arguments: {extra}")
    kind = args.kind
    if kind == "auto":
        first = next((rec for _, rec in read_jsonl(args.file)), {})
        kind = "demos" if "response" in first else "rankings"
    if kind == "demos":
        items = load_demonstrations(args.file)
        print(f"{args.file}: {len(items)} valid demonstrations")
    else:
        items = load_rankings(args.file)
        pairs = sum(len(r.responses) * (len(r.responses) - 1) // 2 for r in items)
        print(f"{args.file}: {len(items)} valid rankings ({pairs} pairs)")
    return 0


def cmd_config(args, extra) -> int:
    import yaml

    from tether.config import config_to_dict, describe

    cfg = _load(args, extra)
    if args.keys:
        for key, default, help_text in describe():
            print(f"{key:36s} {default:24s} {help_text}")
    else:
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tether", description="RLHF: SFT → reward model → PPO (or DPO, GRPO, RLOO), "
                                                                "with a gold score to check it.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run the whole pipeline (skips finished stages)",
                       usage="tether run [CONFIG.yaml] [--preset NAME] [--out DIR] [--policy ppo|dpo|grpo|rloo] "
                             "[--reward rm|gold|...] [--section.key VALUE ...]")
    _add_run_args(p)
    for stage in STAGE_COMMANDS:
        sp = sub.add_parser(stage, help=f"run the '{stage}' stage (and the stages it needs)",
                            usage=f"tether {stage} [CONFIG.yaml] [--preset NAME] [--out DIR] [--section.key VALUE ...]")
        _add_run_args(sp)
    p = sub.add_parser("models", help="list or pull built-in models")
    p.add_argument("action", choices=["list", "pull"])
    p.add_argument("name", nargs="?")
    p.add_argument("--force", action="store_true", help="pull again even if cached")
    p = sub.add_parser("data", help="validate a JSONL file of demonstrations or rankings/pairs")
    p.add_argument("action", choices=["validate"])
    p.add_argument("file")
    p.add_argument("--kind", choices=["auto", "demos", "rankings"], default="auto")
    p = sub.add_parser("report", help="rebuild a run's self-contained report.html (plots, monitor verdicts, samples)")
    p.add_argument("dir", help="run directory")
    p.add_argument("--out", help="where to write it (default: DIR/report.html)")
    p = sub.add_parser("config", help="print the resolved config (or every key with --keys)",
                       usage="tether config [CONFIG.yaml] [--preset NAME] [--keys] [--section.key VALUE ...]")
    _add_run_args(p)
    p.add_argument("--keys", action="store_true", help="list every key with its default and help")
    return parser


def main(argv: list[str] | None = None) -> int:
    from tether.config import ConfigError
    from tether.data.io import DataError

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    # peft asks transformers a deprecated question on every LoRA wrap; not the user's concern
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args, extra)
        if args.command in STAGE_COMMANDS:
            return cmd_run(args, extra, command=args.command)
        if args.command == "models":
            return cmd_models(args, extra)
        if args.command == "data":
            return cmd_data(args, extra)
        if args.command == "config":
            return cmd_config(args, extra)
        if args.command == "report":
            from tether.report import build_report

            print(f"report: {build_report(args.dir, args.out)}")
            return 0
    except (ConfigError, DataError, FileNotFoundError) as exc:
        print(f"tether: error: {exc}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
