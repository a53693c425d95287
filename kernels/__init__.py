"""Fused, torch.compile-able losses and advantage functions shared by every training script.

    from kernels import linear_cross_entropy, dpo_loss, gae_advantages, ...

chunked.py     the language-model head fused with its loss (no (tokens x vocab) logits tensor)
losses.py      masked reductions, KL estimators, Bradley-Terry, DPO/IPO/hinge, PPO policy and value losses
advantages.py  GAE (with a critic), group-relative and leave-one-out advantages (without one)
compile.py     when the kernels run through torch.compile (env KERNELS_COMPILE=1/0 forces it)
benchmark.py   python -m kernels.benchmark: time and memory against plain PyTorch (and Liger-Kernel)
"""

from .advantages import gae_advantages, group_advantages, rloo_advantages
from .chunked import default_chunk_size, linear_cross_entropy, linear_log_probs
from .losses import (aggregate_token_loss, bradley_terry_loss, dpo_loss, kl_penalty, masked_mean, masked_sum,
                     masked_whiten, ppo_policy_loss, ppo_value_loss)

__all__ = [
    "linear_cross_entropy", "linear_log_probs", "default_chunk_size",
    "masked_mean", "masked_sum", "masked_whiten", "kl_penalty", "aggregate_token_loss",
    "bradley_terry_loss", "dpo_loss", "ppo_policy_loss", "ppo_value_loss",
    "gae_advantages", "group_advantages", "rloo_advantages",
]
