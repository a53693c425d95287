"""Stage 1: supervised fine-tuning (SFT). Teach the base model to answer like a good assistant.

The base model has seen good and bad assistants alike and imitates both. SFT shows it only the good
one: a few demonstrations (prompt, ideal reply) written by careful people, and the same next-token
loss as pretraining, but counted on the assistant's tokens alone:

    L(theta) = - sum_t m_t log p_theta(x_{t+1} | x_1..x_t) / sum_t m_t
    m_t = 1 on the reply's tokens and its end-of-turn token, 0 on the prompt and role tokens

The model is not asked to predict the user's words, only how to answer them, and to stop (the
end-of-turn token is a target). Demonstrations are scarce and imperfect (world.sft_demonstrations:
a minority have small mistakes), as in real life, so SFT lifts every behaviour without reaching the
ceiling: the later stages have room to improve on it.

What to watch: the loss on held-out demonstrations; in metrics.json the base -> SFT change of every
behaviour metric, ended_rate near 1; samples.md shows the same prompts answered by both models.

    python 01_sft.py                 # needs out/pretrain/model.pt (python 00_pretrain.py)
    python 01_sft.py --preset test
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
from gpt import (configure_optimizer, cosine_lr, is_main, leave_distributed, lm_loss, local_token_share,
                 save_checkpoint, set_lr, shuffled_minibatches, update)
from report import (Progress, load_stage, plot_curves, positive_float, positive_int, preset_config, print_comparison,
                    read_stage_json, resolve_run, run_parser, stage_dir, write_json, write_task_samples)


# ---- config -------------------------------------------------------------------------------------

@dataclass
class SFTConfig:
    n_demos: int  # demonstrations available (train split)
    n_skill_chats: int  # multi-turn critique and comparison chats mixed in (world.skill_demonstrations)
    mistake_rate: float  # share of demonstrations with a small mistake
    epochs: int
    batch_size: int
    lr: float
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_samples: int = world.EVAL_SAMPLES
    eval_max_new_tokens: int = 96
    log_every: int = 10


PRESETS = {
    "test": SFTConfig(n_demos=160, n_skill_chats=16, mistake_rate=0.1, epochs=2, batch_size=16, lr=2e-3, eval_samples=1,
                      eval_max_new_tokens=48, log_every=5),
    "cpu": SFTConfig(n_demos=1200, n_skill_chats=200, mistake_rate=0.1, epochs=3, batch_size=32, lr=5e-4),
    "gpu": SFTConfig(n_demos=3000, n_skill_chats=500, mistake_rate=0.1, epochs=3, batch_size=64, lr=3e-4),
}


def parse_args():
    parser = run_parser(__doc__, PRESETS)
    parser.add_argument("--epochs", type=positive_int, default=None, help="override the preset's epochs")
    parser.add_argument("--lr", type=positive_float, default=None, help="override the preset's peak learning rate")
    args = parser.parse_args()
    device = resolve_run(args, parser)
    return args, preset_config(PRESETS, args, ["epochs", "lr"]), device


# ---- data ---------------------------------------------------------------------------------------

def chat_example(tokenizer, messages, block_size, given=1):
    """(input ids, targets) of one chat; targets are -100 except on the assistant's tokens after the first
    `given` messages (those are context: the user's request, or a reply that is about to be critiqued)."""
    ids, mask = tokenizer.render_chat(messages)
    context = len(tokenizer.render_chat(messages[:given])[0])
    mask = [0] * context + mask[context:]
    ids, mask = ids[-(block_size + 1):], mask[-(block_size + 1):]
    targets = [t if m else -100 for t, m in zip(ids[1:], mask[1:])]
    return ids[:-1], targets


def pad_batch(examples, device):
    """Right-pad a list of (ids, targets) to one (B, T) batch; padding is ignored by the loss."""
    length = max(len(ids) for ids, _ in examples)
    x = torch.zeros(len(examples), length, dtype=torch.long)
    y = torch.full((len(examples), length), -100, dtype=torch.long)
    for row, (ids, targets) in enumerate(examples):
        x[row, : len(ids)] = torch.tensor(ids)
        y[row, : len(targets)] = torch.tensor(targets)
    return x.to(device), y.to(device)


def loss_tokens(example):
    """How many tokens of an (ids, targets) example the loss is taken on."""
    return sum(t != -100 for t in example[1])


def held_out_split(demos, examples, n_val):
    """(held-out examples, training examples): the first n_val are held out, less those whose prompt a training
    demonstration also has (demonstrations repeat prompts; a repeated one would measure memorisation)."""
    train_prompts = {task.prompt for task, _ in demos[n_val:]}
    held_out = [example for (task, _), example in zip(demos[:n_val], examples[:n_val]) if task.prompt not in train_prompts]
    return held_out or examples[:n_val], examples[n_val:]  # (never empty: the held-out loss divides by its batches)


# ---- method -------------------------------------------------------------------------------------

def assistant_loss(model, x, y):
    """Next-token cross-entropy on the assistant's tokens only (targets -100 elsewhere)."""
    return lm_loss(model.hidden(x), model.lm_head.weight, y)


@torch.no_grad()
def held_out_loss(model, batches, on_cuda):
    model.eval()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda):
        loss = sum(assistant_loss(model, x, y).item() for x, y in batches) / len(batches)
    model.train()
    return loss


