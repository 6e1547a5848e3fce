"""The checkpoints of a training stage's run (pm, sft, ppo, dpo): what is written, atomically, and what
--resume reads back, bit for bit. The loop that calls them, and the run directory they live in, are
rlcd/runs.py's.

A checkpoint is OUT/<ckpt>/, replaced atomically as a whole:
    config.json, model.safetensors, tokenizer*.json    a Hugging Face-format model (models.save_model)
    <name>.safetensors    a stage's other modules (the PM's head.safetensors, PPO's value network)
    run.json              {"stage", "step", "total_steps", "config", ...}: small, human-readable; a stage
                          may add to it (the PM's reward statistics, PPO's KL controller)
    trainer_state.pt      optimiser, scheduler, RNG states and the data-order fingerprint: --resume
<ckpt> is CKPT_DIRS[stage]: "policy" for sft, ppo and dpo, so that `generate.py --model OUT` loads the policy
(models.checkpoint.resolve looks for OUT/policy), and "reward" for pm, so that a preference model run is
never silently loaded as a policy.

Everything is written to a hidden sibling (.NAME.partial) and swapped in by models.hub.replace_dir, so a
crash at any moment leaves the previous checkpoint complete. A checkpoint saved under torchrun holds the
same Hugging Face-format model (gathered whole on rank 0) and, instead of trainer_state.pt,
trainer_state/: the optimiser shards, scheduler, RNG states and data fingerprint in
torch.distributed.checkpoint's format. Either form resumes at any world size.

    checkpointing(args, stage, trunk, tok, optimizer, scheduler, ...) -> (start step, save(step), run.json)
    save_checkpoint(...) / save_checkpoint_distributed(...); load_trainer_state(ckpt, optimizer, scheduler, data)
    read_run_meta(ckpt) -> dict; find_checkpoint(run_dir, stage) -> (ckpt, run.json); recover(ckpt)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from models import CheckpointError, Tokenizer, Transformer, save_model
from models.checkpoint import read_safetensors
from models.hub import replace_dir
from rlcd import distributed
from rlcd.precision import resolve as resolve_precision

if TYPE_CHECKING:                           # the settings' type only: runs.py imports this module
    from rlcd.runs import RunArgs

CKPT_DIRS = {"pm": "reward", "sft": "policy", "ppo": "policy", "dpo": "policy"}
RUN_JSON = "run.json"
STATE_FILE = "trainer_state.pt"
STATE_DIR = "trainer_state"          # the resume state of a run under torchrun (torch.distributed.checkpoint)


def read_run_meta(ckpt: Path) -> dict:
    f = Path(ckpt) / RUN_JSON
    try:
        return json.loads(f.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt}: no {RUN_JSON} (not a checkpoint written by train.py)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: invalid JSON ({e})") from None


def find_checkpoint(path: str | os.PathLike, stage: str) -> tuple[Path, dict]:
    """The checkpoint directory of `stage` for a run directory (OUT) or the checkpoint itself, and its
    run.json. A run of another stage, or a plain model directory, is a clear error, never a silent load."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: no such run directory")
    want = CKPT_DIRS[stage]
    for d in (p, p / want):
        recover(d)
        if (d / RUN_JSON).is_file():
            meta = read_run_meta(d)
            if meta.get("stage") != stage:
                raise CheckpointError(f"{d}: a {meta.get('stage')!r} checkpoint, not a {stage!r} one")
            return d, meta
    for d in set(CKPT_DIRS.values()) - {want}:
        if (p / d / RUN_JSON).is_file():
            got = read_run_meta(p / d).get("stage")
            raise CheckpointError(f"{p}: a {got!r} run directory ({d}/), not a {stage!r} run "
                                  f"(expected {want}/{RUN_JSON})")
    if (p / "config.json").is_file() and "architectures" in json.loads((p / "config.json").read_text()):
        raise CheckpointError(f"{p}: a plain model directory without {RUN_JSON}, not a {stage!r} checkpoint")
    raise CheckpointError(f"{p}: no {stage!r} checkpoint ({want}/{RUN_JSON} not found)")


def run_meta(stage: str, args: RunArgs, total_steps: int, **extra) -> dict:
    """run.json's content (the step is added at save time), with what --precision resolved to."""
    return {"stage": stage, "total_steps": total_steps,
            "config": json.loads(json.dumps(dataclasses.asdict(args), default=str)),
            **resolve_precision(args.precision, args.device).record(), **extra}


