"""Mechanics shared by the post-training scripts (02-07): preference data, the reward model, sequence
log-probs and the DPO step, rollouts, the clipped policy-gradient update, verifiable rewards and
group sampling.

The scripts hold the ideas (the losses and update loops); this module holds the plumbing they share,
so no script imports another and no ten lines are written twice.
"""

import hashlib
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import world
from gpt import (GPT, average_over_processes, load_checkpoint, local_share, pack_sequences, process_seed,
                 response_log_probs, save_checkpoint, split_and_gather, shuffled_minibatches, update, world_info)
from kernels import dpo_loss, group_advantages, kl_penalty, masked_mean, ppo_policy_loss
from report import load_stage, read_json, write_json

# ---------------------------------------------------------------------------------------------
# Preference data: pairs of replies to one prompt, labelled by the (noisy) gold rater
# ---------------------------------------------------------------------------------------------


def reply_ids(tokenizer, text):
    """Token ids of a reply text (END becomes the end-of-turn token)."""
    body, ended = world.strip_end(text)
    return tokenizer.encode(body) + ([tokenizer.eot_id] if ended else [])


def oriented(pick_b, a, b):
    """(chosen, rejected) from a pair (a, b) and the rater's pick."""
    return (b, a) if pick_b else (a, b)


def label_pairs(tasks, replies_a, replies_b, tokenizer, prompts, rng, rater_temperature, sources, max_tokens):
    """Turn two replies per task into (chosen, rejected) pairs with the rater's label.

    Pairs whose replies are identical, or that the gold judge scores equal, are dropped: a rater with
    an "equal" button would press it. So are replies longer than max_tokens (only the world's bad
    replies can be: sampled ones stop there). rater_temperature 0 is a noise-free rater.
    """
    pairs = []
    for task, prompt, a, b, (source_a, source_b) in zip(tasks, prompts, replies_a, replies_b, sources):
        gold_a, gold_b = world.gold_score(task, a), world.gold_score(task, b)
        too_long = max(len(reply_ids(tokenizer, a)), len(reply_ids(tokenizer, b))) > max_tokens
        if a == b or gold_a == gold_b or too_long:
            continue
        pick_b = world.gold_prefer(task, a, b, rng, rater_temperature)
        chosen, rejected = oriented(pick_b, a, b)
        gold_c, gold_r = oriented(pick_b, gold_a, gold_b)
        src_c, src_r = oriented(pick_b, source_a, source_b)
        pairs.append({"family": task.family, "kind": task.kind, "prompt": task.prompt, "prompt_ids": prompt,
                      "chosen": chosen, "rejected": rejected, "chosen_ids": reply_ids(tokenizer, chosen),
                      "rejected_ids": reply_ids(tokenizer, rejected), "gold_chosen": gold_c,
                      "gold_rejected": gold_r, "chosen_source": src_c, "rejected_source": src_r,
                      "flipped": gold_c < gold_r})
    return pairs


def build_preferences(model, tokenizer, *, n_prompts, split, seed, rater_temperature, bad_mix, max_new_tokens):
    """Sample two replies per prompt from `model` (temperature 1) and label each pair.

    With probability bad_mix the second reply is replaced by one of the world's typical bad replies
    (world.preference_negatives), so rare failures (rudeness, compliance, rambling, over-refusal) are covered. Train-split pairs get the noisy rater;
    eval-split pairs are labelled noise-free (they measure the reward model against the truth).
    """
    rng = random.Random(f"preferences/{split}/{seed}")
    tasks = [world.random_task(rng, split) for _ in range(n_prompts)]
    prompts, _, texts = world.generate_responses(model, tokenizer, tasks, samples=2, temperature=1.0,
                                                 max_new_tokens=max_new_tokens, seed=seed)
    replies_a, replies_b, sources = texts[0::2], list(texts[1::2]), []
    for i, task in enumerate(tasks):
        if rng.random() < bad_mix:
            replies_b[i] = rng.choice(world.preference_negatives(task)) + world.END
            sources.append(("model", "bad"))
        else:
            sources.append(("model", "model"))
    return label_pairs(tasks, replies_a, replies_b, tokenizer, prompts[0::2], rng,
                       rater_temperature if split == "train" else 0.0, sources, max_new_tokens)


