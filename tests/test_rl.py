"""Preference data, the reward model and DPO mechanics (rl.py), on tiny seeded models."""

import copy
import math
import random

import pytest
import torch
import torch.nn.functional as F

import rl
import world
from gpt import GPT, GPTConfig, configure_optimizer, response_log_probs
from kernels import bradley_terry_loss, dpo_loss, group_advantages
from rl import (RewardModel, build_preferences, implicit_reward_stats, load_reward_model, pair_log_probs,
                reference_log_probs, save_reward_model)
from tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    docs = world.toy_internet(400, seed=0)
    return Tokenizer.train([world.document_text(d) for d in docs], 400)


def tiny_gpt(tokenizer, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(tokenizer.vocab_size, 128, n_layer=1, n_head=2, n_embd=32))


def ideal_vs_bad_pairs(tokenizer, n=24, seed=0):
    """Pairs with a known right answer: each task's ideal reply against one of its bad replies."""
    tasks = world.make_tasks("facts", n, "train", seed=seed, kind="known")
    prompts = [tokenizer.render_prompt([{"role": "user", "content": t.prompt}]) for t in tasks]
    return [{"prompt_ids": p, "chosen_ids": tokenizer.encode(t.ideal) + [tokenizer.eot_id],
             "rejected_ids": tokenizer.encode(t.bad["wrong"]) + [tokenizer.eot_id]} for t, p in zip(tasks, prompts)]


def test_preference_builder_is_deterministic_by_seed_and_keeps_splits_disjoint(tokenizer):
    model = tiny_gpt(tokenizer)
    settings = dict(n_prompts=80, seed=3, rater_temperature=0.1, bad_mix=1.0, max_new_tokens=64)
    first = build_preferences(model, tokenizer, split="train", **settings)
    again = build_preferences(model, tokenizer, split="train", **settings)
    assert first == again and len(first) > 0
    evals = build_preferences(model, tokenizer, split="eval", **settings)
    assert not {p["prompt"] for p in first} & {p["prompt"] for p in evals}
    assert not any(p["flipped"] for p in evals)  # held-out pairs are labelled noise-free
    for pair in first:
        assert pair["chosen"] != pair["rejected"]


def test_noisy_rater_flips_some_labels_and_noise_free_rater_none(tokenizer):
    model = tiny_gpt(tokenizer)
    noisy = build_preferences(model, tokenizer, n_prompts=300, split="train", seed=0, rater_temperature=0.2,
                              bad_mix=1.0, max_new_tokens=64)
    clean = build_preferences(model, tokenizer, n_prompts=300, split="train", seed=0, rater_temperature=0.0,
                              bad_mix=1.0, max_new_tokens=64)
    assert 0 < sum(p["flipped"] for p in noisy) < len(noisy) / 2
    assert not any(p["flipped"] for p in clean)


def test_reward_model_training_accuracy_rises_on_a_tiny_set(tokenizer):
    pairs = ideal_vs_bad_pairs(tokenizer)
    reward_model = RewardModel(tiny_gpt(tokenizer))
    optimizer = torch.optim.AdamW(reward_model.parameters(), lr=3e-3)
    prompts = [p["prompt_ids"] for p in pairs]

    def step():
        chosen = reward_model(prompts, [p["chosen_ids"] for p in pairs])
        rejected = reward_model(prompts, [p["rejected_ids"] for p in pairs])
        return bradley_terry_loss(chosen, rejected)

    first_loss, first_accuracy = step()
    assert abs(first_loss.item() - math.log(2)) < 0.01  # the small head starts near r = 0 for everything
    for _ in range(80):
        loss, _ = step()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    loss, accuracy = step()
    assert loss.item() < 0.2 and accuracy.item() >= 0.95 > first_accuracy.item()


