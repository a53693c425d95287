"""Stage 7: Constitutional AI. The model critiques and judges itself against written principles.

Human preference labels are slow and expensive, and harmful requests are exactly where we want them
least. Constitutional AI (Bai et al. 2022) replaces them with a short list of principles in plain
English (world.CONSTITUTION) and the model's own judgement, in two phases. No gold label is used in
training: the gold judge only measures the result (a test checks that).

1. SL-CAI, critique and revision. On red-team prompts (harmful requests), the SFT model answers; then
   it is asked to critique its answer against a principle drawn from the constitution, and to revise it:

       user: <request>           assistant: <reply>
       user: Critique your last reply using this principle: <principle>     assistant: Critique: ...
       user: Now revise your reply.                                        assistant: <revision>

   (repeated for --rounds). The model is then fine-tuned on (request, final revision), with the
   loss on the reply's tokens only; a reply its own critique finds nothing wrong with is kept as it
   is, and the model's own replies to other prompts (benign requests, questions, sums; three times as
   many as SL-CAI's prompts on the cpu and gpu presets) are mixed in so it keeps what it could do.
   By default benign requests are answered, not revised (as in Bai et al.): revising replies that were
   fine lets a small model drift to another request's steps. --sl-benign-share puts some benign requests
   into the critique-revision loop too; at 0.1 the 10-seed mean was the same within noise (README).

2. RL-CAI (RL from AI feedback). The SL-CAI model answers each prompt twice; then it is shown both
   replies and a principle, and asked which is better. Its label is the probability it gives to
   "(A)" versus "(B)" as the answer,

       P(A better) = p("(A)") / (p("(A)") + p("(B)")),

   averaged over several principles (--principles) and over both orders of the replies (a language
   model prefers a position; averaging the two orders cancels that bias, which is measured). The
   replies labelled this way train the SL-CAI model with DPO (04's loss, rl.dpo_batch), the
   SL-CAI model as its reference, on a short leash (--beta, 8 on the cpu preset): the labels favour
   refusals, and pushed far, DPO teaches refusing harmless requests too.

What to watch: the harmful-request refusal rate rising after each phase, the benign-help rate not
falling (over-refusal is a failure too: the report counts refusals of harmless requests), and how
often the model's own labels agree with the gold judge. The eval suite has 16 harmful and 16 benign
requests; at 4 replies each its two rates carry about +-4 points of sampling noise, so the script measures
them again from 128 replies per request (request_rates), for SFT, SL-CAI and RL-CAI.

    python 07_cai.py                  # needs out/sft/model.pt (01)
    python 07_cai.py --rounds 2 --principles 4
"""

import os

# Same seed, same numbers on CPU: MKL results independent of memory alignment and of a thread count
# that MKL would otherwise lower by itself when the machine is busy.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
os.environ.setdefault("MKL_DYNAMIC", "FALSE")

import random
import time
from collections import Counter
from dataclasses import asdict, dataclass

import torch

import world
from gpt import (barrier, configure_optimizer, cosine_lr, is_main, leave_distributed, load_checkpoint, local_share,
                 local_token_share, process_seed, response_log_probs, save_checkpoint, set_lr, shuffled_minibatches,
                 split_and_gather, update)
from report import (Progress, load_stage, plot_curves, positive_float, positive_int, preset_config, print_comparison,
                    read_stage_json, resolve_run, run_parser, stage_dir, write_json)
from rl import dpo_batch, implicit_reward_stats, reference_log_probs, reply_ids, reply_loss


# ---- config -------------------------------------------------------------------------------------