# The preference data of each preset, one table for 02 and 04 so both read the same cached pairs.
PREFERENCE_DATA = {
    "test": {"n_train_prompts": 96, "n_eval_prompts": 48, "rater_temperature": 0.1, "bad_mix": 0.3,
             "max_new_tokens": 48},
    "cpu": {"n_train_prompts": 8000, "n_eval_prompts": 500, "rater_temperature": 0.1, "bad_mix": 0.3,
            "max_new_tokens": 96},
    "gpu": {"n_train_prompts": 8000, "n_eval_prompts": 1500, "rater_temperature": 0.1, "bad_mix": 0.3,
            "max_new_tokens": 96},
}


def preference_data(out, preset, seed, model, model_path, tokenizer):
    """(train pairs, held-out pairs) for a preset: PREFERENCE_DATA's settings, cached under <out>."""
    settings = dict(PREFERENCE_DATA[preset])
    n_train, n_eval = settings.pop("n_train_prompts"), settings.pop("n_eval_prompts")
    return tuple(load_or_build_preferences(out, model, model_path, tokenizer, n_prompts=n, split=split, seed=seed,
                                           **settings)
                 for split, n in (("train", n_train), ("eval", n_eval)))


def load_or_build_preferences(out, model, model_path, tokenizer, *, n_prompts, split, seed, rater_temperature,
                              bad_mix, max_new_tokens):
    """The preference pairs of one split, cached under <out>/preferences/ and rebuilt when anything that
    made them (the SFT checkpoint, the settings, the world and its judge) has changed."""
    stat = os.stat(model_path)
    world_source = hashlib.sha256(Path(world.__file__).read_bytes()).hexdigest()[:16]
    signature = {"model": [stat.st_size, stat.st_mtime_ns], "world": world_source, "n_prompts": n_prompts,
                 "seed": seed, "rater_temperature": rater_temperature if split == "train" else 0.0,
                 "bad_mix": bad_mix, "max_new_tokens": max_new_tokens, "device": model.lm_head.weight.device.type}
    path = Path(out) / "preferences" / f"{split}.json"
    if path.is_file():
        cached = read_json(path)
        if cached.get("signature") == signature:
            print(f"reusing {len(cached['pairs'])} {split} preference pairs from {path}")
            return cached["pairs"]
    print(f"building {split} preference pairs: {n_prompts} prompts x 2 replies from {model_path} ...", flush=True)
    pairs = build_preferences(model, tokenizer, n_prompts=n_prompts, split=split, seed=seed,
                              rater_temperature=rater_temperature, bad_mix=bad_mix, max_new_tokens=max_new_tokens)
    write_json(path, {"signature": signature, "pairs": pairs})
    return pairs


def preference_stats(pairs):
    """Size, label noise (share of labels the noise-free judge disagrees with) and share per family."""
    families = {}
    for pair in pairs:
        families[pair["family"]] = families.get(pair["family"], 0) + 1
    return {"pairs": len(pairs), "label_noise": sum(p["flipped"] for p in pairs) / max(1, len(pairs)),
            "per_family": families}


# ---------------------------------------------------------------------------------------------
# The reward model: the SFT transformer with a scalar head read at the reply's last token
# ---------------------------------------------------------------------------------------------