def test_reward_model_reads_the_last_reply_token_and_round_trips(tokenizer, tmp_path):
    reward_model = RewardModel(tiny_gpt(tokenizer))
    torch.nn.init.normal_(reward_model.head.weight)
    prompt, reply = [1, 2, 3], [4, 5, 6]
    padded = reward_model([prompt, prompt + [9, 9, 9, 9]], [reply, reply])
    alone = reward_model([prompt], [reply])
    hidden = reward_model.gpt.hidden(torch.tensor([prompt + reply]))[0, -1]
    torch.testing.assert_close(alone[0], reward_model.head(hidden)[0])
    torch.testing.assert_close(padded[0], alone[0])  # right padding of other rows changes nothing
    reward_model.offset.fill_(0.25)
    save_reward_model(tmp_path / "rm.pt", reward_model, tokenizer, meta={"stage": "reward_model"})
    loaded, _, _ = load_reward_model(tmp_path / "rm.pt", "cpu")
    torch.testing.assert_close(loaded.score([prompt], [reply]), reward_model.score([prompt], [reply]))


def test_likelihood_feature_adds_the_gated_reference_log_prob_and_round_trips(tokenizer, tmp_path):
    """02's --likelihood-feature: r = head(h_last) + softplus(gate(h_last)) * mean log p_ref(reply); the
    reference stays frozen, and the gate and the reference travel with the checkpoint."""
    reference = tiny_gpt(tokenizer, seed=1)
    reward_model = RewardModel(tiny_gpt(tokenizer), reference)
    torch.nn.init.normal_(reward_model.head.weight)
    torch.nn.init.normal_(reward_model.gate.weight)
    prompt, reply = [1, 2, 3], [4, 5, 6, 7]
    reward = reward_model([prompt], [reply])
    hidden = reward_model.gpt.hidden(torch.tensor([prompt + reply]))[0, -1]
    logits = reference(torch.tensor([prompt + reply]))[0, len(prompt) - 1:-1]  # the positions predicting the reply
    mean_logp = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(reply)[:, None]).mean()
    expected = reward_model.head(hidden)[0] + torch.nn.functional.softplus(reward_model.gate(hidden)[0]) * mean_logp
    torch.testing.assert_close(reward[0], expected, rtol=1e-5, atol=1e-5)
    reward.sum().backward()
    assert reward_model.gate.weight.grad.abs().sum() > 0 and reward_model.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in reference.parameters())
    reward_model.offset.fill_(0.25)
    save_reward_model(tmp_path / "rm.pt", reward_model, tokenizer, meta={"stage": "reward_model"})
    loaded, _, _ = load_reward_model(tmp_path / "rm.pt", "cpu")
    assert loaded.reference is not None
    torch.testing.assert_close(loaded.score([prompt], [reply]), reward_model.score([prompt], [reply]))


def test_pair_log_probs_sum_the_reply_tokens(tokenizer):
    model = tiny_gpt(tokenizer).double()
    pairs = ideal_vs_bad_pairs(tokenizer, n=3)
    chosen, rejected = pair_log_probs(model, pairs)
    for i, pair in enumerate(pairs):
        logp, mask = response_log_probs(model, [pair["prompt_ids"]], [pair["chosen_ids"]])
        torch.testing.assert_close(chosen[i], logp.sum())
        ids = torch.tensor([pair["prompt_ids"] + pair["rejected_ids"]])
        logits = torch.log_softmax(model(ids)[0], dim=-1)
        n = len(pair["prompt_ids"])
        expected = sum(logits[n + j - 1, t] for j, t in enumerate(pair["rejected_ids"]))
        torch.testing.assert_close(rejected[i], expected)


