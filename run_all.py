"""Run the whole progression, 00 -> 07, then write the report card (out/report.md, out/report.png).

Each stage runs as its own process with the same --preset/--out/--seed/--device, prints its own
progress lines with an ETA, and the run stops at the first stage that fails. With --skip-done, a stage
whose outputs are up to date (its metrics.json is newer than its script and the earlier stages' outputs it
reads, and was written by the same preset), and none of whose inputs runs again, is skipped and says so;
without it, every stage runs again.
It does not look at the shared modules (gpt.py, rl.py, world.py, ...): after editing one, run without it.

With --jobs N, up to N stages run at the same time, each as soon as the stages it reads have finished
(00 -> 01 -> {02, 05, 07}, 02 -> {03, 04, 06}); their output goes to <out>/<stage>/run.log, and the screen
shows where each one is once a minute. Each stage gets an even share of the CPU threads (00 and 01, alone,
get all of them). One stage of these presets' small models leaves a GPU partly idle (rollouts are bound by
kernel launches): on one H200 the gpu preset took 9.6 min with this schedule (run by a shell script before
--jobs existed), while its stages' own times, each slowed by the others, add up to 18.6 min. On 2 CPU cores
it hardly helps, since the stages share the same cores, and it changes the numbers: a stage on one thread
rounds the last bits differently from one on two, and sampling turns that into other replies (the README
has the measurement).

    python run_all.py                     # the default preset: gpu if CUDA is available, else cpu
    python run_all.py --preset test       # the whole thing in a few minutes
    python run_all.py --skip-done         # after a failure or an edit: rerun what is out of date
    python run_all.py --jobs 5            # on a GPU: independent stages at the same time
"""

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from report import STAGE_SCRIPTS, build_report, positive_int, read_json, write_json

# What each stage reads from earlier stages (its outputs are out of date when any of these is newer).
INPUTS = {"pretrain": [], "sft": ["pretrain"], "reward_model": ["sft"], "ppo": ["sft", "reward_model"],
          "dpo": ["sft"], "grpo": ["sft"], "rlvr": ["sft", "reward_model"], "cai": ["sft"]}
# What each stage must wait for when stages run at the same time: its inputs, and for 04 also 02, because
# both read the preference pairs that the first of them builds and caches under <out>.
WAITS_FOR = {**INPUTS, "dpo": ["sft", "reward_model"]}
# Which stage takes a free slot first when several could start: 02, which three stages wait for, then 06, the
# longest, so that the run does not end with 06 alone on the machine.
START_FIRST = ["pretrain", "sft", "reward_model", "rlvr", "grpo", "cai", "dpo", "ppo"]


def up_to_date(out, stage, preset, seed=0, device=None):
    """Whether <out>/<stage> holds outputs of this preset and seed (and device, if one is asked for) that are
    newer than its inputs and its script."""
    metrics = Path(out) / stage / "metrics.json"
    if not metrics.is_file():
        return False
    written = read_json(metrics)
    if (written.get("preset"), written.get("seed")) != (preset, seed) or device not in (None, written.get("device")):
        return False
    inputs = [Path(out) / s / "metrics.json" for s in INPUTS[stage]] + [Path(__file__).parent / STAGE_SCRIPTS[stage]]
    return all(p.is_file() and p.stat().st_mtime < metrics.stat().st_mtime for p in inputs)


def stages_to_run(out, preset, skip_done, seed=0, device=None):
    """The stages this run runs, in order. With skip_done, a stage is skipped when its outputs are up to date
    and none of the stages it reads runs again (their new outputs would make it out of date)."""
    stages = []
    for stage, script in STAGE_SCRIPTS.items():
        if skip_done and not set(INPUTS[stage]) & set(stages) and up_to_date(out, stage, preset, seed, device):
            print(f"==> {script}: up to date, skipped (--skip-done)", flush=True)
        else:
            stages.append(stage)
    return stages


