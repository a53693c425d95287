"""Run by test_distributed.py as one process or under torchrun: the RL updates on one fixed rollout.

Every process builds the same tiny models and the same rollout, trains with the code the RL scripts use
(rl.clipped_policy_update with each loss aggregation and a k3 KL term, 03's value update, 07's SL-CAI
fine-tuning), and rank 0
saves the weights; two processes must end where one process ends. It also checks that a rollout sampled
with across_processes=True is the same whole rollout in every process.

    python tests/dp_worker.py OUT.pt
    torchrun --nproc_per_node=2 tests/dp_worker.py OUT.pt
"""

import copy
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import rl  # noqa: E402
import world  # noqa: E402
from conftest import load_script  # noqa: E402
from gpt import (GPT, GPTConfig, configure_optimizer, gather_lists, init_distributed, is_main,  # noqa: E402
                 leave_distributed, split_and_gather)
from tokenizer import Tokenizer  # noqa: E402


def tiny_gpt(vocab_size, seed):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size, 128, n_layer=1, n_head=2, n_embd=32))


def fixed_rollout(n, vocab_size, seed):
    """n rows of random prompt and reply token ids of varied lengths (the same in every process)."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab_size) for _ in range(rng.randint(3, 8))] for _ in range(n)]
    replies = [[rng.randrange(vocab_size) for _ in range(rng.randint(1, 9))] for _ in range(n)]
    return rl.Rollout([None] * n, prompts, replies, [""] * n)


def check_sampling_across_processes(tokenizer):
    """across_processes=True: every process holds the same whole rollout, and its replies are those of every task."""
    policy = tiny_gpt(tokenizer.vocab_size, 0)
    tasks = [world.make_task("math", "arithmetic", random.Random(i), "train") for i in range(5)]
    rollout = rl.sample_rollout(policy, tokenizer, tasks, samples=2, max_new_tokens=6, seed=3, across_processes=True)
    assert len(rollout) == 10 and rollout.tasks == [t for t in tasks for _ in range(2)]
    everyone = gather_lists([rollout.responses])
    assert all(r == everyone[0] for r in everyone), "the processes hold different rollouts"
    assert split_and_gather(lambda xs: [x * x for x in xs], list(range(7))) == [x * x for x in range(7)]


def main():
    init_distributed(torch.device("cpu"))
    docs = world.toy_internet(60, seed=0)
    tokenizer = Tokenizer.train([world.document_text(d) for d in docs], 300)
    check_sampling_across_processes(tokenizer)
    vocab_size = 64
    policy = tiny_gpt(vocab_size, 1)
    reference = copy.deepcopy(policy).requires_grad_(False)
    policy.train()
    # 11 rows in minibatches of 5: the last minibatch of each epoch has one row, so one of two processes has none
    rollout = fixed_rollout(11, vocab_size, seed=0)
    old_logp, mask = rl.rollout_log_probs(policy, rollout)
    ref_logp, _ = rl.rollout_log_probs(reference, rollout)
    torch.manual_seed(2)
    advantages = torch.randn(mask.shape) * mask
    optimizer = configure_optimizer(policy, 1e-2, weight_decay=0.0)
    for loss_agg in ("token_mean", "seq_mean", "seq_sum_norm"):
        clip = rl.ClipConfig(epochs=2, minibatch_size=5, loss_agg=loss_agg, kl_beta=0.1)
        rl.clipped_policy_update(policy, optimizer, rollout, old_logp, advantages, mask, clip, random.Random(0),
                                 ref_logp=ref_logp)

    ppo = load_script("03_ppo.py")
    value_model = rl.RewardModel(tiny_gpt(vocab_size, 3))
    value_model.train()
    old_values = ppo.rollout_values(value_model, rollout, mask.shape[1])
    returns = torch.randn(mask.shape) * mask
    config = ppo.PPOConfig(iterations=1, batch_size=11, lr=1e-2, value_lr=1e-2, kl_coef=0.0, minibatch_size=5)
    ppo.update_value_model(value_model, configure_optimizer(value_model, 1e-2, weight_decay=0.0), rollout,
                           old_values, returns, mask, config, random.Random(0), 0)
    # 07's SL-CAI fine-tuning: a mean over reply tokens, shares weighted by their tokens (gpt.local_token_share)
    cai = load_script("07_cai.py")
    tasks = [world.random_task(random.Random(i), "train") for i in range(11)]
    examples = [(t.prompt, "Sure, " * (1 + i % 4) + world.END) for i, t in enumerate(tasks)]
    sl_model = tiny_gpt(tokenizer.vocab_size, 4)
    sl_config = cai.CAIConfig(**{**vars(cai.PRESETS["test"]), "batch_size": 5, "sl_epochs": 2, "sl_lr": 1e-2})
    cai.supervised_finetune(sl_model, tokenizer, examples, sl_config, random.Random(0))
    if is_main():
        torch.save({"policy": policy.state_dict(), "start": reference.state_dict(),
                    "value": value_model.state_dict(), "sl": sl_model.state_dict()}, sys.argv[1])


if __name__ == "__main__":
    main()
    leave_distributed()
