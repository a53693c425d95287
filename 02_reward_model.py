"""Stage 2: a reward model learned from pairwise preferences (Bradley-Terry).

RLHF needs a number that says how good a reply is. People cannot write that number down, but they
can compare two replies. The Bradley-Terry model turns comparisons into a score: if reply y_w was
preferred to y_l, assume

    P(y_w preferred to y_l | x) = sigmoid(r(x, y_w) - r(x, y_l))

and fit r by maximum likelihood:  L = -mean log sigmoid(r(x, y_w) - r(x, y_l)).
Only differences of r matter, so r is shifted afterwards to average 0 on the SFT model's replies.

r is the SFT transformer with a scalar head read at the reply's last token (InstructGPT). The data:
two replies per training prompt sampled from the SFT model (plus some of the world's typical bad
replies), labelled by world.gold_prefer, a rater with noise. The reward model is learned and imperfect,
which is exactly what stage 03 will find out.

What to watch: held-out pairwise accuracy against the noise-free gold judge (target >= 0.85), per family;
the calibration plot (predicted P(preferred) against how often it was); how the reward correlates with
the gold score (good) and with reply length (a shortcut PPO could exploit).

    python 02_reward_model.py              # needs out/sft/model.pt (python 01_sft.py)
    python 02_reward_model.py --preset test
    python 02_reward_model.py --likelihood-feature   # also read the SFT model's likelihood of the reply
"""

import os

# Same seed, same numbers on CPU: MKL results independent of memory alignment and of a thread count
# that MKL would otherwise lower by itself when the machine is busy.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
os.environ.setdefault("MKL_DYNAMIC", "FALSE")

import random
import time
from dataclasses import asdict, dataclass

import torch

from gpt import (configure_optimizer, cosine_lr, is_main, leave_distributed, local_share, main_process_first, set_lr,
                 shuffled_minibatches, update)
from kernels import bradley_terry_loss
from report import (Progress, load_stage, plot_curves, positive_float, positive_int, preset_config, resolve_run,
                    run_parser, stage_dir, write_json, write_samples)
from rl import PREFERENCE_DATA, RewardModel, preference_data, preference_stats, save_reward_model


# ---- config -------------------------------------------------------------------------------------

@dataclass
class RewardConfig:
    epochs: int
    batch_size: int
    lr: float
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    log_every: int = 20


# The preference data (prompts, rater noise, share of typical bad replies) is rl.PREFERENCE_DATA[preset],
# shared with 04_dpo.py so both learn from the same cached pairs.
PRESETS = {
    "test": RewardConfig(epochs=3, batch_size=16, lr=1e-3, log_every=5),
    "cpu": RewardConfig(epochs=2, batch_size=32, lr=3e-4),
    "gpu": RewardConfig(epochs=2, batch_size=64, lr=1e-4),
}


def parse_args():
    parser = run_parser(__doc__, PRESETS)
    parser.add_argument("--epochs", type=positive_int, default=None, help="override the preset's epochs")
    parser.add_argument("--lr", type=positive_float, default=None, help="override the preset's peak learning rate")
    parser.add_argument("--likelihood-feature", action="store_true",
                        help="also read the frozen SFT model's mean log-prob of the reply, with a learned weight "
                             "(rl.RewardModel; an experiment beside the InstructGPT design, see the README)")
    args = parser.parse_args()
    device = resolve_run(args, parser)
    return args, preset_config(PRESETS, args, ["epochs", "lr"]), device


# ---- method -------------------------------------------------------------------------------------

def pair_rewards(reward_model, pairs):
    """Rewards of the chosen and the rejected reply of each pair. -> (B,), (B,)"""
    prompts = [p["prompt_ids"] for p in pairs]
    rewards = reward_model(prompts + prompts, [p["chosen_ids"] for p in pairs] + [p["rejected_ids"] for p in pairs])
    return rewards[: len(pairs)], rewards[len(pairs):]