@dataclass
class CAIConfig:
    n_prompts: int  # SL-CAI's critiqued and revised prompts: red-team (harmful requests), plus sl_benign_share benign
    harmful_share: float  # of the RL-CAI prompts; the rest are benign requests
    n_helpful: int  # the model's own replies to other prompts, mixed into SL-CAI (Bai et al. do the same)
    rounds: int  # critique-revision rounds
    sl_epochs: int
    sl_lr: float
    n_pairs: int  # RL-CAI prompts (two replies each)
    principles: int  # principles in the labelling ensemble
    min_confidence: float  # keep AI-labelled pairs with |P(A better) - 0.5| >= this
    beta: float  # DPO
    dpo_epochs: int
    dpo_lr: float
    batch_size: int = 32
    max_new_tokens: int = 64  # replies and revisions
    sl_temperature: float = 0.7  # SL-CAI's replies, critiques and revisions (see critique_and_revise)
    sl_benign_share: float = 0.0  # expected share of benign requests among SL-CAI's prompts (see the docstring)
    critique_tokens: int = 40
    debias_positions: bool = True
    grad_clip: float = 1.0
    eval_samples: int = world.EVAL_SAMPLES
    eval_max_new_tokens: int = 96
    request_samples: int = 128  # replies per eval-suite request for the precise refusal and help rates
    log_every: int = 10


PRESETS = {
    "test": CAIConfig(n_prompts=32, harmful_share=0.6, n_helpful=16, rounds=1, sl_epochs=1, sl_lr=1e-4, n_pairs=32, principles=2,
                      min_confidence=0.0, beta=0.1, dpo_epochs=1, dpo_lr=1e-4, batch_size=16, max_new_tokens=32,
                      critique_tokens=24, eval_samples=1, eval_max_new_tokens=48, request_samples=2, log_every=2),
    # beta 8 keeps RL-CAI close to the SL-CAI model: at 2 its DPO also taught refusing benign requests (seed 2:
    # benign help -13.9 points, at 4 -6.5, at 8 -4.0; docs/experiments.md)
    "cpu": CAIConfig(n_prompts=600, harmful_share=0.6, n_helpful=1800, rounds=1, sl_epochs=2, sl_lr=1e-4, n_pairs=1600,
                     principles=3, min_confidence=0.1, beta=8.0, dpo_epochs=2, dpo_lr=2e-5),
    "gpu": CAIConfig(n_prompts=2000, harmful_share=0.6, n_helpful=6000, rounds=1, sl_epochs=2, sl_lr=1e-4, n_pairs=3000,
                     principles=4, min_confidence=0.1, beta=2.0, dpo_epochs=2, dpo_lr=2e-5, batch_size=64),
}

# The principles drawn for critiques and comparisons: the constitution's harmlessness and helpfulness
# principles (the ones about facts and arithmetic do not bear on requests).
PRINCIPLES = [world.CONSTITUTION[i] for i in (0, 1, 2, 6, 9)]


def parse_args():
    parser = run_parser(__doc__, PRESETS)
    parser.add_argument("--rounds", type=positive_int, default=None, help="critique-revision rounds")
    parser.add_argument("--principles", type=positive_int, default=None, help="principles per AI label (ensemble)")
    parser.add_argument("--n-pairs", dest="n_pairs", type=positive_int, default=None, help="RL-CAI prompts (2 replies each)")
    parser.add_argument("--sl-lr", dest="sl_lr", type=positive_float, default=None, help="SL-CAI learning rate")
    parser.add_argument("--sl-epochs", dest="sl_epochs", type=positive_int, default=None)
    parser.add_argument("--beta", type=positive_float, default=None, help="DPO beta of the RL-CAI phase")
    parser.add_argument("--dpo-epochs", dest="dpo_epochs", type=positive_int, default=None)
    parser.add_argument("--min-confidence", dest="min_confidence", type=float, default=None,
                        help="keep AI-labelled pairs with |P(A better) - 0.5| at least this, in [0, 0.5)")
    parser.add_argument("--sl-benign-share", dest="sl_benign_share", type=float, default=None,
                        help="share of benign requests among SL-CAI's critiqued and revised prompts, in [0, 1)")
    parser.add_argument("--no-debias", dest="debias_positions", action="store_false", default=None,
                        help="label each pair in one order only (shows the position bias)")
    args = parser.parse_args()
    device = resolve_run(args, parser)
    if args.min_confidence is not None and not 0 <= args.min_confidence < 0.5:
        parser.error("--min-confidence must be in [0, 0.5)")
    if args.sl_benign_share is not None and not 0 <= args.sl_benign_share < 1:
        parser.error("--sl-benign-share must be in [0, 1)")
    if args.principles is not None and args.principles > len(PRINCIPLES):
        parser.error(f"--principles must be at most {len(PRINCIPLES)}")
    overrides = ["rounds", "principles", "n_pairs", "sl_lr", "sl_epochs", "beta", "dpo_epochs", "min_confidence",
                 "debias_positions", "sl_benign_share"]
    return args, preset_config(PRESETS, args, overrides), device


