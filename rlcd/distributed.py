"""Everything this project knows about torch.distributed, in one file: the process group, the rank
helpers, the few collectives the stages use, rank-0-only output, and the data parallelism of the
training stages. Nothing here is a communication layer: each collective is one torch.distributed call.

    python train.py simulate ...                               world size 1: no process group at all
    torchrun --nproc_per_node 2 train.py simulate ...          2 ranks on this machine (gloo on CPU)
    torchrun --nproc_per_node 8 eval.py respond --device cuda  8 GPUs, NCCL, rank r on cuda:r

torchrun starts one process per rank and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT
in each; init() reads them. With WORLD_SIZE unset or 1 (a plain `python`, or `torchrun --nproc_per_node
1`) no process group is created, and every helper below is the identity: shard() returns all items,
the reductions return their input, barrier() returns at once. So a one-process run executes exactly the
code it ran before this module existed.

The generation stages (train.py simulate, eval.py respond) deal their chunks to the ranks with shard()
and write per-rank shard files that rank 0 merges: rlcd/jsonl.py.

Training stages (train.py pm, sft, ppo): data parallelism with FSDP2 (`fully_shard`), no wrapper class.
parallelize() shards a model over a device mesh: without --fsdp the mesh is (N replicas x 1 shard), so
every rank holds the whole model and gradients are all-reduced (DDP's semantics); with --fsdp it is one
shard dimension of N, each block its own unit, so a rank holds 1/N of the parameters, gradients and
AdamW state. Either way the parameters become DTensors, the module keeps its class and attributes, and
the same helpers save and load it: full_state_dict() (a full copy on rank 0, for the Hugging Face-format
checkpoint), and the resume state through torch.distributed.checkpoint (save_resume_state /
load_resume_state), which reshards on load, so a run saved at one world size resumes at another.
With gradient accumulation, replicated models reduce their gradients once per optimiser step, in the
last micro-batch's backward (sync_gradients); sharded ones reduce-scatter in every backward.
"""
from __future__ import annotations

import atexit
import datetime
import functools
import os
import sys
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

T = TypeVar("T")
U = TypeVar("U")
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