class RewardModel(nn.Module):
    """r(prompt, reply) = w . h_last + b - offset, h_last the final hidden state at the reply's last
    token (its end-of-turn token when it ended), as in InstructGPT.

    The head starts near zero so every reply starts with about the same reward; offset is set after
    training so that replies sampled from the SFT model average 0.

    With a `reference` (a frozen copy of the SFT model; 02's --likelihood-feature) the reward also reads
    how likely the reference finds the reply, with a weight the model learns per reply:

        r = w . h_last + b + softplus(g . h_last + c) * mean_t log p_ref(reply_t | prompt, reply_<t) - offset

    A sampled solution with a slipped digit contains a token the SFT model itself thought unlikely; one
    hidden state at the end does not show that, the likelihood does (README, 02).
    """

    def __init__(self, gpt, reference=None):
        super().__init__()
        self.gpt = gpt
        self.head = nn.Linear(gpt.config.n_embd, 1)
        nn.init.normal_(self.head.weight, std=1e-3)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("offset", torch.zeros(()))
        self.reference = reference.requires_grad_(False) if reference is not None else None
        if reference is not None:
            self.gate = nn.Linear(gpt.config.n_embd, 1)  # softplus(gate) >= 0: the likelihood's weight
            nn.init.normal_(self.gate.weight, std=1e-3)
            nn.init.zeros_(self.gate.bias)

    def forward(self, prompts, replies):
        """Rewards (B,) for lists of prompt and reply token ids."""
        device = self.head.weight.device
        idx, prompt_lens = pack_sequences(prompts, replies, self.gpt.config.block_size)
        last = prompt_lens + torch.tensor([len(r) for r in replies]) - 1  # (B,) index of the reply's last token
        hidden = self.gpt.hidden(idx.to(device))  # (B, S, d)
        h_last = hidden[torch.arange(len(replies), device=device), last.to(device)]  # (B, d)
        reward = self.head(h_last).squeeze(-1)
        if self.reference is not None:
            reward = reward + F.softplus(self.gate(h_last).squeeze(-1)) * self.reference_likelihood(prompts, replies)
        return reward - self.offset

    @torch.no_grad()
    def reference_likelihood(self, prompts, replies):
        """Mean log-prob per reply token under the frozen reference. -> (B,)"""
        logp, mask = response_log_probs(self.reference, prompts, replies)
        return masked_mean(logp.float(), mask, dim=1)

    def token_values(self, prompts, replies):
        """The head read at every reply position instead: values (B, R), values[:, j] = V(prompt, reply_<j),
        from the hidden state just before reply token j. PPO's value model is a RewardModel used this way."""
        device = self.head.weight.device
        idx, prompt_lens = pack_sequences(prompts, replies, self.gpt.config.block_size)
        lengths = torch.tensor([len(r) for r in replies])
        steps = torch.arange(int(lengths.max()))
        mask = (steps[None, :] < lengths[:, None])  # (B, R)
        where = ((prompt_lens[:, None] + steps[None, :] - 1) * mask).to(device)  # (B, R) positions, 0 on padding
        hidden = self.gpt.hidden(idx.to(device))  # (B, S, d)
        h = hidden.gather(1, where[..., None].expand(-1, -1, hidden.shape[-1]))  # (B, R, d)
        return (self.head(h).squeeze(-1) - self.offset) * mask.to(device)

    @torch.no_grad()
    def score(self, prompts, replies, batch_size=64):
        """Rewards without gradients, in batches, in eval mode (the previous mode is restored). -> (B,) on the CPU"""
        was_training = self.training
        self.eval()
        rewards = torch.cat([self(prompts[i:i + batch_size], replies[i:i + batch_size]).float().cpu()
                             for i in range(0, len(prompts), batch_size)])
        self.train(was_training)
        return rewards


def save_reward_model(path, reward_model, tokenizer, meta):
    """The transformer as a normal checkpoint; the head and the offset (and, with the likelihood feature,
    the gate and the reference's weights) travel in its meta."""
    head = {"weight": reward_model.head.weight.detach().cpu(), "bias": reward_model.head.bias.detach().cpu(),
            "offset": reward_model.offset.detach().cpu()}
    if reward_model.reference is not None:
        head["gate"] = {k: v.detach().cpu() for k, v in reward_model.gate.state_dict().items()}
        head["reference"] = {k: v.detach().cpu() for k, v in reward_model.reference.state_dict().items()}
    save_checkpoint(path, reward_model.gpt, tokenizer=tokenizer, meta={**meta, "reward_head": head})


def load_reward_stage(out, device, frozen=False):
    """02's reward model from <out>/reward_model/model.pt, or exit with one line saying what to run."""
    return load_stage(out, "reward_model", device, frozen=frozen, loader=load_reward_model)


