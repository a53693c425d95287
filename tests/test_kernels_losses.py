"""Tests for the small loss kernels: masked_mean, masked_whiten, kl_penalty, bradley_terry_loss,
dpo_loss, ppo_policy_loss and ppo_value_loss.

Each is compared with a plain reference written out from its formula, values and gradients, on
seeded float64 inputs; then the properties a learner should be able to rely on: DPO's loss is
ln 2 at the start, the first PPO step is the plain policy gradient, masked-out positions never leak.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from kernels import (
    bradley_terry_loss,
    dpo_loss,
    kl_penalty,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)

ATOL = 1e-12
RTOL = 1e-10


def randn(*shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale


def make_mask(batch, length, seed, empty_row=None):
    """(B, T) 0/1 float mask: each row keeps a random prefix of its tokens; empty_row keeps none."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).double()  # (B, T)
    if empty_row is not None:
        mask[empty_row] = 0
    return mask


def leaf(x):
    return x.detach().clone().requires_grad_(True)


# ---------------------------------------------------------------- masked_mean

@pytest.mark.parametrize("dim", [None, 0, 1])
def test_masked_mean_matches_reference_values_and_gradient(dim):
    x = randn(4, 9, seed=0)
    mask = make_mask(4, 9, seed=1)
    mask[0, :] = 1  # every column has a valid entry (every row already has one)

    actual_x = leaf(x)
    actual = masked_mean(actual_x, mask, dim=dim)
    expected_x = leaf(x)
    if dim is None:
        expected = (expected_x * mask).sum() / mask.sum()
    else:
        expected = (expected_x * mask).sum(dim) / mask.sum(dim)

    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)
    upstream = randn(*expected.shape, seed=2)
    (actual_grad,) = torch.autograd.grad((upstream * actual).sum(), actual_x)
    (expected_grad,) = torch.autograd.grad((upstream * expected).sum(), expected_x)
    torch.testing.assert_close(actual_grad, expected_grad, atol=ATOL, rtol=RTOL)