# ---- data: red-team and benign prompts (only their text is used) ---------------------------------

def request_tasks(rng, n, harmful_share):
    """n request tasks from the train split, harmful_share of them harmful (the red-team prompts).
    Training reads only their prompt text; the rest of a task (its truth) is for measurement."""
    kinds = ["harmful" if rng.random() < harmful_share else "benign" for _ in range(n)]
    return [world.make_task("requests", kind, rng, "train") for kind in kinds]


def sl_cai_tasks(rng, config):
    """SL-CAI's prompts to critique and revise: red-team prompts and, with config.sl_benign_share, benign ones."""
    return request_tasks(rng, config.n_prompts, harmful_share=1 - config.sl_benign_share)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": world.strip_end(text)[0]}


# ---- phase 1: SL-CAI ----------------------------------------------------------------------------

def critique_and_revise(model, tokenizer, prompts, config, rng, seed):
    """Sample a reply to each prompt, then `rounds` of self-critique and revision.
    Returns a list of dicts: prompt, reply, and per round the principle, critique and revision.

    Sampled at config.sl_temperature (0.7), below 1: the model is fine-tuned on these texts, and at
    temperature 1 a small model's samples carry slips (steps of another how-to, garbled words) that
    fine-tuning on them teaches back. Measured on the cpu preset's SFT model, 300 prompts: at 1.0 the
    revisions made 20 of 117 benign replies worse by the gold judge (4 better), at 0.7 6 worse (3 better),
    while harmful replies improved about as much (gold 0.39 -> 0.46 and 0.40 -> 0.46)."""
    def reply_to(chats, max_new_tokens, offset):  # under torchrun each process writes its share of the replies
        return split_and_gather(lambda some: world.continue_chats(model, tokenizer, some, max_new_tokens=max_new_tokens,
                                                             temperature=config.sl_temperature,
                                                             seed=process_seed(seed + offset))[2], chats)

    chats = [[user(p)] for p in prompts]
    replies = reply_to(chats, config.max_new_tokens, 0)
    records = [{"prompt": p, "reply": r, "rounds": []} for p, r in zip(prompts, replies)]
    latest = replies
    for round_ in range(config.rounds):
        principles = [rng.choice(PRINCIPLES) for _ in prompts]
        chats = [chat + [assistant(r), user(world.CRITIQUE_REQUEST.format(principle=pr))]
                 for chat, r, pr in zip(chats, latest, principles)]
        critiques = reply_to(chats, config.critique_tokens, 1_000_000 * (2 * round_ + 1))
        chats = [chat + [assistant(c), user(world.REVISION_REQUEST)] for chat, c in zip(chats, critiques)]
        latest = reply_to(chats, config.max_new_tokens, 1_000_000 * (2 * round_ + 2))
        for record, pr, c, r in zip(records, principles, critiques, latest):
            record["rounds"].append({"principle": pr, "critique": c, "revision": r})
    return records


def sl_target(record):
    """(prompt, the reply to fine-tune on): the last revision, or the last reply the model's own critique
    found nothing wrong with (a revision is only needed when the critique found a problem; revising a
    fine reply anyway lets a small model drift off the request)."""
    reply = record["reply"]
    for round_ in record["rounds"]:
        if world.GOOD_CRITIQUE in round_["critique"]:
            break
        reply = round_["revision"]
    return record["prompt"], reply


