"""The math of PPO for language models, as small pure functions: masked statistics, the per-token KL
reward, GAE, the clipped losses, explained variance and the KL controllers. rlcd/ppo.py runs the loop;
tests/test_ppo_core.py checks each function against a hand computation or a naive float64 loop.

Conventions (RLCD official code = facebookresearch/RLCD on AlpacaFarm's PPO trainer; N+ details =
Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO"; lm-human-preferences = Ziegler et
al. 2019). Responses are right-padded: row b holds its response tokens in columns [0, length_b) and
padding after, so every (B, T_r) tensor comes with a bool `mask` (B, T_r) that is True on real tokens.
Padding is masked everywhere: in whitening statistics, in GAE (a padded step has zero reward and zero
value, so it adds nothing and the step before it is terminal), and in every loss and diagnostic.

Sums divided by a token count: every loss and statistic is a mean over the real tokens of a batch. For
gradient accumulation the caller passes `n`, the token count of the whole minibatch; the micro-batch
results then add up to the minibatch mean, whatever the micro-batch size.

Global batch (torchrun, rlcd/distributed.py): each rank holds B of the global batch's rows. Statistics of
"the batch" (whitening, explained variance, the KL controller's measured KL) take `global_batch=True`
and then reduce their sums and counts over the ranks with one all_reduce per pass, so N ranks whiten
exactly as one process does on the concatenated batch, up to the order of the float additions. The
reduced statistics are constants for autograd (PPO computes them under no_grad). Without a process
group, global_batch=True runs the one-process code unchanged. Loss means take the caller's `n` instead.

Shapes: B responses, T_r response tokens (the longest response of the batch).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rlcd import distributed

KL_ESTIMATORS = ("k1", "k3")


# --- masked statistics -------------------------------------------------------------------------------------
def masked_sum(x: Tensor, mask: Tensor) -> Tensor:
    """sum of x over the mask's True entries (where() rather than a product: padding may hold inf/NaN)."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum()


def _global_sums(*xs: Tensor) -> list[Tensor]:
    """Scalars summed over the ranks in one all_reduce, each back in its own dtype (float64 on the wire:
    token counts stay exact integers, so the divisions promote as the local code's do)."""
    sums = distributed.all_reduce_sum(torch.stack([x.detach().double() for x in xs]))     # (len(xs),)
    return [(s if x.is_floating_point() else s.round()).to(x.dtype) for s, x in zip(sums.unbind(), xs)]


def _global_moments(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, biased variance, token count) of x over the mask of every rank: two passes, as the local
    code (a global mean first, then the global sum of squared deviations from it)."""
    total, n = _global_sums(masked_sum(x, mask), mask.sum())
    mean = total / n
    (sq,) = _global_sums(masked_sum((x - mean) ** 2, mask))
    return mean, sq / n, n


def masked_mean(x: Tensor, mask: Tensor, n: Tensor | float | None = None, global_batch: bool = False) -> Tensor:
    """Mean of x over the mask (a scalar); with n, the masked sum divided by n (gradient accumulation).
    global_batch: the mean over every rank's masked entries (not with n: a loss's denominator is the caller's)."""
    if global_batch and n is not None:
        raise ValueError("masked_mean: pass n (the caller's denominator) or global_batch, not both")
    if global_batch and distributed.active():
        total, count = _global_sums(masked_sum(x, mask), mask.sum())
        return total / count
    return masked_sum(x, mask) / (mask.sum() if n is None else n)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True, global_batch: bool = False) -> Tensor:
    """Variance of x over the mask, with Bessel's correction by default (as the N+ details / TRL);
    global_batch: over every rank's masked entries."""
    if global_batch and distributed.active():
        _, var, n = _global_moments(x, mask)
    else:
        mean = masked_mean(x, mask)
        n = mask.sum()
        var = masked_mean((x - mean) ** 2, mask)
    return var * n / (n - 1).clamp_min(1) if unbiased else var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  global_batch: bool = False) -> Tensor:
    """(x - mean) / std over the mask; shift_mean=False only scales (x - mean) / std + mean, as the
    official code whitens rewards. Padding comes out as 0. global_batch: mean and std of every rank's
    masked entries (two all_reduces), so each rank's rows come out as in a one-process whitening."""
    if global_batch and distributed.active():
        mean, var, n = _global_moments(x, mask)
        var = var * n / (n - 1).clamp_min(1)                     # unbiased, as masked_var
    else:
        mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, torch.zeros((), dtype=out.dtype, device=out.device))


