"""05_grpo.py and the GRPO mechanics of rl.py: groups, zero-variance groups, dynamic sampling."""

import random

import torch

import rl
import world
from conftest import load_script
from gpt import configure_optimizer

grpo = load_script("05_grpo.py")


def draw_math(seed=0):
    rng = random.Random(seed)
    return lambda n: [world.make_task("math", "arithmetic", rng, "train") for _ in range(n)]


def policy_reference_and_optimizer(make_gpt):
    """A tiny policy in train mode, a frozen copy of it, an AdamW, and the policy's weights before any step."""
    policy, reference = make_gpt(seed=1), make_gpt(seed=1)
    policy.train()
    before = [p.detach().clone() for p in policy.parameters()]
    return policy, reference, configure_optimizer(policy, 1e-2, weight_decay=0.0), before


def test_a_group_with_identical_rewards_gets_zero_advantage_and_the_batch_still_trains(toy_tokenizer, make_gpt):
    policy, reference, optimizer, before = policy_reference_and_optimizer(make_gpt)
    clip = rl.ClipConfig(epochs=1, minibatch_size=8, kl_beta=0.0)
    stats, rollout = rl.grpo_step(policy, optimizer, reference, toy_tokenizer, draw_math(), lambda r: [1.0] * len(r),
                                  clip, random.Random(0), n_groups=3, group_size=4, max_new_tokens=8)
    assert stats["zero_variance_share"] == 1.0 and len(rollout) == 12
    assert stats["policy_loss"] == 0.0  # every advantage is exactly zero: no gradient from the surrogate
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))


def test_the_ptx_term_trains_even_when_every_group_teaches_nothing(toy_tokenizer, make_gpt):
    policy, reference, optimizer, before = policy_reference_and_optimizer(make_gpt)
    clip = rl.ClipConfig(epochs=1, minibatch_size=8, kl_beta=0.0)
    ptx = rl.ptx_term(policy, toy_tokenizer, 1.0, n_demos=8, batch_size=8, seed=0)
    stats, _ = rl.grpo_step(policy, optimizer, reference, toy_tokenizer, draw_math(), lambda r: [1.0] * len(r),
                            clip, random.Random(0), n_groups=3, group_size=4, max_new_tokens=8, extra_loss=ptx)
    assert stats["zero_variance_share"] == 1.0 and stats["policy_loss"] == 0.0
    assert stats["extra_loss"] > 0  # logged, and the only thing that moved the weights
    assert not all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))


def test_varied_rewards_move_the_policy(toy_tokenizer, make_gpt):
    policy, reference, optimizer, before = policy_reference_and_optimizer(make_gpt)
    clip = rl.ClipConfig(epochs=1, minibatch_size=8, kl_beta=0.1)

    def reward(rollout):  # varies within groups
        return [float(x[0] % 2) for x in rollout.responses]

    stats, _ = rl.grpo_step(policy, optimizer, reference, toy_tokenizer, draw_math(), reward, clip, random.Random(0),
                            n_groups=3, group_size=4, max_new_tokens=8)
    assert stats["zero_variance_share"] < 1.0 and "kl_k3" in stats
    assert not all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))


def test_dynamic_sampling_refills_the_batch_with_groups_that_teach(toy_tokenizer, make_gpt):
    policy = make_gpt(seed=4)
    even = {}

    def reward(rollout):  # half the prompts give every reply the same reward, the other half vary
        return [float(i % 2) if even.setdefault(t.prompt, len(even) % 2 == 0) else 0.0
                for i, t in enumerate(rollout.tasks)]

    rollout, rewards, stats = rl.sample_groups(policy, toy_tokenizer, draw_math(1), reward, n_groups=6, group_size=4,
                                               temperature=1.0, max_new_tokens=4, seed=0, dynamic=True)
    groups = rewards.view(6, 4)
    assert len(rollout) == 24 and stats["draws"] > 1 and 0 < stats["zero_variance_share"] < 1
    assert torch.all(groups.max(dim=1).values > groups.min(dim=1).values)  # every kept group has variance
    for g in range(6):  # rows stay grouped by task
        assert len({id(t) for t in rollout.tasks[4 * g:4 * g + 4]}) == 1


def test_without_dynamic_sampling_zero_variance_groups_stay(toy_tokenizer, make_gpt):
    rollout, rewards, stats = rl.sample_groups(make_gpt(), toy_tokenizer, draw_math(), lambda r: [0.0] * len(r),
                                               n_groups=2, group_size=3, temperature=1.0, max_new_tokens=4, seed=0)
    assert stats == {"zero_variance_share": 1.0, "draws": 1} and torch.all(rewards == 0)


def test_math_reward_is_the_verifier_plus_a_small_format_term():
    task = world.make_task("math", "arithmetic", random.Random(0), "train")
    reward = grpo.math_reward(0.1)
    rollout = rl.Rollout([task] * 3, [], [], [task.ideal + world.END, task.ideal, task.bad["wrong"] + world.END])
    assert reward(rollout) == [1.1, 1.0, 0.1]


def test_memory_accounting_counts_weights_grads_and_adam_moments(make_gpt):
    model = make_gpt()
    params = sum(p.numel() for p in model.parameters())
    assert rl.training_state_bytes(model, trained=True) == 16 * params
    assert rl.training_state_bytes(model, trained=False) == 4 * params