def test_masked_mean_accepts_bool_mask():
    x = randn(4, 9, seed=3)
    mask = make_mask(4, 9, seed=4)
    torch.testing.assert_close(masked_mean(x, mask.bool()), masked_mean(x, mask), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(
        masked_mean(x, mask.bool(), dim=1), masked_mean(x, mask, dim=1), atol=ATOL, rtol=RTOL)


def test_masked_mean_of_empty_row_is_zero_not_nan():
    x = randn(4, 9, seed=5)
    mask = make_mask(4, 9, seed=6, empty_row=2)
    row_means = masked_mean(x, mask, dim=1)
    assert torch.isfinite(row_means).all()
    assert row_means[2] == 0
    expected_other_rows = (x * mask).sum(1) / mask.sum(1).clamp(min=1)
    torch.testing.assert_close(row_means, expected_other_rows, atol=ATOL, rtol=RTOL)


def test_masked_mean_of_fully_empty_mask_is_zero_not_nan():
    x = randn(4, 9, seed=7)
    assert masked_mean(x, torch.zeros(4, 9, dtype=torch.float64)) == 0


def test_masked_mean_ignores_values_at_masked_out_positions():
    x = randn(4, 9, seed=8)
    mask = make_mask(4, 9, seed=9)
    x_with_junk = torch.where(mask.bool(), x, torch.full_like(x, 1e6))
    for dim in [None, 1]:
        torch.testing.assert_close(
            masked_mean(x_with_junk, mask, dim=dim), masked_mean(x, mask, dim=dim), atol=ATOL, rtol=RTOL)


def test_masked_mean_ignores_inf_and_nan_at_masked_out_positions():
    # Padding can hold -inf log-probs or 0/0 values; x * mask would turn them into NaN.
    x = randn(4, 9, seed=8)
    mask = make_mask(4, 9, seed=9)
    outside = torch.nonzero(mask == 0)
    assert len(outside) >= 3
    x_with_junk = x.clone()
    for (row, col), junk in zip(outside.tolist(), [float("nan"), float("inf"), -float("inf")] * 12):
        x_with_junk[row, col] = junk
    for dim in [None, 1]:
        torch.testing.assert_close(
            masked_mean(x_with_junk, mask, dim=dim), masked_mean(x, mask, dim=dim), atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------- masked_whiten

def test_masked_whiten_gives_zero_mean_unit_std_over_masked_entries():
    x = randn(16, 200, seed=10, scale=3.0) + 5.0
    mask = make_mask(16, 200, seed=11)
    assert mask.sum() > 1000
    whitened = masked_whiten(x, mask)
    valid = whitened[mask.bool()]
    assert abs(valid.mean().item()) < 1e-10
    assert abs(valid.std(correction=0).item() - 1.0) < 0.01


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_reference_with_biased_or_unbiased_variance(shift_mean):
    # The spec leaves the variance estimator open; the result must be one of the two exactly.
    x = randn(5, 12, seed=12, scale=2.0) + 1.0
    mask = make_mask(5, 12, seed=13)
    valid = x[mask.bool()]
    mean = valid.mean()
    whitened = masked_whiten(x, mask, shift_mean=shift_mean)[mask.bool()]
    candidates = []
    for correction in [0, 1]:
        expected = (valid - mean) / torch.sqrt(valid.var(correction=correction) + 1e-8)
        candidates.append(expected if shift_mean else expected + mean)
    assert any(torch.allclose(whitened, c, atol=1e-10, rtol=1e-10) for c in candidates)


def test_masked_whiten_without_shift_keeps_original_masked_mean():
    x = randn(6, 30, seed=14, scale=2.0) + 4.0
    mask = make_mask(6, 30, seed=15)
    whitened = masked_whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(
        whitened[mask.bool()].mean(), x[mask.bool()].mean(), atol=1e-10, rtol=1e-10)


def test_masked_whiten_ignores_values_at_masked_out_positions():
    x = randn(6, 30, seed=16)
    mask = make_mask(6, 30, seed=17)
    x_with_junk = torch.where(mask.bool(), x, torch.full_like(x, 1e3))
    torch.testing.assert_close(
        masked_whiten(x_with_junk, mask)[mask.bool()], masked_whiten(x, mask)[mask.bool()],
        atol=1e-10, rtol=1e-10)


# ---------------------------------------------------------------- kl_penalty

def reference_kl_penalty(logp, ref_logp, kind):
    d = logp - ref_logp
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d ** 2
    return torch.exp(-d) + d - 1


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_penalty_matches_reference_values_and_gradients(kind):
    logp = -randn(3, 7, seed=18).abs()
    ref_logp = -randn(3, 7, seed=19).abs()
    upstream = randn(3, 7, seed=20)
    actual_inputs = (leaf(logp), leaf(ref_logp))
    expected_inputs = (leaf(logp), leaf(ref_logp))
    actual = kl_penalty(*actual_inputs, kind=kind)
    expected = reference_kl_penalty(*expected_inputs, kind)
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)
    actual_grads = torch.autograd.grad((upstream * actual).sum(), actual_inputs)
    expected_grads = torch.autograd.grad((upstream * expected).sum(), expected_inputs)
    for a, e in zip(actual_grads, expected_grads):
        torch.testing.assert_close(a, e, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_penalty_is_zero_when_policy_equals_reference(kind):
    logp = -randn(3, 7, seed=21).abs()
    assert torch.all(kl_penalty(logp, logp.clone(), kind=kind) == 0)


def test_kl_penalty_k3_is_never_negative():
    d = torch.linspace(-8, 8, 1001, dtype=torch.float64)
    ref_logp = -randn(1001, seed=22).abs()
    assert torch.all(kl_penalty(ref_logp + d, ref_logp, kind="k3") >= 0)


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_kl_penalty_monte_carlo_mean_approximates_exact_kl(kind):
    # Tokens sampled from pi: E_pi[k1] = E_pi[k3] = KL(pi || ref) exactly, so the sample mean must sit
    # within a few standard errors of the exact KL (5 standard errors: a 1-in-a-million miss).
    g = torch.Generator().manual_seed(23)
    log_pi = torch.log_softmax(torch.randn(12, generator=g, dtype=torch.float64), -1)  # (V,)
    log_ref = torch.log_softmax(torch.randn(12, generator=g, dtype=torch.float64), -1)  # (V,)
    exact_kl = (log_pi.exp() * (log_pi - log_ref)).sum()

    n_samples = 200_000
    tokens = torch.multinomial(log_pi.exp(), n_samples, replacement=True, generator=g)  # (n,)
    estimates = kl_penalty(log_pi[tokens], log_ref[tokens], kind=kind)  # (n,)
    standard_error = estimates.std() / math.sqrt(n_samples)

    assert 5 * standard_error < 0.05 * exact_kl  # the check is sharp enough to mean something
    assert abs(estimates.mean() - exact_kl) < 5 * standard_error


# ---------------------------------------------------------------- bradley_terry_loss

@pytest.mark.parametrize("margin", [0.0, 0.5])
def test_bradley_terry_loss_matches_reference_values_and_gradients(margin):
    r_chosen, r_rejected = randn(16, seed=24), randn(16, seed=25)
    actual_inputs = (leaf(r_chosen), leaf(r_rejected))
    expected_inputs = (leaf(r_chosen), leaf(r_rejected))

    loss, accuracy = bradley_terry_loss(*actual_inputs, margin=margin)
    expected_loss = -F.logsigmoid(expected_inputs[0] - expected_inputs[1] - margin).mean()
    expected_accuracy = (r_chosen > r_rejected).double().mean()

    torch.testing.assert_close(loss, expected_loss, atol=ATOL, rtol=RTOL)
    assert float(accuracy) == pytest.approx(float(expected_accuracy), abs=1e-12)
    actual_grads = torch.autograd.grad(loss, actual_inputs)
    expected_grads = torch.autograd.grad(expected_loss, expected_inputs)
    for a, e in zip(actual_grads, expected_grads):
        torch.testing.assert_close(a, e, atol=ATOL, rtol=RTOL)


def test_bradley_terry_loss_is_ln2_for_equal_rewards():
    rewards = randn(8, seed=26)
    loss, accuracy = bradley_terry_loss(rewards, rewards.clone())
    assert loss.item() == pytest.approx(math.log(2), abs=1e-12)
    assert float(accuracy) == 0.0  # a tie is not a win


def test_bradley_terry_accuracy_counts_only_strict_wins():
    r_chosen = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    r_rejected = torch.tensor([0.0, 2.0, 5.0, 1.0], dtype=torch.float64)
    _, accuracy = bradley_terry_loss(r_chosen, r_rejected)
    assert float(accuracy) == 0.5


# ---------------------------------------------------------------- dpo_loss

def reference_dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta, loss_type, label_smoothing):
    h = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)  # (B,)
    if loss_type == "sigmoid":
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * h)
                  - label_smoothing * F.logsigmoid(-beta * h))
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * h)
    return losses.mean(), beta * (pi_chosen - ref_chosen), beta * (pi_rejected - ref_rejected)


