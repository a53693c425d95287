"""Advantages: how much better than expected each action (token) was.

Two families:
- with a critic (PPO): GAE mixes the critic's value estimates with the observed rewards;
- without a critic (GRPO, RLOO): sample several responses to the same prompt and compare each one's
  reward with its siblings'. The group is the baseline.
"""

import torch


def gae_advantages(rewards, values, mask, *, gamma=1.0, lam=0.95):
    """Generalised Advantage Estimation (Schulman et al. 2016).

        delta_t = r_t + gamma * V_{t+1} - V_t                   one-step TD error
        A_t     = delta_t + gamma * lam * A_{t+1}  =  sum_k (gamma lam)^k delta_{t+k}
        R_t     = A_t + V_t                                      the value target (returns)

    lam = 0 trusts the critic (A = delta); lam = 1 trusts the sampled rewards (Monte Carlo).
    rewards, values, mask: (B, T). Each row's mask marks one contiguous run of valid steps (the
    response); the value after the last valid step is 0 (the episode ends there). Everything
    outside the mask is 0 in both outputs.

    The recursion runs backwards over time, which in Python is T sequential steps. Unrolled, it is a
    matrix product with the discount matrix M[t, j] = (gamma lam)^(j - t) for j >= t, else 0:
        A = delta @ M.T
    one (B, T) x (T, T) matmul instead of T small kernels; it equals the recursion to rounding.
    """
    valid = mask.bool()
    rewards = torch.where(valid, rewards, torch.zeros_like(rewards))
    values = torch.where(valid, values, torch.zeros_like(values))
    next_values = torch.nn.functional.pad(values[:, 1:], (0, 1))  # V_{t+1}; 0 after the run ends
    deltas = rewards + gamma * next_values - values  # (B, T)
    deltas = torch.where(valid, deltas, torch.zeros_like(deltas))
    steps = torch.arange(rewards.shape[1], device=rewards.device)
    lag = steps[None, :] - steps[:, None]  # (T, T): j - t
    discount = torch.where(lag >= 0, (gamma * lam) ** lag.clamp(min=0).to(rewards.dtype),
                           torch.zeros((), dtype=rewards.dtype, device=rewards.device))
    advantages = torch.where(valid, deltas @ discount.T, torch.zeros_like(deltas))
    returns = torch.where(valid, advantages + values, torch.zeros_like(advantages))
    return advantages, returns


def _grouped(rewards, group_size, min_size):
    """View flat rewards (P * G,) as (P, G), checking the grouping."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (num_prompts * group_size,), got shape {tuple(rewards.shape)}")
    if group_size < min_size or rewards.numel() % group_size != 0:
        raise ValueError(f"group_size must be >= {min_size} and divide the {rewards.numel()} rewards, "
                         f"got {group_size}")
    return rewards.view(-1, group_size)


def group_advantages(rewards, group_size, *, scale="std", eps=1e-6):
    """GRPO's group-relative advantage (Shao et al. 2024, DeepSeekMath).

        A_i = (r_i - mean(group)) / (std(group) + eps)     scale="std"   (GRPO)
        A_i =  r_i - mean(group)                           scale="none"  (Dr. GRPO, Liu et al. 2025)

    rewards: (num_prompts * group_size,), each prompt's group contiguous. std is torch.std
    (Bessel-corrected). Dividing by the std gives questions that are nearly always or nearly never
    solved the same weight as contested ones, which Dr. GRPO argues is a bias. A group whose rewards
    are all equal carries no signal: its advantages are exactly 0 (never NaN).
    """
    if scale not in ("std", "none"):
        raise ValueError(f"scale must be 'std' or 'none', got {scale!r}")
    groups = _grouped(rewards, group_size, min_size=2 if scale == "std" else 1)
    centred = groups - groups.mean(dim=1, keepdim=True)  # (P, G)
    if scale == "std":
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    # In float32 the mean of identical rewards can miss them by one rounding step, which the
    # division above would blow up into a fake signal: such groups are set to exactly 0.
    identical = groups.amax(dim=1, keepdim=True) == groups.amin(dim=1, keepdim=True)
    return torch.where(identical, torch.zeros_like(centred), centred).reshape(-1)


def rloo_advantages(rewards, group_size):
    """REINFORCE Leave-One-Out (Kool et al. 2019; Ahmadian et al. 2024).

        A_i = r_i - mean_{j != i} r_j  =  G / (G - 1) * (r_i - mean(group))

    Each sample's baseline is the mean of its siblings, so the baseline does not depend on the
    sample itself and the gradient estimate stays unbiased.
    """
    groups = _grouped(rewards, group_size, min_size=2)
    others_mean = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others_mean).reshape(-1)