def run_concurrently(stages, start, jobs, finished, poll_seconds=1.0, on_poll=lambda running: None):
    """Run `stages`, up to `jobs` at once, each once every stage of WAITS_FOR[stage] that is in `stages` has
    succeeded; of the stages ready to start, those earlier in START_FIRST go first. start(stage, sharing)
    returns a process (poll(), returncode and terminate(), as Popen), where `sharing` is how many stages run
    at the same time once it has started; finished(stage, returncode) is called as each one ends, and
    on_poll(running stages) at each poll. After the first failure no stage starts; the ones running are left
    to finish, since their outputs are still good. If this loop itself is stopped (Ctrl-C reaching only this
    process, an error), the running stages are stopped too rather than left running on their own.
    Returns {stage: returncode} of the stages run."""
    pending, running, codes = sorted(stages, key=START_FIRST.index), {}, {}
    try:
        while running or (pending and all(code == 0 for code in codes.values())):
            for stage, process in list(running.items()):
                if process.poll() is not None:
                    codes[stage] = process.returncode
                    del running[stage]
                    finished(stage, process.returncode)
            failed = any(code != 0 for code in codes.values())
            ready = [stage for stage in pending
                     if all(codes.get(s) == 0 for s in WAITS_FOR[stage] if s in stages)]
            to_start = [] if failed else ready[:jobs - len(running)]
            sharing = len(running) + len(to_start)  # stages running once these have started
            for stage in to_start:
                running[stage] = start(stage, sharing)
                pending.remove(stage)
            if pending and not running and not failed:
                raise RuntimeError(f"WAITS_FOR leaves {pending} waiting for stages that never run")
            if running:
                on_poll(list(running))
                time.sleep(poll_seconds)
    finally:
        for process in running.values():
            process.terminate()
            process.wait()
    return codes


def tail(path, lines=15):
    return "".join(Path(path).read_text(errors="replace").splitlines(keepends=True)[-lines:]).rstrip()


def last_progress(log):
    """Where a stage is, from the last progress line (report.Progress) in its log: 'step 301/1150, eta 381s',
    with the phase where the line names one ('step 26/40 run reward model, eta 52s'); None before the first."""
    try:
        lines = Path(log).read_text(errors="replace").splitlines()
    except OSError:  # not written yet, or unreadable: the stage itself will say what went wrong
        return None
    for line in reversed(lines):
        found = re.match(r"step\s+(\d+)/(\d+)\s+(.*)\s+eta\s+(\d+)s", line)
        if found:
            done, total, fields, eta = found.groups()
            # the phase is the words before the first "name number" pair: "run verifier  reward 0.91 ..."
            phase = re.match(r"((?:\S+\s+)*?)\S+\s+-?[\d.]", fields)
            named = f"step {done}/{total} {phase[1].strip()}".strip() if phase else f"step {done}/{total}"
            return f"{named}, last step done" if done == total else f"{named}, eta {eta}s"
    return None


def stage_failure(stage, code, log=None):
    """The SystemExit to raise when a stage failed: a one-line error (with --jobs, followed by the end of the
    stage's log, which went to a file)."""
    message = (f"error: {STAGE_SCRIPTS[stage]} failed (exit {code}); {'see its output above; ' if not log else ''}"
               f"fix it, then `python run_all.py --skip-done` reruns from there")
    return SystemExit(message + (f"\nthe end of its log ({log}):\n{tail(log)}" if log else ""))


