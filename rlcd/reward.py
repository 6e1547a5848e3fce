"""The preference model as a scorer: the reward model, its input, scoring, loading. Trained by rlcd/pm.py
(`train.py pm`); read by PPO (the reward, and the value network's initialisation), `eval.py pm-agreement`
and `eval.py compare --pm`.

A LLaMA trunk with a scalar head reads the final hidden state at the last real token of
`prompt + response + end marker` (RLCD, arXiv 2307.12950, Sec. 4 / official code: the reward is read
at the last token of `prompt + ' ' + output + '\\n\\nHuman:'`). The end marker is "\\n\\nHuman:" for the
paper's plain dialogue format and the tokenizer's turn-end token (<|im_end|> for the default model)
for chat prompts: exactly the stop token the policy emits, so PPO's token-level scoring of
prompt + response + stop token sees the same input as training did.

API
    RewardModel(trunk, length_head=False)    .forward(tokens, last, start=None, both=False) -> (N,) rewards
                                             (both: and the length head's outputs, train.py pm --length-head)
                                             .values(tokens, start=None) -> (N, T), for PPO's value net
    fp32_head(h, head) -> (...)              a scalar head in fp32 under autocast (also PPO's value head)
    end_marker(tok, fmt), encode_parts(tok, prompt, response, fmt) -> (ids, prompt length)
    encode_input(tok, prompt, response, fmt, max_length) -> list[int]
    score_ids(pm, seqs, pad_id, batch_size=16) -> (N,)                     token-id lists, any order
    score_texts(pm, tok, prompts, responses, fmt="chat", batch_size=16, ...) -> (N,) float32 rewards
    score_tokens(pm, tokens, start, last_index, normalize=False) -> (N,)    token level, for PPO
    normalized(pm, r) -> (r - mean) / std    with the base-policy statistics stored with the checkpoint
    load_reward_model(run_dir, device="cpu", dtype=float32) -> (RewardModel, Tokenizer, meta)
    TextReward(score, policy_tokenizer, conversations, name)    PPO's reward from text: a PM of another
        family (pm_text_score) or a rule (rule_score(load_rule("MODULE:FUNCTION")))

Shapes: N sequences, T tokens, D model width.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from models import CheckpointError, Tokenizer, Transformer, load_model
from models.tokenizer import TURN_END_TOKENS
from rlcd import checkpoints, runs

PLAIN_END = "\n\nHuman:"      # the paper's end marker: the start of the next human turn
HEAD_FILE = "head"            # head.safetensors in the checkpoint: {"weight": (1, D), "bias": (1,)}
LENGTH_HEAD_FILE = "length_head"    # train.py pm --length-head: the second head, kept for resuming; no scorer reads it


# --- the model -------------------------------------------------------------------------------------------
def fp32_head(h: Tensor, head: nn.Linear) -> Tensor:
    """A scalar linear head (the reward head here, PPO's shared value head) on hidden states h (..., D),
    in fp32 even under bf16 autocast: one D-vector dot product per row is free, and rewards and values
    are compared by differences, where bf16's 3 significant digits would show. Returns (...) fp32."""
    with torch.autocast(h.device.type, enabled=False):
        return F.linear(h.float(), head.weight, head.bias).squeeze(-1)


class RewardModel(nn.Module):
    """A Transformer trunk and a scalar linear head on its final (normed) hidden states. With
    `length_head`, a second such head that training (train.py pm --length-head, ODIN) makes carry the
    response's length; the reward is `head` alone everywhere else."""

    def __init__(self, trunk: Transformer, length_head: bool = False):
        super().__init__()
        self.trunk = trunk
        D = trunk.args.dim
        self.head = self._new_head(D, trunk.device)
        self.length_head = self._new_head(D, trunk.device) if length_head else None
        # Reward mean / std on base-policy samples (set from run.json by load_reward_model; PPO divides by it).
        self.norm_mean: float | None = None
        self.norm_std: float | None = None

    @staticmethod
    def _new_head(D: int, device) -> nn.Linear:
        # N(0, 1/sqrt(D + 1)) weights and a zero bias, as lm-human-preferences (Ziegler et al. 2019)
        # initialises its reward head, so initial rewards have O(1) spread and no offset.
        head = nn.Linear(D, 1, device=device, dtype=torch.float32)
        nn.init.normal_(head.weight, std=1 / math.sqrt(D + 1))
        nn.init.zeros_(head.bias)
        return head

    def forward(self, tokens: Tensor, last: Tensor, start: Tensor | None = None,
                both: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """tokens (N, T), last (N,) column of each row's last real token, start (N,) first real column
        for left padding (None for right padding). Returns rewards (N,) in fp32; with `both`, the
        rewards and the length head's outputs (N,)."""
        h = self.trunk(tokens, start=start, return_hidden=True)                 # (N, T, D)
        h_last = h[torch.arange(h.shape[0], device=h.device), last]            # (N, D)
        r = fp32_head(h_last, self.head)                                               # (N,)
        return (r, fp32_head(h_last, self.length_head)) if both else r

    def values(self, tokens: Tensor, start: Tensor | None = None) -> Tensor:
        """The head at every position: (N, T) fp32. PPO's value network (initialised from the preference
        model, as in the official code) reads V(s_t) here; padded positions hold garbage to be masked."""
        return fp32_head(self.trunk(tokens, start=start, return_hidden=True), self.head)   # (N, T)


# --- inputs ----------------------------------------------------------------------------------------------
def end_marker(tok: Tokenizer, fmt: str) -> str:
    """What closes a response in the preference model's input: the turn-end token the policy stops on
    (chat), or the next human turn "\\n\\nHuman:" (plain, as in the paper)."""
    if fmt == "plain":
        return PLAIN_END
    for t in TURN_END_TOKENS:
        if tok.has_chat_template and t in tok.chat_template and tok.token_id(t) is not None:
            return t
    if tok.eos_token:
        return tok.eos_token
    raise ValueError("the tokenizer has no turn-end or EOS token to end a chat response with; use format 'plain'")


def encode_parts(tok: Tokenizer, prompt: str, response: str, fmt: str) -> tuple[list[int], int]:
    """(token ids of prompt + response + end marker, number of prompt ids): the input of the preference
    model and of SFT. The three parts are encoded separately, the way the policy sees them (prompt ids,
    then generated ids, then its stop token), so no BPE merge crosses the prompt/response boundary."""
    # The paper joins plain prompts and outputs with a space ("Assistant:" + " " + output).
    sep = " " if fmt == "plain" and prompt and not prompt[-1].isspace() else ""
    p = tok.encode(prompt)
    return p + tok.encode(sep + response, add_bos=False) + tok.encode(end_marker(tok, fmt), add_bos=False), len(p)


def encode_input(tok: Tokenizer, prompt: str, response: str, fmt: str, max_length: int | None = None,
                 ) -> list[int]:
    """The preference model's input, `encode_parts` ids. Over max_length, the start of the prompt is cut:
    the reward is read at the end and both sides of a pair share the prompt."""
    ids, _ = encode_parts(tok, prompt, response, fmt)
    return ids[-max_length:] if max_length and len(ids) > max_length else ids


# --- scoring ---------------------------------------------------------------------------------------------
@torch.no_grad()
def score_ids(pm: RewardModel, seqs: list[list[int]], pad_id: int, batch_size: int = 16) -> Tensor:
    """Rewards (N,) fp32 on CPU for token-id sequences, read at each one's last token. Sequences are
    batched by length (little padding) and right-padded; the result is in the input order."""
    device = pm.head.weight.device
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out = torch.empty(len(seqs), dtype=torch.float32)
    for lo in range(0, len(order), batch_size):
        idx = order[lo:lo + batch_size]
        tokens, lengths = runs.right_pad([seqs[i] for i in idx], pad_id, device)   # (n, T), (n,)
        out[idx] = pm(tokens, lengths - 1).float().cpu()
    return out


def score_texts(pm: RewardModel, tok: Tokenizer, prompts: list[str], responses: list[str],
                fmt: str | list[str] = "chat", batch_size: int = 16, max_length: int | None = None,
                normalize: bool = False) -> Tensor:
    """Rewards (N,) fp32 on CPU for (prompt, response) texts; `fmt` for all rows or one per row.
    normalize: (r - mean) / std with the base-policy statistics stored with the checkpoint."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    fmts = [fmt] * len(prompts) if isinstance(fmt, str) else fmt
    max_length = max_length or pm.trunk.args.max_seq_len
    seqs = [encode_input(tok, p, r, f, max_length) for p, r, f in zip(prompts, responses, fmts)]
    r = score_ids(pm, seqs, tok.pad_id, batch_size)
    return normalized(pm, r) if normalize else r


@torch.no_grad()
def score_tokens(pm: RewardModel, tokens: Tensor, start: Tensor | None, last_index: Tensor,
                 normalize: bool = False) -> Tensor:
    """Rewards (N,) fp32 for PPO's rollouts: tokens (N, T) left-padded prompt + response + stop token,
    start (N,) first real column, last_index (N,) column of the stop token (the last real token)."""
    r = pm(tokens, last_index, start=start)
    return normalized(pm, r) if normalize else r


def normalized(pm: RewardModel, r: Tensor) -> Tensor:
    """(r - mean) / std with the base-policy statistics stored with the checkpoint (PPO's reward scale)."""
    if pm.norm_mean is None or pm.norm_std is None:
        raise ValueError("this preference model has no normalisation statistics (trained with --norm-samples 0?)")
    return (r - pm.norm_mean) / max(pm.norm_std, 1e-8)


# --- loading ---------------------------------------------------------------------------------------------
def load_reward_model(run_dir: str | Path, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32) -> tuple[RewardModel, Tokenizer, dict]:
    """Load a preference model written by `train.py pm`: the run directory (OUT) or its reward/
    checkpoint. Returns (model in eval mode, tokenizer, run.json). Another stage's run is an error."""
    from models.checkpoint import read_safetensors

    ckpt, meta = checkpoints.find_checkpoint(run_dir, "pm")
    head_file = ckpt / f"{HEAD_FILE}.safetensors"
    if not head_file.is_file():
        raise CheckpointError(f"{ckpt}: no {head_file.name} (an incomplete preference-model checkpoint)")
    head = read_safetensors(head_file)                  # read first: a corrupt head fails before the trunk loads
    trunk, tok = load_model(ckpt, device=device, dtype=dtype)
    pm = RewardModel(trunk)
    try:
        pm.head.load_state_dict({k: v.float() for k, v in head.items()})
    except RuntimeError as e:                           # missing, unexpected or misshaped tensors
        raise CheckpointError(f"{head_file}: does not fit the trunk ({str(e).splitlines()[-1].strip()})") from None
    stats = meta.get("reward_norm") or {}
    pm.norm_mean, pm.norm_std = stats.get("mean"), stats.get("std")
    return pm.eval(), tok, meta


# --- rewards read from text -----------------------------------------------------------------------------
class TextReward:
    """PPO's reward read from text rather than from the policy's token ids: each rollout's response is
    decoded with the policy's tokenizer (the stop token left out) and handed, with its prompt's
    conversation, to `score(conversations, responses) -> (B,) rewards`. It serves a preference model of
    another family (`pm_text_score`: the prompt re-rendered in that model's own template and the
    response re-encoded by its tokenizer) and a rule (`rule_score`: a Python function of the request and
    the response). A preference model that shares the policy's tokenizer is scored from the token ids
    directly instead (score_tokens), which decodes nothing."""

    def __init__(self, score, tokenizer: Tokenizer, conversations: list[list[dict]], name: str):
        self.score, self.tokenizer, self.conversations, self.name = score, tokenizer, conversations, name

    def __call__(self, batch: list[int], tokens: Tensor, lengths: Tensor, finished: Tensor) -> Tensor:
        """batch (B,) prompt indices, tokens (B, T_r) responses, lengths (B,) including the stop token
        where finished (B,) -> (B,) fp32 rewards on CPU."""
        n, rows = (lengths - finished.long()).tolist(), tokens.cpu().tolist()           # one copy to the host
        texts = [self.tokenizer.decode(row[:k]) for row, k in zip(rows, n)]
        r = self.score([self.conversations[i] for i in batch], texts)
        return torch.as_tensor(r, dtype=torch.float32).reshape(len(texts))


def pm_text_score(pm: RewardModel, tok: Tokenizer, normalize: bool, batch_size: int = 16):
    """score(conversations, responses) of a preference model in its own chat template (TextReward)."""
    from rlcd.tasks import format_prompt

    def score(conversations: list[list[dict]], responses: list[str]) -> Tensor:
        prompts = [format_prompt(c, "chat", tok) for c in conversations]
        return score_texts(pm, tok, prompts, responses, "chat", batch_size, normalize=normalize)
    return score


def load_rule(spec: str):
    """The function of --reward MODULE:FUNCTION or FILE.py:FUNCTION; ValueError naming the flag."""
    import importlib
    import importlib.util

    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise ValueError(f"--reward {spec!r}: expected MODULE:FUNCTION or FILE.py:FUNCTION")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise ValueError(f"--reward {spec!r}: no file {where}")
            loader = importlib.util.spec_from_file_location(f"rlcd_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ValueError:
        raise
    except Exception as e:                        # the user's module failed to import: say where
        raise ValueError(f"--reward {spec!r}: importing {where} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"--reward {spec!r}: {where} has no function {name!r}")
    return fn


def rule_score(fn):
    """score(conversations, responses) of a rule `fn(request, response) -> float`, where request is the
    conversation's last user message (TextReward)."""
    def score(conversations: list[list[dict]], responses: list[str]) -> Tensor:
        out = []
        for c, r in zip(conversations, responses):
            v = float(fn(c[-1]["content"], r))
            if not math.isfinite(v):
                raise FloatingPointError(f"--reward returned {v} for the request {c[-1]['content'][:80]!r}")
            out.append(v)
        return torch.tensor(out, dtype=torch.float32)
    return score
