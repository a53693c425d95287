"""Data parallel with torchrun: two CPU processes (gloo) take the same steps as one process on the same
global batch. Pretraining, DPO and the RL updates (on a fixed rollout) are checked weight by weight; the
RL scripts, whose rollouts are sampled in shares, are run end to end."""

import shutil
import socket
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from gpt import load_checkpoint


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(command, processes):
    launcher = [] if processes == 1 else ["-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                                          f"--master_port={free_port()}"]
    return subprocess.run([sys.executable, *launcher, *command], cwd=ROOT, capture_output=True, text=True, timeout=600)


def run(script, out, *args, processes=1):
    result = launch([str(ROOT / script), "--preset", "test", "--out", str(out), *args], processes)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def max_weight_difference(path_a, path_b):
    a, _, _ = load_checkpoint(path_a)
    b, _, _ = load_checkpoint(path_b)
    return max((pa - pb).abs().max().item() for pa, pb in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A test-preset base and SFT model (one process), copied for each run below."""
    out = tmp_path_factory.mktemp("sft")
    run("00_pretrain.py", out)
    run("01_sft.py", out)
    return out


def test_two_processes_pretrain_like_one_on_the_same_global_batch(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run("00_pretrain.py", one, "--max-steps", "12")
    result = run("00_pretrain.py", two, "--max-steps", "12", processes=2)
    assert result.stdout.count("wrote ") == 1  # only rank 0 evaluates and writes
    apart = max_weight_difference(one / "pretrain" / "model.pt", two / "pretrain" / "model.pt")
    assert apart < 1e-4, apart


def test_two_processes_fine_tune_like_one_on_the_same_global_batch(sft_run, tmp_path):
    """01's loss is a mean over reply tokens: the shares are weighted by their tokens (gpt.local_token_share)."""
    two = tmp_path / "two"
    shutil.copytree(sft_run, two)
    shutil.rmtree(two / "sft")
    run("01_sft.py", two, processes=2)
    moved = max_weight_difference(sft_run / "pretrain" / "model.pt", sft_run / "sft" / "model.pt")
    apart = max_weight_difference(sft_run / "sft" / "model.pt", two / "sft" / "model.pt")
    assert apart < moved / 100, (apart, moved)


def test_two_processes_train_dpo_like_one_on_the_same_global_batch(sft_run, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    for out in (one, two):
        shutil.copytree(sft_run, out)
    run("04_dpo.py", one)
    run("04_dpo.py", two, processes=2)
    moved = max_weight_difference(one / "sft" / "model.pt", one / "dpo" / "model.pt")
    apart = max_weight_difference(one / "dpo" / "model.pt", two / "dpo" / "model.pt")
    assert apart < moved / 100, (apart, moved)  # DPO moved the weights, both runs moved them the same way


def test_two_processes_take_the_rl_updates_of_one_on_the_same_rollout(tmp_path):
    """tests/dp_worker.py: the clipped policy update (every loss aggregation, k3 KL), 03's value update and
    07's token-weighted SL fine-tuning."""
    saved = {}
    for processes in (1, 2):
        saved[processes] = tmp_path / f"{processes}.pt"
        result = launch([str(ROOT / "tests" / "dp_worker.py"), str(saved[processes])], processes)
        assert result.returncode == 0, result.stderr[-3000:]
    one, two = (torch.load(saved[n], weights_only=True) for n in (1, 2))
    moved = max((one["policy"][k] - one["start"][k]).abs().max().item() for k in one["policy"])
    for model in ("policy", "value", "sl"):
        apart = max((one[model][k] - two[model][k]).abs().max().item() for k in one[model])
        assert apart < moved / 1000, (model, apart, moved)


def test_the_rl_scripts_run_under_torchrun_and_only_rank_0_writes(sft_run, tmp_path):
    out = tmp_path / "two"
    shutil.copytree(sft_run, out)
    run("02_reward_model.py", out)  # 03 and 06 need the reward model
    for script, stage in (("03_ppo.py", "ppo"), ("05_grpo.py", "grpo"), ("06_rlvr.py", "rlvr"), ("07_cai.py", "cai")):
        result = run(script, out, processes=2)
        assert result.stdout.count("wrote ") == 1, script
        assert (out / stage / "metrics.json").is_file() and (out / stage / "model.pt").is_file()


def test_every_numbered_script_ends_by_leaving_the_process_group():
    """Under torchrun a finished rank could abort in Python's shutdown; gpt.leave_distributed waits for the others,
    leaves the group and exits before that shutdown, so it must be the last thing a script does."""
    for script in sorted(ROOT.glob("0*_*.py")):
        ending = 'if __name__ == "__main__":\n    main()\n    leave_distributed()\n'
        assert script.read_text().endswith(ending), script.name


def test_in_one_process_the_helpers_change_nothing_and_leave_distributed_returns():
    """Without torchrun there is no group: shares are whole batches, and leave_distributed must not end the
    process (under torchrun it exits at once, see its docstring). Checked in a child process, since an exit
    with status 0 inside pytest would end the suite looking green."""
    code = ("from gpt import gather_lists, leave_distributed, local_share, world_info\n"
            "assert world_info() == (0, 1) and local_share([1, 2, 3]) == ([1, 2, 3], 1.0)\n"
            "assert gather_lists((4, 5)) == [4, 5]\n"
            "leave_distributed()\n"
            "print('still running')\n")
    result = launch(["-c", code], processes=1)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == "still running\n"
