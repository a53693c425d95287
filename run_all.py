"""Run the whole progression, 00 -> 07, then write the report card (out/report.md, out/report.png).

Each stage runs as its own process with the same --preset/--out/--seed/--device, prints its own
progress lines with an ETA, and the run stops at the first stage that fails. With --skip-done, a stage
whose outputs are up to date (its metrics.json is newer than its script and the earlier stages' outputs it
reads, and was written by the same preset) is skipped and says so; without it, every stage runs again.
It does not look at the shared modules (gpt.py, rl.py, world.py, ...): after editing one, run without it.

    python run_all.py                     # the default preset: gpu if CUDA is available, else cpu
    python run_all.py --preset test       # the whole thing in a few minutes
    python run_all.py --skip-done         # after a failure or an edit: rerun what is out of date
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

from report import STAGE_SCRIPTS, build_report, read_json, write_json

# What each stage reads from earlier stages (its outputs are out of date when any of these is newer).
INPUTS = {"pretrain": [], "sft": ["pretrain"], "reward_model": ["sft"], "ppo": ["sft", "reward_model"],
          "dpo": ["sft"], "grpo": ["sft"], "rlvr": ["sft", "reward_model"], "cai": ["sft"]}


def up_to_date(out, stage, preset):
    """Whether <out>/<stage> holds outputs of this preset that are newer than its inputs and its script."""
    metrics = Path(out) / stage / "metrics.json"
    if not metrics.is_file() or read_json(metrics).get("preset") != preset:
        return False
    inputs = [Path(out) / s / "metrics.json" for s in INPUTS[stage]] + [Path(__file__).parent / STAGE_SCRIPTS[stage]]
    return all(p.is_file() and p.stat().st_mtime < metrics.stat().st_mtime for p in inputs)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["test", "cpu", "gpu"], default=None)
    parser.add_argument("--out", default="out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--skip-done", action="store_true", help="skip stages whose outputs are up to date")
    args = parser.parse_args()
    if args.preset is None:
        import torch
        args.preset = "gpu" if torch.cuda.is_available() else "cpu"
    common = ["--preset", args.preset, "--out", args.out, "--seed", str(args.seed)]
    common += ["--device", args.device] if args.device else []

    timings_path = Path(args.out) / "timings.json"
    timings = read_json(timings_path) if timings_path.is_file() else {}
    start = time.time()
    for stage, script in STAGE_SCRIPTS.items():
        if args.skip_done and up_to_date(args.out, stage, args.preset):
            print(f"==> {script}: up to date, skipped (--skip-done)", flush=True)
            continue
        print(f"==> {script} --preset {args.preset}  ({time.time() - start:.0f}s into the run)", flush=True)
        stage_start = time.time()
        result = subprocess.run([sys.executable, str(Path(__file__).parent / script), *common])
        if result.returncode != 0:
            raise SystemExit(f"error: {script} failed (exit {result.returncode}); see its output above, fix it, "
                             f"then `python run_all.py --skip-done` reruns from there")
        timings[stage] = {"seconds": round(time.time() - stage_start, 1), "preset": args.preset}
        write_json(timings_path, timings)
    print(f"all stages done in {time.time() - start:.0f}s")
    build_report(args.out)


if __name__ == "__main__":
    main()
