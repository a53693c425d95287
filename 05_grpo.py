"""Stage 5: GRPO. Reinforcement learning without a value model: the group is the baseline.

PPO needs a value model as large as the policy to tell a good token from a lucky one. GRPO (Shao et
al. 2024, DeepSeekMath) drops it: sample a *group* of G replies to the same prompt, reward each, and
use the group itself as the baseline. Reply i of a group with rewards r_1..r_G gets the advantage

    A_i = (r_i - mean(r_1..r_G)) / std(r_1..r_G)

on every one of its tokens, and the policy takes PPO's clipped step, rho_t = pi(y_t) / pi_old(y_t):

    L = -agg_t min(rho_t A_i, clip(rho_t, 1 - eps_low, 1 + eps_high) A_i)  +  beta * KL_k3(pi || ref)

Here the reward is checkable: the world's verifier says whether the final answer of a math problem is
right (plus a small format term: the turn ended, one final answer). A group whose replies are all right
or all wrong has every A_i = 0 and teaches nothing; the share of such groups is worth watching.

The fixes the field adopted after DeepSeekMath are flags:
- Dr. GRPO (Liu et al. 2025): dividing by the std and by each reply's length biases the update
  (towards easy or hard prompts, towards long wrong answers): --scale none --loss-agg seq_sum_norm;
- DAPO (Yu et al. 2025): token-level averaging (--loss-agg token_mean), a higher upper clip so rare
  good tokens can grow (--clip-high 0.28), and dynamic sampling that drops zero-variance groups and
  draws fresh prompts until the batch is full (--dynamic-sampling).

GRPO here trains on math prompts alone, and a small model that practises only sums can forget the rest: on
an earlier SFT model of the cpu preset, known facts fell 6.5 points on average over four seeds. So, as in 03's
PPO-ptx (InstructGPT), every update also takes the SFT loss on SFT's own demonstrations of every family
(--ptx-coef, 1.0 on the cpu and gpu presets; 0 gives the method alone):

    L_total = L + ptx_coef * (- mean log pi(y_demo | x_demo))

What to watch: reward and math accuracy up, the share of zero-variance groups (mostly all-correct
groups as the policy improves), the entropy (falling: the policy sharpens), the lengths of correct
and wrong replies, and the KL to the SFT model. The eval suite checks that the other behaviours,
never trained here, did not get worse.

    python 05_grpo.py                  # needs out/sft/model.pt (01)
    python 05_grpo.py --scale none --loss-agg seq_sum_norm           # Dr. GRPO
    python 05_grpo.py --loss-agg token_mean --clip-high 0.28 --dynamic-sampling   # DAPO
    python 05_grpo.py --ptx-coef 0                                  # GRPO alone, without the SFT term
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

import world
from gpt import configure_optimizer, is_main, leave_distributed, save_checkpoint
from report import (Progress, load_stage, plot_curves, positive_float, positive_int, preset_config, print_comparison,
                    read_stage_json, resolve_run, run_parser, stage_dir, write_json, write_task_samples)
from rl import ClipConfig, grpo_step, ptx_term, training_state_bytes, verifiable_reward


# ---- config -------------------------------------------------------------------------------------

@dataclass
class GRPOConfig:
    steps: int
    n_groups: int  # prompts per step
    group_size: int  # replies per prompt (G)
    lr: float
    scale: str = "std"  # std (GRPO) or none (Dr. GRPO)
    loss_agg: str = "seq_mean"  # seq_mean (GRPO), token_mean (DAPO), seq_sum_norm (Dr. GRPO)
    clip: float = 0.2
    clip_high: float = None  # DAPO's clip-higher; None = clip
    beta: float = 0.02  # weight of the k3 KL to the SFT model
    dynamic_sampling: bool = False
    epochs: int = 1
    minibatch_size: int = 64  # a step's replies are split into minibatches: the later ones are off-policy
    temperature: float = 1.0
    max_new_tokens: int = 96
    format_weight: float = 0.1  # reward = 1 if the answer is right + format_weight if the format is
    ptx_coef: float = 0.0  # weight of the SFT loss on demonstrations added to every update (as 03's PPO-ptx)
    ptx_demos: int = 1200  # SFT's demonstrations (world.sft_demonstrations with the run's seed, as 01 draws them)
    grad_clip: float = 1.0
    eval_samples: int = world.EVAL_SAMPLES
    eval_max_new_tokens: int = 96
    log_every: int = 5


PRESETS = {
    "test": GRPOConfig(steps=4, n_groups=4, group_size=4, lr=1e-4, minibatch_size=8, max_new_tokens=48, ptx_coef=1.0,
                       ptx_demos=16, eval_samples=1, eval_max_new_tokens=48, log_every=1),
    "cpu": GRPOConfig(steps=80, n_groups=32, group_size=8, lr=5e-5, ptx_coef=1.0),
    "gpu": GRPOConfig(steps=100, n_groups=32, group_size=16, lr=2e-5, minibatch_size=128, ptx_coef=1.0),
}


def parse_args():
    parser = run_parser(__doc__, PRESETS)
    parser.add_argument("--steps", type=positive_int, default=None)
    parser.add_argument("--n-groups", dest="n_groups", type=positive_int, default=None, help="prompts per step")
    parser.add_argument("--group-size", dest="group_size", type=positive_int, default=None)
    parser.add_argument("--epochs", type=positive_int, default=None, help="passes over each step's replies")
    parser.add_argument("--lr", type=positive_float, default=None)
    parser.add_argument("--scale", choices=["std", "none"], default=None, help="std: GRPO; none: Dr. GRPO")
    parser.add_argument("--loss-agg", dest="loss_agg", choices=["seq_mean", "token_mean", "seq_sum_norm"], default=None)
    parser.add_argument("--clip-high", dest="clip_high", type=positive_float, default=None, help="DAPO: e.g. 0.28")
    parser.add_argument("--beta", type=float, default=None, help="k3 KL weight (>= 0; 0 = no reference term)")
    parser.add_argument("--dynamic-sampling", dest="dynamic_sampling", action="store_true", default=None,
                        help="DAPO: replace groups whose rewards are all equal with fresh prompts")
    parser.add_argument("--ptx-coef", dest="ptx_coef", type=float, default=None,
                        help="weight of the SFT loss on demonstrations added to every update (0: none)")
    args = parser.parse_args()
    device = resolve_run(args, parser)
    if args.group_size is not None and args.group_size < 2:
        parser.error("--group-size must be at least 2: a group of one has no baseline")
    for name in ("beta", "ptx_coef"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")
    overrides = ["steps", "n_groups", "group_size", "epochs", "lr", "scale", "loss_agg", "clip_high", "beta", "dynamic_sampling",
                 "ptx_coef"]
    return args, preset_config(PRESETS, args, overrides), device


# ---- data and reward ----------------------------------------------------------------------------

def math_prompts(rng):
    """Draws n fresh math problems from the train split (the eval suite's are held out)."""
    return lambda n: [world.make_task("math", "arithmetic", rng, "train") for _ in range(n)]


def math_reward(format_weight):
    """The verifier's reward: 1 for the right final answer, plus format_weight for a well-formed reply."""
    weights = {"math_answer": 1.0, "format": format_weight}
    return lambda rollout: [verifiable_reward(t, x, weights) for t, x in zip(rollout.tasks, rollout.texts)]


# ---- training -----------------------------------------------------------------------------------

def main():
    args, config, device = parse_args()
    out = stage_dir(args.out, "grpo")
    policy, tokenizer, _ = load_stage(args.out, "sft", device)
    reference, _, _ = load_stage(args.out, "sft", device, frozen=True)
    sft_texts = read_stage_json(args.out, "sft", "eval_texts.json")
    sft_metrics = read_stage_json(args.out, "sft", "metrics.json")
    print(f"preset {args.preset} on {device}: {config}")

    policy.train()
    optimizer = configure_optimizer(policy, config.lr, weight_decay=0.0)
    clip = ClipConfig(epochs=config.epochs, minibatch_size=config.minibatch_size, clip_low=config.clip,
                      clip_high=config.clip_high, loss_agg=config.loss_agg, temperature=config.temperature,
                      kl_beta=config.beta, grad_clip=config.grad_clip)
    rng = random.Random(f"grpo/{args.seed}")
    draw_tasks, reward_fn = math_prompts(rng), math_reward(config.format_weight)
    ptx = ptx_term(policy, tokenizer, config.ptx_coef, n_demos=config.ptx_demos, batch_size=config.minibatch_size,
                   seed=args.seed)
    curve = []
    progress = Progress(config.steps, config.log_every)
    for step in range(config.steps):
        stats, _ = grpo_step(policy, optimizer, reference, tokenizer, draw_tasks, reward_fn, clip, rng,
                             n_groups=config.n_groups, group_size=config.group_size, scale=config.scale,
                             dynamic_sampling=config.dynamic_sampling, max_new_tokens=config.max_new_tokens,
                             step=step, seed=args.seed, extra_loss=ptx)
        curve.append(stats)
        if progress.due(step):
            progress.line(step, reward=stats["reward"], correct=stats["verified"],
                          zero_var=stats["zero_variance_share"], clipfrac=stats["clipfrac"],
                          entropy=stats["entropy"], len_right=stats["len_correct"], len_wrong=stats["len_wrong"],
                          kl=stats["kl"], tok_s=round(stats["tokens_per_s"]),
                          **({"ptx": stats["extra_loss"]} if ptx else {}))
    train_seconds = time.time() - progress.start
    if not is_main():  # under torchrun, the other data-parallel processes are done
        return
    save_checkpoint(out / "model.pt", policy, tokenizer=tokenizer,
                    meta={"stage": "grpo", "preset": args.preset, "config": asdict(config)})

    # ---- evaluation and outputs ----
    tasks = world.eval_suite()  # the same prompts for every stage and every --seed
    metrics, texts = world.evaluate(policy, tokenizer, tasks, samples=config.eval_samples, seed=args.seed,
                                    max_new_tokens=config.eval_max_new_tokens, ref_model=reference,
                                    ref_texts=sft_texts)
    # What PPO would hold in memory on top: a trained value model and a frozen reward model, each the
    # policy's size (03's setup), against GRPO's policy + frozen reference.
    grpo_bytes = training_state_bytes(policy, trained=True) + training_state_bytes(reference, trained=False)
    ppo_bytes = grpo_bytes + training_state_bytes(policy, trained=True) + training_state_bytes(reference, trained=False)
    metrics.update(train_seconds=train_seconds, model_state_mib={"grpo": grpo_bytes / 2**20, "ppo": ppo_bytes / 2**20},
                   curve={key: [s[key] for s in curve] for key in curve[0]}, preset=args.preset, seed=args.seed,
                   device=str(device), threads=torch.get_num_threads())
    write_json(out / "metrics.json", metrics)
    write_json(out / "eval_texts.json", texts)
    print_comparison({"SFT": sft_metrics, "GRPO": metrics}, world.METRIC_NAMES)
    print(f"model state in memory: GRPO {grpo_bytes / 2**20:.1f} MiB (policy + reference) vs PPO "
          f"{ppo_bytes / 2**20:.1f} MiB (+ value model + reward model); activations not counted")

    steps = list(range(len(curve)))

    def line(key):
        return steps, [stats[key] for stats in curve]

    plot_curves(out / "curves.png", {
        "reward": {"x": "step", "y": "mean over the step's replies",
                   "lines": {"reward": line("reward"), "share verified correct": line("verified")}},
        "groups that teach nothing": {"x": "step", "y": "share of groups with equal rewards",
                                      "lines": {"zero-variance groups": line("zero_variance_share")}},
        "clipping": {"x": "step", "y": "", "lines": {"clipfrac": line("clipfrac"), "approx_kl": line("approx_kl")}},
        "entropy (and the ptx term's SFT loss)": {
            "x": "step", "y": "nats per token",
            "lines": {"entropy": line("entropy"),
                      **({f"ptx term: {config.ptx_coef} x SFT loss on demonstrations": line("extra_loss")} if ptx else {})}},
        "reply length": {"x": "step", "y": "tokens", "lines": {"correct replies": line("len_correct"),
                                                              "wrong replies": line("len_wrong")}},
        "KL to the SFT model": {"x": "step", "y": "nats per reply (k1)", "lines": {"KL": line("kl")}},
        "eval suite: SFT vs GRPO": {"x": "rate", "y": "", "labels": world.METRIC_NAMES[1:-1],
                                    "bars": {"SFT": [sft_metrics[k] for k in world.METRIC_NAMES[1:-1]],
                                             "GRPO": [metrics[k] for k in world.METRIC_NAMES[1:-1]]}},
    }, title=f"05 GRPO ({args.preset} preset, {config.loss_agg}, scale {config.scale}, ptx_coef {config.ptx_coef}): math "
             f"accuracy {sft_metrics['math_acc']:.2f} -> {metrics['math_acc']:.2f}")
    shown = [t for t in world.sample_prompts(tasks, per_kind=6) if t.family == "math"]
    write_task_samples(out / "samples.md", "The same math problems answered by the SFT and the GRPO model (temperature 1)", tasks, shown,
                       {"SFT": sft_texts, "GRPO": texts}, config.eval_samples)
    print(f"wrote {out}/model.pt, metrics.json, curves.png, samples.md")


if __name__ == "__main__":
    main()
    leave_distributed()
