"""03_ppo.py: rollouts, per-token rewards, GAE from kernels, and PPO iterations on a tiny problem."""

import random

import torch

import kernels
import rl
import world
from conftest import load_script
from gpt import configure_optimizer

ppo = load_script("03_ppo.py")


class ShareOfLowTokens:
    """A stand-in reward model for a tiny problem: the share of reply tokens whose id is below vocab/2.
    A random policy scores about 0.5; PPO should push it up within a few iterations."""

    def __init__(self, vocab_size):
        self.cut = vocab_size // 2

    def score(self, prompts, replies):
        return torch.tensor([sum(t < self.cut for t in r) / len(r) for r in replies])


def test_rollouts_stop_at_end_of_turn_and_masks_cover_exactly_the_reply(toy_tokenizer, make_gpt):
    policy = make_gpt(seed=1)
    tasks = [world.random_task(random.Random(i)) for i in range(12)]
    rollout = rl.sample_rollout(policy, toy_tokenizer, tasks, samples=2, max_new_tokens=20, seed=0)
    logp, mask = rl.rollout_log_probs(policy, rollout)
    assert len(rollout) == 24 and rollout.tasks[0] is rollout.tasks[1]  # replies to one task are contiguous
    for row, reply in enumerate(rollout.responses):
        assert mask[row].sum().item() == len(reply)
        assert torch.all(mask[row, :len(reply)] == 1) and torch.all(logp[row, len(reply):] == 0)
        if toy_tokenizer.eot_id in reply:  # the turn ends at the first end-of-turn token, nothing after it
            assert reply.index(toy_tokenizer.eot_id) == len(reply) - 1 and rollout.texts[row].endswith(world.END)
        else:
            assert len(reply) == 20 and not rollout.texts[row].endswith(world.END)
    assert torch.all(logp[mask.bool()] < 0)


def test_token_rewards_put_the_score_on_the_last_token_and_the_kl_everywhere():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]])
    ref_logp = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards = ppo.token_rewards(torch.tensor([2.0, -1.0]), logp, ref_logp, mask, kl_coef=0.1, estimator="k1")
    expected = torch.tensor([[-0.05, 0.1, 0.0 + 2.0], [-0.1, 0.0 - 1.0, 0.0]])
    assert torch.allclose(rewards, expected)


def test_advantages_come_from_kernels_not_a_second_implementation():
    assert ppo.gae_advantages is kernels.gae_advantages
    assert ppo.masked_whiten is kernels.masked_whiten
    assert rl.clipped_policy_update.__code__.co_names.count("ppo_policy_loss") >= 1


def test_reply_scores_are_the_reward_model_less_the_unended_penalty_or_with_reward_gold_the_judge_itself():
    task = world.make_tasks("math", 1, "train", seed=0)[0]
    texts = [task.ideal + world.END, task.bad["wrong"] + world.END, task.ideal]  # right, wrong, right but unended
    rollout = rl.Rollout([task] * 3, [[1]] * 3, [[2, 3], [2, 4, 5, 6], [7]], texts)
    config = ppo.PRESETS["test"]
    scores = ppo.reply_scores(ShareOfLowTokens(8), rollout, config)  # token ids below 4 score
    assert scores.tolist() == [1.0, 0.25, 0.0 - config.unended_penalty]
    gold = ppo.PPOConfig(**{**config.__dict__, "reward": "gold"})
    assert ppo.reply_scores(None, rollout, gold).tolist() == [world.gold_score(task, t) for t in texts] == [1.0, 0.0, 0.5]


def test_explained_variance_is_one_for_a_perfect_critic_and_zero_for_the_mean():
    returns = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert abs(ppo.explained_variance(returns, returns, mask) - 1.0) < 1e-6
    assert abs(ppo.explained_variance(torch.full_like(returns, 2.5), returns, mask)) < 1e-6


