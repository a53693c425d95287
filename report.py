"""Bookkeeping shared by the numbered scripts: the run options, progress lines, each stage's output
folder (metrics.json, curves.png, samples.md) and the table that compares stages.

Every stage writes under <out>/<stage>/, and all stages of one run share the same <out>.
"""

import argparse
import dataclasses
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

import world
from tokenizer import write_atomically

STAGE_SCRIPTS = {"pretrain": "00_pretrain.py", "sft": "01_sft.py", "reward_model": "02_reward_model.py",
                 "ppo": "03_ppo.py", "dpo": "04_dpo.py", "grpo": "05_grpo.py", "rlvr": "06_rlvr.py", "cai": "07_cai.py"}



# ---- run options --------------------------------------------------------------------------------

def run_parser(description, presets):
    """An argparse parser with the options every script shares: --preset, --out, --seed, --device."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(presets), default=None,
                        help="model and budget size (default: gpu if CUDA is available, else cpu)")
    parser.add_argument("--out", default="out", help="root folder shared by all stages of a run (default: out)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    return parser


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def preset_config(presets, args, overrides):
    """A copy of the chosen preset's config with the fields in `overrides` replaced where args set them."""
    config = dataclasses.replace(presets[args.preset])
    for name in overrides:
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    return config


def resolve_run(args, parser):
    """Fill in the defaults that depend on the machine and check the device. Returns torch.device."""
    from gpt import init_distributed

    cuda = torch.cuda.is_available()
    args.preset = args.preset or ("gpu" if cuda else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))  # set by torchrun, one process per GPU
    try:
        device = torch.device(args.device or (f"cuda:{local_rank}" if cuda else "cpu"))
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a device (try cpu, cuda or cuda:1)")
    if device.type == "cuda" and not cuda:
        parser.error("--device cuda was asked for but CUDA is not available")
    init_distributed(device)
    torch.manual_seed(args.seed)  # the same seed in every process: the same initial weights
    return device


def stage_dir(out, stage):
    return Path(out) / stage


def load_stage(out, stage, device, *, frozen=False, loader=None):
    """(model, tokenizer, meta) of an earlier stage's model.pt, or exit with one line saying what to run.

    frozen: no gradients (a reference or a reward model). loader: how to read the file (default
    gpt.load_checkpoint; rl.load_reward_model for 02's reward model)."""
    from gpt import load_checkpoint

    path = stage_dir(out, stage) / "model.pt"
    try:
        model, tokenizer, meta = (loader or load_checkpoint)(path, device)
        return model.requires_grad_(not frozen), tokenizer, meta
    except FileNotFoundError:
        raise SystemExit(f"error: {path} not found: run `python {STAGE_SCRIPTS[stage]}` first (with the same --out)")
    except ValueError as error:
        raise SystemExit(f"error: {error}: run `python {STAGE_SCRIPTS[stage]}` again")


def read_stage_json(out, stage, name):
    """A JSON file an earlier stage wrote, or exit with one line saying what to run."""
    path = stage_dir(out, stage) / name
    if not path.is_file():
        raise SystemExit(f"error: {path} not found: run `python {STAGE_SCRIPTS[stage]}` first (with the same --out)")
    return read_json(path)


# ---- progress -----------------------------------------------------------------------------------

class Progress:
    """Prints one line per interval: step/total, the numbers given, elapsed time and ETA. The ETA counts
    from the first line on, once there are two: the first step also pays for warm-up (torch.compile's
    compilation takes a minute on a GPU), which would inflate an average over all steps for a long time."""

    def __init__(self, total_steps, every):
        self.total, self.every, self.start = total_steps, max(1, every), time.time()
        self.first = None  # (step, time) of the first line

    def due(self, step):
        return step % self.every == 0 or step == self.total - 1

    def line(self, step, **numbers):
        from gpt import is_main
        if not is_main():  # under torchrun only rank 0 prints
            return
        now = time.time()
        elapsed = now - self.start
        if self.first is None:
            self.first = (step, now)
        first_step, first_time = self.first
        if step > first_step:
            eta = (now - first_time) / (step - first_step) * (self.total - step - 1)
        else:
            eta = elapsed / (step + 1) * (self.total - step - 1)
        shown = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in numbers.items())
        print(f"step {step + 1:>5}/{self.total}  {shown}  elapsed {elapsed:5.0f}s  eta {eta:5.0f}s", flush=True)


# ---- stage outputs ------------------------------------------------------------------------------

