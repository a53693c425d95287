"""Stage 3: RLHF with PPO. Maximise the learned reward, stay close to the SFT model.

The InstructGPT recipe (Ouyang et al. 2022). The policy starts as the SFT model and is trained to
maximise the reward model's score r(x, y) minus a KL penalty that keeps it near the frozen SFT model:

    maximise  E_{y ~ pi(.|x)} [ r(x, y) ] - kl_coef * KL(pi || ref)

A reply is a sequence of actions (tokens), so the reward is spread over them: every token t pays
-kl_coef * (log pi(y_t) - log ref(y_t)), and the last token also gets the reward model's score.
A value model V (initialised from the reward model) predicts the reward still to come from each
position, and Generalised Advantage Estimation turns rewards and values into per-token advantages

    delta_t = r_t + V_{t+1} - V_t,     A_t = sum_k lambda^k delta_{t+k}        (gamma = 1)

PPO then takes several gradient steps on the same rollout without drifting too far from the policy
that sampled it, through the clipped surrogate (Schulman et al. 2017), rho_t = pi(y_t) / pi_old(y_t):

    L = -mean_t min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t)

and the value model regresses onto the returns A_t + V_t. The KL coefficient is fixed or adapted
(Ziegler et al. 2019) to hold the KL near a target.

InstructGPT's PPO-ptx adds a supervised term to every update, so that chasing the reward model does not
unlearn what the policy could already do (the "alignment tax"):

    L_total = L + ptx_coef * (- mean log pi(y_demo | x_demo))

InstructGPT mixes in pretraining text; here it is SFT's own demonstrations, since the toy internet's chats
are deliberately mixed (wrong sums, rude replies). The reward model cannot tell a right sum from a wrong
one (02), so without the term math drifts down while the policy learns what the reward model does see.

The reward model is a proxy for the gold judge, learned from ~4,000 noisy comparisons. Optimise it
hard enough and the policy finds what it gets wrong: the RM reward keeps rising while the gold score
stalls or falls (reward over-optimisation, Gao et al. 2022). The KL penalty is what holds that back;
a second short run with a tiny penalty shows it (--overopt-iters, --overopt-kl-coef).

What to watch: RM reward up, gold score up with it (measured for you, never used in training), KL to
SFT growing slowly; clipfrac and approx_kl small; explained variance of the value model rising.

How much of what PPO misses is the reward model's fault? --reward gold trains against the gold judge
itself, a perfect reward model no real RLHF run has: the gap between the two runs is what the learned
reward model costs, and what the oracle run still misses is the optimiser's budget (the README, 03).

    python 03_ppo.py                   # needs out/sft (01) and out/reward_model (02)
    python 03_ppo.py --kl-coef 0.01 --kl-estimator k3
    python 03_ppo.py --reward gold --overopt-iters 0    # the oracle diagnostic
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
from gpt import (average_over_processes, configure_optimizer, is_main, leave_distributed, save_checkpoint,
                 shuffled_minibatches, update)
from kernels import gae_advantages, kl_penalty, masked_mean, masked_whiten, ppo_value_loss
from report import (Progress, load_stage, plot_curves, positive_float, positive_int, preset_config, print_comparison,
                    read_stage_json, resolve_run, run_parser, stage_dir, write_json, write_task_samples)
from rl import (ClipConfig, clipped_policy_update, first_minibatch, load_reward_stage, mean_stats, process_share,
                ptx_term, rollout_log_probs, sample_rollout)


# ---- config -------------------------------------------------------------------------------------

@dataclass
class PPOConfig:
    iterations: int  # rollout -> advantages -> update cycles
    batch_size: int  # prompts (one reply each) per rollout
    lr: float  # policy
    value_lr: float
    kl_coef: float  # initial KL coefficient
    kl_estimator: str = "k1"  # per-token KL estimate in the reward: k1 (log-ratio) or k3
    kl_target: float = 0.0  # > 0: adapt kl_coef to hold the rollout KL (nats per reply) near this
    kl_horizon: int = 20  # how fast the adaptive controller moves (iterations)
    epochs: int = 2  # PPO epochs over each rollout
    minibatch_size: int = 32
    clip: float = 0.2
    value_clip: float = 0.2
    lam: float = 0.95  # GAE lambda (gamma is 1: rewards arrive at the end of a short reply)
    temperature: float = 1.0
    max_new_tokens: int = 96
    unended_penalty: float = 1.0  # subtracted from the RM score of a reply that never ends its turn
    grad_clip: float = 1.0
    ptx_coef: float = 0.0  # weight of the SFT loss on demonstrations in every update (PPO-ptx); 0 = plain PPO
    ptx_demos: int = 1200  # SFT's demonstrations (world.sft_demonstrations with the run's seed, as 01 draws them)
    reward: str = "model"  # what scores the replies: 02's reward model, or (a diagnostic) the gold judge itself
    overopt_iters: int = 0  # a second run from SFT with a tiny KL coefficient, for the over-optimisation plot
    overopt_kl_coef: float = 0.001
    eval_samples: int = world.EVAL_SAMPLES
    eval_max_new_tokens: int = 96
    log_every: int = 5


PRESETS = {
    "test": PPOConfig(iterations=4, batch_size=16, lr=1e-4, value_lr=1e-4, kl_coef=0.05, minibatch_size=8,
                      max_new_tokens=32, ptx_coef=1.0, ptx_demos=160, overopt_iters=2, eval_samples=1,
                      eval_max_new_tokens=48, log_every=1),
    "cpu": PPOConfig(iterations=60, batch_size=64, lr=3e-5, value_lr=1e-4, kl_coef=0.2, ptx_coef=1.0, overopt_iters=30),
    "gpu": PPOConfig(iterations=150, batch_size=128, lr=2e-5, value_lr=1e-4, kl_coef=0.2, minibatch_size=64,
                     ptx_coef=1.0, ptx_demos=3000, overopt_iters=100),
}


def parse_args():
    parser = run_parser(__doc__, PRESETS)
    parser.add_argument("--iterations", type=positive_int, default=None)
    parser.add_argument("--lr", type=positive_float, default=None)
    parser.add_argument("--kl-coef", dest="kl_coef", type=float, default=None, help="KL penalty coefficient (>= 0)")
    parser.add_argument("--kl-estimator", dest="kl_estimator", choices=["k1", "k3"], default=None)
    parser.add_argument("--kl-target", dest="kl_target", type=float, default=None,
                        help="> 0: adapt the KL coefficient to hold this KL per reply (nats); 0: fixed")
    parser.add_argument("--temperature", type=positive_float, default=None, help="sampling (and scoring) temperature")
    parser.add_argument("--epochs", type=positive_int, default=None, help="PPO epochs per rollout")
    parser.add_argument("--ptx-coef", dest="ptx_coef", type=float, default=None,
                        help="weight of the SFT loss on demonstrations added to every update (PPO-ptx; 0: plain PPO)")
    parser.add_argument("--reward", choices=["model", "gold"], default=None,
                        help="what scores the replies: the reward model (default) or, as a diagnostic, the gold judge "
                             "itself (a perfect reward model)")
    parser.add_argument("--overopt-iters", dest="overopt_iters", type=int, default=None,
                        help="iterations of the low-KL over-optimisation run (0: skip it)")
    parser.add_argument("--overopt-kl-coef", dest="overopt_kl_coef", type=float, default=None)
    args = parser.parse_args()
    device = resolve_run(args, parser)
    for name in ("kl_coef", "kl_target", "ptx_coef", "overopt_iters", "overopt_kl_coef"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")
    overrides = ["iterations", "lr", "kl_coef", "kl_estimator", "kl_target", "temperature", "epochs", "ptx_coef",
                 "reward", "overopt_iters", "overopt_kl_coef"]
    return args, preset_config(PRESETS, args, overrides), device


# ---- method -------------------------------------------------------------------------------------

def token_rewards(scores, logp, ref_logp, mask, kl_coef, estimator):
    """Per-token rewards (N, R): -kl_coef * KL estimate at every reply token, plus the RM score at the last."""
    rewards = -kl_coef * kl_penalty(logp, ref_logp, estimator) * mask
    last = mask.sum(dim=1).long() - 1  # (N,) index of each reply's last token
    rewards[torch.arange(len(scores)), last] += scores.to(rewards.device)
    return rewards


def reply_scores(reward_model, rollout, config):
    """Each reply's reward (N,): the reward model's score, minus unended_penalty for a reply that never ended its
    turn. With --reward gold the gold judge scores instead (it docks an unended reply itself): an oracle, there to
    measure how much the learned reward model costs, never the method."""
    if config.reward == "gold":
        return torch.tensor([world.gold_score(t, x) for t, x in zip(rollout.tasks, rollout.texts)])
    return reward_model.score(rollout.prompts, rollout.responses) - config.unended_penalty * (~rollout.ended()).float()


def explained_variance(values, returns, mask):
    """1 - Var(returns - values) / Var(returns) over real tokens: 1 is a perfect critic, 0 a useless one."""
    residual = masked_mean((returns - values - masked_mean(returns - values, mask)) ** 2, mask)
    spread = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    return (1 - residual / spread.clamp(min=1e-8)).item()


@torch.no_grad()
def rollout_values(value_model, rollout, width, batch_size=64):
    """The value model's V at every reply token of the rollout (N, width), before any update."""
    values = torch.zeros(len(rollout), width, device=value_model.head.weight.device)
    for start in range(0, len(rollout), batch_size):
        rows = slice(start, start + batch_size)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=values.is_cuda):
            v = value_model.token_values(rollout.prompts[rows], rollout.responses[rows]).float()
        values[rows, : v.shape[1]] = v
    return values