def test_adaptive_kl_controller_raises_the_coefficient_when_kl_is_above_target():
    config = ppo.PRESETS["test"]
    adaptive = ppo.PPOConfig(**{**config.__dict__, "kl_target": 1.0, "kl_horizon": 10})
    assert ppo.adapt_kl_coef(0.1, 3.0, adaptive) > 0.1 > ppo.adapt_kl_coef(0.1, 0.2, adaptive)
    assert ppo.adapt_kl_coef(0.1, 3.0, config) == 0.1  # kl_target 0: fixed coefficient


def test_ppo_iterations_raise_the_reward_on_a_tiny_problem_and_start_each_update_unclipped(toy_tokenizer,
                                                                                       make_gpt):
    config = ppo.PPOConfig(iterations=12, batch_size=32, lr=1e-2, value_lr=3e-3, kl_coef=0.0, minibatch_size=16,
                           epochs=2, max_new_tokens=8, unended_penalty=0.0)
    policy, reference, value_gpt = make_gpt(seed=2), make_gpt(seed=2), make_gpt(seed=3)
    policy.train()
    value_model = rl.RewardModel(value_gpt).train()
    optimizers = (configure_optimizer(policy, config.lr, 0.0), configure_optimizer(value_model, config.value_lr, 0.0))
    rng = random.Random(0)
    reward_model = ShareOfLowTokens(toy_tokenizer.vocab_size)
    history = [ppo.ppo_iteration((policy, value_model, reference, reward_model), optimizers, toy_tokenizer, config,
                                 config.kl_coef, rng, i, seed=0) for i in range(config.iterations)]
    for stats in history:
        assert abs(stats["first_ratio"] - 1) < 1e-5 and stats["first_clipfrac"] == 0.0
    first = sum(s["rm_reward"] for s in history[:3]) / 3
    last = sum(s["rm_reward"] for s in history[-3:]) / 3
    assert last > first + 0.2, [round(s["rm_reward"], 2) for s in history]
    assert history[-1]["kl"] > 0  # the policy moved away from the reference


def test_ptx_term_is_the_weighted_sft_loss_on_demonstrations_and_none_when_off(toy_tokenizer, make_gpt):
    policy = make_gpt(seed=2)
    assert rl.ptx_term(policy, toy_tokenizer, 0.0, n_demos=5, batch_size=3, seed=0) is None
    loss = rl.ptx_term(policy, toy_tokenizer, 2.0, n_demos=5, batch_size=3, seed=0)()
    # the same minibatch by hand: three of the five demonstrations, drawn by the term's own random stream
    demos = world.sft_demonstrations(5, seed=0)
    chosen = random.Random("ptx/0").sample(demos, 3)
    prompts = [toy_tokenizer.render_prompt([{"role": "user", "content": t.prompt}]) for t, _ in chosen]
    replies = [toy_tokenizer.encode(reply) + [toy_tokenizer.eot_id] for _, reply in chosen]
    logp, mask = rl.response_log_probs(policy, prompts, replies)
    torch.testing.assert_close(loss, 2.0 * -(logp * mask).sum() / mask.sum())


def test_ptx_term_moves_the_policy_towards_the_demonstrations_even_without_advantages(toy_tokenizer, make_gpt):
    # zero advantages: the clipped surrogate has no gradient, so only the extra loss can move the policy
    policy = make_gpt(seed=2).train()
    tasks = [world.random_task(random.Random(i)) for i in range(4)]
    rollout = rl.sample_rollout(policy, toy_tokenizer, tasks, samples=2, max_new_tokens=6, seed=0)
    old_logp, mask = rl.rollout_log_probs(policy, rollout)
    ptx = rl.ptx_term(policy, toy_tokenizer, 1.0, n_demos=8, batch_size=8, seed=0)  # every minibatch: all 8 demos
    before = ptx().item()
    optimizer = configure_optimizer(policy, 1e-2, 0.0)
    for _ in range(5):
        history = rl.clipped_policy_update(policy, optimizer, rollout, old_logp, torch.zeros_like(mask), mask,
                                           rl.ClipConfig(epochs=1, minibatch_size=8), random.Random(0), extra_loss=ptx)
    assert all("extra_loss" in stats for stats in history)
    assert ptx().item() < before - 0.5  # the demonstrations became much more likely (6.0 -> 4.5 nats per token)