def test_response_log_probs_under_autocast_have_the_gradients_of_plain_autocast_logits(tokenizer):
    # Under bf16 autocast the chunked kernel must differentiate the function it computed: the same bf16
    # logits that a plain lm_head call under autocast gives (its backward runs outside autocast).
    model = tiny_gpt(tokenizer)
    pair = ideal_vs_bad_pairs(tokenizer, n=1)[0]
    prompt, reply = pair["prompt_ids"], pair["chosen_ids"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, _ = response_log_probs(model, [prompt], [reply])
    (grad_kernel,) = torch.autograd.grad(logp.sum(), model.lm_head.weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.tensor([prompt + reply]))[0, len(prompt) - 1:-1]  # (R, V), bf16
    expected = torch.log_softmax(logits.float(), dim=-1).gather(1, torch.tensor(reply)[:, None]).sum()
    (grad_plain,) = torch.autograd.grad(expected, model.lm_head.weight)
    torch.testing.assert_close(logp.sum(), expected)
    torch.testing.assert_close(grad_kernel, grad_plain, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (bf16 autocast)"))])
def test_implicit_reward_of_the_reference_itself_is_zero(tokenizer, device):
    # Policy and reference scored under the same autocast: at step 0 every margin is exactly 0.
    pairs = ideal_vs_bad_pairs(tokenizer, n=8)
    policy = tiny_gpt(tokenizer).to(device)
    ref_chosen, ref_rejected = reference_log_probs(policy, pairs)
    accuracy, margin = implicit_reward_stats(policy, pairs, ref_chosen, ref_rejected, beta=1.0)
    assert accuracy == 0.0 and margin == 0.0


def test_dpo_step0_loss_is_ln2_and_training_margin_rises(tokenizer):
    pairs = ideal_vs_bad_pairs(tokenizer, n=16)
    policy = tiny_gpt(tokenizer)
    reference = copy.deepcopy(policy).requires_grad_(False)
    ref_chosen, ref_rejected = reference_log_probs(reference, pairs)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    margins = []
    for step in range(8):
        chosen, rejected = pair_log_probs(policy.train(), pairs)
        loss, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1)
        if step == 0:
            assert abs(loss.item() - math.log(2)) < 1e-5
        margins.append((chosen_rewards - rejected_rewards).mean().item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert abs(margins[0]) < 1e-4
    assert margins[-1] > margins[0] + 0.1


def test_label_pairs_orients_each_pair_by_the_noise_free_rater_and_drops_ties(toy_tokenizer):
    tasks = world.make_tasks("math", 6, "train", seed=0)
    good = [t.ideal + world.END for t in tasks]
    bad = [t.bad["wrong"] + world.END for t in tasks]
    replies_a = [g if i % 2 else b for i, (g, b) in enumerate(zip(good, bad))]  # the good reply on both sides
    replies_b = [b if i % 2 else g for i, (g, b) in enumerate(zip(good, bad))]
    sources = [("a", "b")] * 6
    tie = world.make_tasks("math", 1, "train", seed=1)[0]  # two different wrong answers: the judge scores both 0
    tie_a, tie_b = world.final_answer(tie.truth + 1) + world.END, world.final_answer(tie.truth + 2) + world.END
    assert tie_a != tie_b and world.gold_score(tie, tie_a) == world.gold_score(tie, tie_b)
    prompts = [toy_tokenizer.render_prompt([{"role": "user", "content": t.prompt}]) for t in tasks + [tie]]
    pairs = rl.label_pairs(tasks + [tie], replies_a + [tie_a], replies_b + [tie_b], toy_tokenizer, prompts,
                           random.Random(0), 0.0, sources + [("a", "b")], max_tokens=1000)
    assert len(pairs) == 6  # the tie is dropped
    for i, (task, pair) in enumerate(zip(tasks, pairs)):
        assert pair["chosen"] == good[i] and pair["rejected"] == bad[i]
        assert pair["chosen_ids"] == rl.reply_ids(toy_tokenizer, good[i])
        assert pair["rejected_ids"] == rl.reply_ids(toy_tokenizer, bad[i])
        assert pair["gold_chosen"] == world.gold_score(task, good[i]) > pair["gold_rejected"]
        assert pair["chosen_source"] == ("b" if i % 2 == 0 else "a") and not pair["flipped"]


def test_reward_model_subtracts_its_offset(toy_tokenizer):
    reward_model = rl.RewardModel(tiny_gpt(toy_tokenizer, 0))
    torch.nn.init.normal_(reward_model.head.weight)
    prompts, replies = [[1, 2, 3], [4, 5]], [[6, 7], [8, 9, 10]]
    before = reward_model(prompts, replies)
    reward_model.offset.fill_(0.25)
    torch.testing.assert_close(reward_model(prompts, replies), before - 0.25)
    torch.testing.assert_close(reward_model.score(prompts, replies), before.detach() - 0.25)


@pytest.mark.parametrize("loss_type,label_smoothing", [("sigmoid", 0.0), ("sigmoid", 0.3), ("ipo", 0.0), ("hinge", 0.0)])
def test_dpo_batch_is_dpo_loss_of_the_pair_log_probs(toy_tokenizer, loss_type, label_smoothing):
    # A reference that differs from the policy: at policy == reference every variant is insensitive to
    # swapped reference log-probs and the sigmoid loss to label smoothing (it is ln 2 for any).
    pairs = ideal_vs_bad_pairs(toy_tokenizer, n=4)
    policy, reference = tiny_gpt(toy_tokenizer, 0), tiny_gpt(toy_tokenizer, 1)
    ref_chosen, ref_rejected = rl.reference_log_probs(reference, pairs)
    policy.train()
    loss, stats = rl.dpo_batch(policy, pairs, ref_chosen, ref_rejected, beta=0.5, loss_type=loss_type,
                               label_smoothing=label_smoothing)
    pi_chosen, pi_rejected = rl.pair_log_probs(policy, pairs)
    expected, chosen_rewards, rejected_rewards = dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta=0.5,
                                                          loss_type=loss_type, label_smoothing=label_smoothing)
    torch.testing.assert_close(loss, expected)
    assert stats["margin"] == pytest.approx((chosen_rewards - rejected_rewards).mean().item(), rel=1e-5)
    assert stats["reward_acc"] == (chosen_rewards > rejected_rewards).float().mean().item()


def test_dpo_batch_adds_the_chosen_replies_nll_per_token(toy_tokenizer):
    # RPO: loss = DPO term + alpha * mean over pairs of the chosen reply's NLL per token, computed here
    # straight from the logits of prompt + reply, one pair at a time.
    pairs = ideal_vs_bad_pairs(toy_tokenizer, n=4)
    policy, reference = tiny_gpt(toy_tokenizer, 0), tiny_gpt(toy_tokenizer, 1)
    ref_chosen, ref_rejected = rl.reference_log_probs(reference, pairs)
    policy.eval()  # no dropout, so every forward pass below sees the same function
    plain, plain_stats = rl.dpo_batch(policy, pairs, ref_chosen, ref_rejected, beta=0.5)
    loss, stats = rl.dpo_batch(policy, pairs, ref_chosen, ref_rejected, beta=0.5, nll_coef=0.7)
    nlls = []
    for pair in pairs:
        ids = torch.tensor([pair["prompt_ids"] + pair["chosen_ids"]])
        logits = policy(ids)[0, len(pair["prompt_ids"]) - 1:-1]  # the positions that predict the reply's tokens
        nlls.append(F.cross_entropy(logits, torch.tensor(pair["chosen_ids"])))
    nll = torch.stack(nlls).mean()
    assert stats["nll_chosen"] == pytest.approx(nll.item(), rel=1e-5) and nll.item() > 0
    assert stats["dpo_loss"] == pytest.approx(plain.item(), rel=1e-6) == plain_stats["dpo_loss"]
    torch.testing.assert_close(loss, plain + 0.7 * nll)
    extra_grad, = torch.autograd.grad(loss - plain, policy.lm_head.weight)  # the NLL term moves the policy
    assert extra_grad.norm() > 0


def small_rollout(tokenizer, policy, n_tasks=4, samples=2):
    tasks = [world.random_task(random.Random(i)) for i in range(n_tasks)]
    return rl.sample_rollout(policy, tokenizer, tasks, samples=samples, max_new_tokens=6, seed=0)


def test_rollout_log_probs_score_under_the_sampling_temperature(toy_tokenizer, make_gpt):
    policy = make_gpt(seed=1)
    rollout = small_rollout(toy_tokenizer, policy)
    logp, mask = rl.rollout_log_probs(policy, rollout, temperature=0.7)
    with torch.no_grad():
        expected, expected_mask = response_log_probs(policy, rollout.prompts, rollout.responses, temperature=0.7)
        at_one, _ = response_log_probs(policy, rollout.prompts, rollout.responses)
    torch.testing.assert_close(logp, expected)
    assert torch.equal(mask, expected_mask)
    assert not torch.allclose(expected, at_one)  # the temperature matters for this model


def test_kl_beta_enters_the_optimised_loss(toy_tokenizer, make_gpt):
    # Zero advantages: the surrogate has no gradient, so only the KL term can move the policy.
    policy, reference = make_gpt(seed=1).train(), make_gpt(seed=2)
    rollout = small_rollout(toy_tokenizer, policy)
    old_logp, mask = rl.rollout_log_probs(policy, rollout)
    ref_logp, _ = rl.rollout_log_probs(reference, rollout)
    for kl_beta, should_move in [(0.0, False), (0.1, True)]:
        model = copy.deepcopy(policy)
        before = [p.detach().clone() for p in model.parameters()]
        history = rl.clipped_policy_update(model, configure_optimizer(model, 1e-2, 0.0), rollout, old_logp,
                                           torch.zeros_like(mask), mask, rl.ClipConfig(epochs=1, kl_beta=kl_beta),
                                           random.Random(0), ref_logp=ref_logp)
        moved = any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
        assert moved == should_move, kl_beta
        if kl_beta:
            assert history[0]["kl_k3"] > 0


def draw_math(seed=0):
    rng = random.Random(seed)
    return lambda n: [world.make_task("math", "arithmetic", rng, "train") for _ in range(n)]


def test_grpo_step_measures_kl_against_the_reference(toy_tokenizer, make_gpt):
    policy, reference = make_gpt(seed=1).train(), make_gpt(seed=2)
    before = copy.deepcopy(policy)
    stats, rollout = rl.grpo_step(policy, configure_optimizer(policy, 1e-2, 0.0), reference, toy_tokenizer,
                                  draw_math(), lambda r: [float(x[0] % 2) for x in r.responses],
                                  rl.ClipConfig(epochs=1, minibatch_size=8, kl_beta=0.1), random.Random(0),
                                  n_groups=2, group_size=4, max_new_tokens=6)
    old_logp, mask = rl.rollout_log_probs(before, rollout)
    ref_logp, _ = rl.rollout_log_probs(reference, rollout)
    expected = ((old_logp - ref_logp) * mask).sum(dim=1).mean().item()
    assert abs(expected) > 1e-2
    assert stats["kl"] == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_grpo_step_passes_its_scale_to_group_advantages(toy_tokenizer, make_gpt, monkeypatch):
    captured = {}
    original = rl.clipped_policy_update

    def spy(policy, optimizer, rollout, old_logp, advantages, mask, *args, **kwargs):
        captured.update(advantages=advantages.clone(), mask=mask.clone())
        return original(policy, optimizer, rollout, old_logp, advantages, mask, *args, **kwargs)

    monkeypatch.setattr(rl, "clipped_policy_update", spy)

    def reward(rollout):
        return [float(x[0] % 3) for x in rollout.responses]

    policy, reference = make_gpt(seed=1).train(), make_gpt(seed=1)
    _, rollout = rl.grpo_step(policy, configure_optimizer(policy, 1e-2, 0.0), reference, toy_tokenizer, draw_math(),
                              reward, rl.ClipConfig(epochs=1, minibatch_size=8), random.Random(0), n_groups=3,
                              group_size=4, scale="none", max_new_tokens=6)
    rewards = torch.tensor(reward(rollout))
    expected = group_advantages(rewards, 4, scale="none")[:, None] * captured["mask"]
    with_std = group_advantages(rewards, 4, scale="std")[:, None] * captured["mask"]
    assert not torch.allclose(expected, with_std)  # the rewards make the two scales differ
    torch.testing.assert_close(captured["advantages"], expected)