def update_value_model(value_model, optimizer, rollout, old_values, returns, mask, config, rng, step):
    """config.epochs passes of the clipped value loss over shuffled minibatches. -> mean loss"""
    losses = []
    for _, minibatch in shuffled_minibatches(list(range(len(rollout))), config.minibatch_size, config.epochs, rng):
        batch, weights = process_share(minibatch, mask)  # under torchrun: this process's rows of the minibatch
        rows = torch.tensor(batch, device=returns.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=returns.is_cuda):
            values = value_model.token_values([rollout.prompts[i] for i in batch],
                                              [rollout.responses[i] for i in batch]).float()
        width = values.shape[1]
        loss = ppo_value_loss(values, old_values[rows, :width], returns[rows, :width], mask[rows, :width],
                              clip=config.value_clip)
        update(value_model, optimizer, loss * weights["token_mean"], config.grad_clip, step)  # the loss is a token mean
        losses.append(loss.item())
    return average_over_processes({"loss": sum(losses) / len(losses)})["loss"]


def adapt_kl_coef(kl_coef, kl, config):
    """Ziegler et al.'s proportional controller: nudge the coefficient towards holding KL at the target."""
    if config.kl_target <= 0:
        return kl_coef
    error = max(-0.2, min(0.2, kl / config.kl_target - 1))
    return kl_coef * (1 + error / config.kl_horizon)


