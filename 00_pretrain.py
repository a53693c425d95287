"""Stage 0: pretraining. A tokenizer and a base GPT trained on the toy internet.

Pretraining teaches a model to continue text. Given a token sequence x_1..x_T, the model outputs a
distribution over the next token at every position, and we minimise the average negative
log-likelihood of what actually came next:

    L(theta) = -1/T * sum_t log p_theta(x_{t+1} | x_1..x_t)

Nothing in this objective says "be helpful" or "be right": the model learns to imitate its corpus,
all of it. The toy internet (world.py) mixes right and wrong sums, polite and rude replies, refusals
and compliance with harmful requests, corrections and agreement with false premises. So the base
model learns the chat format and the world's facts, but its *samples* are as mixed as its corpus:
that mix is what every later stage works on.

What to watch: the train and validation loss fall together (a gap means memorising); the base
model's eval metrics in metrics.json and its replies in samples.md.

    python 00_pretrain.py                  # default preset: gpu if CUDA is available, else cpu
    python 00_pretrain.py --preset test    # seconds, for the tests
    torchrun --nproc_per_node=4 00_pretrain.py   # data parallel over 4 GPUs (or CPU processes)
"""

import os

# Same seed, same numbers on CPU: MKL results independent of memory alignment and of a thread count
# that MKL would otherwise lower by itself when the machine is busy.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
os.environ.setdefault("MKL_DYNAMIC", "FALSE")

import time
from dataclasses import asdict, dataclass

import torch

import world
from gpt import (GPT, GPTConfig, configure_optimizer, cosine_lr, is_main, leave_distributed, lm_loss, local_share,
                 main_process_first, save_checkpoint, set_lr, update)
from report import (Progress, plot_curves, positive_float, positive_int, preset_config, resolve_run, run_parser,
                    stage_dir, write_json, write_task_samples)
from tokenizer import Tokenizer


# ---- config -------------------------------------------------------------------------------------

@dataclass
class PretrainConfig:
    vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    n_docs: int  # documents of toy internet to generate
    batch_size: int
    max_steps: int
    lr: float
    warmup_steps: int
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_samples: int = world.EVAL_SAMPLES  # sampled replies per eval task
    eval_max_new_tokens: int = 96
    log_every: int = 20


PRESETS = {
    "test": PretrainConfig(vocab_size=320, n_layer=2, n_head=2, n_embd=48, block_size=256, n_docs=1500,
                           batch_size=16, max_steps=60, lr=3e-3, warmup_steps=10, eval_samples=1,
                           eval_max_new_tokens=48, log_every=20),
    "cpu": PretrainConfig(vocab_size=1024, n_layer=4, n_head=4, n_embd=128, block_size=256, n_docs=60000,
                          batch_size=32, max_steps=1150, lr=3e-3, warmup_steps=50),
    "gpu": PretrainConfig(vocab_size=1536, n_layer=8, n_head=8, n_embd=512, block_size=512, n_docs=600000,
                          batch_size=64, max_steps=3000, lr=1e-3, warmup_steps=200),
}


def parse_args():
    parser = run_parser(__doc__, PRESETS)
    parser.add_argument("--max-steps", type=positive_int, default=None, help="override the preset's step count")
    parser.add_argument("--lr", type=positive_float, default=None, help="override the preset's peak learning rate")
    args = parser.parse_args()
    device = resolve_run(args, parser)
    return args, preset_config(PRESETS, args, ["max_steps", "lr"]), device


# ---- data ---------------------------------------------------------------------------------------

def tokenize_documents(tokenizer, documents):
    """One flat token stream: each document (text, or chat rendered with role tokens) then <|endoftext|>."""
    ids = []
    for doc in documents:
        ids += tokenizer.encode(doc) if isinstance(doc, str) else tokenizer.render_chat(doc)[0]
        ids.append(tokenizer.doc_end_id)
    return torch.tensor(ids, dtype=torch.long)


def load_or_train_tokenizer(path, documents, vocab_size):
    """Train the BPE on the corpus text once; later runs with the same corpus and vocab size reuse the file
    (a file that cannot be read, e.g. cut short or from another version, is a stale cache: trained again)."""
    if path.exists():
        try:
            return Tokenizer.load(path)
        except ValueError as error:
            print(f"{error}; training the tokenizer again")
    tokenizer = Tokenizer.train((world.document_text(doc) for doc in documents), vocab_size)
    tokenizer.save(path)
    return tokenizer


def random_windows(stream, batch_size, block_size, generator):
    """A batch of random windows of the packed stream: inputs x and next-token targets y, (B, T)."""
    starts = torch.randint(0, len(stream) - block_size - 1, (batch_size,), generator=generator)
    x = torch.stack([stream[s: s + block_size] for s in starts.tolist()])
    y = torch.stack([stream[s + 1: s + block_size + 1] for s in starts.tolist()])
    return x, y


def local_batch(x, y):
    """This process's rows of a global batch and the weight of its mean loss (gpt.local_share): shares of a
    batch that does not split evenly differ in size, and a plain average of their means is not the global mean."""
    rows, weight = local_share(list(range(len(x))))
    return x[rows], y[rows], weight


# ---- method -------------------------------------------------------------------------------------

def next_token_loss(hidden_fn, model, x, y):
    """Mean cross-entropy of the next token, through the fused head (no (B*T, V) logits tensor)."""
    return lm_loss(hidden_fn(x), model.lm_head.weight, y)


