"""PPO math (rlcd/ppo_core.py) against naive float64 loops and hand-computed values, with masks and
ragged lengths: padding must change nothing anywhere."""
import math

import pytest
import torch

from rlcd.ppo_core import (KLController, apply_missing_stop, batch_mean, explained_variance, gae, kl_per_token,
                           masked_mean, masked_var, masked_whiten, policy_loss, shape_rewards, value_loss)


def f64(*x):
    return torch.tensor(x, dtype=torch.float64)


def ragged(lengths, T):
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]        # (B, T) right-padded mask


# --- masked statistics ---------------------------------------------------------------------------------------
def test_masked_stats_ignore_padding_even_inf():
    x = torch.tensor([[1.0, 2.0, 3.0, float("inf")], [4.0, float("nan"), 0.0, 0.0]], dtype=torch.float64)
    m = ragged([3, 1], 4)
    real = f64(1.0, 2.0, 3.0, 4.0)
    assert masked_mean(x, m).item() == pytest.approx(2.5)
    assert masked_var(x, m).item() == pytest.approx(real.var(unbiased=True).item())
    assert masked_var(x, m, unbiased=False).item() == pytest.approx(real.var(unbiased=False).item())
    assert masked_mean(x, m, n=8).item() == pytest.approx(10 / 8)            # sum / n for accumulation


def test_masked_whiten_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, -7.0, -7.0, -7.0]], dtype=torch.float64)
    m = ragged([3, 1], 4)
    real = f64(1.0, 2.0, 3.0, 4.0)
    mean, std = real.mean(), real.std(unbiased=True)
    w = masked_whiten(x, m)
    torch.testing.assert_close(w[m], (real - mean) / std, rtol=1e-7, atol=1e-7)
    assert torch.all(w[~m] == 0)
    s = masked_whiten(x, m, shift_mean=False)                                  # scale only: the mean stays
    torch.testing.assert_close(s[m], (real - mean) / std + mean, rtol=1e-7, atol=1e-7)
    assert s[m].mean().item() == pytest.approx(mean.item())


def test_global_batch_without_a_process_group_is_the_local_code():
    # One process: global_batch=True must run exactly today's code (tests/test_distributed.py checks 2 ranks).
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)      # float32, (B, T_r)
    m = ragged([5, 2, 0], 5)
    assert masked_mean(x, m, global_batch=True).equal(masked_mean(x, m))
    assert masked_var(x, m, global_batch=True).equal(masked_var(x, m))
    assert masked_whiten(x, m, global_batch=True).equal(masked_whiten(x, m))
    assert masked_whiten(x, m, shift_mean=False, global_batch=True).equal(masked_whiten(x, m, shift_mean=False))
    assert explained_variance(v, x, m, global_batch=True).equal(explained_variance(v, x, m))
    assert batch_mean(x, global_batch=True).equal(x.mean())
    with pytest.raises(ValueError, match="not both"):
        masked_mean(x, m, n=4, global_batch=True)                # a loss's denominator is the caller's


# --- KL and reward shaping -----------------------------------------------------------------------------------
def test_kl_estimators_by_hand():
    logp, ref = f64(-1.0, -2.0, -0.5), f64(-1.5, -1.0, -0.5)
    k1 = kl_per_token(logp, ref, "k1")
    torch.testing.assert_close(k1, f64(0.5, -1.0, 0.0))
    torch.testing.assert_close(kl_per_token(logp, ref, "k1", clamp=True), f64(0.5, 0.0, 0.0))
    # k3 = (r - 1) - log r, r = p_ref / p
    r = torch.exp(ref - logp)
    torch.testing.assert_close(kl_per_token(logp, ref, "k3"), (r - 1) - torch.log(r))
    assert kl_per_token(logp, ref, "k3").min() >= 0
    with pytest.raises(ValueError):
        kl_per_token(logp, ref, "k2")


def test_k1_and_k3_are_unbiased_for_the_true_kl():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(6, dtype=torch.float64), 0)
    q = torch.softmax(torch.randn(6, dtype=torch.float64), 0)
    true_kl = (p * (p.log() - q.log())).sum()
    x = torch.multinomial(p, 400_000, replacement=True)
    for est in ("k1", "k3"):
        assert kl_per_token(p.log()[x], q.log()[x], est).mean().item() == pytest.approx(true_kl.item(), rel=0.03)