def ppo_iteration(models, optimizers, tokenizer, config, kl_coef, rng, iteration, seed, ptx=None):
    """One rollout, its rewards and advantages, then the policy and value updates (plus the ptx term).
    -> stats dict"""
    policy, value_model, reference, reward_model = models
    tasks = [world.random_task(rng, "train") for _ in range(config.batch_size)]
    start = time.time()
    rollout = sample_rollout(policy, tokenizer, tasks, temperature=config.temperature,  # split under torchrun
                             max_new_tokens=config.max_new_tokens, seed=seed + 1000 * iteration, across_processes=True)
    rollout_seconds = time.time() - start

    # ---- score the rollout: old and reference log-probs, RM scores, values (no gradients) ----
    old_logp, mask = rollout_log_probs(policy, rollout, temperature=config.temperature)
    ref_logp, _ = rollout_log_probs(reference, rollout, temperature=config.temperature)
    ended = rollout.ended()
    scores = reply_scores(reward_model, rollout, config)
    old_values = rollout_values(value_model, rollout, mask.shape[1])

    # ---- rewards and advantages ----
    rewards = token_rewards(scores, old_logp, ref_logp, mask, kl_coef, config.kl_estimator)
    advantages, returns = gae_advantages(rewards, old_values, mask, gamma=1.0, lam=config.lam)
    advantages = masked_whiten(advantages, mask)

    # ---- the updates ----
    clip_config = ClipConfig(epochs=config.epochs, minibatch_size=config.minibatch_size, clip_low=config.clip,
                             temperature=config.temperature, grad_clip=config.grad_clip)
    history = clipped_policy_update(policy, optimizers[0], rollout, old_logp, advantages, mask, clip_config, rng,
                                    step=iteration, extra_loss=ptx)
    value_loss = update_value_model(value_model, optimizers[1], rollout, old_values, returns, mask, config, rng,
                                    iteration)

    kl_per_reply = ((old_logp - ref_logp) * mask).sum(dim=1).mean().item()  # k1 estimate of KL(pi || ref)
    return {"rm_reward": scores.mean().item(), "kl": kl_per_reply,
            "gold": sum(world.gold_score(t, r) for t, r in zip(rollout.tasks, rollout.texts)) / len(rollout),
            "length": mask.sum(dim=1).mean().item(), "ended": ended.float().mean().item(),
            "explained_variance": explained_variance(old_values, returns, mask), "value_loss": value_loss,
            **first_minibatch(history),
            "tokens_per_s": mask.sum().item() / rollout_seconds, "kl_coef": kl_coef, **mean_stats(history)}


