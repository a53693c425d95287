"""Preference data, the reward model and DPO mechanics (rl.py), on tiny seeded models."""

import copy
import math

import pytest
import torch

import world
from gpt import GPT, GPTConfig, response_log_probs
from kernels import bradley_terry_loss, dpo_loss
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
