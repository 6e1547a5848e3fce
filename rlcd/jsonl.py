"""Reading JSONL input files with errors that name the file and line (pairs, SFT examples)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator


def read_objects(path: str | Path, error: type[Exception] = ValueError) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; raise `error` naming file:line otherwise."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{path}: no such file")
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{path}:{n}: invalid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise error(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
        yield n, rec