def load_reward_model(path, device):
    """(RewardModel, tokenizer, meta) from a file written by save_reward_model."""
    gpt, tokenizer, meta = load_checkpoint(path, device)
    if "reward_head" not in meta:
        raise ValueError(f"{path} is not a reward model checkpoint (no reward head)")
    head = meta["reward_head"]
    reference = None
    if "reference" in head:
        reference = GPT(gpt.config)
        reference.load_state_dict(head["reference"])
    reward_model = RewardModel(gpt, reference).to(device)
    with torch.no_grad():
        reward_model.head.weight.copy_(head["weight"])
        reward_model.head.bias.copy_(head["bias"])
        reward_model.offset.copy_(head["offset"])
    if reference is not None:
        reward_model.gate.load_state_dict(head["gate"])
    return reward_model.eval(), tokenizer, meta


# ---------------------------------------------------------------------------------------------
# Sequence log-probs of preference pairs (DPO and its relatives)
# ---------------------------------------------------------------------------------------------


def pair_log_probs(model, pairs):
    """Summed log-probs of the chosen and the rejected reply of each pair under model. -> (B,), (B,)

    Differentiable unless called under torch.no_grad.
    """
    prompts = [p["prompt_ids"] for p in pairs]
    logp, _ = response_log_probs(model, prompts + prompts, [p["chosen_ids"] for p in pairs] +
                                 [p["rejected_ids"] for p in pairs])
    sums = logp.sum(dim=1)  # padding positions are already 0
    return sums[: len(pairs)], sums[len(pairs):]


@torch.no_grad()
def reference_log_probs(model, pairs, batch_size=64):
    """pair_log_probs of a frozen model over all pairs, once, in batches. -> (N,), (N,) on the CPU

    On CUDA it runs under the same bf16 autocast as the policy's forward pass, so that at step 0 policy
    and reference log-probs agree up to rounding.
    """
    model.eval()
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=model.lm_head.weight.is_cuda):
            c, r = pair_log_probs(model, pairs[start:start + batch_size])
        chosen.append(c.float().cpu())
        rejected.append(r.float().cpu())
    return torch.cat(chosen), torch.cat(rejected)


# ---------------------------------------------------------------------------------------------
# The DPO step (04 and 07's RL-CAI phase)
# ---------------------------------------------------------------------------------------------


def dpo_batch(policy, pairs, ref_chosen, ref_rejected, *, beta, loss_type="sigmoid", label_smoothing=0.0,
              nll_coef=0.0):
    """The DPO loss of a batch of pairs and what to log about it (the DPO term alone, implicit-reward
    accuracy and margin, the summed log-probs of the chosen and rejected replies, the chosen replies'
    negative log-likelihood per token).

    nll_coef > 0 adds nll_coef x that NLL to the loss (RPO, Pang et al. 2024): DPO only asks the chosen
    reply to gain on the rejected one, and with larger steps the chosen replies lose probability too; the NLL
    term keeps them likely.
    """
    pi_chosen, pi_rejected = pair_log_probs(policy, pairs)  # (B,), (B,) summed over reply tokens
    loss, chosen_rewards, rejected_rewards = dpo_loss(
        pi_chosen, pi_rejected, ref_chosen.to(pi_chosen.device), ref_rejected.to(pi_chosen.device),
        beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    chosen_tokens = torch.tensor([len(p["chosen_ids"]) for p in pairs], device=pi_chosen.device)
    # Each reply's mean over its tokens, then over the batch; from the log-probs DPO already has (rl.reply_loss
    # would run the model a second time).
    nll_chosen = -(pi_chosen / chosen_tokens).mean()
    stats = {"dpo_loss": loss.item(), "reward_acc": (chosen_rewards > rejected_rewards).float().mean().item(),
             "margin": (chosen_rewards - rejected_rewards).mean().item(),
             "logp_chosen": pi_chosen.mean().item(), "logp_rejected": pi_rejected.mean().item(),
             "nll_chosen": nll_chosen.item()}
    if nll_coef:
        loss = loss + nll_coef * nll_chosen
    return loss, stats


@torch.no_grad()
def implicit_reward_stats(policy, pairs, ref_chosen, ref_rejected, beta, batch_size=64):
    """Implicit-reward accuracy and mean margin beta * (log-ratio chosen - log-ratio rejected) over pairs.

    Scored under the same autocast as reference_log_probs, so a policy equal to the reference has margin 0."""
    was_training = policy.training
    policy.eval()
    margins = []
    for start in range(0, len(pairs), batch_size):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=policy.lm_head.weight.is_cuda):
            c, r = pair_log_probs(policy, pairs[start:start + batch_size])
        margins.append(beta * ((c.float().cpu() - ref_chosen[start:start + batch_size])
                               - (r.float().cpu() - ref_rejected[start:start + batch_size])))
    policy.train(was_training)
    margins = torch.cat(margins)
    return (margins > 0).float().mean().item(), margins.mean().item()


