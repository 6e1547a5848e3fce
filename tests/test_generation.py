"""The generation engine: filtering, sampling, seeds, stopping and the returned log-probs."""
import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer
from numerics import NET_TOL

from models.generation import SamplingParams, filter_logits, generate, generate_texts


def test_top_k_keeps_exactly_k():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]])
    out = filter_logits(logits, top_k=2)
    assert torch.isfinite(out).tolist() == [[False, True, False, True, False]]
    torch.testing.assert_close(out[torch.isfinite(out)], torch.tensor([3.0, 2.0]))


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15]])
    logits = probs.log()
    # 0.5 < 0.7, 0.5 + 0.3 = 0.8 >= 0.7: keep {0, 2}; exactly reaching the threshold stops there too.
    assert torch.isfinite(filter_logits(logits, top_p=0.7)).tolist() == [[True, False, True, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.8)).tolist() == [[True, False, True, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.81)).tolist() == [[True, False, True, True]]
    # The most likely token always survives, however small top_p is.
    assert torch.isfinite(filter_logits(logits, top_p=0.01)).tolist() == [[True, False, False, False]]


def full_sort_nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """The nucleus by definition: rank the whole vocabulary, keep a token while the tokens before it
    hold less than top_p. Returns the kept mask."""
    sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    keep_sorted = probs.cumsum(dim=-1) - probs < top_p
    return torch.zeros_like(keep_sorted).scatter(-1, idx, keep_sorted)


@pytest.mark.parametrize("scale", [8.0, 0.5])   # peaked rows (nucleus within the candidates), flat rows (full sort)
def test_top_p_over_candidates_matches_the_full_sort(scale, monkeypatch):
    import models.generation as generation
    monkeypatch.setattr(generation, "NUCLEUS_CANDIDATES", 16)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 500, generator=g, dtype=torch.float64) * scale
    for top_p in (0.5, 0.9, 0.99):
        kept = torch.isfinite(filter_logits(logits, top_p=top_p))
        assert torch.equal(kept, full_sort_nucleus(logits, top_p))
        out = filter_logits(logits, top_p=top_p)
        assert torch.equal(out[kept], logits[kept])   # kept logits pass through unchanged
    # Which path ran: the peaked rows' nucleus fits in 16 candidates, the flat rows' does not.
    assert (full_sort_nucleus(logits, 0.9).sum(-1) <= 16).all() == (scale > 1)


def test_sampling_follows_the_distribution():
    from models.generation import sample
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log().expand(20000, 3).contiguous()
    g = torch.Generator().manual_seed(0)
    ids, lp = sample(logits, SamplingParams(temperature=1.0), g)
    freq = torch.bincount(ids, minlength=3).float() / 20000
    # Statistical, not rounding: a frequency over 20000 draws has std <= sqrt(0.6 * 0.4 / 20000) = 0.0035,
    # so 0.015 is 4.3 standard deviations (the seeded draws themselves can differ between CPUs' kernels).
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)
    torch.testing.assert_close(lp, probs.log()[ids])


def test_seed_reproduces_and_differs():
    model = make_tiny_model()
    prompts = [[5, 6, 7], [8, 9]]
    p = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.95)
    run = lambda s: generate(model, prompts, p, [2], 0, torch.Generator().manual_seed(s)).tokens
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


@pytest.mark.parametrize("params", [SamplingParams(max_new_tokens=12, temperature=0.8),
                                    SamplingParams(max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9),
                                    SamplingParams(max_new_tokens=12, temperature=0)])
def test_logprobs_off_samples_the_same_tokens(params):
    # logprobs=False only skips the per-step log-softmax: same seed, same tokens, lengths and stops
    model = make_tiny_model()
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    run = lambda lp: generate(model, prompts, params, [2, 3], 0, torch.Generator().manual_seed(4), logprobs=lp)
    with_lp, without = run(True), run(False)
    assert without.logprobs is None and with_lp.logprobs is not None
    for k in ("sequences", "tokens", "lengths", "finished"):
        assert torch.equal(getattr(with_lp, k), getattr(without, k)), k


