"""The losses of post-training, each a few lines of tensor math.

Conventions for every function here:
- a loss is a value to minimise (a policy gradient's objective appears with a minus sign);
- per-token tensors are (B, T) and come with a 0/1 `mask` (float or bool) that marks the tokens that
  count (response tokens, not prompt or padding); masked-out values never leak into a result;
- no Python branching on tensor values and no .item(): every function traces into one
  torch.compile graph, so a training step that calls them can be compiled whole.
"""

import torch
import torch.nn.functional as F


def masked_sum(x, mask, dim=None):
    """Sum of x where mask is 1 (over `dim`, or everything)."""
    x = torch.where(mask.bool(), x, torch.zeros_like(x))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x, mask, dim=None):
    """Mean of x over the entries where mask is 1: sum(x * mask) / sum(mask).

    dim=None averages everything to a scalar; dim=k averages along k. A row with an empty mask gives
    0, not NaN (0 / 0 is replaced by 0 / 1).
    """
    count = masked_sum(torch.ones_like(x), mask, dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_whiten(x, mask, shift_mean=True):
    """Normalise x to mean 0 and variance 1 over the masked entries (PPO's advantage whitening).

        x' = (x - mean) / sqrt(var + 1e-8)        mean, var over the entries where mask is 1

    var uses Bessel's correction (n - 1). With shift_mean=False the mean is added back (scale only,
    as PPO does for rewards). Entries outside the mask are returned as 0.
    """
    mean = masked_mean(x, mask)
    centred = torch.where(mask.bool(), x - mean, torch.zeros_like(x))
    count = mask.bool().sum()
    var = (centred**2).sum() / (count - 1).clamp(min=1)
    whitened = centred * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = torch.where(mask.bool(), whitened + mean, whitened)
    return whitened


def kl_penalty(logp, ref_logp, kind="k1"):
    """Per-token estimate of KL(pi || ref) from log-probs of tokens sampled from pi.

    With d = logp - ref_logp = log(pi / ref) at the sampled token (Schulman, "Approximating KL"):
        k1 = d                      unbiased, but negative on some tokens (high variance)
        k2 = d^2 / 2                biased, always >= 0, low variance
        k3 = exp(-d) + d - 1        unbiased and always >= 0 (GRPO's choice)
    All three are 0 where pi and ref agree.
    """
    d = logp - ref_logp
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d**2
    if kind == "k3":
        return torch.expm1(-d) + d
    raise ValueError(f"kind must be 'k1', 'k2' or 'k3', got {kind!r}")


def bradley_terry_loss(r_chosen, r_rejected, margin=0.0):
    """Reward-model loss under the Bradley-Terry model of preferences.

        P(chosen > rejected) = sigmoid(r_chosen - r_rejected)
        loss = mean( -log sigmoid(r_chosen - r_rejected - margin) )

    `margin` (scalar or per pair) asks for a gap of at least that size (Llama 2's margin loss).
    Returns (loss, accuracy), accuracy = share of pairs with r_chosen > r_rejected.
    """
    diff = r_chosen - r_rejected
    loss = -F.logsigmoid(diff - margin).mean()
    accuracy = (diff > 0).to(diff.dtype).mean().detach()
    return loss, accuracy


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, *, beta=0.1, loss_type="sigmoid",
             label_smoothing=0.0):
    """Direct Preference Optimisation (Rafailov et al. 2023) and two relatives.

    Inputs are sequence log-probs (summed over response tokens), shape (B,), of the chosen and the
    rejected response under the policy (pi_*) and the frozen reference (ref_*). The implicit reward of
    a response is beta * log(pi / ref); DPO fits those rewards with a Bradley-Terry loss:
        h = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)
        sigmoid: -(1 - eps) * log sigmoid(beta h) - eps * log sigmoid(-beta h)   (eps: label smoothing, cDPO)
        ipo:     (h - 1 / (2 beta))^2                                             (Azar et al. 2023)
        hinge:   relu(1 - beta h)                                                 (SLiC)
    At pi == ref, h = 0 and the sigmoid loss is ln 2 for any eps.
    Returns (loss averaged over the batch, chosen_rewards, rejected_rewards), rewards detached.
    """
    chosen_logratio = pi_chosen - ref_chosen
    rejected_logratio = pi_rejected - ref_rejected
    h = chosen_logratio - rejected_logratio
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"loss_type must be 'sigmoid', 'ipo' or 'hinge', got {loss_type!r}")
    return losses.mean(), (beta * chosen_logratio).detach(), (beta * rejected_logratio).detach()


def aggregate_token_loss(token_loss, mask, loss_agg):
    """Reduce a (B, T) per-token loss to a scalar.

        token_mean:   sum over valid tokens / number of valid tokens        (DAPO: every token counts once)
        seq_mean:     mean over sequences of each sequence's token mean     (original GRPO; rows with an
                      empty mask are left out)
        seq_sum_norm: sum over valid tokens / (B * T), T = time length      (Dr. GRPO: no length bias)
    """
    if loss_agg == "token_mean":
        return masked_mean(token_loss, mask)
    if loss_agg == "seq_mean":
        per_sequence = masked_mean(token_loss, mask, dim=-1)  # (B,)
        has_tokens = mask.bool().any(dim=-1)
        return masked_mean(per_sequence, has_tokens)
    if loss_agg == "seq_sum_norm":
        return masked_sum(token_loss, mask) / token_loss.numel()
    raise ValueError(f"loss_agg must be 'token_mean', 'seq_mean' or 'seq_sum_norm', got {loss_agg!r}")


def ppo_policy_loss(logp, old_logp, advantages, mask, *, clip_low=0.2, clip_high=None, loss_agg="token_mean"):
    """PPO's clipped surrogate (Schulman et al. 2017), per token, as a loss to minimise.

        r_t    = exp(logp_t - old_logp_t)                      how much more likely the token got
        loss_t = -min(r_t A_t, clip(r_t, 1 - clip_low, 1 + clip_high) A_t)

    The min makes the objective pessimistic: once a token's ratio has moved past the clip range in
    the direction its advantage pushes, its gradient is zero, so one batch cannot move the policy far.
    clip_high > clip_low is DAPO's "clip-higher" (more room to raise unlikely good tokens);
    clip_high=None means clip_high = clip_low.

    logp, old_logp, advantages, mask: (B, T). Returns (loss, stats) where stats holds detached
    scalars: clipfrac (share of valid tokens where the clipped term is taken), approx_kl (the k3
    estimate (r - 1) - log r of KL(old || new) from tokens sampled by the old policy; 0 at the first
    step) and ratio_mean.
    """
    clip_high = clip_low if clip_high is None else clip_high
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * advantages
    token_loss = -torch.minimum(unclipped, clipped)
    loss = aggregate_token_loss(token_loss, mask, loss_agg)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped < unclipped).to(ratio.dtype), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),  # k3, tokens drawn from old
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def ppo_value_loss(values, old_values, returns, mask, *, clip=0.2):
    """Clipped value loss of PPO's critic.

        v_clip = clip(v, v_old - clip, v_old + clip)
        loss   = 0.5 * masked_mean( max((v - R)^2, (v_clip - R)^2) )

    Like the policy's clip, it stops one batch from moving the value estimate far from the values
    the advantages were computed with.
    """
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    worst = torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * masked_mean(worst, mask)