# ---------------------------------------------------------------------------------------------
# Rollouts: sample replies, score their tokens (03, 05, 06)
# ---------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """Replies sampled from the policy, one row per reply. Replies to one task are contiguous (a group)."""
    tasks: list  # the world task of each row
    prompts: list  # prompt token ids
    responses: list  # reply token ids, ending with the end-of-turn token when the reply ended
    texts: list  # decoded replies, with world.END appended when the reply ended

    def __len__(self):
        return len(self.responses)

    def ended(self):
        return torch.tensor([text.endswith(world.END) for text in self.texts])


def sample_rollout(policy, tokenizer, tasks, *, samples=1, temperature=1.0, max_new_tokens=96, seed=0,
                   across_processes=False):
    """`samples` replies per task from the policy (KV-cache generation, stops at the end-of-turn token).

    across_processes=True (training, under torchrun): each process samples the replies to its share of the
    tasks, with its own seed, and every process receives the whole rollout, so that all of them score and
    train on the same global batch. One process: the same as False.
    """
    def sample(some_tasks):
        return world.generate_responses(policy, tokenizer, some_tasks, samples=samples, temperature=temperature,
                                        max_new_tokens=max_new_tokens,
                                        seed=process_seed(seed) if across_processes else seed)
    prompts, outputs, texts = split_and_gather(sample, tasks) if across_processes else sample(tasks)
    return Rollout([t for t in tasks for _ in range(samples)], prompts, outputs, texts)


@torch.no_grad()
def rollout_log_probs(model, rollout, *, temperature=1.0, batch_size=64):
    """Per-token log-probs (N, R) of every reply under a frozen snapshot of `model`, and the mask (N, R).

    Computed in eval mode without gradients: these are the "old" log-probs of PPO's ratio (under the
    policy that sampled the rollout) or the reference's. The temperature must be the sampling one.
    """
    was_training = model.training
    model.eval()
    width = max(len(r) for r in rollout.responses)
    device = model.lm_head.weight.device
    logp = torch.zeros(len(rollout), width, device=device)
    mask = torch.zeros(len(rollout), width, device=device)
    for start in range(0, len(rollout), batch_size):
        rows = slice(start, start + batch_size)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            lp, m = response_log_probs(model, rollout.prompts[rows], rollout.responses[rows], temperature=temperature)
        logp[rows, : lp.shape[1]] = lp.float()
        mask[rows, : m.shape[1]] = m
    model.train(was_training)
    return logp, mask


# ---------------------------------------------------------------------------------------------
# The clipped policy-gradient update (03, 05, 06)
# ---------------------------------------------------------------------------------------------


@dataclass
class ClipConfig:
    """How the clipped surrogate is applied to one rollout."""
    epochs: int = 2  # passes over the rollout (PPO reuses each sample for several steps)
    minibatch_size: int = 32
    clip_low: float = 0.2  # ratio clipped to [1 - clip_low, 1 + clip_high]
    clip_high: float = None  # None: = clip_low (DAPO's clip-higher sets it larger)
    loss_agg: str = "token_mean"  # token_mean (PPO, DAPO), seq_mean (GRPO), seq_sum_norm (Dr. GRPO)
    temperature: float = 1.0  # the sampling temperature, which also divides the logits when scoring
    kl_beta: float = 0.0  # weight of a k3 KL(pi || ref) term in the loss (GRPO); 0 = none
    grad_clip: float = 1.0


