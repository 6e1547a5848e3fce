"""The one JSONL reader behind every input file (pairs, prompts, SFT examples, responses): each error is
one line naming the file and line, in one wording, raised as the caller's error type."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def read_objects(path: str | Path, error: type[Exception] = ValueError, partial_ok: bool = False,
                 ) -> tuple[list[tuple[int, dict]], int]:
    """(line number, object) for each non-blank line, and the byte offset just past the last complete line.

    partial_ok: a last line without its newline is a write cut short by a killed run (records are
    written as one `json + "\\n"` each): it is left out, and the offset stops before it, so a resumed run
    can truncate the file there. Otherwise it is read like any other line (hand-written files often
    lack the final newline). Anything unreadable raises `error("<path>:<line>: <what is wrong>")`.
    """
    p = Path(path)
    if not p.is_file():
        raise error(f"{path}: no such file")
    data = p.read_bytes()
    end = data.rfind(b"\n") + 1                      # 0 if there is no complete line at all
    lines = (data[:end] if partial_ok else data).split(b"\n")
    out = []
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise error(f"{path}:{n}: not UTF-8 ({e.reason} at byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise error(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise error(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
        out.append((n, rec))
    return out, (end if partial_ok else len(data))


def drop_partial_line(path: str | Path, end: int, prog: str, redo: str) -> None:
    """Truncate `path` to `end` (read_objects' offset with partial_ok) when a killed run left a partial
    last line there, saying so on stderr: `redo` says what the resumed run will do again."""
    size = Path(path).stat().st_size
    if end < size:
        print(f"{prog}: {path}: dropping a partial last line ({size - end} bytes, from an interrupted run); "
              f"{redo}", file=sys.stderr)
        os.truncate(path, end)