class Run:
    """One run_all.py invocation: the stages' command line, their timings (<out>/timings.json), the clock."""

    def __init__(self, args):
        self.args, self.start = args, time.time()
        self.common = ["--preset", args.preset, "--out", args.out, "--seed", str(args.seed)]
        self.common += ["--device", args.device] if args.device else []
        self.timings_path = Path(args.out) / "timings.json"
        self.timings = read_json(self.timings_path) if self.timings_path.is_file() else {}

    def command(self, stage):
        return [sys.executable, str(Path(__file__).parent / STAGE_SCRIPTS[stage]), *self.common]

    def forget_old_metrics(self, stage):
        """Called as a stage starts. 00, 01 and 03 save their model before they evaluate it: if one stopped in
        between, its old metrics.json would pass for the new model's, and --skip-done would skip it."""
        (Path(self.args.out) / stage / "metrics.json").unlink(missing_ok=True)

    def log(self, stage):
        """Where a stage's output goes when stages run side by side."""
        return Path(self.args.out) / stage / "run.log"

    def record(self, stage, started):
        """Time the stage took, and when it ran (the report card counts overlapping stages once)."""
        now = time.time()
        self.timings[stage] = {"seconds": round(now - started, 1), "preset": self.args.preset,
                               "started": round(started, 1), "finished": round(now, 1)}
        write_json(self.timings_path, self.timings)

    def since_start(self):
        return f"{time.time() - self.start:.0f}s"


def run_in_order(run, stages):
    """Each stage in turn, its output on the screen; stop at the first failure."""
    for stage in stages:
        print(f"==> {STAGE_SCRIPTS[stage]} --preset {run.args.preset}  ({run.since_start()} into the run)", flush=True)
        started = time.time()
        run.forget_old_metrics(stage)
        result = subprocess.run(run.command(stage))
        if result.returncode != 0:
            raise stage_failure(stage, result.returncode)
        run.record(stage, started)


def run_side_by_side(run, stages, jobs):
    """Up to `jobs` stages at once (run_concurrently), each writing to <out>/<stage>/run.log."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    started = {}

    def launch(stage, sharing):
        # An even share of the CPU cores among the stages running beside it (all of them for 00 and 01, which
        # run alone), unless the caller chose a thread count. A process's thread count is set when it
        # starts, so stages started beside more stages than later run may together ask for a few more
        # threads than there are cores (--jobs 5 with 16 cores: 05 and 07 keep 5 when 03, 04, 06 get 3).
        env = {"OMP_NUM_THREADS": str(max(1, cores // sharing)), **os.environ}
        log = run.log(stage)
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"==> {STAGE_SCRIPTS[stage]} --preset {run.args.preset} started {run.since_start()} into the run, "
              f"{env['OMP_NUM_THREADS']} thread(s) (its output: {log})", flush=True)
        started[stage] = time.time()
        run.forget_old_metrics(stage)
        with open(log, "w") as handle:
            return subprocess.Popen(run.command(stage), stdout=handle, stderr=subprocess.STDOUT, env=env)

    def finished(stage, code):
        outcome = "done" if code == 0 else f"FAILED (exit {code})"
        print(f"<== {STAGE_SCRIPTS[stage]} {outcome} in {time.time() - started[stage]:.0f}s", flush=True)
        if code == 0:
            run.record(stage, started[stage])

    last_shown = time.time()

    def show_progress(running):
        """Every minute, where each running stage is (their progress lines go to their logs)."""
        nonlocal last_shown
        if time.time() - last_shown >= 60:
            last_shown = time.time()
            where = [f"{STAGE_SCRIPTS[s]} {last_progress(run.log(s)) or 'no progress line yet'}" for s in running]
            print(f"    {run.since_start()} into the run: " + "; ".join(where), flush=True)

    for stage, code in run_concurrently(stages, launch, jobs, finished, on_poll=show_progress).items():
        if code != 0:
            raise stage_failure(stage, code, run.log(stage))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["test", "cpu", "gpu"], default=None)
    parser.add_argument("--out", default="out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--skip-done", action="store_true", help="skip stages whose outputs are up to date")
    parser.add_argument("--jobs", type=positive_int, default=1,
                        help="stages run at the same time (default 1: in order)")
    args = parser.parse_args()
    if args.preset is None:
        import torch
        args.preset = "gpu" if torch.cuda.is_available() else "cpu"

    stages = stages_to_run(args.out, args.preset, args.skip_done, args.seed, args.device)
    run = Run(args)
    if args.jobs == 1:
        run_in_order(run, stages)
    else:
        run_side_by_side(run, stages, args.jobs)
    print(f"all stages done in {run.since_start()}")
    build_report(args.out)


if __name__ == "__main__":
    main()