def test_shape_rewards_score_on_last_real_token():
    kl = f64(0.5, 1.0, 2.0, 4.0, 0.25, 3.0, 7.0, 7.0).view(2, 4)
    m = ragged([4, 2], 4)
    r = shape_rewards(f64(10.0, 20.0), kl, m, beta=0.1)
    expected = torch.tensor([[-0.05, -0.1, -0.2, -0.4 + 10.0], [-0.025, -0.3 + 20.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(r, expected)


def test_missing_stop_score():
    s = apply_missing_stop(torch.tensor([0.7, 2.0, -3.0]), torch.tensor([True, False, False]), -1.0)
    assert s.tolist() == [pytest.approx(0.7), -1.0, -1.0]
    assert apply_missing_stop(torch.tensor([0.7, 2.0]), torch.tensor([True, False]), None).tolist() == \
        [pytest.approx(0.7), 2.0]


# --- GAE ----------------------------------------------------------------------------------------------------
def naive_gae(rewards, values, lengths, gamma, lam):
    """Per row, only its real steps, the textbook reversed loop with V = 0 after the last one."""
    B, T = rewards.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        last = 0.0
        for t in reversed(range(lengths[b])):
            v_next = values[b, t + 1].item() if t + 1 < lengths[b] else 0.0
            delta = rewards[b, t].item() + gamma * v_next - values[b, t].item()
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv, adv + torch.where(ragged(lengths, T), values, 0.0)


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (1.0, 0.95), (0.9, 0.8), (0.99, 0.0)])
def test_gae_matches_a_naive_loop_with_ragged_lengths(gamma, lam):
    torch.manual_seed(0)
    lengths = [7, 1, 4, 5]
    rewards, values = torch.randn(4, 7, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64)
    m = ragged(lengths, 7)
    # padding holds garbage (a pad token's value, leftover rewards): it must not leak in
    rewards_p, values_p = rewards.masked_fill(~m, 123.0), values.masked_fill(~m, -55.0)
    adv, ret = gae(rewards_p, values_p, m, gamma, lam)
    ref_adv, ref_ret = naive_gae(rewards, values, lengths, gamma, lam)
    torch.testing.assert_close(adv, ref_adv, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret, torch.where(m, ref_ret, 0.0), rtol=1e-12, atol=1e-12)


def test_gae_gamma_lambda_one_is_reward_to_go_minus_value():
    r = f64(1.0, 2.0, 3.0)[None]
    v = f64(0.5, 0.25, 0.125)[None]
    adv, ret = gae(r, v, torch.ones(1, 3, dtype=torch.bool), 1.0, 1.0)
    torch.testing.assert_close(ret, f64(6.0, 5.0, 3.0)[None])
    torch.testing.assert_close(adv, f64(5.5, 4.75, 2.875)[None])


# --- losses ---------------------------------------------------------------------------------------------------
def test_policy_loss_by_hand():
    # ratios 1.5, 0.5, 1.1, 0.7 (last token padded); eps 0.2
    logp = torch.log(f64(1.5, 0.5, 1.1, 0.7))[None].requires_grad_()
    old = torch.zeros(1, 4, dtype=torch.float64)
    adv = f64(1.0, 1.0, -2.0, 5.0)[None]
    m = ragged([3], 4)
    loss, clipfrac, approx_kl = policy_loss(logp, old, adv, m, clip=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(-0.5, -0.8) = -0.5; token 2: max(2.2, 2.2) = 2.2
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.2) / 3)
    assert clipfrac.item() == pytest.approx(1 / 3)
    lr = torch.log(f64(1.5, 0.5, 1.1))
    assert approx_kl.item() == pytest.approx((0.5 * lr ** 2).mean().item())
    loss.backward()
    # no gradient through the clipped token 0 or the padded token 3; d(-A rho)/dlogp = -A rho
    torch.testing.assert_close(logp.grad, f64(0.0, -0.5 / 3, 2.2 / 3, 0.0)[None])
    # sum / n: two halves of a minibatch add up to its mean
    half = policy_loss(logp.detach(), old, adv, m, 0.2, n=6)[0]
    assert half.item() == pytest.approx(loss.item() / 2)


def test_value_loss_by_hand():
    v = f64(1.0, 0.0, 3.0, 9.0)[None].requires_grad_()
    old = f64(0.5, 0.5, 3.0, 0.0)[None]
    ret = f64(2.0, 0.0, 1.0, 0.0)[None]
    m = ragged([3], 4)
    loss, clipfrac = value_loss(v, old, ret, m, clip=0.2)
    # token 0: v clipped to 0.7: max((1-2)^2, (0.7-2)^2) = 1.69 (clipped); token 1: clipped 0.3: max(0, 0.09) = 0.09
    # (clipped); token 2: max(4, 4) = 4
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.09 + 4.0) / 3)
    assert clipfrac.item() == pytest.approx(2 / 3)
    loss.backward()
    # clipped tokens have no gradient; token 2: d/dv 0.5 (v - R)^2 / 3 = (3 - 1) / 3
    torch.testing.assert_close(v.grad, f64(0.0, 0.0, 2.0 / 3, 0.0)[None])


def test_explained_variance():
    ret = f64(1.0, 2.0, 3.0, 4.0, 100.0).view(1, 5)
    m = ragged([4], 5)
    assert explained_variance(ret, ret, m).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(ret, 2.5), ret, m).item() == pytest.approx(0.0)
    assert explained_variance(-ret, ret, m).item() < 0


# --- KL controller ---------------------------------------------------------------------------------------------
def test_kl_controllers():
    fixed = KLController(0.004)
    fixed.update(kl=100.0, n=512)
    assert fixed.value == 0.004
    ada = KLController(0.1, target=6.0, horizon=10000)
    ada.update(kl=12.0, n=512)                                    # error clipped to +0.2
    assert ada.value == pytest.approx(0.1 * (1 + 0.2 * 512 / 10000))
    ada.update(kl=5.4, n=100)                                     # error -0.1
    assert ada.value == pytest.approx(0.1 * (1 + 0.2 * 512 / 10000) * (1 - 0.1 * 100 / 10000))
    other = KLController(1.0)
    other.load_state_dict(ada.state_dict())
    assert other == ada
    assert not math.isnan(ada.value)