def process_share(minibatch, mask):
    """This process's rows of a minibatch of the rollout, and how much they count in the minibatch's loss for
    each way of averaging token losses (kernels.aggregate_token_loss): the share's mean loss times its weight,
    averaged over the processes, is the whole minibatch's mean loss. One process: every row, all weights 1.

    minibatch: rollout row indices; mask: the rollout's (N, R) reply mask. A process with no rows in the
    minibatch gets one row with weight 0 (gpt.local_share), so that it still takes part in the averaging.
    """
    rows, row_weight = local_share(minibatch)  # row_weight = rows * processes / minibatch rows
    world_size = world_info()[1]
    if world_size == 1:
        return rows, {"token_mean": 1.0, "seq_mean": 1.0, "seq_sum_norm": 1.0}
    lengths = mask.sum(dim=1)
    mine, whole = lengths[rows], lengths[minibatch]
    present = float(row_weight > 0)
    tokens = (mine.sum() / whole.sum()).item()
    area = (len(rows) * mine.max() / (len(minibatch) * whole.max())).item()  # Dr. GRPO: B x longest reply
    return rows, {"token_mean": present * world_size * tokens, "seq_mean": row_weight,
                  "seq_sum_norm": present * world_size * area}


def clipped_policy_update(policy, optimizer, rollout, old_logp, advantages, mask, config, rng, *, ref_logp=None,
                          step=0, extra_loss=None):
    """`config.epochs` passes of the clipped surrogate over shuffled minibatches of one rollout.

    old_logp, advantages, mask: (N, R) per-token tensors of the whole rollout (a per-reply advantage is
    broadcast over its tokens by the caller). Returns one stats dict per minibatch, in order: the first
    minibatch sees the policy that sampled the rollout, so its ratio is 1 and its clipfrac 0. Under torchrun
    every process holds the whole rollout and trains on its share of each minibatch (gradients averaged).
    extra_loss: None, or a function of no arguments whose loss is added to every minibatch's (03's ptx term);
    it is logged as "extra_loss".
    """
    history = []
    for _, minibatch in shuffled_minibatches(list(range(len(rollout))), config.minibatch_size, config.epochs, rng):
        batch, weights = process_share(minibatch, mask)  # one process: the whole minibatch, weights 1
        rows = torch.tensor(batch, device=old_logp.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=old_logp.is_cuda):
            logp, m, entropy = response_log_probs(policy, [rollout.prompts[i] for i in batch],
                                                  [rollout.responses[i] for i in batch],
                                                  temperature=config.temperature, return_entropy=True)
        width = logp.shape[1]  # this minibatch's longest reply
        loss, stats = ppo_policy_loss(logp, old_logp[rows, :width], advantages[rows, :width], m,
                                      clip_low=config.clip_low, clip_high=config.clip_high, loss_agg=config.loss_agg)
        stats = {k: float(v) for k, v in stats.items()}
        share_loss = loss * weights[config.loss_agg]
        if ref_logp is not None and config.kl_beta > 0:
            kl = masked_mean(kl_penalty(logp, ref_logp[rows, :width], "k3"), m)
            loss = loss + config.kl_beta * kl
            share_loss = share_loss + config.kl_beta * kl * weights["token_mean"]
            stats["kl_k3"] = kl.item()
        if extra_loss is not None:
            extra = extra_loss()
            share_loss = share_loss + extra  # the same in every process: averaging keeps it whole
            stats["extra_loss"] = extra.item()
        stats.update(policy_loss=loss.item(), entropy=masked_mean(entropy.float(), m).item())
        update(policy, optimizer, share_loss, config.grad_clip, step)  # NaN guard, backward, clip, step
        history.append(stats)
    return history


