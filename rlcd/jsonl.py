"""JSON and JSONL files: the one reader behind every input file (pairs, prompts, SFT examples, responses),
the one atomic writer of whole files (write_atomic, write_json_atomic), and the resumable, sharded writer
of the generation stages (train.py simulate, eval.py respond).

Reading. Each error is one line naming the file and line, in one wording, raised as the caller's error
type (read_objects).

The generation stages' output. The inputs are sorted by (length, id) and cut into fixed chunks of the
batch size (fixed_chunks): similar lengths share a batch, and the chunks depend on the inputs alone, not
on what is already done. Each chunk is generated in one call seeded from its ids (seed_of), so a chunk
regenerated after a kill samples exactly what it did; its records are appended and fsynced together
(append_chunks), so a kill loses at most the chunk in flight, and a write it cut short is a last line
without its newline, which the rerun cuts off (drop_partial_line). A rerun counts the ids already on
disk as done (done_ids, after the stage's own check that they came from the same run), redoes only the
chunks that lack one, and writes only the missing records: the file it completes is the file an
uninterrupted run writes (on the same machine and batch size).

Under torchrun (rlcd/distributed.py) the chunks left to do are dealt to the ranks round-robin (chunk i to
rank i mod N; sorted by length, so the loads are alike), and rank r appends to `OUT.rank<r>` (shard_path).
After every rank is done, rank 0 appends the shards' records to OUT in the order the one-process run
would have written them and deletes the shards (merge_shards, finish_shards), so OUT does not depend on
N. A kill of any rank leaves the shards on disk; the rerun (at any world size) counts their ids as done
and merges them at its end. Readers only ever see OUT, complete once the command returns.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from rlcd import distributed

T = TypeVar("T")
Lines = list[tuple[int, dict]]                  # (line number, record) of a file's complete lines


def read_objects(path: str | Path, error: type[Exception] = ValueError, partial_ok: bool = False,
                 ) -> tuple[Lines, int]:
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


def write_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically: a hidden temporary file beside it, then a rename, so a kill never
    leaves half a file and a reader sees the old file or the new one. The temporary name holds the process
    id, so processes writing the same file at once (ranks building one cache) never share it. Creates the
    directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: str | Path, obj) -> None:
    """`obj` as indented JSON (anything JSON has no type for as its str()), written atomically (write_atomic)."""
    write_atomic(path, json.dumps(obj, indent=2, default=str))


# --- the generation stages' output ------------------------------------------------------------------------------
def seed_of(*parts) -> int:
    """A generator seed from `parts`: the first 60 bits of the sha256 of their str()s joined by ':', the same
    on every machine, in every process and at every world size."""
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:15], 16)


def fixed_chunks(items: list[T], batch_size: int, key: Callable[[T], tuple]) -> list[list[T]]:
    """`items` sorted by `key` (length, then id) and cut into chunks of `batch_size`."""
    items = sorted(items, key=key)
    return [items[i:i + batch_size] for i in range(0, len(items), batch_size)]


def done_ids(path: str | Path, read: Callable[[Path], tuple[Lines, int]], check: Callable[[Path, Lines], None],
             prog: str, redo: str) -> set[str]:
    """The ids already written to `path` and to its shard files (this run's or a killed one's, at any world
    size). First each rank cuts a partial last line off the file it appends to (rank 0 also off `path`,
    which it merges into; drop_partial_line says so, with `redo`); past a barrier, every rank reads every
    file. `read(file)` is the stage's reader (its lines and the offset past the last complete one, every
    record checked for its fields); `check(file, lines)` raises for records another run wrote."""
    path = Path(path)
    own = {path} if distributed.world_size() == 1 else {shard_path(path)}
    for f in own | ({path} if distributed.is_main() else set()):
        if f.exists():
            drop_partial_line(f, read(f)[1], prog, redo)
    distributed.barrier()                  # no rank reads a file while another is truncating it
    done = set()
    for f in [path, *shard_files(path)]:
        if f.exists():
            lines, _ = read(f)
            check(f, lines)
            done |= {rec["id"] for _, rec in lines}
    return done


def append_chunks(path: str | Path, chunks: list[list[T]], id_of: Callable[[T], str], done: set[str],
                  make: Callable[[list[T]], tuple[list[dict], int]], error: type[Exception], desc: str, unit: str,
                  progress: bool = True) -> tuple[int, int, float]:
    """Complete `path` with the records of every chunk that lacks one: make(chunk) -> (records, tokens
    generated), of which those whose id is not in `done` are appended, one write and an fsync per chunk.
    Under torchrun this rank does its share of those chunks into its shard file, and rank 0 merges them
    in the order of `chunks`. Returns the totals over the ranks: records written, tokens generated,
    seconds of the slowest rank; `path` is complete on every rank's return."""
    path = Path(path)
    todo = [c for c in chunks if any(id_of(x) not in done for x in c)]
    mine = distributed.shard(todo)
    one = distributed.world_size() == 1
    target = path if one else shard_path(path)
    n_mine = sum(id_of(x) not in done for c in mine for x in c)
    # One process counts the whole file; a rank of N its own share.
    n_all = sum(len(c) for c in chunks)
    bar = distributed.progress(total=n_all if one else n_mine, initial=n_all - n_mine if one else 0, desc=desc,
                               unit=unit, disable=not progress, dynamic_ncols=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    written, tried, n_tokens, t0 = 0, 0, 0, time.perf_counter()
    with open(target, "a", encoding="utf-8") as f:
        for chunk in mine:
            recs, toks = make(chunk)
            recs = [r for r in recs if r["id"] not in done]
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
            f.flush()
            os.fsync(f.fileno())                # after a crash at most this chunk is redone
            n_new = sum(id_of(x) not in done for x in chunk)
            written, tried, n_tokens = written + len(recs), tried + n_new, n_tokens + toks
            bar.update(n_new)
            per_min = 60 * written / (time.perf_counter() - t0)
            bar.set_postfix({"kept": written, "dropped": tried - written, f"{unit}s_per_min": f"{per_min:.1f}"})
    bar.close()
    return finish_shards(path, [id_of(x) for c in chunks for x in c], error, written, n_tokens,
                         time.perf_counter() - t0)


# --- per-rank shard files -------------------------------------------------------------------------------------
def shard_path(path: str | Path, r: int | None = None) -> Path:
    """Where rank r (default: this one) appends its records of the output `path`: PATH.rank<r>."""
    path = Path(path)
    return path.with_name(f"{path.name}.rank{distributed.rank() if r is None else r}")


def shard_files(path: str | Path) -> list[Path]:
    """The shard files of `path` on disk (from this run or a killed one at any world size), by rank."""
    path = Path(path)
    prefix = path.name + ".rank"
    if not path.parent.is_dir():
        return []
    found = [p for p in path.parent.iterdir() if p.name.startswith(prefix) and p.name[len(prefix):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(prefix):]))