def bar_panel(base_metrics, sft_metrics):
    """The eval-suite rates of both models side by side (mean_len has another scale: left out)."""
    names = [k for k in world.METRIC_NAMES if k != "mean_len"]
    return {"x": "rate on the eval suite (gold_score: mean score)", "y": "", "labels": names,
            "bars": {"base": [base_metrics[k] for k in names], "SFT": [sft_metrics[k] for k in names]}}


def main():
    args, config, device = parse_args()
    out = stage_dir(args.out, "sft")
    model, tokenizer, _ = load_stage(args.out, "pretrain", device)
    base_texts = read_stage_json(args.out, "pretrain", "eval_texts.json")
    base_metrics = read_stage_json(args.out, "pretrain", "metrics.json")
    print(f"preset {args.preset} on {device}: {config}")

    demos = world.sft_demonstrations(config.n_demos, seed=args.seed, mistake_rate=config.mistake_rate)
    block = model.config.block_size
    examples = [chat_example(tokenizer, [{"role": "user", "content": task.prompt},
                                         {"role": "assistant", "content": reply}], block) for task, reply in demos]
    skills = [chat_example(tokenizer, chat, block, given) for chat, given in
              world.skill_demonstrations(config.n_skill_chats, seed=args.seed)]
    n_val = max(config.batch_size, len(examples) // 10)
    held_out, train = held_out_split(demos, examples, n_val)
    val_batches = [pad_batch(held_out[i:i + config.batch_size], device) for i in range(0, len(held_out), config.batch_size)]
    train = train + skills  # the held-out loss stays on single-turn demos
    steps_per_epoch = (len(train) + config.batch_size - 1) // config.batch_size
    max_steps = config.epochs * steps_per_epoch
    print(f"{len(demos)} demonstrations ({config.mistake_rate:.0%} with small mistakes) and {len(skills)} multi-turn "
          f"skill chats: {len(train)} train, {len(held_out)} held out; {max_steps} steps")

    on_cuda = device.type == "cuda"
    model.train()
    optimizer = configure_optimizer(model, config.lr, config.weight_decay)
    rng = random.Random(args.seed)
    curve = {"step": [], "train_loss": [], "val_step": [], "val_loss": []}
    progress = Progress(max_steps, config.log_every)
    for step, (epoch, batch) in enumerate(shuffled_minibatches(train, config.batch_size, config.epochs, rng)):
        lr = cosine_lr(step, max_steps, config.lr, config.warmup_steps)
        set_lr(optimizer, lr)
        # under torchrun each process takes its share, weighted by its share of the batch's loss tokens
        share, weight = local_token_share(batch, loss_tokens)
        x, y = pad_batch(share, device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda):
            loss = assistant_loss(model, x, y)
        update(model, optimizer, loss * weight, config.grad_clip, step)  # NaN guard, backward, clip, step
        curve["step"].append(step)
        curve["train_loss"].append(loss.item())
        if progress.due(step) and is_main():
            val = held_out_loss(model, val_batches, on_cuda)
            curve["val_step"].append(step)
            curve["val_loss"].append(val)
            progress.line(step, epoch=epoch + 1, loss=loss.item(), held_out=val, lr=lr)
    train_seconds = time.time() - progress.start
    if not is_main():  # the other data-parallel processes are done
        return

    # ---- evaluation and outputs ----
    save_checkpoint(out / "model.pt", model, tokenizer=tokenizer,
                    meta={"stage": "sft", "preset": args.preset, "config": asdict(config)})
    tasks = world.eval_suite()  # the same prompts for every stage and every --seed
    metrics, texts = world.evaluate(model, tokenizer, tasks, samples=config.eval_samples, seed=args.seed,
                                    max_new_tokens=config.eval_max_new_tokens, ref_texts=base_texts)
    # SFT is the reference of later stages; here the comparison is with the base model
    metrics["win_rate_vs_base"] = metrics.pop("win_rate_vs_sft")
    metrics["tie_rate_vs_base"] = metrics.pop("tie_rate_vs_sft")
    metrics.update(held_out_loss=curve["val_loss"][-1], train_seconds=train_seconds, preset=args.preset, seed=args.seed,
                   device=str(device), threads=torch.get_num_threads(), n_demos=len(demos))
    write_json(out / "metrics.json", metrics)
    write_json(out / "eval_texts.json", texts)
    print_comparison({"base": base_metrics, "SFT": metrics}, world.METRIC_NAMES)
    print(f"  win rate vs base       {metrics['win_rate_vs_base']:.3f} (ties {metrics['tie_rate_vs_base']:.3f})")
    plot_curves(out / "curves.png", {
        "assistant-token loss": {"x": "step", "y": "cross-entropy (nats/token)",
                                 "lines": {"train": (curve["step"], curve["train_loss"]),
                                           "held-out demos": (curve["val_step"], curve["val_loss"])}},
        "eval suite: base vs SFT": bar_panel(base_metrics, metrics)},
        title=f"01 SFT ({args.preset} preset)")
    shown = world.sample_prompts(tasks)
    write_task_samples(out / "samples.md", "The same prompts answered by the base and the SFT model (temperature 1)", tasks, shown,
                       {"base": base_texts, "SFT": texts}, config.eval_samples)
    print(f"wrote {out}/model.pt, metrics.json, curves.png, samples.md")


if __name__ == "__main__":
    main()
    leave_distributed()