def dpo_inputs(seed):
    """Sequence log-probs (B,) for policy and reference, chosen and rejected."""
    return tuple(-randn(12, seed=seed + i, scale=5.0).abs() for i in range(4))


@pytest.mark.parametrize("loss_type,label_smoothing", [
    ("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0),
])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_matches_reference_values_and_gradients(loss_type, label_smoothing, beta):
    pi_chosen, pi_rejected, ref_chosen, ref_rejected = dpo_inputs(seed=30)
    if loss_type == "hinge":  # keep some pairs on each side of the hinge (beta * h = 1)
        pi_chosen = pi_chosen + torch.linspace(-2, 2, 12, dtype=torch.float64) / beta
    actual_inputs = (leaf(pi_chosen), leaf(pi_rejected))
    expected_inputs = (leaf(pi_chosen), leaf(pi_rejected))

    actual = dpo_loss(*actual_inputs, ref_chosen, ref_rejected,
                      beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    expected = reference_dpo_loss(*expected_inputs, ref_chosen, ref_rejected,
                                  beta, loss_type, label_smoothing)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, atol=ATOL, rtol=RTOL)
    actual_grads = torch.autograd.grad(actual[0], actual_inputs)
    expected_grads = torch.autograd.grad(expected[0], expected_inputs)
    for a, e in zip(actual_grads, expected_grads):
        torch.testing.assert_close(a, e, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_dpo_loss_is_ln2_when_policy_equals_reference(label_smoothing):
    pi_chosen, pi_rejected, _, _ = dpo_inputs(seed=40)
    loss, chosen_rewards, rejected_rewards = dpo_loss(
        pi_chosen, pi_rejected, pi_chosen.clone(), pi_rejected.clone(),
        beta=0.1, label_smoothing=label_smoothing)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-12)
    assert torch.all(chosen_rewards == 0) and torch.all(rejected_rewards == 0)


def test_dpo_loss_gradient_raises_chosen_and_lowers_rejected():
    pi_chosen, pi_rejected, ref_chosen, ref_rejected = dpo_inputs(seed=50)
    pi_chosen, pi_rejected = leaf(pi_chosen), leaf(pi_rejected)
    loss, _, _ = dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta=0.1)
    loss.backward()
    assert torch.all(pi_chosen.grad < 0)  # descent raises the chosen log-prob
    assert torch.all(pi_rejected.grad > 0)  # and lowers the rejected one