def data_fingerprint(train_keys: list[str], args: RunArgs) -> str:
    """A hash of what fixes the data order, checked on resume (a changed pairs file is an error)."""
    h = hashlib.sha256(json.dumps([train_keys, args.batch_size, args.seed]).encode())
    return h.hexdigest()[:16]


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(ckpt: Path, trunk: Transformer, tok: Tokenizer, meta: dict,
                    optimizer: torch.optim.Optimizer, scheduler, step: int, data: str,
                    tensors: dict[str, dict[str, Tensor]] | None = None) -> Path:
    """Write the full training state to `ckpt` atomically.

    Everything is assembled in a hidden sibling (.NAME.partial) and swapped in with one rename
    (models.hub.replace_dir), so a crash at any point leaves the previous checkpoint complete:
    either at `ckpt`, or, during the swap itself, at .NAME.old, which _recover puts back.
    (The one-process checkpoint; under torchrun, save_checkpoint_distributed.)"""
    from safetensors.torch import save_file

    partial = ckpt.with_name(f".{ckpt.name}.partial")
    try:
        save_model(trunk, tok, partial)            # itself atomic; replaces a leftover .partial
        for name, tdict in (tensors or {}).items():
            save_file({k: v.detach().contiguous().cpu() for k, v in tdict.items()},
                      str(partial / f"{name}.safetensors"))
        (partial / RUN_JSON).write_text(json.dumps({**meta, "step": step}, indent=2, default=str))
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": rng_state(), "data": data}, partial / STATE_FILE)
        replace_dir(partial, ckpt)
    except BaseException as e:
        shutil.rmtree(partial, ignore_errors=True)
        raise _write_failed(ckpt, e) from e
    return ckpt


def _write_failed(ckpt: Path, err: BaseException) -> BaseException:
    """What a failed checkpoint write raises: an I/O failure (a full disk, which torch.save reports only as
    'iostream error' or 'unexpected pos') becomes an OSError naming the checkpoint and the free space left;
    anything else (an interrupt, a bug) is passed on as it is. The previous checkpoint is intact either way."""
    if not isinstance(err, (OSError, RuntimeError)) or isinstance(err, NotImplementedError):
        return err
    free = shutil.disk_usage(ckpt.parent).free / 2**30
    return OSError(f"writing checkpoint {ckpt} failed with {free:.1f} GiB free on its disk; the previous "
                   f"checkpoint there, if any, is intact ({type(err).__name__}: {err})")


def plain_model(args, state: dict[str, Tensor]) -> Transformer:
    """A Transformer holding the tensors of a full state dict (no copy, no random init): what save_model
    writes from a model gathered off the ranks. Built on the meta device, then given the tensors."""
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def save_checkpoint_distributed(ckpt: Path, trunk: Transformer, tok: Tokenizer, meta: dict,
                                optimizer: torch.optim.Optimizer, scheduler, step: int, data: str,
                                modules: dict[str, nn.Module]) -> Path:
    """save_checkpoint under torchrun, called by every rank: the same files, atomically replaced, but the
    model and `modules` are gathered whole onto rank 0, which writes them (config.json, model.safetensors,
    NAME.safetensors, run.json: what load_model and other LLaMA tooling read), and the resume state is
    trainer_state/ in torch.distributed.checkpoint's format, each rank writing its optimiser shard, so
    that it resumes at any world size (load_trainer_state)."""
    from safetensors.torch import save_file

    partial = ckpt.with_name(f".{ckpt.name}.partial")
    trunk_state = distributed.full_state_dict(trunk)                    # collectives: every rank takes part
    module_states = {name: distributed.full_state_dict(m) for name, m in modules.items()}
    try:
        if distributed.is_main():
            save_model(plain_model(trunk.args, trunk_state), tok, partial)   # replaces a leftover .partial
            for name, tdict in module_states.items():
                save_file({k: v.contiguous() for k, v in tdict.items()}, str(partial / f"{name}.safetensors"))
            (partial / RUN_JSON).write_text(json.dumps({**meta, "step": step}, indent=2, default=str))
        distributed.barrier()
        extra = {"step": step, "scheduler": scheduler.state_dict(), "rng": rng_state(), "data": data}
        distributed.save_resume_state(partial / STATE_DIR, _named(trunk, modules), optimizer, extra)
        distributed.barrier()
        if distributed.is_main():
            replace_dir(partial, ckpt)
        distributed.barrier()                   # the checkpoint is in place on every rank's return
    except BaseException as e:
        if distributed.is_main():
            shutil.rmtree(partial, ignore_errors=True)
        raise _write_failed(ckpt, e) from e
    return ckpt


