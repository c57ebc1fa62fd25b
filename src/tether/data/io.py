"""JSONL reading with precise errors, and atomic writing.

Every error names the file, the line and, where it applies, the field:
``demos.jsonl:17: field 'response': must be a non-empty string``.

What :func:`read_jsonl` refuses, each as a :class:`DataError` with the line number: a line
over ``MAX_LINE_BYTES`` (16 MiB; it is measured without being held in memory), bytes that
are not UTF-8, malformed JSON (including an integer of more than 4300 digits), a line that
is not a JSON object, values nested more than ``MAX_DEPTH`` (64) levels deep, and a lone
UTF-16 surrogate escape (``"\\ud800"``: not Unicode, so no tokenizer or UTF-8 file could
hold it). A UTF-8 byte-order mark at the start of the file is skipped; blank lines are
skipped but counted.
"""

from __future__ import annotations

import contextlib
import json
import os
import reprlib
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

__all__ = ["DataError", "read_jsonl", "write_jsonl", "write_json", "atomic_write_text", "atomic_directory",
           "short_repr"]

MAX_LINE_BYTES = 16 * 1024 * 1024
MAX_DEPTH = 64
_CHUNK = 1024 * 1024

_repr = reprlib.Repr()
_repr.maxstring, _repr.maxother, _repr.maxlist, _repr.maxdict, _repr.maxlevel = 60, 60, 8, 6, 3


def short_repr(value: Any) -> str:
    """``repr(value)`` cut to a few dozen characters, for error messages about any input
    (never expands a huge or deeply nested value)."""
    return _repr.repr(value)


class DataError(ValueError):
    """Bad input data; the message names file, line and field."""

    def __init__(self, path: str | Path, line: int | None, message: str, field: str | None = None):
        where = f"{path}:{line}" if line is not None else f"{path}"
        what = f" field '{field}':" if field else ""
        super().__init__(f"{where}:{what} {message}")
        self.path, self.line, self.field = str(path), line, field


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)`` for each non-blank line; every record must be an object
    (what else is refused: see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, "file not found")
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise DataError(path, None, f"cannot be read: {exc.strerror or exc}") from None
    with fh:
        lineno = 0
        while True:
            try:
                raw = fh.readline(MAX_LINE_BYTES + 1)
            except OSError as exc:
                raise DataError(path, lineno + 1, f"cannot be read: {exc.strerror or exc}") from None
            if not raw:
                return
            lineno += 1
            if len(raw) > MAX_LINE_BYTES:
                size = len(raw)
                while not raw.endswith(b"\n"):  # measure the rest without holding it
                    raw = fh.readline(_CHUNK)
                    if not raw:
                        break
                    size += len(raw)
                raise DataError(path, lineno, f"line is {size} bytes, more than the {MAX_LINE_BYTES} allowed")
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a byte-order mark (Windows editors)
                raw = raw[3:]
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
            except RecursionError:
                raise DataError(path, lineno, f"malformed JSON: nested more than {MAX_DEPTH} levels deep") from None
            except ValueError as exc:  # e.g. an integer of more than 4300 digits
                raise DataError(path, lineno, f"malformed JSON: {str(exc).split(';')[0]}") from None
            if not isinstance(record, dict):
                raise DataError(path, lineno, f"expected a JSON object, got {type(record).__name__}")
            if text.count("[") + text.count("{") > MAX_DEPTH or "\\u" in text:
                _check_values(record, path, lineno)
            yield lineno, record


def _check_values(record: dict, path, line: int) -> None:
    """Refuse values nested deeper than ``MAX_DEPTH`` and strings holding a lone surrogate."""
    stack: list[tuple[Any, str, int]] = [(v, str(k), 1) for k, v in record.items()]
    while stack:
        value, where, depth = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise DataError(path, line, f"holds a lone surrogate \\u{ord(value[exc.start]):04x}, which is "
                                            "not Unicode", field=where) from None
        elif isinstance(value, (list, dict)):
            if depth >= MAX_DEPTH:
                raise DataError(path, line, f"nested more than {MAX_DEPTH} levels deep",
                                field=where if len(where) <= 60 else where[:60] + "…")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for k, v in items:
                if isinstance(v, (str, list, dict)):
                    stack.append((v, f"{where}.{k}" if isinstance(value, dict) else f"{where}[{k}]", depth + 1))


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
