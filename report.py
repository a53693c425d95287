"""Bookkeeping shared by the numbered scripts: the run options, progress lines, each stage's output
folder (metrics.json, curves.png, samples.md) and the table that compares stages.

Every stage writes under <out>/<stage>/, and all stages of one run share the same <out>.
"""

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import torch

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
    cuda = torch.cuda.is_available()
    args.preset = args.preset or ("gpu" if cuda else "cpu")
    try:
        device = torch.device(args.device or ("cuda" if cuda else "cpu"))
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a device (try cpu, cuda or cuda:1)")
    if device.type == "cuda" and not cuda:
        parser.error("--device cuda was asked for but CUDA is not available")
    torch.manual_seed(args.seed)
    return device


def stage_dir(out, stage):
    return Path(out) / stage


def load_stage(out, stage, device):
    """(model, tokenizer, meta) of an earlier stage's model.pt, or exit with one line saying what to run."""
    from gpt import load_checkpoint

    path = stage_dir(out, stage) / "model.pt"
    try:
        return load_checkpoint(path, device)
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
    """Prints one line per interval: step/total, the numbers given, elapsed time and ETA."""

    def __init__(self, total_steps, every):
        self.total, self.every, self.start = total_steps, max(1, every), time.time()

    def due(self, step):
        return step % self.every == 0 or step == self.total - 1

    def line(self, step, **numbers):
        elapsed = time.time() - self.start
        eta = elapsed / (step + 1) * (self.total - step - 1)
        shown = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in numbers.items())
        print(f"step {step + 1:>5}/{self.total}  {shown}  elapsed {elapsed:5.0f}s  eta {eta:5.0f}s", flush=True)


# ---- stage outputs ------------------------------------------------------------------------------

def write_json(path, data):
    """Write JSON atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_json(path):
    with open(path) as f:
        return json.load(f)


def plot_curves(path, panels, title):
    """One figure with a panel per entry of panels: {panel title: {"x": label, "y": label, and any of
    "lines": {legend: (xs, ys)}, "points": {legend: (xs, ys)} (a scatter), or "labels": [...] with
    "bars": {legend: [value per label]}}}. Saved as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (panel_title, panel) in zip(axes[0], panels.items()):
        if "bars" in panel:
            draw_bars(ax, panel["labels"], panel["bars"])
        for legend, (xs, ys) in panel.get("lines", {}).items():
            ax.plot(xs, ys, label=legend, marker="o" if len(xs) < 20 else None)
        for legend, (xs, ys) in panel.get("points", {}).items():
            ax.scatter(xs, ys, label=legend, s=8, alpha=0.4)
        ax.set_title(panel_title)
        ax.set_xlabel(panel["x"])
        ax.set_ylabel(panel["y"])
        ax.grid(alpha=0.3)
        if sum(len(panel.get(kind, {})) for kind in ("lines", "bars", "points")) > 1:
            ax.legend()
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


def write_samples(path, title, prompts, columns):
    """samples.md: each prompt with the replies of several models. columns = {model name: [reply]}."""
    lines = [f"# {title}", ""]
    for i, prompt in enumerate(prompts):
        lines += [f"## {i + 1}. {prompt}", ""]
        for name, replies in columns.items():
            lines += [f"**{name}:** {replies[i]}", ""]
    Path(path).write_text("\n".join(lines))