def train_ppo(args, config, frozen, tokenizer, device, *, kl_coef, iterations, label):
    """A PPO run from the SFT model with a fresh value model (a copy of the RM). -> (policy, per-iteration stats)"""
    reference, reward_model = frozen
    policy, _, _ = load_stage(args.out, "sft", device)
    value_model, _, _ = load_reward_stage(args.out, device)
    policy.train()
    value_model.train()
    optimizers = (configure_optimizer(policy, config.lr, weight_decay=0.0),
                  configure_optimizer(value_model, config.value_lr, weight_decay=0.0))
    rng = random.Random(f"ppo/{label}/{args.seed}")
    ptx = ptx_term(policy, tokenizer, config.ptx_coef, n_demos=config.ptx_demos, batch_size=config.minibatch_size,
                   seed=args.seed)
    curve = []
    progress = Progress(iterations, config.log_every)
    for iteration in range(iterations):
        stats = ppo_iteration((policy, value_model, reference, reward_model), optimizers, tokenizer, config, kl_coef,
                              rng, iteration, args.seed, ptx)
        if device.type == "cpu":  # on CUDA, bf16 rounding differs between the rollout's and a minibatch's batching
            assert abs(stats["first_ratio"] - 1) < 1e-4 and stats["first_clipfrac"] == 0, \
                "the first minibatch is scored by the policy that sampled it: ratio 1, nothing clipped"
        kl_coef = adapt_kl_coef(kl_coef, stats["kl"], config)
        curve.append(stats)
        if progress.due(iteration):
            progress.line(iteration, run=label, rm=stats["rm_reward"], gold=stats["gold"], kl=stats["kl"],
                          clipfrac=stats["clipfrac"], approx_kl=stats["approx_kl"],
                          expl_var=stats["explained_variance"], entropy=stats["entropy"], len=stats["length"],
                          tok_s=round(stats["tokens_per_s"]), **({"ptx": stats["extra_loss"]} if ptx else {}))
    return policy, curve


def series(curve, key):
    return [stats[key] for stats in curve]


def smooth(values, window=5):
    """Trailing moving average: one rollout's mean is noisy (64 prompts)."""
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
            for i in range(len(values))]


