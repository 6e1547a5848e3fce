"""Everything this project knows about torch.distributed, in one file: the process group, the rank
helpers, the few collectives the stages use, rank-0-only output, and the per-rank shard files of the
generation stages. Nothing here is a communication layer: each collective is one torch.distributed call.

    python train.py simulate ...                               world size 1: no process group at all
    torchrun --nproc_per_node 2 train.py simulate ...          2 ranks on this machine (gloo on CPU)
    torchrun --nproc_per_node 8 eval.py respond --device cuda  8 GPUs, NCCL, rank r on cuda:r

torchrun starts one process per rank and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT
in each; init() reads them. With WORLD_SIZE unset or 1 (a plain `python`, or `torchrun --nproc_per_node
1`) no process group is created, and every helper below is the identity: shard() returns all items,
the reductions return their input, barrier() returns at once. So a one-process run executes exactly the
code it ran before this module existed.

Sharded outputs (train.py simulate, eval.py respond): at world size N > 1 rank r appends its records to
`OUT.rank<r>` (shard_path) and, after every rank is done, rank 0 appends the shards' records to OUT in
the order the one-process run would have written them and deletes the shards (merge_shards). A kill of
any rank leaves the shards on disk; the rerun (at any world size) counts their ids as done and merges
them at its end. Readers only ever see OUT, complete once the command returns.
"""
from __future__ import annotations

import atexit
import datetime
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")
TIMEOUT_S = 1800.0         # a collective that waits longer than this fails (torch's default for gloo)


# --- the process group -------------------------------------------------------------------------------------
def init(device: str = "cpu", timeout_s: float | None = None) -> int:
    """Join the process group torchrun describes in the environment; returns the world size.

    Idempotent (the second call returns the group's size). No process group when WORLD_SIZE is unset or
    1. Backend: gloo for CPU tensors, plus NCCL for CUDA tensors when `device` is CUDA (each rank then
    owns cuda:LOCAL_RANK). `timeout_s` bounds every collective, so a rank that died shows up as an error
    on the others instead of a hang."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 1
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch with torchrun")
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    # "cpu:gloo,cuda:nccl": NCCL for the model's tensors, gloo for CPU ones (counters, gather_objects).
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_s or TIMEOUT_S))
    atexit.register(close)
    return world


def close() -> None:
    """Leave the process group (registered at exit by init; safe to call twice)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """True inside a process group of two or more ranks."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def local_rank() -> int:
    """This rank's index on its machine (torchrun's LOCAL_RANK): which GPU it owns."""
    return int(os.environ.get("LOCAL_RANK", "0")) if active() else 0


def is_main() -> bool:
    """Rank 0: the one that prints, shows progress, writes metrics and merges shards."""
    return rank() == 0


def device_for_rank(device: str) -> str:
    """The device this rank computes on: "cuda" becomes cuda:LOCAL_RANK under torchrun; cpu stays cpu."""
    if not active() or not device.startswith("cuda"):
        return device
    if device != "cuda":
        raise ValueError(f"--device {device} under torchrun: pass --device cuda, each rank takes cuda:LOCAL_RANK")
    return f"cuda:{local_rank()}"


# --- collectives (all no-ops at world size 1) -------------------------------------------------------------
def barrier() -> None:
    if active():
        dist.barrier()


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of `items`, by index: items[rank::world]. Interleaved rather than contiguous so
    that a list sorted by cost (length) gives every rank a similar load."""
    return list(items[rank()::world_size()])


def all_reduce_sum(t: Tensor) -> Tensor:
    """The elementwise sum of `t` over the ranks, as a new tensor (`t` itself at world size 1). Not
    differentiable: reduce statistics, not losses (DDP / FSDP reduce the gradients)."""
    if not active():
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_mean(t: Tensor) -> Tensor:
    """The elementwise mean of `t` over the ranks (`t` itself at world size 1)."""
    return all_reduce_sum(t) / world_size() if active() else t


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order, on every rank; [obj] at world size 1."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


# --- output from rank 0, errors from every rank ----------------------------------------------------------------
def print0(*args, **kwargs) -> None:
    """print() on rank 0 only."""
    if is_main():
        print(*args, **kwargs)


def progress(**tqdm_kwargs):
    """A tqdm bar on rank 0; disabled (but still callable) on the other ranks."""
    from tqdm import tqdm

    tqdm_kwargs["disable"] = tqdm_kwargs.get("disable", False) or not is_main()
    return tqdm(**tqdm_kwargs)


def _launch() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment, valid before init() and after a failed one."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def tag(prog: str) -> str:
    """`prog` at world size 1; "prog [rank r/N]" under torchrun, for error lines that name their rank."""
    r, n = _launch()
    return prog if n <= 1 else f"{prog} [rank {r}/{n}]"


@contextmanager
def rank_errors() -> Iterator[None]:
    """Under torchrun, an exception escaping the block names its rank: a note under its traceback
    (Python >= 3.11; a line on stderr before it otherwise). The commands' one-line errors use tag()."""
    try:
        yield
    except Exception as e:
        r, n = _launch()
        if n > 1:
            if hasattr(e, "add_note"):
                e.add_note(f"(on rank {r} of {n})")
            else:
                print(f"[rank {r}/{n}] {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise


def run_command(body: Callable[[], T], errors: tuple[type[Exception], ...], prog: str,
                label: str = "") -> tuple[int, T | None]:
    """A command's body on every rank: (0, its result), or (2, None) after one line on stderr for an
    expected error (`errors`), "PROG: LABELmessage" with PROG naming the rank under torchrun (tag). Any
    other exception propagates with its rank noted under the traceback (rank_errors)."""
    try:
        with rank_errors():
            return 0, body()
    except errors as e:
        print(f"{tag(prog)}: {label}{e}", file=sys.stderr)
        return 2, None


# --- per-rank shard files of the generation stages -------------------------------------------------------------
def shard_path(path: str | Path, r: int | None = None) -> Path:
    """Where rank r (default: this one) appends its records of the output `path`: PATH.rank<r>."""
    path = Path(path)
    return path.with_name(f"{path.name}.rank{rank() if r is None else r}")


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
    from rlcd.jsonl import read_objects

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
    counts = gather_objects((written, n_tokens, seconds))
    if is_main():
        merge_shards(path, order, error)
    barrier()
    return sum(c[0] for c in counts), sum(c[1] for c in counts), max(c[2] for c in counts)

