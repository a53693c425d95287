"""Tests for the advantage estimators: gae_advantages (PPO), group_advantages (GRPO, Dr. GRPO) and
rloo_advantages (RLOO).

GAE is compared with a plain Python reverse loop, one row at a time, on rows whose valid steps are
a random contiguous run (empty, at the start, in the middle, at the end), for several gamma and lam.
The group estimators are compared with their formulas written over a (num_prompts, group_size) view;
a group of identical rewards must give zeros, and bad group sizes must raise ValueError.
"""

import pytest
import torch

from kernels import gae_advantages, group_advantages, rloo_advantages


def randn(*shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale


# ---------------------------------------------------------------- gae_advantages

def reference_gae(rewards, values, mask, gamma, lam):
    """Reverse loop over each row's valid run; the value after the last valid step is 0."""
    advantages = torch.zeros_like(rewards)
    returns = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        steps = [t for t in range(rewards.shape[1]) if mask[b, t]]
        next_value, next_advantage = 0.0, 0.0
        for t in reversed(steps):
            delta = rewards[b, t].item() + gamma * next_value - values[b, t].item()
            next_advantage = delta + gamma * lam * next_advantage
            next_value = values[b, t].item()
            advantages[b, t] = next_advantage
            returns[b, t] = next_advantage + values[b, t].item()
    return advantages, returns


def contiguous_run_mask(seed, length=12):
    """(B, T) 0/1 float mask, one contiguous run per row: random rows plus the edge cases."""
    g = torch.Generator().manual_seed(seed)
    runs = [(0, 0), (0, length), (0, 5), (7, length), (3, 4), (length - 1, length)]
    for _ in range(6):
        start, end = sorted(torch.randint(0, length + 1, (2,), generator=g).tolist())
        runs.append((start, end))
    mask = torch.zeros(len(runs), length, dtype=torch.float64)
    for row, (start, end) in enumerate(runs):
        mask[row, start:end] = 1
    return mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (1.0, 0.95), (0.99, 0.95), (0.9, 0.0), (0.5, 0.8)])
