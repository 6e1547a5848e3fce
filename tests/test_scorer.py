"""The RLAIF scorer: P("B") from next-token logits, batched and left-padded, and both-orders averaging."""
import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer
from numerics import NET_TOL

import rlcd.scorer as scorer
from rlcd.scorer import choice_ids, choice_logits, prob_b, score_pairs
from rlcd.tasks import scorer_prompt


@pytest.fixture(scope="module")
def tiny():
    # A context long enough for the byte-level scorer prompts (one token per byte).
    return make_tiny_model(max_seq_len=1024), make_tiny_tokenizer()


def test_choice_ids_are_the_single_letter_tokens(tiny):
    _, tok = tiny
    assert choice_ids(tok) == [tok.encode("A")[0], tok.encode("B")[0]]
    assert [tok.decode([i]) for i in choice_ids(tok)] == ["A", "B"]


def test_choice_ids_refuse_multi_token_letters():
    class TwoPieces:
        def encode(self, text, add_bos=None):
            return [7, 8]

    with pytest.raises(ValueError, match="'A' to be a single token"):
        choice_ids(TwoPieces())


def test_prob_b_matches_a_hand_computation_from_the_logits(tiny):
    model, tok = tiny
    # Different lengths and batch_size 2: rows are sorted, left-padded and split across batches.
    texts = ["The answer is: (", "Options: (A) yes (B) no. The answer is: (", "x(", "a much longer text, "
             "with several clauses and some punctuation; then the answer is: ("]
    p = prob_b(model, tok, texts, batch_size=2)
    a_id, b_id = choice_ids(tok)
    for i, t in enumerate(texts):
        with torch.no_grad():
            z = model(torch.tensor([tok.encode(t)]))[0, -1].double()     # (V,) unpadded, alone
        want = torch.exp(z[b_id]) / (torch.exp(z[a_id]) + torch.exp(z[b_id]))
        assert abs(p[i].item() - want.item()) < 1e-5, (i, p[i].item(), want.item())
    # The answer is not a constant: the texts really go through the model.
    assert p.max() - p.min() > 1e-4


def test_choice_logits_equal_the_full_head(tiny):
    model, tok = tiny
    texts = ["hello", "a longer prompt here", "mid size"]
    ids = [5, 66, 300]
    got = choice_logits(model, tok, texts, ids, batch_size=3)                 # (3, 3)
    for i, t in enumerate(texts):
        with torch.no_grad():
            full = model(torch.tensor([tok.encode(t)]))[0, -1]                 # (V,)
        torch.testing.assert_close(got[i], full[ids].float(), **NET_TOL)


def test_score_pairs_reads_the_official_prompt(tiny):
    model, tok = tiny
    conv = ["Human: Hi\n\nAssistant:", "Human: How do I pick a lock?\n\nAssistant:"]
    instr = ["Please choose the response that is more helpful.", "Choose the less harmful response."]
    a, b = ["Hello there.", "I can't help with that."], ["Go away.", "Use a tension wrench."]
    got = score_pairs(model, tok, conv, instr, a, b, batch_size=2)
    want = prob_b(model, tok, [scorer_prompt(*x) for x in zip(conv, instr, a, b)])
    torch.testing.assert_close(got, want)
    # Both orders: the mean of P(B) for (a, b) and 1 - P(B) for (b, a).
    swapped = prob_b(model, tok, [scorer_prompt(c, i, y, x) for c, i, x, y in zip(conv, instr, a, b)])
    both = score_pairs(model, tok, conv, instr, a, b, both_orders=True, batch_size=2)
    torch.testing.assert_close(both, 0.5 * (want + 1 - swapped))


def test_both_orders_cancel_a_pure_position_bias(monkeypatch):
    # A judge that says "B" with probability 0.8 whatever the options, plus +0.1 when B is "good":
    # one order reports 0.9 for the good answer; both orders report 0.5 + 0.1 / 2 + 0.1 / 2 = 0.6.
    def fake_prob_b(model, tokenizer, texts, batch_size=8):
        return torch.tensor([0.8 + (0.1 if "(B) good" in t else -0.1 if "(A) good" in t else 0.0)
                             for t in texts])

    monkeypatch.setattr(scorer, "prob_b", fake_prob_b)
    args = (None, None, ["Human: q\n\nAssistant:"], ["pick one"], ["bad"], ["good"])
    assert score_pairs(*args).item() == pytest.approx(0.9)
    assert score_pairs(*args, both_orders=True).item() == pytest.approx(0.5 * (0.9 + 1 - 0.7))


def test_too_long_scorer_prompt_is_a_clear_error(tiny):
    _, tok = tiny
    short = make_tiny_model(max_seq_len=32)
    with pytest.raises(ValueError, match="scorer prompt 0 has .* tokens, more than the model's context of 32"):
        prob_b(short, tok, ["x" * 40])


def test_mismatched_lengths_are_an_error(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="same length"):
        score_pairs(model, tok, ["c"], ["i", "j"], ["a"], ["b"])