def batch_mean(x: Tensor, global_batch: bool = False) -> Tensor:
    """Mean of every entry of x, e.g. the per-sequence KL (B,) that the KL controller measures;
    global_batch: over every rank's entries (one all_reduce)."""
    if global_batch and distributed.active():
        total, count = _global_sums(x.sum(), torch.tensor(x.numel(), device=x.device))
        return total / count
    return x.mean()


# --- the per-token KL reward ---------------------------------------------------------------------------------
def kl_per_token(logp: Tensor, ref_logp: Tensor, estimator: str = "k1", clamp: bool = False) -> Tensor:
    """Estimate of KL(pi || pi_ref) at each sampled token x ~ pi (Schulman, "Approximating KL divergence"):
        k1 = log pi(x) - log pi_ref(x)                     unbiased, can be negative
        k3 = (r - 1) - log r,  r = pi_ref(x) / pi(x)       unbiased, always >= 0, lower variance
    clamp=True clamps k1 at 0 as the official RLCD code does (`torch.clamp(logprobs - ref_logprobs,
    min=0.0)`), so a token the reference likes more than the policy is never a bonus."""
    log_ratio = logp - ref_logp                                   # (B, T_r) log pi / pi_ref
    if estimator == "k1":
        return log_ratio.clamp_min(0.0) if clamp else log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio                # (r - 1) - log r with log r = -log_ratio
    raise ValueError(f"KL estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def apply_missing_stop(score: Tensor, finished: Tensor, no_stop_score: float | None) -> Tensor:
    """The score (B,) of a response that ended without the stop token becomes `no_stop_score` (official
    code's penalty_reward_value = -1, the N+ details' -1); None keeps the preference model's score."""
    if no_stop_score is None:
        return score
    return torch.where(finished, score, torch.full_like(score, no_stop_score))


def shape_rewards(score: Tensor, kl: Tensor, mask: Tensor, beta: Tensor | float) -> Tensor:
    """Per-token rewards (B, T_r): r_t = -beta * KL_t on every response token, plus the sequence score
    (B,) on its last real token (Ziegler et al. 2019; official code `_shape_reward`). Indexing the last
    token by the mask, not by "tokens != pad", avoids the official code's off-by-one when pad == eos."""
    rewards = torch.where(mask, -beta * kl, torch.zeros((), dtype=kl.dtype, device=kl.device))   # (B, T_r)
    last = (mask.sum(1) - 1).clamp_min(0)                                                        # (B,)
    return rewards.scatter_add(1, last[:, None], score[:, None].to(rewards.dtype))               # (B, T_r)


# --- advantages ---------------------------------------------------------------------------------------------
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the response tokens (Schulman et al. 2016):
        delta_t = r_t + gamma V_{t+1} - V_t,   A_t = sum_{s >= t} (gamma lam)^(s - t) delta_s,   R_t = A_t + V_t
    with V and r zeroed on padding, so V_{T} = 0 after each row's last real token (the episode ends
    there) and padded steps contribute delta = 0. Written as one (T_r, T_r) matmul with the discount
    matrix Gamma[s, t] = (gamma lam)^(s - t) for s >= t instead of a reversed loop over t: the same
    sums, one kernel. Returns (advantages, returns), both (B, T_r), 0 on padding."""
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    v = torch.where(mask, values, zero)                                            # (B, T_r)
    r = torch.where(mask, rewards.to(values.dtype), zero)                          # (B, T_r)
    v_next = torch.nn.functional.pad(v[:, 1:], (0, 1))                            # (B, T_r) V_{t+1}, 0 past the end
    delta = r + gamma * v_next - v                                                 # (B, T_r)
    T = delta.shape[1]
    s = torch.arange(T, device=delta.device)
    dist = s[:, None] - s[None, :]                                                 # (T_r, T_r) s - t
    c = torch.tensor(gamma * lam, dtype=torch.float64, device=delta.device)
    # float64 powers, then cast: (gamma lam)^k for k up to T_r is exact enough in any dtype after that
    discount = torch.where(dist >= 0, c ** dist.clamp_min(0), 0.0).to(delta.dtype)  # (T_r, T_r) Gamma[s, t]
    adv = delta @ discount                                                         # (B, T_r) A_t = sum_s delta_s Gamma[s, t]
    adv = torch.where(mask, adv, zero)
    return adv, torch.where(mask, adv + v, zero)


# --- losses -------------------------------------------------------------------------------------------------
def policy_loss(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, clip: float,
                n: Tensor | float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017), a mean over the real tokens (or sum / n):
        L = E[max(-A rho, -A clip(rho, 1 - eps, 1 + eps))],   rho = exp(log pi - log pi_old)
    Returns (loss, clipfrac, approx_kl): clipfrac = fraction of tokens where the clipped term is the
    larger one (no gradient there); approx_kl = E[(log rho)^2] / 2, the official code's estimate of the
    KL between the old and the current policy."""
    log_ratio = logp - old_logp                                                    # (B, T_r)
    ratio = torch.exp(log_ratio)                                                   # (B, T_r) rho
    pg1 = -adv * ratio                                                             # (B, T_r)
    pg2 = -adv * ratio.clamp(1.0 - clip, 1.0 + clip)                               # (B, T_r)
    loss = masked_mean(torch.maximum(pg1, pg2), mask, n)
    with torch.no_grad():
        clipfrac = masked_mean((pg2 > pg1).to(logp.dtype), mask, n)
        approx_kl = masked_mean(0.5 * log_ratio ** 2, mask, n)
    return loss, clipfrac, approx_kl


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float,
               n: Tensor | float | None = None) -> tuple[Tensor, Tensor]:
    """Clipped value loss (official code / N+ details), a mean over the real tokens (or sum / n):
        L_V = E[max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)] / 2
    Returns (loss, clipfrac): the fraction of tokens where the clipped error is the larger one."""
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)              # (B, T_r)
    err1 = (values - returns) ** 2                                                 # (B, T_r)
    err2 = (v_clipped - returns) ** 2                                              # (B, T_r)
    loss = 0.5 * masked_mean(torch.maximum(err1, err2), mask, n)
    with torch.no_grad():
        clipfrac = masked_mean((err2 > err1).to(values.dtype), mask, n)
    return loss, clipfrac


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor, global_batch: bool = False) -> Tensor:
    """1 - Var[R - V] / Var[R] over the real tokens: 1 is a perfect value function, 0 no better than a
    constant, negative worse (cleanrl's diagnostic). global_batch: both variances over every rank's tokens."""
    var_r = masked_var(returns, mask, global_batch=global_batch)
    return 1.0 - masked_var(returns - values, mask, global_batch=global_batch) / var_r.clamp_min(1e-12)


# --- KL coefficient -------------------------------------------------------------------------------------------
@dataclass
class KLController:
    """beta, the KL coefficient. Fixed when target is None (RLCD: a fixed 0.002-0.004); otherwise the
    adaptive controller of Ziegler et al. 2019 (lm-human-preferences): after each batch of n rollouts
    whose mean sequence KL is kl,
        e = clip(kl / target - 1, -0.2, 0.2),   beta <- beta * (1 + e * n / horizon)
    so beta drifts up while the policy is further from the reference than `target` nats, down otherwise.
    Under torchrun every rank must update with the same numbers: kl the global batch's mean
    (batch_mean(..., global_batch=True)) and n the global batch size, so beta stays equal on all ranks."""
    value: float
    target: float | None = None
    horizon: int = 10000

    def update(self, kl: float, n: int) -> None:
        if self.target is None:
            return
        e = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + e * n / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = state["value"], state["target"], state["horizon"]
