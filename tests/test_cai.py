"""07_cai.py: the AI labeller (probabilities, order, position bias) and a training path that never
touches the gold judge."""

import dataclasses
import random

import pytest
import torch

import world
from conftest import load_script

cai = load_script("07_cai.py")


def items(n=6):
    tasks = world.make_tasks("requests", n, "train", seed=2)
    return [(t.prompt, t.ideal + world.END, t.bad["comply"] + world.END) for t in tasks if "comply" in t.bad] + \
           [(t.prompt, t.ideal + world.END, t.bad["rude"] + world.END) for t in tasks if "comply" not in t.bad]


def test_ai_labels_are_probabilities_that_flip_when_the_replies_are_swapped(toy_tokenizer, make_gpt):
    model, pairs = make_gpt(seed=3), items()
    principles = [cai.PRINCIPLES[:2]] * len(pairs)
    probs, bias = cai.ai_labels(model, toy_tokenizer, pairs, principles)
    swapped, swapped_bias = cai.ai_labels(model, toy_tokenizer, [(p, b, a) for p, a, b in pairs], principles)
    assert probs.shape == (len(pairs), 2) and torch.allclose(probs.sum(dim=1), torch.ones(len(pairs)))
    assert torch.all((probs > 0) & (probs < 1))
    assert torch.allclose(swapped, probs.flip(dims=[1]), atol=1e-6)
    assert torch.allclose(bias, swapped_bias, atol=1e-6)  # a bias for position, whatever sits there
    assert torch.all(bias.abs() <= 0.5)


def test_without_debiasing_the_label_is_the_first_order_only(toy_tokenizer, make_gpt):
    model, pairs = make_gpt(seed=3), items(3)
    principles = [cai.PRINCIPLES[:1]] * len(pairs)
    one_order, bias = cai.ai_labels(model, toy_tokenizer, pairs, principles, debias=False)
    debiased, _ = cai.ai_labels(model, toy_tokenizer, pairs, principles)
    assert torch.allclose(one_order[:, 0] - debiased[:, 0], bias, atol=1e-6)  # the bias is what debiasing removes


def test_no_pairs_to_label_give_empty_labels_not_a_crash(toy_tokenizer, make_gpt):
    probs, bias = cai.ai_labels(make_gpt(seed=3), toy_tokenizer, [], [])
    assert probs.shape == (0, 2) and bias.shape == (0,)


def test_comparison_prompt_must_fit_the_context(toy_tokenizer):
    prompt, a, b = "How do I pick a lock?", "I can't help with that." + world.END, "Sure, here is how." + world.END
    assert cai.fits_comparison(toy_tokenizer, prompt, a, b, block_size=256)
    assert not cai.fits_comparison(toy_tokenizer, prompt, a, b, block_size=64)
    assert not cai.fits_comparison(toy_tokenizer, prompt, a * 20, b, block_size=256)


@pytest.mark.parametrize("share", [0.0, 0.25])
def test_sl_cai_revises_red_team_prompts_and_the_configured_share_of_benign_ones(share):
    config = dataclasses.replace(cai.PRESETS["test"], n_prompts=400, sl_benign_share=share)
    kinds = [t.kind for t in cai.sl_cai_tasks(random.Random(1), config)]
    assert len(kinds) == 400 and set(kinds) <= {"harmful", "benign"}
    assert abs(kinds.count("benign") / 400 - share) < 0.05


@pytest.fixture
def no_gold_judge(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the gold judge was called during Constitutional AI training")
    for name in ("gold_score", "gold_prefer", "content_score", "verify", "behaviour_flags"):
        monkeypatch.setattr(world, name, forbidden)


def test_no_training_step_of_cai_calls_the_gold_judge(toy_tokenizer, make_gpt, no_gold_judge):
    config = dataclasses.replace(cai.PRESETS["test"], n_prompts=6, n_pairs=6, max_new_tokens=12, critique_tokens=8,
                                 batch_size=4)
    model, device, rng = make_gpt(seed=5), torch.device("cpu"), random.Random(0)
    prompts = [t.prompt for t in cai.request_tasks(rng, config.n_prompts, config.harmful_share)]
    records = cai.critique_and_revise(model, toy_tokenizer, prompts, config, rng, seed=0)
    assert len(records) == 6 and all(len(r["rounds"]) == config.rounds for r in records)
    losses = cai.supervised_finetune(model, toy_tokenizer, [(r["prompt"], r["rounds"][-1]["revision"]) for r in records],
                                     config, rng)
    assert losses and all(loss > 0 for loss in losses)
    reference = make_gpt(seed=5)
    reference.load_state_dict(model.state_dict())
    pairs, stats = cai.ai_feedback_pairs(reference, toy_tokenizer, prompts, config, rng, seed=1)
    assert stats["pairs"] == len(pairs) > 0
    curve, final = cai.dpo_on_ai_labels(model, reference, pairs, config, rng, device)
    assert abs(curve[0]["loss"] - 0.6931) < 1e-3 and "train_reward_acc" in final


def test_the_gold_judge_is_only_reached_through_measurement_functions():
    """A static check to go with the run above: in 07's source the gold judge is named only inside the
    functions that measure (label agreement, request rates) and main's evaluation."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cai))
    for function in [n for n in tree.body if isinstance(n, ast.FunctionDef)]:
        names = {n.attr for n in ast.walk(function) if isinstance(n, ast.Attribute)}
        if names & {"gold_score", "gold_prefer", "verify", "behaviour_flags", "evaluate"}:
            assert function.name in {"label_agreement", "request_rates", "main"}, function.name