def reply_loss(model, prompts, replies):
    """The SFT loss on (prompt ids, reply ids) pairs: the mean negative log-likelihood of the reply tokens."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=model.lm_head.weight.is_cuda):
        logp, mask = response_log_probs(model, prompts, replies)
    return -masked_mean(logp.float(), mask)


def ptx_term(policy, tokenizer, coef, *, n_demos, batch_size, seed):
    """InstructGPT's ptx term, or None when coef <= 0: a function of no arguments that draws batch_size of SFT's
    demonstrations (world.sft_demonstrations(n_demos, seed), as 01 draws them) and returns coef times the SFT
    loss on them (reply_loss). Passed as extra_loss, it is added to every minibatch of a clipped update, so
    that chasing the reward does not unlearn what SFT taught."""
    if coef <= 0:
        return None
    demos = [(tokenizer.render_prompt([{"role": "user", "content": task.prompt}]), reply_ids(tokenizer, reply + world.END))
             for task, reply in world.sft_demonstrations(n_demos, seed=seed)]
    rng = random.Random(f"ptx/{seed}")  # the same draws in every process: the term is not split

    def loss():
        batch = rng.sample(demos, min(batch_size, len(demos)))
        return coef * reply_loss(policy, [p for p, _ in batch], [r for _, r in batch])
    return loss


def first_minibatch(history):
    """Ratio and clipfrac of an update's first minibatch (1 and 0: the policy has not moved yet)."""
    first = average_over_processes({"ratio": history[0]["ratio_mean"], "clipfrac": history[0]["clipfrac"]})
    return {"first_ratio": first["ratio"], "first_clipfrac": first["clipfrac"]}


def mean_stats(history):
    """Average of each key over a list of stats dicts (the minibatches of one iteration), and over the
    processes under torchrun."""
    return average_over_processes({key: sum(h[key] for h in history) / len(history) for key in history[0]})


# ---------------------------------------------------------------------------------------------
# Verifiable rewards: deterministic checkers instead of a learned reward model (05, 06)
# ---------------------------------------------------------------------------------------------


def check_math_answer(task, response):
    """Exactly one "The answer is N.", N is the true result, and no number after it."""
    return world.verify(task, response)


def check_fact(task, response):
    """The fact in the reply is the knowledge base's.

    Known place: the one value named is the truth. Unknown place: says it does not know and names nothing.
    False premise: says a plain "No" and names the true value only."""
    return world.verify(task, response)


def check_format(task, response):
    """The turn ended, the reply is not empty, it does not repeat itself and gives at most one final answer."""
    text, ended = world.strip_end(response)
    return ended and bool(text) and not world.repetition(text) and len(world.ANSWER_RE.findall(text)) <= 1


# name -> (which tasks it applies to, the check). A reward is the weighted sum of the checks that apply.
CHECKERS = {
    "math_answer": (lambda task: task.family == "math", check_math_answer),
    "fact_lookup": (lambda task: task.family == "facts", check_fact),
    "format": (lambda task: True, check_format),
}


def verifiable_reward(task, response, weights):
    """Sum over CHECKERS that apply to the task of weights[name] * (1 if the check passes else 0)."""
    return sum(weight * float(bool(CHECKERS[name][1](task, response)))
               for name, weight in weights.items() if CHECKERS[name][0](task))


# ---------------------------------------------------------------------------------------------
# Groups of replies per prompt, with dynamic sampling (05, 06)
# ---------------------------------------------------------------------------------------------