def write_json(path, data):
    """Write JSON atomically (tokenizer.write_atomically: a temporary file, then a rename)."""
    write_atomically(path, lambda f: json.dump(data, f, indent=1))


def read_json(path):
    with open(path) as f:
        return json.load(f)


def plot_curves(path, panels, title, columns=4):
    """One figure with a panel per entry of panels: {panel title: {"x": label, "y": label, and any of
    "lines": {legend: (xs, ys)}, "points": {legend: (xs, ys)} (a scatter), or "labels": [...] with
    "bars": {legend: [value per label]}}, and "legend": "outside" to put the legend beside the panel, in
    the free space of the row, which it needs: it is left out of the layout}, at most
    `columns` panels per row. With both lines and points, the i-th points share the i-th line's colour and
    legend. Saved as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(columns, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (panel_title, panel) in zip(axes.flat, panels.items()):
        if "bars" in panel:
            draw_bars(ax, panel["labels"], panel["bars"])
        for legend, (xs, ys) in panel.get("lines", {}).items():
            ax.plot(xs, ys, label=legend, marker="o" if len(xs) < 20 else None)
        if panel.get("lines") and panel.get("points"):
            ax.set_prop_cycle(None)  # the i-th points take the colour of the i-th line
        for legend, (xs, ys) in panel.get("points", {}).items():
            ax.scatter(xs, ys, label=None if panel.get("lines") else legend, s=8, alpha=0.4)
        ax.set_title(panel_title)
        ax.set_xlabel(panel["x"])
        ax.set_ylabel(panel["y"])
        ax.grid(alpha=0.3)
        if sum(len(panel.get(kind, {})) for kind in ("lines", "bars", "points")) > 1:
            if panel.get("legend") == "outside":  # many lines: beside the panel (the row's free space)
                ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5)).set_in_layout(False)
            else:
                ax.legend(loc="center right" if "bars" in panel else "best")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_bars(ax, labels, series):
    """Grouped horizontal bars: one group per label, one bar per series ({legend: [value per label]})."""
    height = 0.8 / len(series)
    for i, (legend, values) in enumerate(series.items()):
        ax.barh([y + i * height for y in range(len(labels))], values, height=height, label=legend)
    ax.set_yticks([y + 0.4 - height / 2 for y in range(len(labels))])
    ax.set_yticklabels(labels)
    ax.invert_yaxis()
    values = [v for vs in series.values() for v in vs]
    ax.set_xlim(min(0, min(values)), max(max(values), 0.1) * 1.45)  # room on the right for the legend


def print_comparison(columns, keys):
    """The eval-suite metrics of several models side by side (columns = {model name: metrics}), and the last
    model's win rate and KL against SFT when it has them."""
    print(f"{' -> '.join(columns)} on the eval suite:")
    for key in keys:
        print(f"  {key:<22} " + " -> ".join(f"{metrics[key]:8.3f}" for metrics in columns.values()))
    last = list(columns.values())[-1]
    if "win_rate_vs_sft" in last:
        ties = f" (ties {last['tie_rate_vs_sft']:.3f})" if "tie_rate_vs_sft" in last else ""
        print(f"  win rate vs SFT        {last['win_rate_vs_sft']:.3f}{ties}   KL to SFT {last['kl_to_sft']:.3f} nats")


def write_task_samples(path, title, tasks, shown, replies, samples):
    """samples.md for eval tasks: each model's first sampled reply to each task in `shown`.
    replies = {model name: its eval texts, `samples` per task, in the order of `tasks`}."""
    index = {id(t): i for i, t in enumerate(tasks)}
    write_samples(path, title, [t.prompt for t in shown],
                  {name: [texts[index[id(t)] * samples] for t in shown] for name, texts in replies.items()})


def write_samples(path, title, prompts, columns):
    """samples.md: each prompt with the replies of several models. columns = {model name: [reply]}."""
    lines = [f"# {title}", ""]
    for i, prompt in enumerate(prompts):
        lines += [f"## {i + 1}. {prompt}", ""]
        for name, replies in columns.items():
            lines += [f"**{name}:** {replies[i]}", ""]
    Path(path).write_text("\n".join(lines))


# ---- the report card: every stage side by side --------------------------------------------------

REPORT_ROWS = [("pretrain", "base"), ("sft", "SFT"), ("reward_model", "RM"), ("ppo", "PPO"), ("dpo", "DPO"),
               ("grpo", "GRPO"), ("rlvr", "RLVR"), ("cai", "CAI")]