def helpful_replies(model, tokenizer, rng, n, temperature, seed):
    """(prompt, reply) pairs: the model's own replies to n train prompts of every family but harmful
    requests. Mixed into SL-CAI's fine-tuning so that it keeps what the model could already do (Bai et al.
    mix in samples of their helpful model the same way)."""
    tasks = []
    while len(tasks) < n:
        task = world.random_task(rng, "train")
        if task.kind != "harmful":
            tasks.append(task)
    prompts = [t.prompt for t in tasks]

    def reply_to(chats):  # under torchrun each process writes its share of the replies
        return world.continue_chats(model, tokenizer, chats, temperature=temperature, seed=process_seed(seed + 3))[2]

    replies = split_and_gather(reply_to, [[user(p)] for p in prompts])
    return list(zip(prompts, replies))


def supervised_finetune(model, tokenizer, examples, config, rng):
    """Fine-tune on (prompt, reply text) pairs: cross-entropy on the reply's tokens only. -> loss curve"""
    data = [(tokenizer.render_prompt([user(p)]), reply_ids(tokenizer, r)) for p, r in examples]
    max_steps = config.sl_epochs * ((len(data) + config.batch_size - 1) // config.batch_size)
    optimizer = configure_optimizer(model, config.sl_lr, weight_decay=0.0)
    model.train()
    losses = []
    progress = Progress(max_steps, config.log_every)
    for step, (_, whole) in enumerate(shuffled_minibatches(data, config.batch_size, config.sl_epochs, rng)):
        set_lr(optimizer, cosine_lr(step, max_steps, config.sl_lr, warmup_steps=5))
        batch, weight = local_token_share(whole, lambda item: len(item[1]))  # under torchrun: this process's share
        loss = reply_loss(model, [p for p, _ in batch], [r for _, r in batch])
        update(model, optimizer, loss * weight, config.grad_clip, step)
        losses.append(loss.item())
        if progress.due(step):
            progress.line(step, phase="SL-CAI", loss=loss.item())
    return losses


# ---- phase 2: RL-CAI (AI feedback) --------------------------------------------------------------

@torch.no_grad()
def first_reply_probabilities(model, tokenizer, comparisons, batch_size=64):
    """For each comparison (principle, prompt, first reply, second reply): the model's
    P("(A)") / (P("(A)") + P("(B)")) when shown the first reply as (A) and the second as (B). -> (N,)"""
    prompts = [tokenizer.render_prompt([user(world.COMPARISON_PROMPT.format(
        principle=principle, prompt=prompt, a=world.strip_end(first)[0], b=world.strip_end(second)[0]))])
        for principle, prompt, first, second in comparisons]
    answer_a, answer_b = tokenizer.encode("(A)"), tokenizer.encode("(B)")
    probabilities = []
    progress = Progress((len(prompts) + batch_size - 1) // batch_size, every=10)
    for step, start in enumerate(range(0, len(prompts), batch_size)):
        chunk = prompts[start:start + batch_size]
        logp, _ = response_log_probs(model, chunk + chunk, [answer_a] * len(chunk) + [answer_b] * len(chunk))
        log_a, log_b = logp.sum(dim=1).float().cpu().chunk(2)
        probabilities.append(torch.sigmoid(log_a - log_b))
        if progress.due(step) and progress.total > 10:  # long labelling jobs say how far they are
            progress.line(step, phase="AI labels", comparisons=start + len(chunk))
    return torch.cat(probabilities)


def ai_labels(model, tokenizer, items, principles, debias=True):
    """The model's own preference between the replies a and b of each item (prompt, a, b).

    principles: one list of principles per item (the ensemble). Returns probs (N, 2), rows
    [P(a better), P(b better)] summing to 1, averaged over the principles and, with debias, over both
    orders; and the position bias (N,): how much more the first-shown reply is picked than the
    order-free label says (0 = none, +0.5 = always the first).
    """
    if not items:  # every pair was identical or too long to compare: the caller says so
        return torch.zeros(0, 2), torch.zeros(0)
    comparisons = [(pr, prompt, first, second) for (prompt, a, b), prs in zip(items, principles) for pr in prs
                   for first, second in ((a, b), (b, a))]
    p = torch.tensor(split_and_gather(lambda some: first_reply_probabilities(model, tokenizer, some).tolist(),
                                      comparisons))
    p = p.view(len(items), len(principles[0]), 2)  # under torchrun each process scored its share
    p_first, p_second = p[..., 0].mean(dim=1), p[..., 1].mean(dim=1)  # a shown first; b shown first
    p_a = (p_first + 1 - p_second) / 2 if debias else p_first
    return torch.stack([p_a, 1 - p_a], dim=1), (p_first + p_second - 1) / 2


def fits_comparison(tokenizer, prompt, a, b, block_size):
    """Whether the comparison prompt with both replies fits the context (cut prompts would lose the principle)."""
    longest = max(PRINCIPLES, key=len)
    text = world.COMPARISON_PROMPT.format(principle=longest, prompt=prompt, a=world.strip_end(a)[0],
                                          b=world.strip_end(b)[0])
    return len(tokenizer.render_prompt([user(text)])) + 4 <= block_size


def ai_feedback_pairs(model, tokenizer, prompts, config, rng, seed):
    """Two replies per prompt from the model, labelled by the model. -> (pairs for DPO, labelling stats)"""
    prompt_ids, outputs, texts = split_and_gather(  # under torchrun each process samples its share
        lambda chats: world.continue_chats(model, tokenizer, chats, max_new_tokens=config.max_new_tokens,
                                           seed=process_seed(seed)), [[user(p)] for p in prompts for _ in (0, 1)])
    skipped, items, indices = Counter(), [], []
    for i, prompt in enumerate(prompts):
        a, b = texts[2 * i], texts[2 * i + 1]
        if a == b:
            skipped["identical replies"] += 1
        elif not fits_comparison(tokenizer, prompt, a, b, model.config.block_size):
            skipped["too long to compare"] += 1
        else:
            items.append((prompt, a, b))
            indices.append(i)
    print(f"labelling {len(items)} pairs x {config.principles} principles x 2 orders ...", flush=True)
    probs, bias = ai_labels(model, tokenizer, items, [rng.sample(PRINCIPLES, config.principles) for _ in items],
                            config.debias_positions)
    pairs = []
    for (prompt, a, b), i, (p_a, p_b) in zip(items, indices, probs.tolist()):
        if abs(p_a - 0.5) < config.min_confidence:
            skipped["low confidence"] += 1
            continue
        chosen, rejected = (b, a) if p_b > p_a else (a, b)
        pairs.append({"index": i, "prompt": prompt, "prompt_ids": prompt_ids[2 * i], "chosen": chosen,
                      "rejected": rejected, "chosen_ids": reply_ids(tokenizer, chosen),
                      "rejected_ids": reply_ids(tokenizer, rejected), "confidence": max(p_a, p_b)})
    stats = {"pairs": len(pairs), "skipped": dict(skipped),
             "position_bias": bias.mean().item() if len(items) else 0.0}
    return pairs, stats


def dpo_on_ai_labels(policy, reference, pairs, config, rng, device):
    """DPO on the AI-labelled pairs, the SL-CAI model as reference. -> per-step stats"""
    ref_chosen, ref_rejected = reference_log_probs(reference, pairs)
    optimizer = configure_optimizer(policy, config.dpo_lr, weight_decay=0.0)
    max_steps = config.dpo_epochs * ((len(pairs) + config.batch_size - 1) // config.batch_size)
    policy.train()
    curve = []
    progress = Progress(max_steps, config.log_every)
    order = list(range(len(pairs)))
    for step, (_, batch) in enumerate(shuffled_minibatches(order, config.batch_size, config.dpo_epochs, rng)):
        set_lr(optimizer, cosine_lr(step, max_steps, config.dpo_lr, warmup_steps=5))
        batch, weight = local_share(batch)  # under torchrun: this process's share of the batch
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, stats = dpo_batch(policy, [pairs[i] for i in batch], ref_chosen[batch], ref_rejected[batch],
                                    beta=config.beta)
        update(policy, optimizer, loss * weight, config.grad_clip, step)
        curve.append({"loss": loss.item(), **stats})
        if progress.due(step):
            progress.line(step, phase="RL-CAI (DPO)", loss=loss.item(), acc=stats["reward_acc"], margin=stats["margin"])
    final_acc, final_margin = implicit_reward_stats(policy, pairs, ref_chosen, ref_rejected, config.beta)
    return curve, {"train_reward_acc": final_acc, "train_margin": final_margin}


# ---- measurement (the gold judge appears only from here on) --------------------------------------

def label_agreement(pairs, tasks):
    """Share of AI-labelled pairs where the gold judge also prefers the chosen reply (pairs it scores
    equal are left out). tasks: the tasks whose prompts the pairs answer (pair["index"])."""
    decided = [(world.gold_score(tasks[p["index"]], p["chosen"]), world.gold_score(tasks[p["index"]], p["rejected"]))
               for p in pairs]
    decided = [(c, r) for c, r in decided if c != r]
    return sum(c > r for c, r in decided) / max(1, len(decided)), len(decided)


REQUEST_RATES = ["harmful_refusal_rate", "benign_help_rate"]


def request_rates(models, tokenizer, tasks, samples, max_new_tokens, seed):
    """{model name: {"harmful_refusal_rate", "benign_help_rate", "replies"}} on the eval suite's requests, from
    `samples` replies per request. The eval suite's 4 replies per request (64 per kind) leave about +-4 points
    of sampling noise on each rate, as large as the 5-point limit on the benign-help drop. At 32 per request
    one model measured with five seeds still ranged over 6.7 points of harmful refusal change and 4.3 of help
    change against SFT; 128 per request (2,048 replies per kind) bring each rate to about +-1 point (a change
    against SFT to about +-1.4)."""
    requests = [t for t in tasks if t.family == "requests"]
    rates = {}
    for name, model in models.items():
        _, _, texts = world.generate_responses(model, tokenizer, requests, samples=samples,
                                               max_new_tokens=max_new_tokens, seed=seed)
        flags = [world.behaviour_flags(t, r) for t, r in zip([t for t in requests for _ in range(samples)], texts)]
        rates[name] = {"harmful_refusal_rate": world.flag_rate(flags, "refused"),
                       "benign_help_rate": world.flag_rate(flags, "helped"), "replies": len(texts)}
    return rates


def refusal_report(tasks, texts, samples):
    """Over-refusal: refusals of harmless prompts (benign requests, questions) and the most repeated
    opening sentences of replies to requests (boilerplate)."""
    replies = [(t, r) for t, rs in zip(tasks, [texts[i:i + samples] for i in range(0, len(texts), samples)])
               for r in rs]
    harmless = [world.is_refusal(world.strip_end(r)[0]) for t, r in replies if t.kind != "harmful"]
    benign = [world.is_refusal(world.strip_end(r)[0]) for t, r in replies if t.kind == "benign"]
    openings = Counter(world.strip_end(r)[0].split(".")[0] for t, r in replies if t.family == "requests")
    return {"benign_refused": sum(benign) / len(benign), "harmless_refused": sum(harmless) / len(harmless),
            "top_openings": openings.most_common(3)}


def main():
    args, config, device = parse_args()
    out = stage_dir(args.out, "cai")
    model, tokenizer, _ = load_stage(args.out, "sft", device)
    sft_reference, _, _ = load_stage(args.out, "sft", device, frozen=True)
    sft_texts = read_stage_json(args.out, "sft", "eval_texts.json")
    sft_metrics = read_stage_json(args.out, "sft", "metrics.json")
    print(f"preset {args.preset} on {device}: {config}")
    rng = random.Random(f"cai/{args.seed}")
    start = time.time()

    # ---- phase 1: SL-CAI ----
    sl_prompts = [t.prompt for t in sl_cai_tasks(rng, config)]
    records = critique_and_revise(model, tokenizer, sl_prompts, config, rng, args.seed)
    own = helpful_replies(model, tokenizer, rng, config.n_helpful, config.sl_temperature, args.seed)
    final = [sl_target(r) for r in records] + own
    examples = [(p, rev) for p, rev in final if rev.endswith(world.END) and world.strip_end(rev)[0]]
    revised = sum(rev != r["reply"] for r, (_, rev) in zip(records, final))
    print(f"SL-CAI: {len(records)} prompts critiqued (about {config.sl_benign_share:.0%} benign), {revised} replies "
          f"revised; fine-tuning on {len(examples)} ended targets (with {config.n_helpful} of the model's own replies "
          f"to other prompts)")
    sl_losses = supervised_finetune(model, tokenizer, examples, config, rng)
    sl_seconds = time.time() - start
    if is_main():
        save_checkpoint(out / "sl_cai.pt", model, tokenizer=tokenizer,
                        meta={"stage": "sl_cai", "config": asdict(config)})
    barrier()  # under torchrun the others wait for the file

    # ---- phase 2: RL-CAI, DPO on the model's own labels ----
    sl_reference, _, _ = load_checkpoint(out / "sl_cai.pt", device)
    sl_reference.requires_grad_(False)  # the reference of the RL-CAI phase
    rl_tasks = request_tasks(rng, config.n_pairs, config.harmful_share)
    pairs, label_stats = ai_feedback_pairs(sl_reference, tokenizer, [t.prompt for t in rl_tasks], config, rng,
                                           args.seed + 1)
    if not pairs:
        raise SystemExit(f"error: no AI-labelled pairs to train on (skipped: {label_stats['skipped']}); "
                         f"try more --principles or a longer-context preset")
    print(f"RL-CAI: {label_stats['pairs']} AI-labelled pairs (skipped {label_stats['skipped']}), "
          f"position bias {label_stats['position_bias']:+.3f}")
    dpo_curve, dpo_stats = dpo_on_ai_labels(model, sl_reference, pairs, config, rng, device)
    train_seconds = time.time() - start
    if not is_main():  # under torchrun, the other data-parallel processes are done
        return
    save_checkpoint(out / "model.pt", model, tokenizer=tokenizer,
                    meta={"stage": "cai", "preset": args.preset, "config": asdict(config)})

    # ---- evaluation: the eval suite after each phase (sl_reference is the SL-CAI model), label agreement,
    # over-refusal ----
    tasks = world.eval_suite()  # the same prompts for every stage and every --seed
    eval_sl = {}
    eval_sl["metrics"], eval_sl["texts"] = world.evaluate(sl_reference, tokenizer, tasks, samples=config.eval_samples,
                                                          seed=args.seed, max_new_tokens=config.eval_max_new_tokens,
                                                          ref_model=sft_reference, ref_texts=sft_texts)
    metrics, texts = world.evaluate(model, tokenizer, tasks, samples=config.eval_samples, seed=args.seed,
                                    max_new_tokens=config.eval_max_new_tokens, ref_model=sft_reference,
                                    ref_texts=sft_texts)
    agreement, judged = label_agreement(pairs, rl_tasks)
    print(f"requests again, {config.request_samples} replies each (the eval suite's {config.eval_samples} are noisy):")
    requests = request_rates({"SFT": sft_reference, "SL-CAI": sl_reference, "RL-CAI": model}, tokenizer, tasks,
                             config.request_samples, config.eval_max_new_tokens, args.seed + 5)
    metrics.update(sl_cai=eval_sl["metrics"], request_rates=requests, label_agreement_with_gold=agreement,
                   label_pairs_judged=judged,
                   labels=label_stats, dpo=dpo_stats, over_refusal={
                       "sft": refusal_report(tasks, sft_texts, config.eval_samples),
                       "sl_cai": refusal_report(tasks, eval_sl["texts"], config.eval_samples),
                       "rl_cai": refusal_report(tasks, texts, config.eval_samples)},
                   sl_examples=len(examples), sl_seconds=sl_seconds, train_seconds=train_seconds,
                   preset=args.preset, seed=args.seed, device=str(device), threads=torch.get_num_threads())
    write_json(out / "metrics.json", metrics)
    write_json(out / "eval_texts.json", texts)
    print_comparison({"SFT": sft_metrics, "SL-CAI": eval_sl["metrics"], "RL-CAI": metrics}, world.METRIC_NAMES)
    for name, rates in requests.items():
        print(f"  {name:<7} harmful refusal {rates['harmful_refusal_rate']:.3f}   "
              f"benign help {rates['benign_help_rate']:.3f}   ({rates['replies']} replies)")
    print(f"AI labels agree with the gold judge on {agreement:.1%} of {judged} pairs it can tell apart")
    for stage, report in metrics["over_refusal"].items():
        print(f"  {stage:<7} refuses {report['benign_refused']:.1%} of benign requests, "
              f"{report['harmless_refused']:.1%} of harmless prompts")

    names = ["harmful_refusal_rate", "benign_help_rate", "pushback_rate", "idk_rate", "math_acc", "facts_acc",
             "rude_rate", "ended_rate"]
    plot_curves(out / "curves.png", {
        "SL-CAI fine-tuning": {"x": "step", "y": "reply-token cross-entropy",
                               "lines": {"loss": (list(range(len(sl_losses))), sl_losses)}},
        "RL-CAI (DPO on AI labels)": {"x": "step", "y": "", "lines": {
            "loss": (list(range(len(dpo_curve))), [s["loss"] for s in dpo_curve]),
            "implicit-reward accuracy": (list(range(len(dpo_curve))), [s["reward_acc"] for s in dpo_curve])}},
        "eval suite after each phase": {"x": "rate", "y": "", "labels": names, "bars": {
            "SFT": [sft_metrics[k] for k in names], "SL-CAI": [eval_sl["metrics"][k] for k in names],
            "RL-CAI": [metrics[k] for k in names]}},
        f"requests, {config.request_samples} replies each": {"x": "rate", "y": "", "labels": REQUEST_RATES,
                                                             "bars": {name: [rates[k] for k in REQUEST_RATES]
                                                                      for name, rates in requests.items()}},
    }, title=f"07 Constitutional AI ({args.preset} preset): harmful refusal {sft_metrics['harmful_refusal_rate']:.2f}"
             f" -> {eval_sl['metrics']['harmful_refusal_rate']:.2f} -> {metrics['harmful_refusal_rate']:.2f}, "
             f"AI-gold agreement {agreement:.2f}", columns=4)
    write_critiques(out / "samples.md", records, tasks, sft_texts, eval_sl["texts"], texts, config.eval_samples)
    print(f"wrote {out}/model.pt, sl_cai.pt, metrics.json, curves.png, samples.md")


def write_critiques(path, records, tasks, sft_texts, sl_texts, rl_texts, samples):
    """samples.md: critique-revision examples, then eval replies of SFT, SL-CAI and RL-CAI side by side."""
    lines = ["# Constitutional AI", "", "## Self-critique and revision (SL-CAI training data)", ""]
    for record in records[:6]:
        lines += [f"**request:** {record['prompt']}", "", f"**reply:** {record['reply']}", ""]
        for round_ in record["rounds"]:
            lines += [f"**principle:** {round_['principle']}", "", f"**critique:** {round_['critique']}", "",
                      f"**revision:** {round_['revision']}", ""]
        lines.append("---")
    lines += ["", "## Eval prompts: SFT, SL-CAI, RL-CAI (temperature 1)", ""]
    shown = [t for t in world.sample_prompts(tasks, per_kind=3) if t.family == "requests"]
    index = {id(t): i for i, t in enumerate(tasks)}
    for task in shown:
        i = index[id(task)] * samples
        lines += [f"### {task.prompt}", "", f"**SFT:** {sft_texts[i]}", "", f"**SL-CAI:** {sl_texts[i]}", "",
                  f"**RL-CAI:** {rl_texts[i]}", ""]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
    leave_distributed()
