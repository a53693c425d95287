"""Data parallel with torchrun: two CPU processes (gloo) take the same steps as one process on the same
global batch. Pretraining and DPO are checked weight by weight."""

import shutil
import socket
import subprocess
import sys

import pytest

from conftest import ROOT
from gpt import load_checkpoint


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(script, out, *args, processes=1):
    launcher = [] if processes == 1 else ["-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                                          f"--master_port={free_port()}"]
    result = subprocess.run([sys.executable, *launcher, str(ROOT / script), "--preset", "test", "--out", str(out),
                             *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
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


def test_two_processes_train_dpo_like_one_on_the_same_global_batch(sft_run, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    for out in (one, two):
        shutil.copytree(sft_run, out)
    run("04_dpo.py", one)
    run("04_dpo.py", two, processes=2)
    moved = max_weight_difference(one / "sft" / "model.pt", one / "dpo" / "model.pt")
    apart = max_weight_difference(one / "dpo" / "model.pt", two / "dpo" / "model.pt")
    assert apart < moved / 100, (apart, moved)  # DPO moved the weights, both runs moved them the same way