def test_greedy_matches_argmax_loop_and_logprobs_match_full_forward():
    model = make_tiny_model()
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    out = generate(model, prompts, SamplingParams(max_new_tokens=6, temperature=0), [], 0)
    for b, p in enumerate(prompts):
        x = torch.tensor([p])
        with torch.no_grad():
            for _ in range(6):
                x = torch.cat([x, model(x)[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert out.tokens[b].tolist() == x[0, len(p):].tolist()
    # Sampled log-probs equal log_softmax(logits / T) of a full forward over the padded sequences.
    T = 0.7
    out = generate(model, prompts, SamplingParams(max_new_tokens=6, temperature=T), [], 0,
                   torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(out.sequences, start=out.start)[:, out.prompt_len - 1:-1]   # (B, T_n, V)
    ref = (logits / T).log_softmax(-1).gather(-1, out.tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(out.logprobs, ref, **NET_TOL)


def test_rows_stop_independently_and_are_padded_after():
    model = make_tiny_model()
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    free = generate(model, prompts, SamplingParams(max_new_tokens=8, temperature=0), [], 0)
    # Make row 0's third greedy token a stop token: row 0 ends there; row 1 ends at its own first
    # occurrence of that token, if any, and is otherwise unaffected.
    stop = int(free.tokens[0, 2])
    out = generate(model, prompts, SamplingParams(max_new_tokens=8, temperature=0), [stop], pad_id=0)
    for b in range(2):
        row = free.tokens[b].tolist()
        n = row.index(stop) + 1 if stop in row else 8
        assert out.lengths[b] == n and bool(out.finished[b]) == (stop in row)
        assert out.tokens[b, :n].tolist() == row[:n]
        assert out.tokens[b, n:].eq(0).all()
    assert out.lengths[0] == free.tokens[0].tolist().index(stop) + 1 <= 3
    assert out.response_mask.sum(1).tolist() == out.lengths.tolist()


def test_generate_texts_keeps_order_and_strips_stop():
    model, tok = make_tiny_model(), make_tiny_tokenizer()
    prompts = ["a much longer prompt than the others", "hi", "medium prompt"]
    p = SamplingParams(max_new_tokens=5, temperature=0)
    batched = generate_texts(model, tok, prompts, p, batch_size=2, progress=False)
    alone = [generate_texts(model, tok, [q], p, batch_size=1, progress=False)[0] for q in prompts]
    assert [r["token_ids"] for r in batched] == [r["token_ids"] for r in alone]
    for r in batched:
        assert not set(r["token_ids"]) & set(tok.stop_ids)


def test_static_shape_decode_path_matches_int_positions():
    """A tensor `pos` (the path torch.compile captures) gives the same logits as the int path."""
    model = make_tiny_model()
    tokens = torch.randint(3, 320, (2, 9))
    start = torch.tensor([0, 4])
    with torch.no_grad():
        model.setup_cache(2, 16)
        model(tokens[:, :6], pos=0, start=start)
        a = [model(tokens[:, t:t + 1], pos=t, start=start) for t in range(6, 9)]
        model.clear_cache()
        model.setup_cache(2, 16)
        model(tokens[:, :6], pos=0, start=start)
        b = [model(tokens[:, t:t + 1], pos=torch.tensor([t]), start=start) for t in range(6, 9)]
        model.clear_cache()
    torch.testing.assert_close(torch.cat(b, 1), torch.cat(a, 1), **NET_TOL)


@pytest.mark.slow
def test_compiled_decoding_matches_eager():
    """generate(compile=True) (torch.compile of the static-shape step; ~20-45 s to compile on CPU)."""
    model = make_tiny_model()
    p = SamplingParams(max_new_tokens=12, temperature=0)
    eager = generate(model, [[5, 6, 7], [8, 9, 10, 11]], p, [2], 0)
    assert not hasattr(model, "_compiled_decode_step"), "compile=None compiled on a CPU (compile_by_default)"
    for _ in range(2):      # the second call reuses the compiled step and its cache buffers
        comp = generate(model, [[5, 6, 7], [8, 9, 10, 11]], p, [2], 0, compile=True)
        assert torch.equal(comp.tokens, eager.tokens) and torch.equal(comp.lengths, eager.lengths)
