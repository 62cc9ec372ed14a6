"""Small file helpers shared by every module: JSONL reading with file:line errors, atomic writes."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

from continual_opd.errors import DataError


def read_text(path: str | Path, what: str = "file") -> str:
    """A UTF-8 text file's contents, or a one-line `DataError` that names the file (and line) and the fix.

    A UTF-8 byte-order mark is stripped, everywhere the toolkit reads text (editors on Windows write one; it is
    not part of the data). Binary files (gzip, NUL bytes) and other encodings (Latin-1, ...) are errors.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: {what} not found; check the path "
                        "(relative paths resolve against the file that names them)")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a {what}")
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b" or b"\x00" in data[:8192]:
        kind = "gzip-compressed" if data[:2] == b"\x1f\x8b" else "binary"
        raise DataError(f"{path}: is a {kind} file, expected UTF-8 text; decompress or convert it first")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); "
                        "re-save the file as UTF-8") from None


def read_jsonl(path: str | Path, *, required: Iterable[str] = (), what: str = "rows") -> list[dict]:
    """Read a JSONL file (see `read_jsonl_lines`); the rows only."""
    return [row for _, row in read_jsonl_lines(path, required=required, what=what)]


def read_jsonl_lines(path: str | Path, *, required: Iterable[str] = (), what: str = "rows") -> list[tuple[int, dict]]:
    """Read a JSONL file as (line number, row) pairs; every problem is a one-line `DataError` naming `file:line`
    and the fix.

    Blank lines are skipped. Each non-blank line must be a JSON object holding the `required` keys.
    An empty file is an error (a silently empty dataset is never what the user meant).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found; check the path "
                        "(relative paths resolve against the file that names them)")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a .jsonl file")
    rows: list[tuple[int, dict]] = []
    for lineno, line in enumerate(read_text(path, ".jsonl file").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno}); "
                            "fix or remove the line") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}; one object per line")
        missing = [k for k in required if k not in row]
        if missing:
            raise DataError(f"{path}:{lineno}: missing key(s) {missing}; each line needs {sorted(required)}")
        rows.append((lineno, row))
    if not rows:
        raise DataError(f"{path}: no {what} found (file is empty); add at least one JSON line")
    return rows


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """Write rows as JSONL atomically."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temp file + rename so a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")