def test_gae_advantages_match_reverse_loop_reference(gamma, lam):
    mask = contiguous_run_mask(seed=0)
    rewards = randn(*mask.shape, seed=1)
    values = randn(*mask.shape, seed=2)

    advantages, returns = gae_advantages(rewards, values, mask, gamma=gamma, lam=lam)
    expected_advantages, expected_returns = reference_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(advantages, expected_advantages, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(returns, expected_returns, atol=1e-12, rtol=1e-10)


def test_gae_advantages_accept_bool_mask():
    mask = contiguous_run_mask(seed=3)
    rewards, values = randn(*mask.shape, seed=4), randn(*mask.shape, seed=5)
    float_result = gae_advantages(rewards, values, mask, gamma=0.99, lam=0.95)
    bool_result = gae_advantages(rewards, values, mask.bool(), gamma=0.99, lam=0.95)
    for b, f in zip(bool_result, float_result):
        torch.testing.assert_close(b, f, atol=1e-12, rtol=1e-10)


def test_gae_advantages_are_zero_outside_mask_and_ignore_values_there():
    mask = contiguous_run_mask(seed=6)
    rewards, values = randn(*mask.shape, seed=7), randn(*mask.shape, seed=8)
    outside = ~mask.bool()
    advantages, returns = gae_advantages(rewards, values, mask, gamma=0.99, lam=0.95)
    junk_advantages, junk_returns = gae_advantages(
        torch.where(outside, torch.full_like(rewards, 1e3), rewards),
        torch.where(outside, torch.full_like(values, -1e3), values),
        mask, gamma=0.99, lam=0.95)
    assert torch.all(advantages[outside] == 0) and torch.all(returns[outside] == 0)
    torch.testing.assert_close(junk_advantages, advantages, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(junk_returns, returns, atol=1e-12, rtol=1e-10)


def test_gae_with_gamma_and_lam_one_gives_reward_to_go_minus_value():
    mask = torch.ones(3, 6, dtype=torch.float64)
    rewards, values = randn(3, 6, seed=9), randn(3, 6, seed=10)
    advantages, returns = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    reward_to_go = rewards.flip(1).cumsum(1).flip(1)  # (B, T)
    torch.testing.assert_close(returns, reward_to_go, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(advantages, reward_to_go - values, atol=1e-12, rtol=1e-10)


def test_gae_with_lam_zero_gives_one_step_td_error():
    mask = torch.ones(3, 6, dtype=torch.float64)
    rewards, values = randn(3, 6, seed=11), randn(3, 6, seed=12)
    advantages, _ = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.0)
    next_values = torch.cat([values[:, 1:], torch.zeros(3, 1, dtype=torch.float64)], dim=1)  # (B, T)
    torch.testing.assert_close(advantages, rewards + 0.9 * next_values - values, atol=1e-12, rtol=1e-10)


# ---------------------------------------------------------------- group_advantages

@pytest.mark.parametrize("scale", ["std", "none"])
def test_group_advantages_match_reference(scale):
    group_size, eps = 4, 1e-6
    rewards = randn(5 * group_size, seed=20)
    grouped = rewards.view(-1, group_size)  # (num_prompts, group_size)
    centred = grouped - grouped.mean(1, keepdim=True)
    if scale == "std":
        expected = centred / (grouped.std(1, keepdim=True) + eps)
    else:
        expected = centred
    actual = group_advantages(rewards, group_size, scale=scale, eps=eps)
    assert actual.shape == rewards.shape
    torch.testing.assert_close(actual, expected.view(-1), atol=1e-12, rtol=1e-10)


def test_group_advantages_use_bessel_corrected_std():
    # Two rewards {0, 1}: unbiased std = 1/sqrt(2), biased std = 1/2.
    advantages = group_advantages(torch.tensor([0.0, 1.0], dtype=torch.float64), 2, scale="std", eps=0.0)
    expected = torch.tensor([-0.5, 0.5], dtype=torch.float64) * 2 ** 0.5
    torch.testing.assert_close(advantages, expected, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("scale", ["std", "none"])
def test_group_advantages_of_identical_rewards_are_exactly_zero(scale):
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, -0.5, -0.5, -0.5, -0.5,
                            0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    advantages = group_advantages(rewards, 4, scale=scale)
    assert torch.isfinite(advantages).all()
    assert torch.all(advantages[:12] == 0)
    assert torch.all(advantages[12:] != 0)  # the mixed group still gets a signal


@pytest.mark.parametrize("scale", ["std", "none"])
def test_group_advantages_of_identical_float32_rewards_are_zero_up_to_rounding(scale):
    # 0.3 is not exact in binary: the float32 group mean can miss it by one rounding step (~3e-8).
    # That rounding must not survive as a signal; dividing it by (std + eps) ~ 1e-6 would make it ~0.03.
    rewards = torch.full((8,), 0.3, dtype=torch.float32)
    advantages = group_advantages(rewards, 8, scale=scale)
    assert torch.isfinite(advantages).all()
    assert advantages.abs().max() < 1e-6


def test_group_advantages_raise_value_error_when_length_not_divisible():
    with pytest.raises(ValueError):
        group_advantages(randn(10, seed=21), 4)


# ---------------------------------------------------------------- rloo_advantages

def test_rloo_advantages_match_leave_one_out_reference():
    group_size = 4
    rewards = randn(3 * group_size, seed=30)
    expected = torch.empty_like(rewards)
    for i in range(rewards.numel()):
        start = i // group_size * group_size
        others = [rewards[j].item() for j in range(start, start + group_size) if j != i]
        expected[i] = rewards[i] - sum(others) / len(others)
    torch.testing.assert_close(rloo_advantages(rewards, group_size), expected, atol=1e-12, rtol=1e-10)


def test_rloo_advantages_of_identical_rewards_are_zero():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    assert torch.all(rloo_advantages(rewards, 3) == 0)


@pytest.mark.parametrize("length,group_size", [(8, 1), (8, 0), (10, 4)])
def test_rloo_advantages_raise_value_error_for_invalid_group_size(length, group_size):
    with pytest.raises(ValueError):
        rloo_advantages(randn(length, seed=31), group_size)