@torch.no_grad()
def held_out_accuracy(reward_model, pairs, batch_size=64):
    """Share of pairs whose gold-preferred reply gets the higher reward, and the rewards themselves."""
    reward_model.eval()
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        c, r = pair_rewards(reward_model, pairs[start:start + batch_size])
        chosen.append(c.float().cpu())
        rejected.append(r.float().cpu())
    reward_model.train()
    chosen, rejected = torch.cat(chosen), torch.cat(rejected)
    return (chosen > rejected).float().mean().item(), chosen, rejected


# ---- evaluation helpers -------------------------------------------------------------------------

def correlation(xs, ys):
    xs, ys = torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)
    return torch.corrcoef(torch.stack([xs, ys]))[0, 1].item()


def calibration(chosen, rejected, rng, bins=10):
    """Predicted P(first reply preferred) = sigmoid(r_first - r_second) against the observed rate, with the
    pair order shuffled so both outcomes occur. -> (bin centres, observed rates, counts)"""
    predicted, observed = [], []
    for c, r in zip(chosen.tolist(), rejected.tolist()):
        first_is_chosen = rng.random() < 0.5
        diff = c - r if first_is_chosen else r - c
        predicted.append(torch.sigmoid(torch.tensor(diff)).item())
        observed.append(float(first_is_chosen))
    centres, rates, counts = [], [], []
    for b in range(bins):
        members = [o for p, o in zip(predicted, observed) if b / bins <= p < (b + 1) / bins or (b == bins - 1 and p == 1)]
        if members:
            centres.append((b + 0.5) / bins)
            rates.append(sum(members) / len(members))
            counts.append(len(members))
    return centres, rates, counts


