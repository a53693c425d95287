"""Stage 6: RL from verifiable rewards. A checker is harder to fool than a learned reward model.

Where the right answer can be checked by a program, the reward needs no human labels and no learned
model: a registry of deterministic checkers (rl.CHECKERS) says pass or fail, and the reward of a reply
is the weighted sum of the checks that apply to its task,

    R(x, y) = sum_c w_c * check_c(x, y),    check_c in {0, 1}

- math_answer: exactly one "The answer is N." and N is the true result;
- fact_lookup: the value named matches the knowledge base; for a place nobody knows, "I don't know"
  and no value; for a false premise, "No" and the true value, not the claimed one;
- format: the turn ended, the reply does not repeat itself, at most one final answer.

The checks are written so that the usual tricks fail: several candidate answers, repeating the
question's numbers, hedging between values. Training is GRPO (05's mechanics, rl.grpo_step) on math
and fact prompts.

The lesson at the heart of RLVR comes from running the *same* training twice: once with the checkers
as reward, once with the learned reward model from 02 as reward. Both runs are measured by both
yardsticks. A learned reward is a proxy; the policy climbs whatever it rewards, right or not, so its
RM score can rise while the verifier's accuracy does not. The checker run cannot drift that way: its
reward *is* the accuracy.

pass@k (the chance that at least one of k samples is right, estimated without bias from n = 16
samples per task, Chen et al. 2021) shows what RL does to the distribution: it moves probability onto
answers the model could already find (pass@1 up), which can narrow it (pass@16 flat or down).

    python 06_rlvr.py                  # needs out/sft (01) and out/reward_model (02)
"""

import os

# Same seed, same numbers on CPU: MKL results independent of memory alignment and of a thread count
# that MKL would otherwise lower by itself when the machine is busy.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
os.environ.setdefault("MKL_DYNAMIC", "FALSE")

import math
import random
import time
from dataclasses import asdict, dataclass

import torch

import world
from gpt import configure_optimizer, is_main, leave_distributed, save_checkpoint
from report import (Progress, load_stage, plot_curves, positive_float, positive_int, preset_config, print_comparison,
                    read_stage_json, resolve_run, run_parser, stage_dir, write_json, write_task_samples)
from rl import CHECKERS, ClipConfig, grpo_step, load_reward_stage, sample_rollout, verifiable_reward


# ---- config -------------------------------------------------------------------------------------

@dataclass
class RLVRConfig:
    steps: int  # of the verifier run
    rm_steps: int  # of the reward-model run (the hacking shows within a few dozen steps)
    n_groups: int
    group_size: int
    lr: float
    beta: float = 0.02  # k3 KL to the SFT model
    loss_agg: str = "token_mean"
    clip: float = 0.2
    minibatch_size: int = 64
    temperature: float = 1.0
    max_new_tokens: int = 96
    math_share: float = 0.5  # of training prompts; the rest are fact questions (facts are learnt faster)
    format_weight: float = 0.1
    pass_k_samples: int = 16  # samples per eval task for pass@k
    grad_clip: float = 1.0
    eval_samples: int = world.EVAL_SAMPLES
    eval_max_new_tokens: int = 96
    log_every: int = 5


PRESETS = {
    "test": RLVRConfig(steps=3, rm_steps=2, n_groups=4, group_size=4, lr=1e-4, minibatch_size=8, max_new_tokens=48,
                       pass_k_samples=2, eval_samples=1, eval_max_new_tokens=48, log_every=1),
    "cpu": RLVRConfig(steps=96, rm_steps=24, n_groups=48, group_size=8, lr=5e-5, math_share=0.6),
    "gpu": RLVRConfig(steps=80, rm_steps=80, n_groups=32, group_size=16, lr=2e-5, minibatch_size=128),
}


def parse_args():
    parser = run_parser(__doc__, PRESETS)
    parser.add_argument("--steps", type=positive_int, default=None, help="steps of the verifier run")
    parser.add_argument("--rm-steps", dest="rm_steps", type=positive_int, default=None,
                        help="steps of the run with the reward model as reward")
    parser.add_argument("--lr", type=positive_float, default=None)
    parser.add_argument("--beta", type=float, default=None, help="k3 KL weight (>= 0)")
    parser.add_argument("--math-share", dest="math_share", type=float, default=None,
                        help="each training prompt's chance of being math, else a fact question; in (0, 1) "
                             "(the preset's: 0.6 on cpu, 0.5 otherwise)")
    args = parser.parse_args()
    device = resolve_run(args, parser)
    if args.beta is not None and args.beta < 0:
        parser.error("--beta must be >= 0")
    if args.math_share is not None and not 0 < args.math_share < 1:
        parser.error("--math-share must be in (0, 1): both families are trained and tracked")
    return args, preset_config(PRESETS, args, ["steps", "rm_steps", "lr", "beta", "math_share"]), device