# ---------------------------------------------------------------- ppo_policy_loss

def reference_ppo_policy_loss(logp, old_logp, advantages, mask, clip_low, clip_high, loss_agg):
    clip_high = clip_low if clip_high is None else clip_high
    ratio = torch.exp(logp - old_logp)  # (B, T)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * advantages
    per_token = -torch.minimum(unclipped, clipped)  # (B, T)
    mask = mask.double()
    if loss_agg == "token_mean":
        loss = (per_token * mask).sum() / mask.sum()
    elif loss_agg == "seq_mean":
        lengths = mask.sum(1)
        non_empty = lengths > 0
        seq_means = (per_token * mask).sum(1)[non_empty] / lengths[non_empty]
        loss = seq_means.mean()
    else:
        loss = (per_token * mask).sum() / mask.numel()
    clipfrac = ((clipped < unclipped).double() * mask).sum() / mask.sum()
    return loss, clipfrac


def ppo_inputs(seed, batch=5, length=8):
    """(B, T) logp, old_logp, advantages and mask; ratios spread well past a 0.2 clip; row 3 empty."""
    old_logp = -randn(batch, length, seed=seed).abs()
    logp = old_logp + randn(batch, length, seed=seed + 1, scale=0.3)
    advantages = randn(batch, length, seed=seed + 2)
    mask = make_mask(batch, length, seed=seed + 3, empty_row=3)
    return logp, old_logp, advantages, mask


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean", "seq_sum_norm"])
@pytest.mark.parametrize("clip_high", [None, 0.28])
def test_ppo_policy_loss_matches_reference_values_and_gradient(loss_agg, clip_high):
    logp, old_logp, advantages, mask = ppo_inputs(seed=60)
    actual_logp, expected_logp = leaf(logp), leaf(logp)

    loss, stats = ppo_policy_loss(actual_logp, old_logp, advantages, mask,
                                  clip_low=0.2, clip_high=clip_high, loss_agg=loss_agg)
    expected_loss, expected_clipfrac = reference_ppo_policy_loss(
        expected_logp, old_logp, advantages, mask, 0.2, clip_high, loss_agg)

    torch.testing.assert_close(loss, expected_loss, atol=ATOL, rtol=RTOL)
    assert 0 < float(expected_clipfrac) < 1
    assert float(stats["clipfrac"]) == pytest.approx(float(expected_clipfrac), abs=1e-12)
    (actual_grad,) = torch.autograd.grad(loss, actual_logp)
    (expected_grad,) = torch.autograd.grad(expected_loss, expected_logp)
    torch.testing.assert_close(actual_grad, expected_grad, atol=ATOL, rtol=RTOL)