REPORT_COLUMNS = ["gold_score", "win_rate_vs_sft", "kl_to_sft", "math_acc", "math_acc_greedy", "facts_acc",
                  "idk_rate", "pushback_rate", "harmful_refusal_rate", "benign_help_rate", "rude_rate", "ended_rate",
                  "mean_len"]


def cpu_name(cpuinfo=Path("/proc/cpuinfo")):
    """The CPU's model name where Linux tells it (cpuinfo), else the architecture. It matters: the same seed
    gives the same numbers only on the same kind of CPU (MKL picks its code path by CPU)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware():
    """One line naming the machine the numbers came from."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{cpu_name()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"


def label_offsets(points, near=0.1):
    """Label offsets (points) for a scatter: above-right, or below-right when an earlier label sits within
    `near` of the point (as a fraction of each axis's span), so that close points keep readable labels."""
    xs, ys = [x for x, _ in points.values()], [y for _, y in points.values()]
    span_x, span_y = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    offsets, placed = {}, []
    for name, (x, y) in points.items():
        crowded = any(abs(x - px) / span_x < near and abs(y - py) / span_y < near for px, py in placed)
        offsets[name] = (5, -12) if crowded else (5, 4)
        placed.append((x, y))
    return offsets


def busy_seconds(timings):
    """Seconds during which at least one stage ran: the length of the union of the stages' [started, finished]
    intervals (stages that overlapped count once, gaps between runs not at all). Timings written before
    stages recorded their start times count their own seconds."""
    intervals = sorted((t["started"], t["finished"]) for t in timings if "started" in t)
    busy = sum(t["seconds"] for t in timings if "started" not in t)
    end = float("-inf")
    for start, finish in intervals:
        busy += max(0.0, finish - max(start, end))
        end = max(end, finish)
    return busy


