"""Our parameter names and ModelArgs <-> Hugging Face's tensor names and config.json: the one place where
this project's names meet Hugging Face's. models/checkpoint.py loads and saves checkpoint directories with
these tables; models/from_gguf.py writes what a converted GGUF must hold by them.

Qwen2 is LLaMA plus q/k/v biases; its config has no `attention_bias` key, the family implies them.
"""
from __future__ import annotations

import re

import torch

from models.llama import ModelArgs, Transformer

# Ours <-> Hugging Face's, per layer and global. Both directions read these tables. Our q/k/v and
# gate/up projections are stacked row-wise into one matrix each (one GEMM instead of several); the
# stacked parts map to Hugging Face's separate tensors, in the order listed.
_LAYER_NAMES = {
    "attention_norm.weight": ["input_layernorm.weight"],
    "attention.wqkv.weight": ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
    "attention.wqkv.bias": ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"],  # Qwen2
    "attention.wo.weight": ["self_attn.o_proj.weight"],
    "ffn_norm.weight": ["post_attention_layernorm.weight"],
    "feed_forward.w13.weight": ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
    "feed_forward.w2.weight": ["mlp.down_proj.weight"],
}
_GLOBAL_NAMES = {
    "tok_embeddings.weight": ["model.embed_tokens.weight"],
    "norm.weight": ["model.norm.weight"],
    "output.weight": ["lm_head.weight"],
}
_HF_TO_OURS = {h: (ours, i) for ours, hs in _GLOBAL_NAMES.items() for i, h in enumerate(hs)}
_HF_LAYER_TO_OURS = {h: (ours, i) for ours, hs in _LAYER_NAMES.items() for i, h in enumerate(hs)}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file or tensor at fault."""


def to_hf_names(name: str) -> list[str]:
    """Hugging Face names of the tensor(s) one of our parameters holds (several when stacked)."""
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m:
        return [f"model.layers.{m.group(1)}.{h}" for h in _LAYER_NAMES[m.group(2)]]
    return _GLOBAL_NAMES[name]


def from_hf_name(name: str) -> tuple[str, int] | None:
    """(our parameter, index of the stacked part) for a Hugging Face tensor name, None if unknown."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if m:
        ours = _HF_LAYER_TO_OURS.get(m.group(2))
        return None if ours is None else (f"layers.{m.group(1)}.{ours[0]}", ours[1])
    return _HF_TO_OURS.get(name)


def part_rows(name: str, a: ModelArgs) -> list[int]:
    """Row counts of the stacked parts of parameter `name` (a single entry when not stacked)."""
    if name.endswith(("wqkv.weight", "wqkv.bias")):
        return [a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim, a.n_kv_heads * a.head_dim]
    if name.endswith("w13.weight"):
        return [a.hidden_dim, a.hidden_dim]
    return []


def hf_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every Hugging Face tensor name a checkpoint of `args` holds, with its shape (the tied head left
    out). The converters check what they write against it."""
    with torch.device("meta"):
        model = Transformer(args)
    shapes = {}
    for name, p in model.named_parameters():
        rows = part_rows(name, args)
        for hf, r in zip(to_hf_names(name), rows or [p.shape[0]]):
            shapes[hf] = (r, *p.shape[1:])
    return shapes


def to_hf_state(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's parameters under Hugging Face names, stacked matrices split back into parts."""
    state = {}
    for name, p in model.named_parameters():
        p = p.detach()
        rows = part_rows(name, model.args)
        parts = p.split(rows, dim=0) if rows else [p]
        for hf, t in zip(to_hf_names(name), parts):
            state[hf] = t.contiguous().cpu()
    return state


# --- config.json --------------------------------------------------------------------------------------
# Hugging Face's class and model_type for each family.
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def family_config(model_type: str, n_layers: int) -> dict:
    """The config.json keys one family has and the other lacks (also used by models/from_gguf.py)."""
    if model_type == "qwen2":
        # No sliding-window attention: every layer attends to the whole context, as Qwen2.5 ships.
        return {"use_sliding_window": False, "sliding_window": None, "max_window_layers": n_layers,
                "attention_dropout": 0.0}
    return {"attention_bias": False, "mlp_bias": False}


def args_from_hf_config(cfg: dict, where: str = "config.json") -> ModelArgs:
    arch = cfg.get("architectures") or []
    model_type = cfg.get("model_type")
    if model_type not in _ARCHITECTURES:
        model_type = next((t for t, a in _ARCHITECTURES.items() if a in arch), None)
    if model_type is None:
        raise CheckpointError(f"{where}: model_type={cfg.get('model_type')!r}, architectures={arch}: "
                              f"not a LLaMA checkpoint (nor a Qwen2 one)")
    if model_type == "llama":
        for flag in ("attention_bias", "mlp_bias"):
            if cfg.get(flag):
                raise CheckpointError(f"{where}: {flag}=true is not supported (our LLaMA layers have no "
                                      f"bias; Hugging Face's attention_bias also puts one on o_proj)")
    elif cfg.get("use_sliding_window"):
        raise CheckpointError(f"{where}: use_sliding_window=true is not supported (full attention only)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: hidden_act={cfg['hidden_act']!r}, only 'silu' is supported")
    sizes = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size",
             "num_key_value_heads", "head_dim", "max_position_embeddings")
    for key in sizes:
        v = cfg.get(key)
        if key in cfg and v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0
                                             or (v == 0 and key != "head_dim")):
            raise CheckpointError(f"{where}: {key} must be a positive integer, got {v!r}")
    try:
        n_heads = cfg["num_attention_heads"]
        return ModelArgs(
            dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads, vocab_size=cfg["vocab_size"],
            hidden_dim=cfg["intermediate_size"], head_dim=cfg.get("head_dim") or 0,
            norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=cfg.get("rope_theta", 10000.0),
            rope_scaling=cfg.get("rope_scaling"),
            max_seq_len=cfg.get("max_position_embeddings", 2048),
            tie_embeddings=cfg.get("tie_word_embeddings", False),
            qkv_bias=model_type == "qwen2", model_type=model_type)
    except KeyError as e:
        raise CheckpointError(f"{where}: missing key {e.args[0]!r}") from None
    except (ValueError, TypeError) as e:                    # ModelArgs' own checks, a number of the wrong type
        raise CheckpointError(f"{where}: {e}") from None


def hf_config_from_args(a: ModelArgs, torch_dtype: torch.dtype) -> dict:
    return {
        "architectures": [_ARCHITECTURES[a.model_type]], "model_type": a.model_type,
        "hidden_size": a.dim, "num_hidden_layers": a.n_layers, "num_attention_heads": a.n_heads,
        "num_key_value_heads": a.n_kv_heads, "head_dim": a.head_dim, "vocab_size": a.vocab_size,
        "intermediate_size": a.hidden_dim, "rms_norm_eps": a.norm_eps, "rope_theta": a.rope_theta,
        "rope_scaling": a.rope_scaling, "max_position_embeddings": a.max_seq_len,
        "tie_word_embeddings": a.tie_embeddings, "hidden_act": "silu",
        **family_config(a.model_type, a.n_layers), "torch_dtype": str(torch_dtype).removeprefix("torch."),
    }