def test_ppo_policy_loss_accepts_bool_mask():
    logp, old_logp, advantages, mask = ppo_inputs(seed=70)
    for loss_agg in ["token_mean", "seq_mean", "seq_sum_norm"]:
        float_loss, float_stats = ppo_policy_loss(logp, old_logp, advantages, mask, loss_agg=loss_agg)
        bool_loss, bool_stats = ppo_policy_loss(logp, old_logp, advantages, mask.bool(), loss_agg=loss_agg)
        torch.testing.assert_close(bool_loss, float_loss, atol=ATOL, rtol=RTOL)
        assert float(bool_stats["clipfrac"]) == pytest.approx(float(float_stats["clipfrac"]), abs=1e-12)


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean", "seq_sum_norm"])
def test_ppo_policy_loss_first_step_is_plain_policy_gradient(loss_agg):
    _, old_logp, advantages, mask = ppo_inputs(seed=80)
    logp = leaf(old_logp)
    loss, stats = ppo_policy_loss(logp, old_logp.clone(), advantages, mask, loss_agg=loss_agg)
    loss.backward()

    batch, length = mask.shape
    lengths = mask.sum(1, keepdim=True)  # (B, 1)
    if loss_agg == "token_mean":
        normaliser = mask.sum()
    elif loss_agg == "seq_mean":
        normaliser = (lengths > 0).sum() * lengths.clamp(min=1)  # (B, 1): sequences x own length
    else:
        normaliser = torch.tensor(float(batch * length), dtype=torch.float64)
    expected_grad = -advantages / normaliser * mask  # (B, T)

    torch.testing.assert_close(logp.grad, expected_grad, atol=ATOL, rtol=RTOL)
    # At ratio 1 the per-token loss is -A, so the loss is the sum of the expected gradient.
    torch.testing.assert_close(loss, expected_grad.sum(), atol=ATOL, rtol=RTOL)
    assert float(stats["clipfrac"]) == 0
    assert float(stats["approx_kl"]) == 0


def test_ppo_policy_loss_asymmetric_clip_uses_clip_high_for_positive_advantages():
    # One sequence, four tokens; clip_low = 0.2, clip_high = 0.28.
    ratio = torch.tensor([[1.25, 1.35, 0.75, 0.85]], dtype=torch.float64)
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0]], dtype=torch.float64)
    old_logp = torch.full((1, 4), -1.0, dtype=torch.float64)
    logp = leaf(old_logp + torch.log(ratio))
    mask = torch.ones(1, 4, dtype=torch.float64)

    loss, stats = ppo_policy_loss(logp, old_logp, advantages, mask, clip_low=0.2, clip_high=0.28)
    loss.backward()

    # 1.25 < 1.28: unclipped, -1.25. 1.35 > 1.28: clipped to -1.28 (a symmetric 0.2 clip would give -1.2).
    # 0.75 < 0.8 with A < 0: clipped to +0.8. 0.85 within the clip: +0.85.
    expected_per_token = torch.tensor([-1.25, -1.28, 0.8, 0.85], dtype=torch.float64)
    torch.testing.assert_close(loss, expected_per_token.mean(), atol=ATOL, rtol=RTOL)
    assert float(stats["clipfrac"]) == pytest.approx(0.5, abs=1e-12)
    # Clipped tokens get no gradient; the others get -A * ratio / 4.
    expected_grad = torch.tensor([[-1.25 / 4, 0.0, 0.0, 0.85 / 4]], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, expected_grad, atol=ATOL, rtol=RTOL)


