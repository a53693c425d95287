"""Mechanics shared by the post-training scripts (02-07): preference data, the reward model, and
sequence log-probs for DPO-style losses.

The scripts hold the ideas (the losses and update loops); this module holds the plumbing they share,
so no script imports another and no ten lines are written twice.
"""

import hashlib
import os
import random
from pathlib import Path

import torch
import torch.nn as nn

import world
from gpt import load_checkpoint, pack_sequences, response_log_probs, save_checkpoint
from report import read_json, write_json

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

    With probability bad_mix the second reply is replaced by one of the world's typical bad replies, so
    rare failures (rudeness, compliance, rambling) are covered. Train-split pairs get the noisy rater;
    eval-split pairs are labelled noise-free (they measure the reward model against the truth).
    """
    rng = random.Random(f"preferences/{split}/{seed}")
    tasks = [world.random_task(rng, split) for _ in range(n_prompts)]
    prompts, _, texts = world.generate_responses(model, tokenizer, tasks, samples=2, temperature=1.0,
                                                 max_new_tokens=max_new_tokens, seed=seed)
    replies_a, replies_b, sources = texts[0::2], list(texts[1::2]), []
    for i, task in enumerate(tasks):
        if rng.random() < bad_mix:
            replies_b[i] = rng.choice(list(task.bad.values())) + world.END
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
                 "bad_mix": bad_mix, "max_new_tokens": max_new_tokens, "device": str(model.lm_head.weight.device)}
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
    """

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt
        self.head = nn.Linear(gpt.config.n_embd, 1)
        nn.init.normal_(self.head.weight, std=1e-3)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("offset", torch.zeros(()))

    def forward(self, prompts, replies):
        """Rewards (B,) for lists of prompt and reply token ids."""
        device = self.head.weight.device
        idx, prompt_lens = pack_sequences(prompts, replies, self.gpt.config.block_size)
        last = prompt_lens + torch.tensor([len(r) for r in replies]) - 1  # (B,) index of the reply's last token
        hidden = self.gpt.hidden(idx.to(device))  # (B, S, d)
        h_last = hidden[torch.arange(len(replies), device=device), last.to(device)]  # (B, d)
        return self.head(h_last).squeeze(-1) - self.offset

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
    """The transformer as a normal checkpoint; the head and the offset travel in its meta."""
    head = {"weight": reward_model.head.weight.detach().cpu(), "bias": reward_model.head.bias.detach().cpu(),
            "offset": reward_model.offset.detach().cpu()}
    save_checkpoint(path, reward_model.gpt, tokenizer=tokenizer, meta={**meta, "reward_head": head})


def load_reward_model(path, device):
    """(RewardModel, tokenizer, meta) from a file written by save_reward_model."""
    gpt, tokenizer, meta = load_checkpoint(path, device)
    if "reward_head" not in meta:
        raise ValueError(f"{path} is not a reward model checkpoint (no reward head)")
    reward_model = RewardModel(gpt).to(device)
    head = meta["reward_head"]
    with torch.no_grad():
        reward_model.head.weight.copy_(head["weight"])
        reward_model.head.bias.copy_(head["bias"])
        reward_model.offset.copy_(head["offset"])
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