def _named(trunk: nn.Module, modules: dict[str, nn.Module]) -> nn.ModuleDict:
    """One module holding every trained parameter, whose names key the resume state's optimiser entries."""
    return nn.ModuleDict({"trunk": trunk, **modules})


def load_trainer_state(ckpt: Path, optimizer: torch.optim.Optimizer, scheduler, data: str,
                       model: nn.Module | None = None) -> int:
    """Restore optimiser, scheduler and RNG states from a checkpoint; return the step to continue at.

    Reads trainer_state.pt (a one-process run) or trainer_state/ (a run under torchrun) at any world
    size; `model` (every trained module, named as _named names them) is needed to map the optimiser's
    entries to parameters whenever the two differ (a distributed run or checkpoint); without it, the
    one-process optimizer.load_state_dict."""
    if (ckpt / STATE_FILE).is_file():
        try:
            state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
            opt_state = state["optimizer"]
        except Exception as e:                  # a truncated or foreign file: torch raises many kinds
            first = str(e).split(". ")[0].splitlines()[0][:200] if str(e) else ""
            raise CheckpointError(f"{ckpt / STATE_FILE}: unreadable ({type(e).__name__}: {first}); "
                                  f"the checkpoint cannot be resumed") from None
    elif (ckpt / STATE_DIR).is_dir() and model is not None:
        state, opt_state = distributed.load_resume_state(ckpt / STATE_DIR, model, optimizer), None
    else:
        raise CheckpointError(f"{ckpt}: no {STATE_FILE} or {STATE_DIR}/ to resume from")
    if state["data"] != data:
        raise CheckpointError(f"{ckpt}: the training data or its order changed since this checkpoint "
                              f"(fingerprint {state['data']} != {data}); resume with the same pairs files")
    if opt_state is not None:
        if model is None:
            optimizer.load_state_dict(opt_state)
        else:                                   # optimizer.load_state_dict itself at world size 1
            distributed.load_optimizer_state(model, optimizer, opt_state)
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return int(state["step"])


def recover(ckpt: Path) -> None:
    """A crash between replace_dir's two renames leaves only .NAME.old: it is the last complete checkpoint,
    put back at `ckpt`."""
    old = ckpt.with_name(f".{ckpt.name}.old")
    if not ckpt.exists() and old.is_dir():
        os.replace(old, ckpt)


def checkpointing(args: RunArgs, stage: str, trunk: Transformer, tok: Tokenizer, optimizer: torch.optim.Optimizer,
                scheduler, total_steps: int, train_keys: list[str], resume_from: Path | None,
                modules: dict[str, nn.Module], **meta) -> tuple[int, Callable[[int], None], dict]:
    """Checkpointing for a stage's run, and the state --resume restores: returns (the step to start at,
    save(step), run.json's content).

    A checkpoint (OUT/CKPT_DIRS[stage]) holds `trunk` as a Hugging Face-format model, each of the stage's
    other `modules` as NAME.safetensors (the PM's head, PPO's value network), run.json (`meta` plus the
    number of trainable parameters; a stage may add to the returned dict before a save) and the optimiser,
    scheduler and RNG states. On resume from `resume_from`, the modules' weights and those states are
    restored here; the trunk was loaded from the checkpoint by the stage."""
    fingerprint = data_fingerprint(train_keys, args)
    # Sharded parameters (DTensors) count their global size.
    n_trainable = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    run = run_meta(stage, args, total_steps, **meta, n_trainable=n_trainable)
    start = 0
    if resume_from is not None:
        device = distributed.device_for_rank(args.device)
        for name, m in modules.items():
            file = resume_from / f"{name}.safetensors"
            if not file.is_file():
                raise CheckpointError(f"{resume_from}: no {file.name} (an incomplete checkpoint)")
            try:
                distributed.load_full_state_dict(m, read_safetensors(file, device))
            except RuntimeError as e:                   # missing, unexpected or misshaped tensors
                raise CheckpointError(f"{file}: does not fit this run ({str(e).splitlines()[-1].strip()})") from None
        start = load_trainer_state(resume_from, optimizer, scheduler, fingerprint, _named(trunk, modules))
    ckpt = Path(args.out) / CKPT_DIRS[stage]

    def save(step: int) -> None:
        if distributed.active():
            save_checkpoint_distributed(ckpt, trunk, tok, run, optimizer, scheduler, step, fingerprint, modules)
        else:
            save_checkpoint(ckpt, trunk, tok, run, optimizer, scheduler, step, fingerprint,
                            {name: m.state_dict() for name, m in modules.items()})
    return start, save, run
