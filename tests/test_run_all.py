"""run_all.py: which stages --skip-done reruns, and the scheduler for --jobs (stages start only after what
they read, at most N at a time, nothing new after a failure). Stub metrics files and fake processes stand
in for the stages, so these run in milliseconds."""

import argparse
import os
import sys

import pytest

from conftest import ROOT
from report import STAGE_SCRIPTS, write_json
from run_all import START_FIRST, WAITS_FOR, Run, last_progress, run_concurrently, run_in_order, stages_to_run

STAGES = list(STAGE_SCRIPTS)


class FakeStage:
    """A stage that ends with `code` after `polls` calls of poll()."""

    def __init__(self, polls, code):
        self.polls, self.code, self.returncode = polls, code, None

    def poll(self):
        self.polls -= 1
        if self.polls <= 0:
            self.returncode = self.code
        return self.returncode

    def terminate(self):
        self.returncode = -15

    def wait(self):
        return self.returncode


def simulate(stages, jobs, polls=None, codes=None, shares=None, polled=None):
    """Run the scheduler on fake stages; returns the log of events and what run_concurrently returned.
    Fills shares[stage] with the `sharing` start() was given (stages running once it started, itself
    included) and polled with the lists of running stages on_poll was given."""
    events, running = [], set()
    shares = {} if shares is None else shares
    polled = [] if polled is None else polled

    def start(stage, sharing):
        events.append(("start", stage, frozenset(running)))
        running.add(stage)
        shares[stage] = sharing
        return FakeStage((polls or {}).get(stage, 2), (codes or {}).get(stage, 0))

    def finished(stage, code):
        events.append(("end", stage, code))
        running.discard(stage)

    return events, run_concurrently(stages, start, jobs, finished, poll_seconds=0, on_poll=polled.append)


@pytest.mark.parametrize("jobs", [1, 2, 3, 5, 8])
def test_each_stage_starts_after_the_stages_it_waits_for_and_at_most_jobs_run_at_once(jobs):
    events, codes = simulate(STAGES, jobs, polls={"grpo": 7, "ppo": 5, "cai": 3})
    assert codes == {stage: 0 for stage in STAGES}
    ended = []
    for event in events:
        if event[0] == "start":
            _, stage, running = event
            assert all(s in ended for s in WAITS_FOR[stage]), (stage, ended)
            assert len(running) < jobs
        else:
            ended.append(event[1])


def test_five_jobs_run_the_independent_stages_together():
    """The schedule of the README's GPU run: 02, 05 and 07 after 01, then 03, 04 and 06 after 02."""
    events, _ = simulate(STAGES, 5, polls={"reward_model": 2, "grpo": 9, "cai": 9})
    starts = [(stage, running) for kind, stage, *rest in events if kind == "start" for running in rest]
    assert [s for s, _ in starts][:5] == ["pretrain", "sft", "reward_model", "grpo", "cai"]
    assert dict(starts)["rlvr"] == {"grpo", "cai"}  # 02 has ended; 05 and 07 still run; 06 goes first
    assert {s for s, _ in starts[5:]} == {"ppo", "dpo", "rlvr"}


def test_dpo_waits_for_the_reward_model_that_builds_the_shared_preference_pairs():
    events, _ = simulate(STAGES, 8, polls={"reward_model": 6})
    order = [stage for kind, stage, *_ in events if kind in ("start", "end")]
    end_of_rm = next(i for i, e in enumerate(events) if e[:2] == ("end", "reward_model"))
    start_of_dpo = next(i for i, e in enumerate(events) if e[:2] == ("start", "dpo"))
    assert end_of_rm < start_of_dpo, order


def test_no_stage_starts_after_a_failure_but_running_ones_finish():
    events, codes = simulate(STAGES, 8, polls={"reward_model": 1, "grpo": 6, "cai": 6},
                             codes={"reward_model": 3})
    assert codes["reward_model"] == 3
    assert codes["grpo"] == 0 and codes["cai"] == 0  # started with 02, left to finish
    assert not {"ppo", "dpo", "rlvr"} & set(codes)


def test_a_stage_that_does_not_need_the_failed_one_does_not_start_after_the_failure():
    _, codes = simulate(STAGES, 2, polls={"reward_model": 1, "grpo": 4}, codes={"reward_model": 3})
    assert codes["grpo"] == 0  # was running beside 02
    assert "cai" not in codes  # needs only 01, and had a free slot, but 02 had failed


def test_running_stages_are_stopped_when_the_scheduler_itself_stops():
    processes = {}

    def start(stage, sharing):
        processes[stage] = FakeStage(1 if stage == "grpo" else 10, 0)
        return processes[stage]

    def finished(stage, code):
        raise KeyboardInterrupt  # e.g. Ctrl-C sent to run_all.py alone, as 05 ends

    with pytest.raises(KeyboardInterrupt):
        run_concurrently(["grpo", "cai"], start, 2, finished, poll_seconds=0)
    assert processes["cai"].returncode == -15  # stopped, not left running


def write_all_stages(out):
    """Up-to-date stubs of every stage, each newer than every script and than the stage before it.
    Returns the time they start from."""
    newer_than_scripts = max((ROOT / script).stat().st_mtime for script in STAGE_SCRIPTS.values()) + 100
    for i, stage in enumerate(STAGES):
        write_stage(out, stage, newer_than_scripts + i)
    return newer_than_scripts


