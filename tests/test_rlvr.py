"""06_rlvr.py and the checkers of rl.CHECKERS: they accept the world's ideal answers, reject its bad ones,
and cannot be fooled by repeating or listing answers; pass@k is unbiased."""

import math
import random

import pytest

import rl
import world
from conftest import load_script

rlvr = load_script("06_rlvr.py")


def tasks_of(family, kind, n=60):
    return world.make_tasks(family, n, "train", seed=5, kind=kind)


@pytest.mark.parametrize("family,kind", [("math", "arithmetic"), ("facts", "known"), ("facts", "unknown"),
                                         ("facts", "false_premise")])
def test_checkers_accept_ideal_answers_and_reject_wrong_ones(family, kind):
    checker = rl.check_math_answer if family == "math" else rl.check_fact
    for task in tasks_of(family, kind):
        assert checker(task, task.ideal + world.END), task.ideal
        for failure, reply in task.bad.items():
            if failure in ("rude", "ramble"):  # style failures: the content is right, the format checker's job
                continue
            assert not checker(task, reply + world.END), (failure, reply)


def test_math_checker_cannot_be_fooled_by_several_or_repeated_answers():
    for task in tasks_of("math", "arithmetic", 30):
        right, wrong = f"The answer is {task.truth}.", f"The answer is {task.truth + 1}."
        assert rl.check_math_answer(task, right + world.END)
        assert not rl.check_math_answer(task, f"{wrong} {right}" + world.END)
        assert not rl.check_math_answer(task, f"{right} {right}" + world.END)
        assert not rl.check_math_answer(task, f"{task.truth} {task.truth + 1} {task.truth - 1}" + world.END)


def test_fact_checker_cannot_be_fooled_by_listing_values():
    for task in tasks_of("facts", "known", 30):
        others = [v for v in world.ENTITY_VALUES[task.info["relation"]] if v != task.truth][:3]
        assert not rl.check_fact(task, f"It is {task.truth} or {others[0]}." + world.END)
        assert not rl.check_fact(task, " ".join(others + [task.truth]) + world.END)


def test_format_checker_wants_an_ended_turn_without_repetition_and_one_answer():
    task = tasks_of("math", "arithmetic", 1)[0]
    assert rl.check_format(task, task.ideal + world.END)
    assert not rl.check_format(task, task.ideal)  # never ended
    assert not rl.check_format(task, "" + world.END)
    assert not rl.check_format(task, "The answer is 1. The answer is 2." + world.END)
    assert not rl.check_format(task, "yes yes yes" + world.END)


def test_verifiable_reward_sums_the_checks_that_apply():
    math_task, fact_task = tasks_of("math", "arithmetic", 1)[0], tasks_of("facts", "known", 1)[0]
    weights = {"math_answer": 1.0, "fact_lookup": 1.0, "format": 0.1}
    assert rl.verifiable_reward(math_task, math_task.ideal + world.END, weights) == pytest.approx(1.1)
    assert rl.verifiable_reward(fact_task, fact_task.ideal + world.END, weights) == pytest.approx(1.1)
    assert rl.verifiable_reward(fact_task, fact_task.bad["wrong"], weights) == 0.0


def test_pass_at_k_matches_its_definition():
    assert rlvr.pass_at_k(16, 0, 8) == 0.0 and rlvr.pass_at_k(16, 16, 1) == 1.0
    assert rlvr.pass_at_k(16, 4, 1) == pytest.approx(4 / 16)
    # P(at least one right in k draws without replacement) = 1 - C(n-c, k) / C(n, k)
    assert rlvr.pass_at_k(10, 3, 2) == pytest.approx(1 - math.comb(7, 2) / math.comb(10, 2))
    assert rlvr.pass_at_k(16, 1, 16) == 1.0


def test_training_prompts_are_checkable_and_from_the_train_split():
    tasks = rlvr.verifiable_prompts(random.Random(0), 0.5)(200)
    assert {t.family for t in tasks} == {"math", "facts"}
    eval_prompts = {t.prompt for t in world.eval_suite(0)}
    assert not eval_prompts & {t.prompt for t in tasks}
