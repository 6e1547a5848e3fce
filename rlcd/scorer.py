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

The judge (evaluation, and any model as the scorer: `judge_pairs`) always scores both orders and keeps
both: P("A") with the first response shown as A and with it shown as B. From them come P(first better)
= (P_1("A") + 1 - P_2("A")) / 2, position agreement (both orders pick the same response) and position
bias (the mean P("A") over both orders, 0.5 for none). Its prompt has two renderings:
    plain  the scorer prompt as it is, raw text ending on "The answer is: (" (the official code)
    chat   the scorer prompt minus its answer stub as the user turn of the judge's chat template, and
           the assistant turn opened with "The answer is: (" (for instruction-tuned judges)
Identical prompt texts are scored once, so a response compared with itself gets exactly 0.5.

API
    choice_ids(tokenizer, choices=("A", "B")) -> list[int]   the single token id of each choice
    choice_logits(model, tokenizer, texts, token_ids, batch_size=8) -> Tensor (N, K)
        next-token logits of `token_ids` after each text, batched and left-padded
    prob_b(model, tokenizer, texts, batch_size=8) -> Tensor (N,)   P("B") over {"A", "B"}
    score_pairs(model, tokenizer, conversations, instructions, a, b, both_orders=False,
                batch_size=8) -> Tensor (N,)   P(B is the better response), fp32 on the CPU
    judge_prompt(tokenizer, conversation, instruction, a, b, fmt="chat") -> str
    judge_pairs(model, tokenizer, conversations, instructions, first, second, fmt="chat",
                batch_size=8) -> Judgement(p_first (N,), p_a (N, 2))
    Judgement.agree (N,) bool, .position_bias float
    JUDGE_FORMATS, DEFAULT_JUDGE_FORMAT, ANSWER_STUB
(The judge used by default, and how it was chosen: rlcd.judge.)

Shapes: N texts, B rows per batch, T_p left-padded prompt columns, D model width, K choices.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

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
                  batch_size: int = 8, progress: bool = False) -> Tensor:
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
    bar = tqdm(total=len(texts), desc="judge prompts", unit="prompt", disable=not progress, dynamic_ncols=True)
    for lo in range(0, len(order), batch_size):
        idx = order[lo:lo + batch_size]
        ids, start = left_pad([encoded[i] for i in idx], tokenizer.pad_id, model.device)   # (B, T_p)
        h = model(ids, start=start, return_hidden=True)[:, -1]                 # (B, D) last column
        out[idx] = F.linear(h, W).float().cpu()                                # (B, K)
        bar.update(len(idx))
    bar.close()
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


# --- the pairwise judge ------------------------------------------------------------------------------------
JUDGE_FORMATS = ("plain", "chat")
# chat: accuracy 0.62 on the human-labelled pairs with the 135M model, plain 0.38 (rlcd/evaluate.py)
DEFAULT_JUDGE_FORMAT = "chat"
ANSWER_STUB = "The answer is: ("   # the last words of scorer_prompt; the next token is the choice


def judge_prompt(tokenizer, conversation: str, instruction: str, a: str, b: str, fmt: str = DEFAULT_JUDGE_FORMAT,
                 ) -> str:
    """The judge's input text for options (A) a and (B) b; its next token is read as the choice."""
    text = scorer_prompt(conversation, instruction, a, b)
    if fmt == "plain":
        return text
    if fmt != "chat":
        raise ValueError(f"judge format must be one of {JUDGE_FORMATS}, got {fmt!r}")
    if not getattr(tokenizer, "has_chat_template", False):
        raise ValueError("judge format 'chat' needs a tokenizer with a chat template; use 'plain'")
    body = text[: len(text) - len(ANSWER_STUB)].rstrip()
    return tokenizer.apply_chat_template([{"role": "user", "content": body}], add_generation_prompt=True) + ANSWER_STUB


@dataclass
class Judgement:
    """A judged list of N pairs (first, second); for a judge that shows both in order, both orders.

    p_a[:, 0] is P("A") with `first` shown as A, p_a[:, 1] is P("A") with `second` shown as A; a judge
    without positions (pointwise, judge-free: rlcd.judge) has p_a None."""
    p_first: Tensor                  # (N,) P(first is better), both orders averaged
    p_a: Tensor | None = None        # (N, 2) P("A") in the order (first, second) and in the order (second, first)
    logodds: Tensor | None = None    # (N, 2) float64 log P("A") - log P("B") in the same two orders

    @property
    def agree(self) -> Tensor | None:
        """(N,) True where both orders pick the same response: first as A wins iff the swapped order's A
        (the second response) loses. None for a judge without positions."""
        if self.p_a is None:
            return None
        return (self.p_a[:, 0] > 0.5) == (self.p_a[:, 1] < 0.5)

    @property
    def position_bias(self) -> float | None:
        """Mean P("A") over both orders and all pairs: 0.5 for a judge without position bias."""
        return None if self.p_a is None else self.p_a.double().mean().item()


def judge_pairs(model: Transformer, tokenizer, conversations: list[str], instructions: list[str],
                first: list[str], second: list[str], fmt: str = DEFAULT_JUDGE_FORMAT, batch_size: int = 8,
                progress: bool = False) -> Judgement:
    """Judge each (first[i], second[i]) in both orders; conversations in the plain dialogue form."""
    n = len(conversations)
    if not (len(instructions) == len(first) == len(second) == n):
        raise ValueError("conversations, instructions, first and second must have the same length")
    fwd = [judge_prompt(tokenizer, c, ins, x, y, fmt) for c, ins, x, y in zip(conversations, instructions, first, second)]
    rev = [judge_prompt(tokenizer, c, ins, y, x, fmt) for c, ins, x, y in zip(conversations, instructions, first, second)]
    # Score each distinct text once: identical texts then get bit-identical probabilities whatever batch
    # and padding they would have landed in, and a response judged against itself is exactly a tie.
    unique = list(dict.fromkeys(fwd + rev))
    index = {t: i for i, t in enumerate(unique)}
    z = (choice_logits(model, tokenizer, unique, choice_ids(tokenizer), batch_size, progress)
         if unique else torch.empty(0, 2))                                               # (U, 2)
    p_a = 1.0 - z.softmax(dim=-1)[:, 1]
    lo = (z[:, 0].double() - z[:, 1].double())
    rows = ([index[t] for t in fwd], [index[t] for t in rev])
    p_a = torch.stack([p_a[rows[0]], p_a[rows[1]]], dim=1) if n else torch.empty(0, 2)
    lo = torch.stack([lo[rows[0]], lo[rows[1]]], dim=1) if n else torch.empty(0, 2, dtype=torch.float64)
    # P(first better) = mean of P_1("A") and P_2("B") = 1 - P_2("A"); written as 0.5 * (1 + difference) so
    # that equal probabilities give exactly 0.5 in floating point.
    p_first = 0.5 * (1.0 + (p_a[:, 0] - p_a[:, 1]))
    return Judgement(p_first=p_first, p_a=p_a, logodds=lo)
