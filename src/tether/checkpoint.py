"""Crash-safe, resumable checkpoints inside a training stage.

A stage's ``checkpoints/`` folder holds ``step-NNNNNNNN/`` folders, each complete or absent:

* written in a temporary folder (``.tmp-…``): the trainable weights of every model as
  safetensors, everything else (optimiser, scheduler, RNG states, data position, KL
  controller, monitor, loop state) in ``state.pt``, each file fsync'ed;
* ``manifest.json`` last, with every file's size and SHA-256 and the stage's fingerprint
  (config and the stages it reads), then the folder is renamed into place and the parent
  fsync'ed. A kill at any moment leaves either the old set or the new one;
* on resume the newest checkpoint whose manifest and hashes check out is loaded; a corrupt
  or truncated one is set aside (``.corrupt-…``) with a warning and the one before is used.

Only trainable parameters are saved: the frozen ones come from the stage's starting model,
which an earlier, finished stage wrote and which the fingerprint pins. ``state.pt`` is read
with ``weights_only=True`` (no code runs from a checkpoint).

A component is a ``torch.nn.Module`` (its trainable parameters) or anything with
``state_dict()`` / ``load_state_dict()``; :class:`RNGState` and :class:`LoopState` cover
the process's random generators and an algorithm's own loop variables.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import pickle
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["Checkpointer", "CheckpointError", "RNGState", "LoopState", "fingerprint", "latest_valid"]

FORMAT = 1
PREFIX = "step-"


from tether import console  # noqa: E402
from tether.errors import CheckpointError  # noqa: E402 - re-exported here


# --------------------------------------------------------------------------- state holders


class RNGState:
    """The process's random generators (torch CPU and CUDA, Python's ``random``, NumPy's
    global one) and any named ``torch.Generator`` an algorithm keeps."""

    def __init__(self, **generators: torch.Generator):
        self.generators = generators

    def state_dict(self) -> dict:
        state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                                 "generators": {k: g.get_state() for k, g in self.generators.items()}}
        if torch.cuda.is_available():
            state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
        try:
            import numpy as np

            name, keys, pos, has_gauss, cached = np.random.get_state()
            state["numpy"] = [name, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]
        except ImportError:  # pragma: no cover - numpy ships with torch's users
            pass
        return state

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        random.setstate(_as_tuple(state["python"]))
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        if "numpy" in state:
            import numpy as np

            name, keys, pos, has_gauss, cached = state["numpy"]
            np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))
        for k, g in self.generators.items():
            g.set_state(state["generators"][k])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


class LoopState(dict):
    """An algorithm's loop variables (data order, history, flags) as one mutable dict:
    saved whole, and filled in place on resume."""

    def state_dict(self) -> dict:
        return dict(self)

    def load_state_dict(self, state: dict) -> None:
        self.clear()
        self.update(state)


# --------------------------------------------------------------------------- files


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(*parts: Any) -> str:
    """A short hash of JSON-able parts (a stage's config and what it reads)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def _step_of(path: Path) -> int:
    try:
        return int(path.name[len(PREFIX):])
    except ValueError:
        return -1


def _candidates(root: Path) -> list[Path]:
    """Checkpoint folders, newest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and _step_of(p) >= 0]
    return sorted(found, key=_step_of, reverse=True)


def verify(path: Path) -> dict:
    """The manifest of a complete, intact checkpoint folder; :class:`CheckpointError` saying
    what is wrong otherwise (missing manifest, missing file, size or hash mismatch)."""
    manifest_path = path / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no manifest.json (an interrupted write)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{manifest_path}: unreadable ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{manifest_path}: not a Tether checkpoint manifest of format {FORMAT}")
    for name, meta in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if f.stat().st_size != meta.get("bytes"):
            raise CheckpointError(f"{path}: {name} has {f.stat().st_size} bytes, the manifest says {meta.get('bytes')} "
                                  "(truncated)")
        if _sha256(f) != meta.get("sha256"):
            raise CheckpointError(f"{path}: {name} does not match its SHA-256 in the manifest (corrupted)")
    return manifest


def latest_valid(root: str | Path, fingerprint: str | None = None, *, quarantine: bool = True,
                 warn=None) -> tuple[Path, dict] | None:
    """The newest intact checkpoint under ``root`` (and its manifest), or None.

    A corrupt one is reported through ``warn`` and, with ``quarantine``, renamed
    ``.corrupt-step-…`` so that it is neither tried again nor overwritten. With
    ``fingerprint`` set, checkpoints of another configuration do not count."""
    warn = warn or _warn
    for path in _candidates(Path(root)):
        try:
            manifest = verify(path)
        except CheckpointError as exc:
            warn(f"checkpoint {exc}; falling back to the previous one")
            if quarantine:
                _quarantine(path)
            continue
        if fingerprint is not None and manifest.get("fingerprint") != fingerprint:
            continue
        return path, manifest
    return None


def _warn(msg: str) -> None:
    console.warn(msg)


# --------------------------------------------------------------------------- crash tests


def _fault(stage: str, event: str, count: int) -> None:
    """Crash tests: ``TETHER_FAULT=<stage>:<event>:<n>`` kills this process with SIGKILL at
    the n-th ``event`` of ``stage`` (``step``: after an optimiser step or rollout, before any
    checkpoint of it; ``save``: halfway through writing a checkpoint)."""
    spec = os.environ.get("TETHER_FAULT")
    if spec and spec == f"{stage}:{event}:{count}":
        os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------- the checkpointer


class Checkpointer:
    """Saves and restores one stage's training state.

    Args:
        root: the stage's ``checkpoints/`` folder.
        every: save after every ``every`` steps (0: never).
        every_minutes: also save when this long passed since the last save.
        keep: newest checkpoints kept.
        stage: the stage's name (messages, crash tests).
        fingerprint: what the checkpoint must have been saved under to be resumed.
        force: resume the newest checkpoint whatever its fingerprint (changed settings).
    """

    def __init__(self, root: str | Path, *, every: int = 25, every_minutes: float = 0.0, keep: int = 2,
                 stage: str = "stage", fingerprint: str = "", force: bool = False, say=None):
        self.root = Path(root)
        self.every, self.every_minutes, self.keep = int(every), float(every_minutes), max(1, int(keep))
        self.stage, self.fingerprint, self.force = stage, fingerprint, force
        self.say = say or _info
        self.resumed_from: int | None = None
        self.saved: list[int] = []
        self._last_save = time.monotonic()
        self._steps_seen = 0
        self._saves = 0

    @property
    def enabled(self) -> bool:
        return self.every > 0 or self.every_minutes > 0

    @classmethod
    def from_config(cls, root, cfg, *, stage: str, fingerprint: str = "") -> "Checkpointer":
        return cls(root, every=cfg.every, every_minutes=cfg.every_minutes, keep=cfg.keep, stage=stage,
                   fingerprint=fingerprint, force=cfg.resume == "force")

    # ------------------------------------------------------------------ resume
    def resume(self, components: dict[str, Any]) -> int:
        """Load the newest usable checkpoint into ``components``; returns its step (0: none).

        Each checkpoint is first read whole and checked against the components (names,
        shapes); one that fails its manifest or cannot be read is set aside with a warning
        and the one before is tried. Only then is anything loaded, so a failed read never
        leaves the model half overwritten. With ``force`` a checkpoint of another
        fingerprint is used too, and objects that can (the engine) keep this run's settings.
        """
        if not self.enabled:
            return 0
        modules = {k: v for k, v in components.items() if isinstance(v, torch.nn.Module)}
        others = {k: v for k, v in components.items() if not isinstance(v, torch.nn.Module)}
        while True:
            found = latest_valid(self.root, None if self.force else self.fingerprint)
            if found is None:
                return 0
            path, manifest = found
            try:
                weights, state = self._read(path, modules, others)
                break
            except (CheckpointError, OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
                _warn(f"checkpoint {path} cannot be read ({type(exc).__name__}: {str(exc)[:300]}); "
                      "falling back to the previous one")
                _quarantine(path)
                if path.exists():  # could not be set aside (a read-only folder): never try it twice
                    raise CheckpointError(f"{path} cannot be read and cannot be set aside; move it away") from None
        for name, module in modules.items():
            _load_trainable(module, weights[name], path / f"model-{name}.safetensors")
        for name, obj in others.items():
            if self.force and "config_wins" in inspect.signature(obj.load_state_dict).parameters:
                obj.load_state_dict(state[name], config_wins=True)
            else:
                obj.load_state_dict(state[name])
        step = int(manifest["step"])
        self.resumed_from = step
        self._steps_seen = step
        other = self.force and manifest.get("fingerprint") != self.fingerprint
        self.say(f"  {self.stage}: resumed from step {step} ({path})"
                 + (", under changed settings (checkpoint.resume: force)" if other else ""))
        return step

    @staticmethod
    def _read(path: Path, modules: dict, others: dict) -> tuple[dict, dict]:
        from safetensors.torch import load_file

        weights = {}
        for name, module in modules.items():
            f = path / f"model-{name}.safetensors"
            if not f.is_file():
                raise CheckpointError(f"{path}: no weights for '{name}'")
            weights[name] = load_file(str(f))
            _check_fits(module, weights[name], f)
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        missing = [k for k in others if k not in state]
        if missing:
            raise CheckpointError(f"{path}/state.pt: no state for {missing}")
        return weights, state

    # ------------------------------------------------------------------ save
    def due(self, steps_done: int) -> bool:
        if self.every > 0 and steps_done % self.every == 0:
            return True
        return self.every_minutes > 0 and time.monotonic() - self._last_save >= 60 * self.every_minutes

    def step(self, steps_done: int, components: dict[str, Any], *, final: bool = False) -> Path | None:
        """After ``steps_done`` steps: save when due (or ``final``, the loop's end, so that a
        kill during what follows training does not train again)."""
        if steps_done > self._steps_seen:
            _fault(self.stage, "step", steps_done)
            self._steps_seen = steps_done
        if not self.enabled or not (final or self.due(steps_done)):
            return None
        if steps_done in self.saved:
            return None
        from tether import distributed

        if not distributed.is_main():  # data parallel: the processes' states are the same; one saves
            self.saved.append(steps_done)
            return None
        return self.save(steps_done, components)

    def save(self, steps_done: int, components: dict[str, Any]) -> Path:
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        self._clean_tmp()
        name = f"{PREFIX}{steps_done:08d}"
        tmp = self.root / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        files: dict[str, dict] = {}
        others = {}
        for key, obj in components.items():
            if isinstance(obj, torch.nn.Module):
                tensors = _trainable(obj)
                bad = [n for n, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
                if bad:
                    raise CheckpointError(f"not saving step {steps_done}: '{key}' has non-finite weights ({bad[:3]})")
                f = tmp / f"model-{key}.safetensors"
                save_file(tensors, str(f))
                files[f.name] = {}
            else:
                others[key] = _plain(obj.state_dict())
        self._saves += 1
        _fault(self.stage, "save", self._saves)
        torch.save(others, tmp / "state.pt")
        try:  # what resume will read, read now: a value it cannot load fails here, not after the crash
            torch.load(tmp / "state.pt", map_location="cpu", weights_only=True)
        except Exception as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            bad = [k for k, v in others.items() if not _loads(v)]
            raise CheckpointError(f"cannot save step {steps_done}: the state of {bad or list(others)} holds values "
                                  f"a checkpoint cannot store ({exc})") from None
        files["state.pt"] = {}
        for fname in files:
            f = tmp / fname
            _fsync(f)
            files[fname] = {"bytes": f.stat().st_size, "sha256": _sha256(f)}
        manifest = {"format": FORMAT, "stage": self.stage, "step": steps_done, "time": time.time(),
                    "fingerprint": self.fingerprint, "files": files}
        m = tmp / "manifest.json"
        m.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        _fsync(m)
        _fsync(tmp)
        final = self.root / name
        if final.exists():  # a corrupt or older save of the same step (after a fallback)
            aside = self.root / f".old-{name}-{os.getpid()}"
            final.rename(aside)
            shutil.rmtree(aside, ignore_errors=True)
        tmp.rename(final)
        _fsync(self.root)
        self.saved.append(steps_done)
        self._last_save = time.monotonic()
        self._prune()
        return final

    def _clean_tmp(self) -> None:
        for p in self.root.iterdir():
            if p.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(p, ignore_errors=True)

    def _prune(self) -> None:
        for old in _candidates(self.root)[self.keep :]:
            shutil.rmtree(old, ignore_errors=True)

    def finish(self, keep: bool = False) -> None:
        """The stage is done: delete its checkpoints (unless ``keep``)."""
        if not keep:
            shutil.rmtree(self.root, ignore_errors=True)


def _info(msg: str) -> None:
    console.say(f"[cyan]{msg}[/cyan]")


def _plain(x: Any) -> Any:
    """``x`` with NumPy scalars and arrays as Python numbers and tensors (a task's gold
    scores may be ``np.float64``), so that ``weights_only`` loading accepts it."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_plain(v) for v in x]
    if isinstance(x, tuple):
        return tuple(_plain(v) for v in x)
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x.copy())
    if isinstance(x, np.generic):
        return x.item()
    return x


def _loads(value: Any) -> bool:
    import io

    buf = io.BytesIO()
    torch.save(value, buf)
    buf.seek(0)
    try:
        torch.load(buf, weights_only=True)
        return True
    except Exception:
        return False


def _quarantine(path: Path) -> None:
    try:
        path.rename(path.with_name(f".corrupt-{path.name}-{int(time.time())}"))
    except OSError:
        pass


def _trainable(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu").contiguous() for n, p in module.named_parameters() if p.requires_grad}


def _check_fits(module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    if set(params) != set(tensors):
        extra, missing = sorted(set(tensors) - set(params)), sorted(set(params) - set(tensors))
        raise CheckpointError(f"{source}: does not fit the model (missing {missing[:3]}, unexpected {extra[:3]})")
    for n, p in params.items():
        if tensors[n].shape != p.shape:
            raise CheckpointError(f"{source}: '{n}' has shape {tuple(tensors[n].shape)}, the model {tuple(p.shape)}")


def _load_trainable(module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    _check_fits(module, tensors, source)
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[n].to(p.device, p.dtype))