def sample_groups(policy, tokenizer, draw_tasks, reward_fn, *, n_groups, group_size, temperature, max_new_tokens,
                  seed, dynamic=False, max_draws=4):
    """A rollout of n_groups groups of group_size replies (one group per task), and their rewards (N,).

    reward_fn(rollout) -> list of floats, one per reply. With dynamic sampling (DAPO), a group whose rewards are all
    equal (it teaches nothing: its group advantages are 0) is dropped and fresh tasks are drawn, up to
    max_draws rounds; if the batch is still short it is filled with dropped groups.
    Also returns {"zero_variance_share": share of the first draw's groups with equal rewards, "draws": n}.
    """
    kept, dropped, stats = [], [], {}
    for draw in range(max_draws if dynamic else 1):
        tasks = draw_tasks(n_groups - len(kept))
        rollout = sample_rollout(policy, tokenizer, tasks, samples=group_size, temperature=temperature,
                                 max_new_tokens=max_new_tokens, seed=seed + 7919 * draw, across_processes=True)
        rewards = torch.tensor(reward_fn(rollout), dtype=torch.float32)
        groups = rewards.view(len(tasks), group_size)
        equal = (groups.max(dim=1).values == groups.min(dim=1).values).tolist()
        if draw == 0:
            stats["zero_variance_share"] = sum(equal) / len(equal)
        for g, is_equal in enumerate(equal):
            (dropped if dynamic and is_equal else kept).append((rollout, g, groups[g]))
        stats["draws"] = draw + 1
        if len(kept) >= n_groups:
            break
    kept = (kept + dropped)[:n_groups]
    merged = Rollout([], [], [], [])
    for rollout, g, _ in kept:
        for i in range(g * group_size, (g + 1) * group_size):
            merged.tasks.append(rollout.tasks[i])
            merged.prompts.append(rollout.prompts[i])
            merged.responses.append(rollout.responses[i])
            merged.texts.append(rollout.texts[i])
    return merged, torch.cat([r for _, _, r in kept]), stats


# ---------------------------------------------------------------------------------------------
# One GRPO step (05, 06): groups of replies, group-relative advantages, the clipped update
# ---------------------------------------------------------------------------------------------


def grpo_step(policy, optimizer, reference, tokenizer, draw_tasks, reward_fn, clip, rng, *, n_groups, group_size,
              scale="std", dynamic_sampling=False, max_new_tokens=96, step=0, seed=0, extra_loss=None):
    """Sample n_groups x group_size replies, reward them (reward_fn(rollout) -> list of floats), turn each
    reward into its group-relative advantage (kernels.group_advantages) and apply the clipped update
    (clipped_policy_update with `clip`, a ClipConfig). No value model: the group is the baseline.
    extra_loss: as in clipped_policy_update (for example ptx_term's).

    Returns (stats, rollout): the stats of the step and the rollout it trained on.
    """
    start = time.time()
    rollout, rewards, sample_stats = sample_groups(
        policy, tokenizer, draw_tasks, reward_fn, n_groups=n_groups, group_size=group_size,
        temperature=clip.temperature, max_new_tokens=max_new_tokens, seed=seed + 1000 * step,
        dynamic=dynamic_sampling)
    rollout_seconds = time.time() - start
    advantages = group_advantages(rewards, group_size, scale=scale)  # (N,) one per reply
    old_logp, mask = rollout_log_probs(policy, rollout, temperature=clip.temperature)
    ref_logp, _ = rollout_log_probs(reference, rollout, temperature=clip.temperature)
    token_advantages = advantages.to(mask.device)[:, None] * mask  # every token of a reply gets its advantage
    history = clipped_policy_update(policy, optimizer, rollout, old_logp, token_advantages, mask, clip, rng,
                                    ref_logp=ref_logp, step=step, extra_loss=extra_loss)
    lengths = mask.sum(dim=1).cpu()
    correct = torch.tensor([bool(world.verify(t, x)) for t, x in zip(rollout.tasks, rollout.texts)])
    stats = {"reward": rewards.mean().item(), **sample_stats,
             "verified": correct.float().mean().item(),
             "len_correct": lengths[correct].mean().item() if correct.any() else float("nan"),
             "len_wrong": lengths[~correct].mean().item() if (~correct).any() else float("nan"),
             "kl": ((old_logp - ref_logp) * mask).sum(dim=1).mean().item(),  # k1 estimate of KL(pi || ref)
             "tokens_per_s": lengths.sum().item() / rollout_seconds,
             **first_minibatch(history), **mean_stats(history)}
    return stats, rollout


def training_state_bytes(model, trained):
    """Bytes of float32 state a model holds: weights, plus gradients and two AdamW moments when trained."""
    params = sum(p.numel() for p in model.parameters())
    return params * 4 * (4 if trained else 1)