def test_ppo_policy_loss_ignores_masked_out_positions():
    logp, old_logp, advantages, mask = ppo_inputs(seed=90)
    junk = randn(*mask.shape, seed=95, scale=3.0)
    outside = ~mask.bool()
    loss, stats = ppo_policy_loss(logp, old_logp, advantages, mask)
    loss_junk, stats_junk = ppo_policy_loss(
        torch.where(outside, logp + junk, logp), torch.where(outside, old_logp - junk, old_logp),
        torch.where(outside, advantages * 10, advantages), mask)
    torch.testing.assert_close(loss_junk, loss, atol=ATOL, rtol=RTOL)
    for key in ["clipfrac", "approx_kl"]:
        assert float(stats_junk[key]) == pytest.approx(float(stats[key]), abs=1e-12)


# ---------------------------------------------------------------- ppo_value_loss

def test_ppo_value_loss_matches_reference_values_and_gradient():
    old_values = randn(5, 8, seed=100)
    values = old_values + randn(5, 8, seed=101, scale=0.4)  # some moves past the 0.2 clip, some not
    returns = randn(5, 8, seed=102)
    mask = make_mask(5, 8, seed=103)
    actual_values, expected_values = leaf(values), leaf(values)

    loss = ppo_value_loss(actual_values, old_values, returns, mask, clip=0.2)
    clipped = torch.clamp(expected_values, old_values - 0.2, old_values + 0.2)
    per_token = torch.maximum((expected_values - returns) ** 2, (clipped - returns) ** 2)  # (B, T)
    expected_loss = 0.5 * (per_token * mask).sum() / mask.sum()

    torch.testing.assert_close(loss, expected_loss, atol=ATOL, rtol=RTOL)
    (actual_grad,) = torch.autograd.grad(loss, actual_values)
    (expected_grad,) = torch.autograd.grad(expected_loss, expected_values)
    torch.testing.assert_close(actual_grad, expected_grad, atol=ATOL, rtol=RTOL)
    assert torch.all(actual_grad[~mask.bool()] == 0)


def test_ppo_approx_kl_is_k3_estimate_of_kl_old_to_new():
    # Tokens were sampled from the old policy, so KL(old || new) ~ mean((r - 1) - log r), r = new / old.
    gen = torch.Generator().manual_seed(77)
    logp = torch.randn(3, 5, generator=gen, dtype=torch.float64) * 0.3
    old_logp = torch.randn(3, 5, generator=gen, dtype=torch.float64) * 0.3
    mask = torch.ones(3, 5)
    mask[1, 3:] = 0
    _, stats = ppo_policy_loss(logp, old_logp, torch.randn(3, 5, generator=gen, dtype=torch.float64), mask)
    log_ratio = logp - old_logp
    expected = ((log_ratio.exp() - 1 - log_ratio) * mask).sum() / mask.sum()
    torch.testing.assert_close(stats["approx_kl"], expected, rtol=1e-12, atol=1e-12)


def test_dpo_loss_returns_detached_rewards():
    pi_chosen, pi_rejected, ref_chosen, ref_rejected = (-randn(6, seed=s, scale=5.0).abs() for s in range(4))
    pi_chosen.requires_grad_(True)
    pi_rejected.requires_grad_(True)
    loss, chosen_rewards, rejected_rewards = dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta=0.1)
    assert loss.requires_grad
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_is_zero_outside_the_mask(shift_mean):
    x = randn(5, 12, seed=12, scale=2.0) + 3.0
    mask = (torch.arange(12)[None, :] < torch.tensor([12, 7, 3, 1, 9])[:, None]).double()
    whitened = masked_whiten(x, mask, shift_mean=shift_mean)
    assert torch.all(whitened[~mask.bool()] == 0)
