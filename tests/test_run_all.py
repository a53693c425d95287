"""run_all.py's scheduler for --jobs: stages start only after what they read, at most N at a time, and
nothing new starts after a failure. Fake processes stand in for the stages, so these run in milliseconds."""

import pytest

from report import STAGE_SCRIPTS
from run_all import WAITS_FOR, run_concurrently

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


def simulate(stages, jobs, polls=None, codes=None):
    """Run the scheduler on fake stages; returns the log of events and what run_concurrently returned."""
    events, running = [], set()

    def start(stage):
        events.append(("start", stage, frozenset(running)))
        running.add(stage)
        return FakeStage((polls or {}).get(stage, 2), (codes or {}).get(stage, 0))

    def finished(stage, code):
        events.append(("end", stage, code))
        running.discard(stage)

    return events, run_concurrently(stages, start, jobs, finished, poll_seconds=0)


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
    assert dict(starts)["ppo"] == {"grpo", "cai"}  # 02 has ended; 05 and 07 still run
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


def test_stages_skipped_as_up_to_date_do_not_hold_the_others_back():
    events, codes = simulate(["ppo", "dpo", "cai"], 3)
    assert set(codes) == {"ppo", "dpo", "cai"}
    assert [e[1] for e in events[:3]] == ["ppo", "dpo", "cai"]  # all three start at once
