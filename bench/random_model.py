"""A model of the same architecture and tokenizer as SRC with seeded random weights, for
speed measurements where the real weights cannot travel (throughput, memory and MFU depend
on the architecture and the token counts, not on the weights; quality figures do).

    python bench/random_model.py SRC DST [--reward]    # --reward: a one-output reward model
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="a model folder (its config and tokenizer files are read; no weights needed)")
    ap.add_argument("dst")
    ap.add_argument("--reward", action="store_true", help="AutoModelForSequenceClassification, num_labels 1")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    src, dst = Path(args.src), Path(args.dst)
    config = AutoConfig.from_pretrained(src)
    torch.manual_seed(args.seed)
    if args.reward:
        config.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
        model.config.pad_token_id = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(dst)
    for f in src.iterdir():
        if f.is_file() and (f.name.startswith("tokenizer") or f.name.endswith(".jinja")
                            or f.name in ("special_tokens_map.json", "generation_config.json")):
            shutil.copy(f, dst / f.name)
    print(f"{dst}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, random (seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