def binned(xs, ys, bins=6):
    """Means of (x, y) over equal-count bins of x: the trend through a noisy scatter."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    groups = [order[b * len(order) // bins:(b + 1) * len(order) // bins] for b in range(bins)]
    groups = [g for g in groups if g]
    return ([sum(xs[i] for i in g) / len(g) for g in groups], [sum(ys[i] for i in g) / len(g) for g in groups])


def main():
    args, config, device = parse_args()
    out = stage_dir(args.out, "ppo")
    reference, tokenizer, _ = load_stage(args.out, "sft", device, frozen=True)
    reward_model, _, _ = load_reward_stage(args.out, device, frozen=True)
    sft_texts = read_stage_json(args.out, "sft", "eval_texts.json")
    sft_metrics = read_stage_json(args.out, "sft", "metrics.json")
    print(f"preset {args.preset} on {device}: {config}")

    # ---- training: the main run, then the low-KL run that shows over-optimisation ----
    start = time.time()
    policy, curve = train_ppo(args, config, (reference, reward_model), tokenizer, device, kl_coef=config.kl_coef,
                              iterations=config.iterations, label="main")
    train_seconds = time.time() - start
    if is_main():
        save_checkpoint(out / "model.pt", policy, tokenizer=tokenizer,
                        meta={"stage": "ppo", "preset": args.preset, "config": asdict(config)})
    overopt = []
    if config.overopt_iters:
        low_kl = PPOConfig(**{**asdict(config), "kl_target": 0.0, "ptx_coef": 0.0})  # plain PPO, tiny KL penalty
        _, overopt = train_ppo(args, low_kl, (reference, reward_model), tokenizer, device,
                               kl_coef=config.overopt_kl_coef, iterations=config.overopt_iters, label="low-kl")
    if not is_main():  # the other data-parallel processes are done
        return

    # ---- evaluation and outputs ----
    tasks = world.eval_suite()  # the same prompts for every stage and every --seed
    metrics, texts = world.evaluate(policy, tokenizer, tasks, samples=config.eval_samples, seed=args.seed,
                                    max_new_tokens=config.eval_max_new_tokens, ref_model=reference,
                                    ref_texts=sft_texts)
    last = curve[-1]
    metrics.update(train_seconds=train_seconds, total_seconds=time.time() - start,
                   final_rm_reward=last["rm_reward"], final_rollout_kl=last["kl"], final_kl_coef=last["kl_coef"],
                   rollout_tokens_per_s=sum(series(curve, "tokens_per_s")) / len(curve),
                   first_minibatch_clipfrac=max(series(curve, "first_clipfrac")),
                   curve={key: series(curve, key) for key in curve[0]},
                   overopt_curve={key: series(overopt, key) for key in ("rm_reward", "gold", "kl")} if overopt else None,
                   reward=config.reward, preset=args.preset, seed=args.seed, device=str(device),
                   threads=torch.get_num_threads())
    write_json(out / "metrics.json", metrics)
    write_json(out / "eval_texts.json", texts)
    print_comparison({"SFT": sft_metrics, "PPO": metrics}, world.METRIC_NAMES)

    steps = list(range(len(curve)))
    trained_on = "RM reward" if config.reward == "model" else "reward: the gold judge itself"
    overopt_lines, overopt_points = {}, {}
    for run, stats in (("main run", curve), (f"kl_coef {config.overopt_kl_coef}", overopt)):
        if not stats:
            continue
        root_kl = [math.sqrt(max(k, 0.0)) for k in series(stats, "kl")]
        for key, name in (("rm_reward", trained_on), ("gold", "gold score")):
            overopt_points[f"{run}: {name}"] = (root_kl, series(stats, key))
            overopt_lines[f"{run}: {name} (binned)"] = binned(root_kl, series(stats, key))
    plot_curves(out / "curves.png", {
        "reward of the rollouts": {"x": "iteration", "y": "mean per reply (moving average of 5)",
                                   "lines": {f"{trained_on} (trained on)": (steps, smooth(series(curve, "rm_reward"))),
                                             "gold score (never seen)": (steps, smooth(series(curve, "gold")))}},
        "KL to the SFT model": {"x": "iteration", "y": "nats per reply (k1, rollouts)",
                                "lines": {"KL": (steps, series(curve, "kl"))}},
        "over-optimisation": {"x": "sqrt(KL to SFT) of the rollouts", "y": "mean per reply",
                              "lines": overopt_lines, "points": overopt_points},
        "PPO health": {"x": "iteration", "y": "", "lines": {"clipfrac": (steps, series(curve, "clipfrac")),
                                                          "approx_kl": (steps, series(curve, "approx_kl"))}},
        "value model": {"x": "iteration", "y": "explained variance",
                        "lines": {"explained variance": (steps, series(curve, "explained_variance"))}},
        "entropy (and the ptx term's SFT loss)": {
            "x": "iteration", "y": "nats per token",
            "lines": {"policy entropy on its rollouts": (steps, series(curve, "entropy")),
                      **({f"ptx term: {config.ptx_coef} x SFT loss on demonstrations": (steps, series(curve, "extra_loss"))}
                         if config.ptx_coef > 0 else {})}},
        "reply length": {"x": "iteration", "y": "tokens", "lines": {"mean length": (steps, series(curve, "length"))}},
        "rollout throughput": {"x": "iteration", "y": "generated tokens per second (KV cache)",
                               "lines": {"tokens/s": (steps, series(curve, "tokens_per_s"))}},
    }, title=f"03 PPO ({args.preset} preset, kl_coef {config.kl_coef}, ptx_coef {config.ptx_coef}"
             f"{', gold judge as reward' if config.reward == 'gold' else ''}): win rate vs SFT "
             f"{metrics['win_rate_vs_sft']:.2f}, KL {metrics['kl_to_sft']:.2f}")
    shown = world.sample_prompts(tasks)
    write_task_samples(out / "samples.md", "The same prompts answered by the SFT and the PPO model (temperature 1)", tasks, shown,
                       {"SFT": sft_texts, "PPO": texts}, config.eval_samples)
    print(f"wrote {out}/model.pt, metrics.json, curves.png, samples.md")


if __name__ == "__main__":
    main()
    leave_distributed()