def write_stage(out, stage, mtime, **fields):
    """A stub of a stage's outputs: a test-preset, seed-0 metrics.json written at `mtime`."""
    path = out / stage / "metrics.json"
    write_json(path, {"preset": "test", "seed": 0, "device": "cpu", **fields})
    os.utime(path, (mtime, mtime))


def test_skip_done_reruns_every_stage_that_reads_a_rerun_one(tmp_path):
    newer_than_scripts = write_all_stages(tmp_path)
    assert stages_to_run(tmp_path, "test", skip_done=True) == []
    # 01's outputs now predate its script (01_sft.py was edited): 01 runs again, and so must every stage
    # that reads it, although their own outputs are still newer than the old SFT model's.
    write_stage(tmp_path, "sft", 1000)
    assert stages_to_run(tmp_path, "test", skip_done=True) == STAGES[1:]
    write_stage(tmp_path, "sft", newer_than_scripts + 1)
    write_stage(tmp_path, "reward_model", 1000)
    assert stages_to_run(tmp_path, "test", skip_done=True) == ["reward_model", "ppo", "rlvr"]
    assert stages_to_run(tmp_path, "test", skip_done=False) == STAGES


def test_skip_done_reruns_stages_written_with_another_seed_or_device(tmp_path):
    newer_than_scripts = write_all_stages(tmp_path)
    assert stages_to_run(tmp_path, "test", True, seed=0, device="cpu") == []
    assert stages_to_run(tmp_path, "test", True, seed=1) == STAGES
    assert stages_to_run(tmp_path, "test", True, seed=0, device="cuda") == STAGES
    write_stage(tmp_path, "dpo", newer_than_scripts + 9, seed=None)  # written before stages recorded their seed
    assert stages_to_run(tmp_path, "test", True) == ["dpo"]


def test_a_stage_that_fails_leaves_no_old_metrics_for_skip_done_to_trust(tmp_path, monkeypatch):
    # 00 saves its model, then stops during its evaluation: its old metrics.json must not pass for the new model's.
    newer_than_scripts = write_all_stages(tmp_path)
    run = Run(argparse.Namespace(preset="test", out=str(tmp_path), seed=0, device=None))
    monkeypatch.setattr(run, "command", lambda stage: [sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(SystemExit, match="00_pretrain.py failed"):
        run_in_order(run, ["pretrain"])
    assert not (tmp_path / "pretrain" / "metrics.json").exists()
    assert stages_to_run(tmp_path, "test", skip_done=True) == STAGES


def test_stages_skipped_as_up_to_date_do_not_hold_the_others_back():
    events, codes = simulate(["ppo", "dpo", "cai"], 3)
    assert set(codes) == {"ppo", "dpo", "cai"}
    assert {e[1] for e in events[:3]} == {"ppo", "dpo", "cai"}  # all three start at once


@pytest.mark.parametrize("jobs", [2, 5])
def test_each_stage_is_told_how_many_stages_share_the_machine_with_it(jobs):
    """run_all gives each stage cores // sharing threads: 00 and 01 run alone and get all of them."""
    shares, polled = {}, []
    events, _ = simulate(STAGES, jobs, polls={"reward_model": 3, "grpo": 4, "cai": 9}, shares=shares, polled=polled)
    assert polled and all(0 < len(running) <= jobs for running in polled)
    assert shares["pretrain"] == shares["sft"] == 1
    for event in events:
        if event[0] == "start":
            _, stage, running = event
            assert len(running) < shares[stage] <= jobs
    started_together = [e[1] for e in events if e[0] == "start"][2:2 + min(jobs, 3)]
    assert all(shares[stage] == min(jobs, 3) for stage in started_together)  # 02, 05 (and 07) after 01


def test_start_first_sends_the_reward_model_and_then_rlvr_into_a_free_slot():
    """With two slots, 02 starts first after 01 and 06 (the longest stage) as soon as 02 ends, ahead of
    07, 03 and 04, so the run does not end with 06 running alone."""
    assert sorted(START_FIRST) == sorted(STAGES)
    events, _ = simulate(STAGES, 2, polls={"reward_model": 2, "grpo": 6})
    starts = [stage for kind, stage, *_ in events if kind == "start"]
    assert starts[:4] == ["pretrain", "sft", "reward_model", "grpo"]
    assert starts[4] == "rlvr"


def test_the_screen_shows_each_running_stage_at_its_last_progress_line(tmp_path):
    log = tmp_path / "run.log"
    assert last_progress(log) is None  # not written yet
    log.write_text("preset cpu on cpu: ...\n")
    assert last_progress(log) is None
    log.write_text("preset cpu\nstep    21/1150  loss 3.1  tok/s 20942  elapsed   10s  eta   500s\n"
                   "step    41/1150  loss 2.9  tok/s 21124  elapsed   19s  eta   481s\nsaved model.pt\n")
    assert last_progress(log) == "step 41/1150, eta 481s"
    log.write_text("step    26/40  run reward model  reward 1.237  kl 13.24  elapsed    97s  eta    52s\n")
    assert last_progress(log) == "step 26/40 run reward model, eta 52s"  # 06's second run
    log.write_text("step    28/28  phase RL-CAI (DPO)  loss 0.07327  acc 1  elapsed    13s  eta     0s\n")
    assert last_progress(log) == "step 28/28 phase RL-CAI (DPO), last step done"  # evaluating, not 'eta 0s'
    assert last_progress(tmp_path) is None  # unreadable (a directory): no line, no crash
