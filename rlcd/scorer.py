"""The RLAIF scorer: the same language model judges which of two responses is better, zero-shot.

RLCD's baselines (arXiv 2307.12950, Sec. 4: RLAIF and RLCD-Rescore) label a pair (A, B) by showing
the model the conversation, one principle and both options, ending on "The answer is: (", and reading
the next-token logits of "A" and "B". The soft label is P(B) = softmax([z_A, z_B])[1], exactly as
analyze_results() in facebookresearch/RLCD scripts/simulate_preference_data.py computes it (it keeps
z_A and z_B, and the trainer softmaxes them).

The official code scores one order only. A model this small has a strong position bias (it says
"A" or "B" largely whatever the options are), so `both_orders=True` also scores (B, A) and averages
P(B over A) with 1 - P(A over B), which cancels a bias that does not depend on the content. It is off
by default because the paper did not do it.

API
    choice_ids(tokenizer, choices=("A", "B")) -> list[int]   the single token id of each choice
    choice_logits(model, tokenizer, texts, token_ids, batch_size=8) -> Tensor (N, K)
        next-token logits of `token_ids` after each text, batched and left-padded
    prob_b(model, tokenizer, texts, batch_size=8) -> Tensor (N,)   P("B") over {"A", "B"}
    score_pairs(model, tokenizer, conversations, instructions, a, b, both_orders=False,
                batch_size=8) -> Tensor (N,)   P(B is the better response), fp32 on the CPU

Shapes: N texts, B rows per batch, T_p left-padded prompt columns, D model width, K choices.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from models.generation import left_pad
from models.llama import Transformer
from rlcd.tasks import scorer_prompt


def choice_ids(tokenizer, choices: tuple[str, ...] = ("A", "B")) -> list[int]:
    """The id of each choice letter as the token that follows "(" in the scorer prompt.

    The official code takes tokenizer.encode('A')[-1]. Here each letter must be exactly one token
    (true of byte-level BPE vocabularies such as SmolLM2's), otherwise the "probability of A" would
    be the probability of a first piece only, which is an error worth stopping for.
    """
    ids = []
    for c in choices:
        enc = tokenizer.encode(c, add_bos=False)
        if len(enc) != 1:
            raise ValueError(f"the scorer needs {c!r} to be a single token, but it encodes to {enc}")
        ids.append(enc[0])
    return ids


@torch.no_grad()
def choice_logits(model: Transformer, tokenizer, texts: list[str], token_ids: list[int],
                  batch_size: int = 8) -> Tensor:
    """(N, K) fp32 logits of `token_ids` for the token after each text.

    Texts are sorted by length and left-padded in batches, so every row's last real token sits in the
    last column and one forward gives all next-token distributions: `model(ids, start=start)[:, -1]`.
    Only the K needed rows of the output head are multiplied (the full (B, V) row would be 49152 wide
    for SmolLM2 and is never used); tests check this against the full logits.
    """
    encoded = [tokenizer.encode(t) for t in texts]
    limit = model.args.max_seq_len
    for i, e in enumerate(encoded):
        if len(e) > limit:
            raise ValueError(f"scorer prompt {i} has {len(e)} tokens, more than the model's context of {limit}")
    W = model.output_weight[torch.tensor(token_ids, device=model.device)]      # (K, D)
    out = torch.empty(len(texts), len(token_ids), dtype=torch.float32)
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    for lo in range(0, len(order), batch_size):
        idx = order[lo:lo + batch_size]
        ids, start = left_pad([encoded[i] for i in idx], tokenizer.pad_id, model.device)   # (B, T_p)
        h = model(ids, start=start, return_hidden=True)[:, -1]                 # (B, D) last column
        out[idx] = F.linear(h, W).float().cpu()                                # (B, K)
    return out


def prob_b(model: Transformer, tokenizer, texts: list[str], batch_size: int = 8) -> Tensor:
    """(N,) P("B") = softmax over the two logits of "A" and "B" after each scorer prompt."""
    z = choice_logits(model, tokenizer, texts, choice_ids(tokenizer), batch_size)   # (N, 2)
    return z.softmax(dim=-1)[:, 1]


def score_pairs(model: Transformer, tokenizer, conversations: list[str], instructions: list[str],
                a: list[str], b: list[str], both_orders: bool = False, batch_size: int = 8) -> Tensor:
    """(N,) probability that response b[i] is better than a[i] for conversation i under principle i.

    conversations are the neutral dialogue text the scorer prompt quotes ("Human: ...\\n\\nAssistant:"
    in the official code). With both_orders, the mean of P(B) for (a, b) and 1 - P(B) for (b, a).
    """
    n = len(conversations)
    if not (len(instructions) == len(a) == len(b) == n):
        raise ValueError("conversations, instructions, a and b must have the same length")
    texts = [scorer_prompt(c, ins, x, y) for c, ins, x, y in zip(conversations, instructions, a, b)]
    if not both_orders:
        return prob_b(model, tokenizer, texts, batch_size)
    swapped = [scorer_prompt(c, ins, y, x) for c, ins, x, y in zip(conversations, instructions, a, b)]
    p = prob_b(model, tokenizer, texts + swapped, batch_size)                      # (2N,)
    # In the swapped prompt b is option A, so P(b better) there is 1 - P("B").
    return 0.5 * (p[:n] + (1.0 - p[n:]))
