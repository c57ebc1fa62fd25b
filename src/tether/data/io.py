"""JSONL reading with precise errors, and atomic writing.

Every error names the file, the line and, where it applies, the field:
``demos.jsonl:17: field 'response': must be a non-empty string``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

__all__ = ["DataError", "read_jsonl", "write_jsonl", "write_json", "atomic_write_text", "atomic_directory"]

MAX_LINE_BYTES = 16 * 1024 * 1024


class DataError(ValueError):
    """Bad input data; the message names file, line and field."""

    def __init__(self, path: str | Path, line: int | None, message: str, field: str | None = None):
        where = f"{path}:{line}" if line is not None else f"{path}"
        what = f" field '{field}':" if field else ""
        super().__init__(f"{where}:{what} {message}")
        self.path, self.line, self.field = str(path), line, field


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)`` for each non-blank line; every record must be an object."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, "file not found")
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(path, lineno, f"line is {len(raw)} bytes, more than the {MAX_LINE_BYTES} allowed")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(path, lineno, f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(path, lineno, f"malformed JSON: {exc.msg} (column {exc.colno})") from None
            if not isinstance(record, dict):
                raise DataError(path, lineno, f"expected a JSON object, got {type(record).__name__}")
            yield lineno, record


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename (never half written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_jsonl(path: str | Path, records: Iterable[dict]) -> Path:
    """Write records as JSONL, atomically."""
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=_jsonable) + "\n")


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


@contextlib.contextmanager
def atomic_directory(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``dest``; on success fsync its files and rename it
    to ``dest`` (replacing an old one). On error nothing at ``dest`` changes."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