def merge_shards(path: str | Path, order: Sequence[str], error: type[Exception] = ValueError) -> int:
    """Append to `path` every record of its shard files whose id `path` lacks, ordered as the ids in
    `order` (the order one process writes; ids not in it last), then fsync and delete the shards.
    Returns how many records were appended. Call on one rank, after a barrier.

    Lines are copied byte for byte. A partial last line of a shard (a killed write) is left out. A kill
    during the merge is safe: a rerun finds the merged ids in `path` and skips them, and a partial line
    that the kill left in `path` is cut off by the caller's resume, its record still in a shard."""
    path = Path(path)
    shards = shard_files(path)
    if not shards:
        return 0
    have = {rec["id"] for _, rec in read_objects(path, error, partial_ok=True)[0]} if path.exists() else set()
    new: dict[str, bytes] = {}
    for s in shards:
        objects, end = read_objects(s, error, partial_ok=True)
        raw = s.read_bytes()[:end].split(b"\n")                 # line n of read_objects is raw[n - 1]
        for n, rec in objects:
            if rec["id"] not in have:
                new.setdefault(rec["id"], raw[n - 1] + b"\n")
    position = {k: i for i, k in enumerate(order)}
    ids = sorted(new, key=lambda k: position.get(k, len(position)))    # stable: unknown ids keep file order
    with open(path, "ab") as f:
        f.write(b"".join(new[k] for k in ids))
        f.flush()
        os.fsync(f.fileno())
    for s in shards:
        s.unlink()
    return len(ids)


def finish_shards(path: str | Path, order: Sequence[str], error: type[Exception], written: int, n_tokens: int,
                  seconds: float) -> tuple[int, int, float]:
    """The end of a sharded generation stage (simulate, respond): every rank's counts, then rank 0 merges
    the shards (and any a killed run left) into `path` in the one-process order (`order`: the ids as one
    process writes them). Returns the totals: records written, tokens generated, seconds of the slowest
    rank. `path` is complete on every rank's return."""
    counts = distributed.gather_objects((written, n_tokens, seconds))
    if distributed.is_main():
        merge_shards(path, order, error)
    distributed.barrier()
    return sum(c[0] for c in counts), sum(c[1] for c in counts), max(c[2] for c in counts)