def build_report(out):
    """<out>/report.md (the eval-suite metrics of every stage that has run, wall times, hardware) and
    <out>/report.png (gold score and win rate against KL to SFT, one point per method)."""
    out = Path(out)
    timings = read_json(out / "timings.json") if (out / "timings.json").is_file() else {}
    rows = {}
    for stage, name in REPORT_ROWS:
        if (out / stage / "metrics.json").is_file():
            rows[name] = (stage, read_json(out / stage / "metrics.json"))
    if not rows:
        raise SystemExit(f"error: no stage outputs under {out}: run `python run_all.py` first")
    preset = next(iter(rows.values()))[1].get("preset", "?")
    lines = [f"# Report card ({preset} preset, {out})", "", f"Hardware: {hardware()}.", "",
             f"Eval suite ({eval_suite_size(out, rows)} at temperature 1; greedy for *_greedy). "
             "win rate and KL are against the SFT model. RM: held-out pairwise accuracy of the reward model.", "",
             "| stage | " + " | ".join(REPORT_COLUMNS) + " | wall time |",
             "|---|" + "---|" * (len(REPORT_COLUMNS) + 1)]
    for name, (stage, metrics) in rows.items():
        seconds = timings.get(stage, {}).get("seconds")
        wall = f"{seconds:.0f} s" if seconds is not None else "-"
        if stage == "reward_model":
            cells = [f"held-out accuracy {metrics['held_out_accuracy']:.3f}"] + [""] * (len(REPORT_COLUMNS) - 1)
        else:
            cells = [f"{metrics[c]:.3f}" if isinstance(metrics.get(c), (int, float)) else "-" for c in REPORT_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {wall} |")
    ceiling = ideal_ceiling(out)
    if ceiling is not None:
        lines += ["", "The ceiling of the win-rate column: the world's ideal reply to every task would score "
                      f"gold 1.000 and win {ceiling[0]:.3f} against SFT's replies (ties {ceiling[1]:.3f}, with every "
                      "SFT reply that is already as good)."]
    total = sum(t["seconds"] for t in timings.values())
    lines += ["", f"Total wall time of the stages timed by run_all.py: {total:.0f} s ({total / 60:.1f} min)."]
    busy = busy_seconds(timings.values())
    if busy < total - 1:
        lines.append(f"Some stages ran at the same time (run_all.py --jobs): stages were running for {busy:.0f} s "
                     f"({busy / 60:.1f} min) in all.")
    lines.append("")
    (out / "report.md").write_text("\n".join(lines))

    methods = {name: m for name, (stage, m) in rows.items() if "kl_to_sft" in m}
    if methods:
        kl = {name: max(m["kl_to_sft"], 0.0) for name, m in methods.items()}
        plot_methods(out / "report.png", methods, kl, rows.get("SFT", (None, {}))[1], preset,
                     ceiling[0] if ceiling else None)
    print(f"wrote {out}/report.md" + (" and report.png" if methods else ""))


def eval_suite_size(out, rows):
    """"132 fixed tasks, 4 samples each": the samples per task counted from a stage's stored eval replies."""
    n_tasks = len(world.eval_suite())
    for stage, _ in rows.values():
        path = Path(out) / stage / "eval_texts.json"
        if path.is_file():
            samples = len(read_json(path)) // n_tasks
            return f"{n_tasks} fixed tasks, {samples} sample{'s' if samples != 1 else ''} each"
    return f"{n_tasks} fixed tasks"


def ideal_ceiling(out):
    """(win rate, tie rate) of the world's ideal replies against the SFT model's eval replies, or None before 01
    has run: how far above 0.5 the win rates against SFT can go on this eval suite."""
    path = Path(out) / "sft" / "eval_texts.json"
    if not path.is_file():
        return None
    try:
        return world.ideal_win_rate(world.eval_suite(), read_json(path))
    except ValueError as error:  # replies from another version of the eval suite: leave the ceiling out
        print(f"warning: no win-rate ceiling in the report card: {error}")
        return None


def plot_methods(path, methods, kl, sft_metrics, preset, ideal_win=None):
    """Two panels: gold score vs KL to SFT, and win rate vs SFT vs KL to SFT, one labelled point per method;
    the second also shows the win rate of the world's ideal replies, the most any method could reach."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, reference in ((axes[0], "gold_score", sft_metrics.get("gold_score")),
                               (axes[1], "win_rate_vs_sft", 0.5)):
        points = {name: (kl[name], metrics[key]) for name, metrics in methods.items()}
        for name, offset in label_offsets(points).items():
            ax.scatter(*points[name], s=40)
            ax.annotate(name, points[name], textcoords="offset points", xytext=offset)
        if reference is not None:
            ax.axhline(reference, color="gray", linestyle="--", linewidth=1, label="SFT")
            ax.scatter([0.0], [reference], color="gray", s=40)
        if key == "win_rate_vs_sft" and ideal_win is not None:
            ax.axhline(ideal_win, color="green", linestyle=":", linewidth=1.5,
                       label=f"the world's ideal replies ({ideal_win:.3f})")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        ax.set_xlabel("KL to the SFT model (nats per reply)")
        ax.set_ylabel(key.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.margins(x=0.1, y=0.12)  # room for the labels of the outermost points
    axes[0].set_title("gold score against distance from SFT")
    axes[1].set_title("win rate against SFT (gold judge)")
    fig.suptitle(f"Every method on the eval suite ({preset} preset)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- the temperature sweep: how much of each gain a lower sampling temperature gives -------------

SWEEP_STAGES = [(stage, name) for stage, name in REPORT_ROWS if stage not in ("pretrain", "reward_model")]
SWEEP_KEYS = ["gold_score", "win_rate_vs_sft", "tie_rate_vs_sft", "math_acc", "facts_acc", "idk_rate",
              "pushback_rate", "harmful_refusal_rate", "benign_help_rate"]


def temperature_sweep(out, temperatures, device="cpu"):
    """Every policy's eval suite sampled again at each of `temperatures` (same tasks, samples and seed).

    The eval suite samples at temperature 1 to measure each policy's distribution. A lower temperature
    moves probability to each step's likeliest token with no training at all, and drops many of the slips
    a small model's tail holds (a wrong digit, a wrong name). Each point has two win rates: against SFT's
    replies at temperature 1 (the report card's reference: what the method and the cooler sampler give
    together) and against SFT's replies at the same temperature (what the method adds to the cooler
    sampler). The temperature-1 point is each stage's own metrics.json unless 1 is asked for too (then
    sampled again, as on another device it would be). Writes <out>/temperature_sweep.json and .png."""
    out = Path(out)
    if not (out / "sft" / "model.pt").is_file():  # every win rate is against SFT's replies
        raise SystemExit(f"error: {out}/sft/model.pt not found: run `python 01_sft.py` first (with the same --out)")
    tasks = world.eval_suite()
    sft_texts = {1.0: read_stage_json(out, "sft", "eval_texts.json")}  # SFT's replies at each temperature
    samples = len(sft_texts[1.0]) // len(tasks)
    if samples == 0 or len(sft_texts[1.0]) % len(tasks):
        raise SystemExit(f"error: {out}/sft/eval_texts.json holds replies to another eval suite: run `python "
                         "01_sft.py` again (with the same --out)")
    sampled_tasks = [task for task in tasks for _ in range(samples)]
    sweep = {}
    for stage, name in SWEEP_STAGES:
        if not (out / stage / "model.pt").is_file():
            continue
        stored = read_stage_json(out, stage, "metrics.json")
        model, tokenizer, meta = load_stage(out, stage, device, frozen=True)
        rows = {1.0: {k: stored[k] for k in SWEEP_KEYS if k in stored}}
        if stage == "sft":  # against its own replies every reply ties
            rows[1.0].update(win_rate_vs_sft=0.5, tie_rate_vs_sft=1.0)
        rows[1.0]["win_rate_vs_sft_at_t"] = rows[1.0].get("win_rate_vs_sft")
        rows[1.0]["tie_rate_vs_sft_at_t"] = rows[1.0].get("tie_rate_vs_sft")
        for temperature in temperatures:
            metrics, texts = world.evaluate(model, tokenizer, tasks, samples=samples, temperature=temperature,
                                            seed=stored.get("seed", 0), ref_texts=sft_texts[1.0],
                                            max_new_tokens=meta["config"]["eval_max_new_tokens"])
            if stage == "sft":
                sft_texts.setdefault(temperature, texts)  # at 1 the stored replies stay the reference
            rows[temperature] = {k: metrics[k] for k in SWEEP_KEYS}
            rows[temperature]["win_rate_vs_sft_at_t"], rows[temperature]["tie_rate_vs_sft_at_t"] = \
                world.compare_with_reference(sampled_tasks, texts, sft_texts[temperature])
            print(f"{name:>5} at temperature {temperature:g}: " + "  ".join(
                f"{k} {rows[temperature][k]:.3f}" for k in ("gold_score", "win_rate_vs_sft", "win_rate_vs_sft_at_t",
                                                            "math_acc", "facts_acc", "harmful_refusal_rate",
                                                            "benign_help_rate")), flush=True)
        sweep[name] = {f"{t:g}": row for t, row in rows.items()}
    write_json(out / "temperature_sweep.json", sweep)
    plot_temperature_sweep(out / "temperature_sweep.png", sweep)
    print(f"wrote {out}/temperature_sweep.json and temperature_sweep.png")
    return sweep


def plot_temperature_sweep(path, sweep):
    """Gold score and the two win rates against the sampling temperature, a line per stage."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("gold_score", "gold score", "gold score: the same models, sampled cooler"),
              ("win_rate_vs_sft", "win rate vs SFT at temperature 1",
               "win rate against SFT's replies at temperature 1"),
              ("win_rate_vs_sft_at_t", "win rate vs SFT at the same temperature",
               "win rate against SFT sampled at the same temperature"))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    for ax, (key, label, title) in zip(axes, panels):
        for name, rows in sweep.items():
            points = sorted((float(t), row[key]) for t, row in rows.items() if row.get(key) is not None)
            if points:
                ax.plot(*zip(*points), marker="o", label=name, linestyle="--" if name == "SFT" else "-")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("sampling temperature (the report card's: 1)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    for ax in axes[1:]:
        for target, label in ((0.60, "04's target"), (0.65, "03's target")):
            ax.axhline(target, color="green", linestyle=":", linewidth=1)
            ax.annotate(label, (0, target), xycoords=("axes fraction", "data"), textcoords="offset points",
                        xytext=(4, 3), color="green", fontsize=8)
    top = max(ax.get_ylim()[1] for ax in axes[1:])
    lowest = min(row[key] for rows in sweep.values() for row in rows.values()
                 for key in ("win_rate_vs_sft", "win_rate_vs_sft_at_t") if row.get(key) is not None)
    for ax in axes[1:]:
        ax.set_ylim(min(0.48, lowest - 0.01), max(top, 0.665))  # the same scale for both win rates
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sampling_temperature(text):
    value = float(text)
    if not 0 < value <= 2:
        raise argparse.ArgumentTypeError(f"must be in (0, 2], got {value}")
    return value


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Build <out>/report.md and report.png from the stages that have run.")
    parser.add_argument("--out", default="out", help="the run's root folder (default: out)")
    parser.add_argument("--temperatures", type=sampling_temperature, nargs="+", default=None, metavar="T",
                        help="also sample every policy's eval suite at these temperatures (e.g. 0.7 0.5 0.3) and "
                             "write temperature_sweep.json and .png: what a cooler sampler alone gives")
    parser.add_argument("--device", default="cpu", help="where the sweep runs its models (default: cpu)")
    args = parser.parse_args()
    build_report(args.out)
    if args.temperatures:
        temperature_sweep(args.out, args.temperatures, args.device)