# ---- data and rewards ---------------------------------------------------------------------------

def verifiable_prompts(rng, math_share):
    """Draws n train-split tasks whose answers a checker can verify: math problems and fact questions."""
    def draw(n):
        return [world.make_task("math", "arithmetic", rng, "train") if rng.random() < math_share else
                world.make_task("facts", rng.choice(["known", "unknown", "false_premise"]), rng, "train")
                for _ in range(n)]
    return draw


def checker_reward(format_weight):
    weights = {"math_answer": 1.0, "fact_lookup": 1.0, "format": format_weight}
    return lambda rollout: [verifiable_reward(t, x, weights) for t, x in zip(rollout.tasks, rollout.texts)]


def learned_reward(reward_model):
    return lambda rollout: reward_model.score(rollout.prompts, rollout.responses).tolist()


def verified_share(rollout, family):
    """Share of the rollout's replies to tasks of `family` that the family's checker accepts."""
    results = [bool(world.verify(t, x)) for t, x in zip(rollout.tasks, rollout.texts) if t.family == family]
    return sum(results) / len(results) if results else float("nan")


# ---- pass@k -------------------------------------------------------------------------------------

def pass_at_k(n, c, k):
    """Unbiased estimate of P(at least one of k samples is right) from c right out of n samples."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_k_curve(model, tokenizer, tasks, config, seed):
    """{family: {k: mean pass@k}} over the tasks, from config.pass_k_samples samples each."""
    n = config.pass_k_samples
    rollout = sample_rollout(model, tokenizer, tasks, samples=n, temperature=config.temperature,
                             max_new_tokens=config.eval_max_new_tokens, seed=seed)
    ks = [k for k in (1, 2, 4, 8, 16, 32) if k <= n]
    curves = {}
    for family in ("math", "facts"):
        counts = [sum(bool(world.verify(t, x)) for t, x in zip(rollout.tasks[i * n:(i + 1) * n],
                                                               rollout.texts[i * n:(i + 1) * n]))
                  for i, task in enumerate(tasks) if task.family == family]
        curves[family] = {k: sum(pass_at_k(n, c, k) for c in counts) / len(counts) for k in ks}
    return curves


# ---- training -----------------------------------------------------------------------------------

def train_rlvr(args, config, reward_fn, yardsticks, device, label, steps):
    """A GRPO run from the SFT model with the given reward; every step is measured by both yardsticks."""
    policy, tokenizer, _ = load_stage(args.out, "sft", device)
    reference, reward_model = yardsticks
    policy.train()
    optimizer = configure_optimizer(policy, config.lr, weight_decay=0.0)
    clip = ClipConfig(epochs=1, minibatch_size=config.minibatch_size, clip_low=config.clip,
                      loss_agg=config.loss_agg, temperature=config.temperature, kl_beta=config.beta,
                      grad_clip=config.grad_clip)
    rng = random.Random(f"rlvr/{args.seed}")  # both runs see the same prompts
    draw_tasks = verifiable_prompts(rng, config.math_share)
    curve = []
    progress = Progress(steps, config.log_every)
    for step in range(steps):
        stats, rollout = grpo_step(policy, optimizer, reference, tokenizer, draw_tasks, reward_fn, clip, rng,
                                   n_groups=config.n_groups, group_size=config.group_size,
                                   max_new_tokens=config.max_new_tokens, step=step, seed=args.seed)
        stats.update(math_verified=verified_share(rollout, "math"), facts_verified=verified_share(rollout, "facts"),
                     rm_score=reward_model.score(rollout.prompts, rollout.responses).mean().item())
        curve.append(stats)
        if progress.due(step):
            progress.line(step, run=label, reward=stats["reward"], math_ok=stats["math_verified"],
                          facts_ok=stats["facts_verified"], rm=stats["rm_score"], kl=stats["kl"],
                          entropy=stats["entropy"], len=(stats["len_correct"] + stats["len_wrong"]) / 2)
    return policy, curve


def main():
    args, config, device = parse_args()
    out = stage_dir(args.out, "rlvr")
    sft_model, tokenizer, _ = load_stage(args.out, "sft", device)
    reference, _, _ = load_stage(args.out, "sft", device, frozen=True)
    reward_model, _, _ = load_reward_stage(args.out, device, frozen=True)
    sft_texts = read_stage_json(args.out, "sft", "eval_texts.json")
    sft_metrics = read_stage_json(args.out, "sft", "metrics.json")
    print(f"preset {args.preset} on {device}: {config}")
    print("checkers:", ", ".join(f"{name} ({check.__doc__.splitlines()[0]})" for name, (_, check) in CHECKERS.items()))

    # ---- the same GRPO training twice: checkers as reward, then the learned RM as reward ----
    start = time.time()
    policy, verifier_curve = train_rlvr(args, config, checker_reward(config.format_weight),
                                        (reference, reward_model), device, "verifier", config.steps)
    verifier_seconds = time.time() - start
    if is_main():
        save_checkpoint(out / "model.pt", policy, tokenizer=tokenizer,
                        meta={"stage": "rlvr", "preset": args.preset, "config": asdict(config)})
    rm_policy, rm_curve = train_rlvr(args, config, learned_reward(reward_model), (reference, reward_model), device,
                                     "reward model", config.rm_steps)
    if not is_main():  # under torchrun, the other data-parallel processes are done
        return

    # ---- evaluation: the eval suite, and pass@k on its checkable tasks before and after ----
    tasks = world.eval_suite()  # the same prompts for every stage and every --seed
    metrics, texts = world.evaluate(policy, tokenizer, tasks, samples=config.eval_samples, seed=args.seed,
                                    max_new_tokens=config.eval_max_new_tokens, ref_model=reference,
                                    ref_texts=sft_texts)
    checkable = [t for t in tasks if t.family in ("math", "facts")]
    pass_k = {name: pass_k_curve(model, tokenizer, checkable, config, args.seed)
              for name, model in (("SFT", sft_model), ("RLVR (verifier)", policy), ("RL on the RM", rm_policy))}
    metrics.update(pass_at_k=pass_k, verifier_accuracy={name: {f: c[f][1] for f in c} for name, c in pass_k.items()},
                   train_seconds=verifier_seconds, total_seconds=time.time() - start,
                   verifier_curve={k: [s[k] for s in verifier_curve] for k in verifier_curve[0]},
                   rm_curve={k: [s[k] for s in rm_curve] for k in rm_curve[0]}, preset=args.preset, seed=args.seed,
                   device=str(device), threads=torch.get_num_threads())
    write_json(out / "metrics.json", metrics)
    write_json(out / "eval_texts.json", texts)
    print_comparison({"SFT": sft_metrics, "RLVR": metrics}, world.METRIC_NAMES)
    print("verifier accuracy (pass@1 from samples) on the eval suite's checkable tasks:")
    for name, accuracy in metrics["verifier_accuracy"].items():
        print(f"  {name:<18} math {accuracy['math']:.3f}   facts {accuracy['facts']:.3f}")

    def both(key):
        return {"verifier as reward": (list(range(len(verifier_curve))), [s[key] for s in verifier_curve]),
                "RM as reward": (list(range(len(rm_curve))), [s[key] for s in rm_curve])}

    pass_lines = {f"{name}, {family}": (list(curve[family]), list(curve[family].values()))
                  for name, curve in pass_k.items() for family in ("math", "facts")}
    plot_curves(out / "curves.png", {
        "verifier accuracy, math (rollouts)": {"x": "step", "y": "share verified", "lines": both("math_verified")},
        "verifier accuracy, facts (rollouts)": {"x": "step", "y": "share verified", "lines": both("facts_verified")},
        "reward model score (rollouts)": {"x": "step", "y": "mean RM reward", "lines": both("rm_score")},
        "KL to the SFT model": {"x": "step", "y": "nats per reply (k1)", "lines": both("kl")},
        "pass@k on the eval suite": {"x": "k", "y": "pass@k", "lines": pass_lines, "legend": "outside"},
    }, title=f"06 RLVR ({args.preset} preset): math {pass_k['SFT']['math'][1]:.2f} -> "
             f"{pass_k['RLVR (verifier)']['math'][1]:.2f}, facts {pass_k['SFT']['facts'][1]:.2f} -> "
             f"{pass_k['RLVR (verifier)']['facts'][1]:.2f} (pass@1)", columns=3)
    shown = [t for t in world.sample_prompts(tasks, per_kind=3) if t.family in ("math", "facts")]
    write_task_samples(out / "samples.md", "The same checkable prompts answered by SFT and by RLVR (temperature 1)", tasks, shown,
                       {"SFT": sft_texts, "RLVR": texts}, config.eval_samples)
    print(f"wrote {out}/model.pt, metrics.json, curves.png, samples.md")


if __name__ == "__main__":
    main()
    leave_distributed()