def exit(code: int) -> NoReturn:
    """End the process with `code`: what train.py and eval.py do when their command returns.

    At world size 1, sys.exit. Under torchrun the ranks first meet (after a success: no rank leaves while
    a peer is still in a collective), flush their output and end with os._exit, skipping the teardown of
    the process group and of the interpreter (the operating system closes the sockets): there a rank
    now and then aborted ("terminate called without an active exception", SIGABRT, after complete
    output: 2 of 6 manual torchrun runs and 1 CI run of the 2-rank tests on the AMD EPYC, 2026-11-28;
    whether in destroy_process_group or in the C++ destructors after it was not pinned down, so both are
    skipped)."""
    if not active():
        sys.exit(code)
    if code == 0:
        barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


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


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order, on every rank; [obj] at world size 1."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def map_sharded(fn: Callable[[list[T]], list[U]], items: Sequence[T]) -> list[U]:
    """fn over `items` split across the ranks, every result on every rank in the items' order; fn(items)
    itself at world size 1. fn maps a list to one result per element (e.g. a batch of sequences to their
    scores). Rank r takes items[r::N], padded with copies of items[0] to ceil(len / N) so that every rank
    calls fn on as many items (FSDP's forwards are collectives: the ranks must run the same number);
    the padding's results are dropped."""
    if not active():
        return fn(list(items))
    n, N, r = len(items), world_size(), rank()
    mine = list(items[r::N])
    real = len(mine)
    out = fn(mine + [items[0]] * (-(-n // N) - real))[:real] if n else []
    result: list[Any] = [None] * n
    for k, part in enumerate(gather_objects(out)):
        result[k::N] = part
    return result


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


# --- data parallelism of the training stages (FSDP2) -------------------------------------------------------------
# FSDP2 warns when a forward method returns a view; RewardModel.values returns one (a squeeze) and nothing
# writes to it in place.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


@functools.lru_cache(maxsize=None)
def _mesh(device_type: str, fsdp: bool):
    """The device mesh of every rank: (N,) "shard" for FSDP; (N, 1) "replicate" x "shard" otherwise,
    i.e. HSDP with shards of one rank, which is DDP: whole parameters everywhere, gradients all-reduced."""
    from torch.distributed.device_mesh import init_device_mesh

    if fsdp:
        return init_device_mesh(device_type, (world_size(),), mesh_dim_names=("shard",))
    return init_device_mesh(device_type, (world_size(), 1), mesh_dim_names=("replicate", "shard"))


def parallelize(model: nn.Module, blocks: Iterable[nn.Module] = (), fsdp: bool = False,
                mixed_precision: bool = False, methods: Sequence[str] = ()) -> nn.Module:
    """Make `model` data-parallel over the ranks, in place (its class and attributes stay; its parameters
    become DTensors); the identity at world size 1. Build the optimiser after this call.

    fsdp=False: every rank keeps the whole model, gradients are all-reduced after each backward and
    averaged (DDP's semantics), one communication unit for the model. fsdp=True: each of `blocks` (the
    transformer blocks) and the rest of the model are FSDP units sharded over the ranks: a unit's
    parameters are all-gathered for its forward and backward and freed after, gradients are
    reduce-scattered. mixed_precision (with fsdp, on GPU): units are gathered in bf16 for compute while the
    sharded fp32 parameters stay the master copy, and gradients are reduced in fp32. `methods`: other
    methods than forward that run the model (RewardModel.values), so that they gather the parameters too.

    Gradients are averaged over the ranks: a loss normalised by a count over the global batch must be
    multiplied by world_size() before backward (see rlcd/runs.py). The model's root unit keeps its
    parameters gathered after a forward (FSDP2's default, for the backward that follows), so code that
    reads a weight after the forward (the tied output head) sees the whole tensor."""
    if not active():
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    device_type = "cuda" if next(model.parameters()).is_cuda else "cpu"
    mesh = _mesh(device_type, fsdp)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if fsdp and mixed_precision else MixedPrecisionPolicy()
    if fsdp:
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    if not fsdp:
        _REPLICATED.add(model)
    for name in methods:
        register_fsdp_forward_method(model, name)
    return model


_REPLICATED: weakref.WeakSet[nn.Module] = weakref.WeakSet()    # the models parallelize() replicated


def sync_gradients(enabled: bool) -> None:
    """Whether the backward passes that follow all-reduce the gradients of the replicated models
    (parallelize without fsdp). Gradient accumulation turns it off for every micro-batch of an optimiser
    step but the last: the gradients add up on each rank and are all-reduced once, in the last backward,
    instead of once per micro-batch (FSDP2's set_requires_gradient_sync). Sharded models (--fsdp) reduce
    in every backward whatever this says: deferring would keep every block's whole gradient on every
    rank, the memory FSDP is there to save. A no-op at world size 1."""
    for model in _REPLICATED:
        model.set_requires_gradient_sync(enabled)


def full_tensor(t: Tensor) -> Tensor:
    """A DTensor's whole value (a collective for sharded ones); any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _full_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The whole state dict of a (sharded) module on rank 0, in CPU memory; {} on the other ranks. A
    collective: every rank calls it. Plain module.state_dict() without a process group."""
    if not active():
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_full_options(cpu_offload=True))


def load_full_state_dict(module: nn.Module, state: dict[str, Tensor]) -> None:
    """Load a whole state dict (read from a file by every rank) into a possibly sharded module: each rank
    keeps its shard."""
    if not active():
        module.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(module, state, options=_full_options(strict=True))


@torch.no_grad()
def refresh_copy(copy: nn.Module, model: nn.Module) -> None:
    """Write `model`'s current weights into `copy`, a plain module of the same structure (PPO's
    generation copy of the policy): each parameter gathered whole (a collective for sharded ones), cast
    to the copy's dtype, copied in place, so the copy's tensors keep their addresses."""
    mine = dict(copy.named_parameters())
    for name, p in model.named_parameters():
        mine[name].copy_(full_tensor(p.detach()))


# --- the resume state: torch.distributed.checkpoint ---------------------------------------------------------------
def save_resume_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict) -> None:
    """Save the optimiser state (each rank its shard) and `extra` (scheduler, RNG, step: small picklable
    objects, rank 0's) with torch.distributed.checkpoint into the directory `path`. `model` holds every
    parameter the optimiser updates (an nn.ModuleDict of the stage's modules), whose names key the state.
    A collective; load_resume_state reads it at any world size, world size 1 included."""
    import io

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    blob = io.BytesIO()                 # `extra` as one bytes item: dcp.load fills only keys it is given
    torch.save(extra, blob)
    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer), "extra": blob}, checkpoint_id=str(path),
             no_dist=not active())


def load_resume_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore what save_resume_state wrote (at any world size) into `optimizer`; returns `extra`."""
    import io

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    # get_optimizer_state_dict creates the state tensors (a zero step) for dcp.load to fill in place.
    state = {"optimizer": get_optimizer_state_dict(model, optimizer), "extra": io.BytesIO()}
    with warnings.catch_warnings():     # "torch.distributed is disabled...": a one-process load, as meant
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path), no_dist=not active())
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
    state["extra"].seek(0)
    return torch.load(state["extra"], weights_only=True)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a one-process optimizer.state_dict() (parameters by index, whole tensors: trainer_state.pt
    of a run at world size 1) into a possibly sharded optimizer; optimizer.load_state_dict at world size 1."""
    if not active():
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    # Index i of a state_dict is the i-th parameter over the param groups; name it as `model` does.
    names = {p: n for n, p in model.named_parameters()}
    fqn = [names[p] for g in optimizer.param_groups for p in g["params"]]
    by_name = {"state": {fqn[i]: s for i, s in state["state"].items()},
               "param_groups": [{**g, "params": [fqn[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=_full_options())