@torch.no_grad()
def validation_loss(hidden_fn, model, batches, on_cuda):
    model.eval()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda):
        loss = sum(next_token_loss(hidden_fn, model, x, y).item() for x, y in batches) / len(batches)
    model.train()
    return loss


def main():
    args, config, device = parse_args()
    out = stage_dir(args.out, "pretrain")
    out.mkdir(parents=True, exist_ok=True)
    print(f"preset {args.preset} on {device}: {config}")

    documents = world.toy_internet(config.n_docs, seed=args.seed)
    t0 = time.time()
    cache = out / f"tokenizer_v{config.vocab_size}_docs{config.n_docs}_seed{args.seed}.json"
    with main_process_first():  # under torchrun, rank 0 trains the tokenizer and the others read its file
        tokenizer = load_or_train_tokenizer(cache, documents, config.vocab_size)
    n_val = max(1, len(documents) // 20)
    train_stream = tokenize_documents(tokenizer, documents[n_val:])
    val_stream = tokenize_documents(tokenizer, documents[:n_val])
    print(f"tokenizer ({tokenizer.vocab_size} tokens) and corpus ready in {time.time() - t0:.1f}s: "
          f"{len(train_stream):,} train / {len(val_stream):,} validation tokens")

    model = GPT(GPTConfig(tokenizer.vocab_size, config.block_size, config.n_layer, config.n_head, config.n_embd)).to(device)
    on_cuda = device.type == "cuda"
    hidden_fn = torch.compile(model.hidden) if on_cuda else model.hidden  # the loss head compiles itself
    optimizer = configure_optimizer(model, config.lr, config.weight_decay)
    generator = torch.Generator().manual_seed(args.seed)
    val_batches = [random_windows(val_stream, config.batch_size, config.block_size, generator) for _ in range(4)]
    val_batches = [(x.to(device), y.to(device)) for x, y in val_batches]
    tokens_per_step = config.batch_size * config.block_size
    print(f"model: {model.num_params() / 1e6:.2f}M parameters; {config.max_steps} steps x {tokens_per_step} tokens "
          f"= {config.max_steps * tokens_per_step / len(train_stream):.1f} epochs")

    curve = {"step": [], "train_loss": [], "val_step": [], "val_loss": []}
    progress = Progress(config.max_steps, config.log_every)
    window_start, window_tokens = time.time(), 0
    for step in range(config.max_steps):
        lr = cosine_lr(step, config.max_steps, config.lr, config.warmup_steps)
        set_lr(optimizer, lr)
        x, y = random_windows(train_stream, config.batch_size, config.block_size, generator)
        x, y, weight = local_batch(x, y)  # under torchrun: this process's share of the global batch
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_cuda):
            loss = next_token_loss(hidden_fn, model, x.to(device), y.to(device))
        update(model, optimizer, loss * weight, config.grad_clip, step)  # NaN guard, backward, clip, step
        window_tokens += tokens_per_step
        curve["step"].append(step)
        curve["train_loss"].append(loss.item())
        if progress.due(step) and is_main():
            if on_cuda:
                torch.cuda.synchronize()
            tokens_per_s = window_tokens / (time.time() - window_start)
            numbers = {"loss": loss.item(), "val": validation_loss(hidden_fn, model, val_batches, on_cuda),
                       "lr": lr, "tok/s": round(tokens_per_s)}
            if on_cuda:
                numbers["mfu"] = tokens_per_s * model.flops_per_token(config.block_size) / 989e12
            curve["val_step"].append(step)
            curve["val_loss"].append(numbers["val"])
            progress.line(step, **numbers)
            window_start, window_tokens = time.time(), 0
    train_seconds = time.time() - progress.start
    if not is_main():  # the other data-parallel processes are done
        return

    # ---- evaluation and outputs ----
    save_checkpoint(out / "model.pt", model, tokenizer=tokenizer,
                    meta={"stage": "pretrain", "preset": args.preset, "config": asdict(config)})
    tasks = world.eval_suite()  # the same prompts for every stage and every --seed
    metrics, texts = world.evaluate(model, tokenizer, tasks, samples=config.eval_samples, seed=args.seed,
                                    max_new_tokens=config.eval_max_new_tokens)
    metrics.update(val_loss=curve["val_loss"][-1], train_seconds=train_seconds, preset=args.preset, seed=args.seed,
                   device=str(device), threads=torch.get_num_threads(), parameters=model.num_params())
    write_json(out / "metrics.json", metrics)
    write_json(out / "eval_texts.json", texts)
    print("base model on the eval suite:", {k: round(v, 3) if isinstance(v, float) else v for k, v in metrics.items()})
    plot_curves(out / "curves.png", {
        "next-token loss": {"x": "step", "y": "cross-entropy (nats/token)",
                            "lines": {"train": (curve["step"], curve["train_loss"]),
                                      "validation": (curve["val_step"], curve["val_loss"])}}},
        title=f"00 pretraining ({args.preset} preset)")
    shown = world.sample_prompts(tasks)
    write_task_samples(out / "samples.md", "Base model replies (one sample each, temperature 1)", tasks, shown,
                       {"base": texts}, config.eval_samples)
    print(f"wrote {out}/model.pt, metrics.json, curves.png, samples.md")


if __name__ == "__main__":
    main()
    leave_distributed()