def main():
    args, config, device = parse_args()
    out = stage_dir(args.out, "reward_model")
    sft_path = stage_dir(args.out, "sft") / "model.pt"
    sft, tokenizer, _ = load_stage(args.out, "sft", device)
    print(f"preset {args.preset} on {device}: {config}")

    # ---- data ----
    with main_process_first():  # under torchrun, rank 0 builds the cached pairs and the others read them
        train_pairs, eval_pairs = preference_data(args.out, args.preset, args.seed, sft, sft_path, tokenizer)
    data_stats = {"train": preference_stats(train_pairs), "eval": preference_stats(eval_pairs),
                  "settings": PREFERENCE_DATA[args.preset]}
    print(f"preference data: {data_stats['train']['pairs']} train pairs (label noise "
          f"{data_stats['train']['label_noise']:.1%} at rater temperature "
          f"{PREFERENCE_DATA[args.preset]['rater_temperature']}), {data_stats['eval']['pairs']} held-out pairs "
          f"(noise-free)")

    # ---- training ----
    reference = load_stage(args.out, "sft", device, frozen=True)[0] if args.likelihood_feature else None
    reward_model = RewardModel(sft, reference).to(device).train()
    optimizer = configure_optimizer(reward_model, config.lr, config.weight_decay)
    rng = random.Random(args.seed)
    steps_per_epoch = (len(train_pairs) + config.batch_size - 1) // config.batch_size
    max_steps = config.epochs * steps_per_epoch
    curve = {"step": [], "loss": [], "accuracy": [], "eval_step": [], "eval_accuracy": []}
    progress = Progress(max_steps, config.log_every)
    for step, (epoch, batch) in enumerate(shuffled_minibatches(train_pairs, config.batch_size, config.epochs, rng)):
        lr = cosine_lr(step, max_steps, config.lr, config.warmup_steps)
        set_lr(optimizer, lr)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            share, weight = local_share(batch)  # under torchrun: this process's share of the global batch
            r_chosen, r_rejected = pair_rewards(reward_model, share)
        loss, accuracy = bradley_terry_loss(r_chosen.float(), r_rejected.float())
        update(reward_model, optimizer, loss * weight, config.grad_clip, step)  # NaN guard, backward, clip, step
        curve["step"].append(step)
        curve["loss"].append(loss.item())
        curve["accuracy"].append(accuracy.item())
        if progress.due(step) and is_main():
            held_out, _, _ = held_out_accuracy(reward_model, eval_pairs)
            curve["eval_step"].append(step)
            curve["eval_accuracy"].append(held_out)
            progress.line(step, epoch=epoch + 1, loss=loss.item(), train_acc=accuracy.item(),
                          held_out_acc=held_out, lr=lr)
    train_seconds = time.time() - progress.start
    if not is_main():  # the other data-parallel processes are done
        return

    # ---- evaluation: accuracy, normalisation, correlations, calibration ----
    accuracy, chosen, rejected = held_out_accuracy(reward_model, eval_pairs)
    sft_replies = [(p["prompt_ids"], p[f"{side}_ids"]) for p in eval_pairs for side in ("chosen", "rejected")
                   if p[f"{side}_source"] == "model"]
    reward_model.offset.fill_(reward_model.score(*zip(*sft_replies)).mean().item())
    _, chosen, rejected = held_out_accuracy(reward_model, eval_pairs)
    per_family = {}
    for family in sorted({p["family"] for p in eval_pairs}):
        hits = [(c > r).item() for p, c, r in zip(eval_pairs, chosen, rejected) if p["family"] == family]
        per_family[family] = sum(hits) / len(hits)
    rewards = chosen.tolist() + rejected.tolist()
    golds = [p["gold_chosen"] for p in eval_pairs] + [p["gold_rejected"] for p in eval_pairs]
    lengths = [len(p["chosen_ids"]) for p in eval_pairs] + [len(p["rejected_ids"]) for p in eval_pairs]
    centres, rates, counts = calibration(chosen, rejected, random.Random(args.seed))
    metrics = {"held_out_accuracy": accuracy, "held_out_accuracy_per_family": per_family,
               "reward_gold_correlation": correlation(rewards, golds),
               "reward_length_correlation": correlation(rewards, lengths),
               "calibration": {"predicted": centres, "observed": rates, "count": counts},
               "data": data_stats, "train_seconds": train_seconds, "preset": args.preset, "seed": args.seed,
               "device": str(device),
               "likelihood_feature": args.likelihood_feature, "threads": torch.get_num_threads()}
    write_json(out / "metrics.json", metrics)
    save_reward_model(out / "model.pt", reward_model, tokenizer,
                      meta={"stage": "reward_model", "preset": args.preset, "config": asdict(config)})
    print(f"held-out pairwise accuracy {accuracy:.3f} (per family: "
          + ", ".join(f"{k} {v:.3f}" for k, v in per_family.items()) + ")")
    print(f"correlation of reward with gold score {metrics['reward_gold_correlation']:.3f}, "
          f"with reply length {metrics['reward_length_correlation']:.3f}")

    # ---- plots and samples ----
    plot_curves(out / "curves.png", {
        "Bradley-Terry loss": {"x": "step", "y": "loss", "lines": {"train batch": (curve["step"], curve["loss"])}},
        "pairwise accuracy": {"x": "step", "y": "accuracy",
                              "lines": {"train batch": (curve["step"], curve["accuracy"]),
                                        "held-out (gold, noise-free)": (curve["eval_step"], curve["eval_accuracy"])}},
        "calibration (held-out)": {"x": "predicted P(first reply preferred)", "y": "observed frequency",
                                   "lines": {"reward model": (centres, rates), "perfect": ([0, 1], [0, 1])}},
        "reward vs gold score": {"x": "gold score", "y": "reward (SFT replies average 0)",
                                 "points": {"held-out replies": (golds, rewards)}}},
        title=f"02 reward model ({args.preset} preset): held-out accuracy {accuracy:.3f}")
    shown = eval_pairs[:8]
    write_samples(out / "samples.md", "Held-out pairs: the gold-preferred reply first, with rewards",
                  [p["prompt"] for p in shown],
                  {"preferred": [f"{p['chosen']} (reward {c:.2f}, gold {p['gold_chosen']:.2f})"
                                 for p, c in zip(shown, chosen)],
                   "other": [f"{p['rejected']} (reward {r:.2f}, gold {p['gold_rejected']:.2f})"
                             for p, r in zip(shown, rejected)]})
    print(f"wrote {out}/model.pt, metrics.json, curves.png, samples.md")


if __name__ == "__main__":
    main()
    leave_distributed()
