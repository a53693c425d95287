"""Stage 4: Direct Preference Optimisation. Learn from preferences without a reward model or RL.

RLHF maximises reward minus a KL penalty to the reference policy:  max_pi E[r(x, y)] - beta KL(pi || ref).
Its optimum has a closed form, pi*(y|x) = ref(y|x) exp(r(x, y) / beta) / Z(x), so any policy defines
an *implicit reward*

    r(x, y) = beta log(pi(y|x) / ref(y|x)) + beta log Z(x).

Put that into the Bradley-Terry likelihood of the preference pairs; Z(x) cancels in the difference,
and what is left is a classification loss on log-prob ratios (Rafailov et al. 2023):

    L_DPO = -log sigmoid(beta [log pi(y_w|x)/ref(y_w|x) - log pi(y_l|x)/ref(y_l|x)])

No reward model, no sampling during training: the SFT model is both the starting policy and the frozen
reference. At step 0 pi = ref, every margin is 0 and the loss is ln 2 = 0.693 exactly. IPO
((h - 1/(2 beta))^2) and the hinge loss are the same idea with other curves (--loss).

DPO only asks the chosen reply to gain on the rejected one; with larger steps the chosen replies lose
probability too. RPO (Pang et al. 2024) adds the chosen replies' negative log-likelihood per token,

    L = L_DPO + alpha * NLL(y_w | x),

which keeps them likely; on this world it lets DPO take larger steps: at the same step it ends with more gold
at a lower KL than plain DPO (alpha 30 on the cpu preset; --nll-coef 0 is plain DPO). The printed and
asserted step-0 loss is the DPO term.

What to watch: the implicit-reward accuracy and margin rising on the training pairs and, more slowly,
on held-out ones; the log-probs of chosen and rejected replies (under plain DPO both can fall, since it
only needs their gap to grow: "likelihood displacement"; the NLL term holds the chosen ones up); KL to
SFT; the eval suite's win rate against SFT.

    python 04_dpo.py                  # needs out/sft/model.pt (01) and reuses 02's preference pairs
    python 04_dpo.py --preset test --loss ipo
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
from gpt import (configure_optimizer, cosine_lr, is_main, leave_distributed, local_share, main_process_first,
                 save_checkpoint, set_lr, shuffled_minibatches, update)
from report import (Progress, load_stage, plot_curves, positive_float, positive_int, preset_config, print_comparison,
                    read_stage_json, resolve_run, run_parser, stage_dir, write_json, write_task_samples)
from rl import (PREFERENCE_DATA, dpo_batch, implicit_reward_stats, preference_data, preference_stats,
                reference_log_probs)


# ---- config -------------------------------------------------------------------------------------

@dataclass
class DPOConfig:
    beta: float
    loss: str  # sigmoid (DPO), ipo, hinge
    label_smoothing: float  # cDPO: the share of labels assumed flipped
    epochs: int
    batch_size: int
    lr: float
    nll_coef: float  # alpha: weight of the chosen replies' NLL per token (RPO); 0 is plain DPO
    warmup_steps: int = 10
    grad_clip: float = 1.0
    eval_samples: int = world.EVAL_SAMPLES
    eval_max_new_tokens: int = 96
    log_every: int = 10
    kl_prompts: int = 64  # eval-suite prompts whose sampled replies measure the KL to SFT during training


# The preference data is rl.PREFERENCE_DATA[preset], the same cached pairs 02_reward_model.py learns from.
PRESETS = {
    "test": DPOConfig(beta=0.1, loss="sigmoid", label_smoothing=0.0, epochs=3, batch_size=16, lr=1e-3, nll_coef=1.0,
                      eval_samples=1, eval_max_new_tokens=48, log_every=5),
    # The chosen replies are SFT's own samples, about 0.07 nats per token at the start, so the NLL term needs
    # a large alpha to count (1 to 100 tried: docs/experiments.md, 04). The gpu preset has not run with it.
    "cpu": DPOConfig(beta=1.0, loss="sigmoid", label_smoothing=0.0, epochs=2, batch_size=32, lr=1e-4, nll_coef=30.0),
    "gpu": DPOConfig(beta=1.0, loss="sigmoid", label_smoothing=0.0, epochs=2, batch_size=64, lr=2e-5, nll_coef=0.0),
}


def parse_args():
    parser = run_parser(__doc__, PRESETS)
    parser.add_argument("--beta", type=positive_float, default=None, help="strength of the KL anchor to the reference")
    parser.add_argument("--loss", choices=["sigmoid", "ipo", "hinge"], default=None)
    parser.add_argument("--label-smoothing", dest="label_smoothing", type=float, default=None,
                        help="cDPO: assumed share of flipped labels, in [0, 0.5)")
    parser.add_argument("--epochs", type=positive_int, default=None)
    parser.add_argument("--lr", type=positive_float, default=None)
    parser.add_argument("--nll-coef", dest="nll_coef", type=float, default=None,
                        help="RPO: weight of the chosen replies' NLL per token (0: plain DPO)")
    args = parser.parse_args()
    device = resolve_run(args, parser)
    if args.label_smoothing is not None and not 0 <= args.label_smoothing < 0.5:
        parser.error("--label-smoothing must be in [0, 0.5)")
    if args.nll_coef is not None and args.nll_coef < 0:
        parser.error("--nll-coef must be >= 0")
    return args, preset_config(PRESETS, args, ["beta", "loss", "label_smoothing", "epochs", "lr", "nll_coef"]), device


# ---- measurement during training ----------------------------------------------------------------

def sampled_kl(policy, reference, tokenizer, tasks, seed):
    """KL(policy || SFT) in nats per reply, estimated (k1) on one reply per task sampled from the policy.
    DPO never samples while it trains, so this is the only place its distance from SFT shows."""
    prompts, outputs, _ = world.generate_responses(policy, tokenizer, tasks, seed=seed)
    policy.eval()
    kl = world.kl_to_reference(policy, reference, prompts, outputs, temperature=1.0)
    policy.train()
    return kl


def main():
    args, config, device = parse_args()
    out = stage_dir(args.out, "dpo")
    sft_path = stage_dir(args.out, "sft") / "model.pt"
    policy, tokenizer, _ = load_stage(args.out, "sft", device)
    reference, _, _ = load_stage(args.out, "sft", device, frozen=True)  # a frozen copy of the SFT model
    sft_texts = read_stage_json(args.out, "sft", "eval_texts.json")
    sft_metrics = read_stage_json(args.out, "sft", "metrics.json")
    print(f"preset {args.preset} on {device}: {config}")

    # ---- data: the same cached pairs as 02; reference log-probs computed once ----
    with main_process_first():  # under torchrun, rank 0 builds (or reuses) the cache and the others read it
        train_pairs, eval_pairs = preference_data(args.out, args.preset, args.seed, reference, sft_path, tokenizer)
    data_stats = {"train": preference_stats(train_pairs), "eval": preference_stats(eval_pairs),
                  "settings": PREFERENCE_DATA[args.preset]}
    print(f"{len(train_pairs)} train pairs (label noise {data_stats['train']['label_noise']:.1%}), "
          f"{len(eval_pairs)} held-out pairs")
    ref_train = reference_log_probs(reference, train_pairs)
    ref_eval = reference_log_probs(reference, eval_pairs)

    # ---- training ----
    policy.train()
    optimizer = configure_optimizer(policy, config.lr, weight_decay=0.0)
    rng = random.Random(args.seed)
    order = list(range(len(train_pairs)))
    steps_per_epoch = (len(order) + config.batch_size - 1) // config.batch_size
    max_steps = config.epochs * steps_per_epoch
    curve = {k: [] for k in ("step", "dpo_loss", "nll_chosen", "reward_acc", "margin", "logp_chosen",
                             "logp_rejected", "eval_step", "eval_acc", "eval_margin", "kl")}
    suite = world.eval_suite()
    kl_tasks = suite[::max(1, len(suite) // config.kl_prompts)][:config.kl_prompts]  # spread over every kind
    progress = Progress(max_steps, config.log_every)
    for step, (epoch, batch) in enumerate(shuffled_minibatches(order, config.batch_size, config.epochs, rng)):
        lr = cosine_lr(step, max_steps, config.lr, config.warmup_steps)
        set_lr(optimizer, lr)
        batch, weight = local_share(batch)  # under torchrun: this process's share of the global batch
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, stats = dpo_batch(policy, [train_pairs[i] for i in batch], ref_train[0][batch],
                                    ref_train[1][batch], beta=config.beta, loss_type=config.loss,
                                    label_smoothing=config.label_smoothing, nll_coef=config.nll_coef)
        if step == 0 and config.loss == "sigmoid":
            print(f"step-0 loss {stats['dpo_loss']:.6f} (ln 2 = {math.log(2):.6f}: the policy equals the reference)")
            tolerance = 0.05 if device.type == "cuda" else 1e-3  # bf16 rounding differs between batchings
            assert abs(stats["dpo_loss"] - math.log(2)) < tolerance, "at step 0 the policy is the reference: loss ln 2"
        update(policy, optimizer, loss * weight, config.grad_clip, step)  # NaN guard, backward, clip, step
        curve["step"].append(step)
        for key, value in stats.items():
            curve[key].append(value)
        if progress.due(step) and is_main():
            eval_acc, eval_margin = implicit_reward_stats(policy, eval_pairs, *ref_eval, config.beta)
            curve["eval_step"].append(step)
            curve["eval_acc"].append(eval_acc)
            curve["eval_margin"].append(eval_margin)
            curve["kl"].append(sampled_kl(policy, reference, tokenizer, kl_tasks, args.seed))
            progress.line(step, epoch=epoch + 1, dpo_loss=stats["dpo_loss"], nll=stats["nll_chosen"],
                          acc=stats["reward_acc"], margin=stats["margin"], held_out_acc=eval_acc,
                          held_out_margin=eval_margin, kl=curve["kl"][-1], lr=lr)
    train_seconds = time.time() - progress.start
    if not is_main():  # the other data-parallel processes are done
        return

    # ---- evaluation and outputs ----
    save_checkpoint(out / "model.pt", policy, tokenizer=tokenizer,
                    meta={"stage": "dpo", "preset": args.preset, "config": asdict(config)})
    tasks = world.eval_suite()  # the same prompts for every stage and every --seed
    metrics, texts = world.evaluate(policy, tokenizer, tasks, samples=config.eval_samples, seed=args.seed,
                                    max_new_tokens=config.eval_max_new_tokens, ref_model=reference,
                                    ref_texts=sft_texts)
    train_acc, train_margin = implicit_reward_stats(policy, train_pairs, *ref_train, config.beta)  # all pairs, after training
    metrics.update(held_out_reward_acc=curve["eval_acc"][-1], held_out_margin=curve["eval_margin"][-1],
                   train_reward_acc=train_acc, train_margin=train_margin, step0_loss=curve["dpo_loss"][0],
                   data=data_stats, train_seconds=train_seconds, preset=args.preset, seed=args.seed, device=str(device),
                   threads=torch.get_num_threads())
    write_json(out / "metrics.json", metrics)
    write_json(out / "eval_texts.json", texts)
    print_comparison({"SFT": sft_metrics, "DPO": metrics}, world.METRIC_NAMES)
    plot_curves(out / "curves.png", {
        "DPO loss (the DPO term)": {"x": "step", "y": "loss",
                                    "lines": {"train batch": (curve["step"], curve["dpo_loss"]),
                                              "ln 2 (step 0)": ([0, max_steps - 1], [math.log(2)] * 2)}},
        f"chosen replies' NLL (alpha {config.nll_coef:g} in the loss)": {
            "x": "step", "y": "nats per token", "lines": {"train batch": (curve["step"], curve["nll_chosen"])}},
        "implicit-reward accuracy": {"x": "step", "y": "share of pairs with r(chosen) > r(rejected)",
                                     "lines": {"train batch": (curve["step"], curve["reward_acc"]),
                                               "held-out": (curve["eval_step"], curve["eval_acc"])}},
        "implicit-reward margin": {"x": "step", "y": "beta * (log-ratio chosen - log-ratio rejected)",
                                   "lines": {"train batch": (curve["step"], curve["margin"]),
                                             "held-out": (curve["eval_step"], curve["eval_margin"])}},
        "log-probs of the replies": {"x": "step", "y": "summed log pi (nats)",
                                     "lines": {"chosen": (curve["step"], curve["logp_chosen"]),
                                               "rejected": (curve["step"], curve["logp_rejected"])}},
        f"KL to SFT ({len(kl_tasks)} sampled replies)": {"x": "step", "y": "nats per reply (k1)",
                                                        "lines": {"KL": (curve["eval_step"], curve["kl"])}}},
        title=f"04 DPO ({args.preset} preset, {config.loss}, beta {config.beta}, NLL alpha {config.nll_coef:g}): "
              f"win rate vs SFT {metrics['win_rate_vs_sft']:.2f}, KL {metrics['kl_to_sft']:.2f}")
    shown = world.sample_prompts(tasks)
    write_task_samples(out / "samples.md", "The same prompts answered by the SFT and the DPO model (temperature 1)", tasks, shown,
                       {"SFT": sft_texts, "DPO": texts}, config.eval_samples)
    print(f"wrote {out}/model.pt, metrics.json, curves.png, samples.md")


if __name__ == "__main__":
    main()
    leave_distributed()
