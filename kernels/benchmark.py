"""Benchmark the kernels against plain PyTorch (and torch's and Liger-Kernel's fused heads when present).

    python -m kernels.benchmark                      # GPU shapes on CUDA, small shapes on CPU
    python -m kernels.benchmark --json out/bench.json

What is measured, per shape (tokens x d x vocab):
- linear + cross-entropy, forward + backward: median wall time (after warm-up, synchronised) and peak
  memory above the inputs, gradients included (every method must produce them). On CUDA: the
  allocator's peak. On CPU: the rise of the process's resident high-water mark, in a fresh process
  per case (Linux only);
- linear_log_probs: without grad (rollout scoring), with grad, with grad + entropy;
- gae_advantages and group_advantages against the Python loops they replace.
Inputs are bf16 on CUDA (float32 on CPU, where bf16 matmuls are emulated and say nothing about a GPU).
dynamo's caches are reset between shapes so no compiled function hits its recompile limit.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from kernels.compile import compile_enabled
from kernels import gae_advantages, group_advantages, linear_cross_entropy, linear_log_probs

GPU_SHAPES = [(16384, 384, 8192), (16384, 768, 50304), (32768, 768, 50304), (16384, 2048, 128256)]
CPU_SHAPES = [(4096, 128, 2048), (16384, 256, 8192)]
GPU_LOGPROB_SHAPE = (32768, 768, 50304)
CPU_LOGPROB_SHAPE = (4096, 256, 8192)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def rss_kib(field):
    """VmRSS (resident now) or VmHWM (resident high-water mark) of this process, in KiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def cpu_peak_mib(method, tokens, d, vocab):
    """Peak resident memory (MiB) that one forward+backward of `method` adds above its inputs, on CPU.

    CPU tensors have no allocator statistics, so each measurement runs in a fresh process: after the
    inputs exist, the kernel's high-water mark is reset (Linux: write 5 to /proc/self/clear_refs), the
    step runs, and the new high-water mark minus the resident size before the step is its peak. Large
    tensors are mmap'd and returned to the OS when freed, so this sees every big temporary.
    """
    code = ("import torch; from kernels.benchmark import *; "
            f"h, w, t = make_inputs({tokens}, {d}, {vocab}, torch.float32, torch.device('cpu')); "
            "open('/proc/self/clear_refs', 'w').write('5'); before = rss_kib('VmRSS'); "
            f"forward_backward(cross_entropy_methods([])[{method!r}], h, w, t)(); "
            "print((rss_kib('VmHWM') - before) / 1024)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return float(result.stdout.strip()) if result.returncode == 0 else float("nan")


def measure(step, device, warmup, repeats):
    """Median milliseconds of step() and its peak memory (MiB) above what was allocated before."""
    for _ in range(warmup):
        step()
    synchronize(device)
    peak_mib = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        synchronize(device)
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), peak_mib


def make_inputs(tokens, d, vocab, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = (torch.randn(tokens, d, generator=gen, device=device) / d**0.5).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, d, generator=gen, device=device) * 0.02).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=gen, device=device)
    return hidden, weight, targets


def forward_backward(loss_fn, hidden, weight, targets):
    """A step that computes loss_fn, backpropagates, and drops the gradients again."""
    def step():
        loss_fn(hidden, weight, targets).backward()
        hidden.grad = weight.grad = None
    return step


def plain_cross_entropy(hidden, weight, targets):
    return F.cross_entropy((hidden @ weight.T).float(), targets)


def cross_entropy_methods(chunk_sizes):
    """name -> loss function(hidden, weight, targets) for every method available here."""
    methods = {"plain PyTorch": plain_cross_entropy, "ours (auto chunk)": linear_cross_entropy}
    for chunk in chunk_sizes:
        methods[f"ours chunk {chunk}"] = (
            lambda h, w, t, c=chunk: linear_cross_entropy(h, w, t, chunk_size=c))
    if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        options = torch.nn.LinearCrossEntropyOptions()
        methods["torch F.linear_cross_entropy (chunked)"] = (
            lambda h, w, t: F.linear_cross_entropy(h, w, t, options=options))
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        liger = LigerFusedLinearCrossEntropyLoss()
        methods["Liger-Kernel FLCE"] = lambda h, w, t: liger(w, h, t)
    except ImportError:
        pass
    return methods


def bench_cross_entropy(shapes, dtype, device, chunk_sizes, warmup, repeats):
    rows = []
    for tokens, d, vocab in shapes:
        for name, loss_fn in cross_entropy_methods(chunk_sizes).items():
            torch._dynamo.reset()
            hidden, weight, targets = make_inputs(tokens, d, vocab, dtype, device)
            try:
                ms, mib = measure(forward_backward(loss_fn, hidden, weight, targets), device, warmup, repeats)
            except torch.OutOfMemoryError:
                ms, mib = float("nan"), float("nan")
            if device.type == "cpu" and name in cross_entropy_methods([]):
                mib = cpu_peak_mib(name, tokens, d, vocab)
            rows.append({"shape": f"{tokens} x {d} x {vocab}", "method": name, "ms": ms, "peak_mib": mib})
            print(f"  {rows[-1]['shape']:>22}  {name:<40} {ms:9.2f} ms  {fmt_mib(mib):>9} MiB", flush=True)
            del hidden, weight, targets
    return rows


def plain_log_probs(hidden, weight, targets, with_entropy):
    logp_all = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
    logp = logp_all.gather(1, targets[:, None]).squeeze(1)
    return logp, -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None


def bench_log_probs(shape, dtype, device, warmup, repeats):
    rows = []
    hidden, weight, targets = make_inputs(*shape, dtype, device)
    for mode in ("no grad", "grad", "grad + entropy"):
        with_entropy = mode == "grad + entropy"
        for name in ("plain PyTorch", "ours"):
            def loss_fn(h, w, t, name=name):
                if name == "ours":
                    logp, entropy = linear_log_probs(h, w, t, return_entropy=True)
                else:
                    logp, entropy = plain_log_probs(h, w, t, with_entropy)
                return logp.sum() + (entropy.sum() if with_entropy else 0)

            def no_grad_step(name=name):
                with torch.no_grad():
                    if name == "ours":
                        linear_log_probs(hidden, weight, targets)
                    else:
                        plain_log_probs(hidden, weight, targets, False)

            torch._dynamo.reset()
            step = no_grad_step if mode == "no grad" else forward_backward(loss_fn, hidden, weight, targets)
            ms, mib = measure(step, device, warmup, repeats)
            rows.append({"shape": " x ".join(map(str, shape)), "mode": mode, "method": name, "ms": ms, "peak_mib": mib})
            print(f"  {mode:<15} {name:<15} {ms:9.2f} ms  {fmt_mib(mib):>9} MiB", flush=True)
    return rows


def gae_python_loop(rewards, values, mask, gamma, lam):
    """The textbook backward recursion, one time step per Python iteration (vectorised over rows)."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
        next_value = values[:, t] * mask[:, t]
    return advantages, (advantages + values) * mask


def group_python_loop(rewards, group_size):
    out = torch.empty_like(rewards)
    for start in range(0, rewards.numel(), group_size):
        group = rewards[start:start + group_size]
        out[start:start + group_size] = (group - group.mean()) / (group.std() + 1e-6)
    return out


def bench_advantages(device, warmup, repeats):
    batch, time_steps, group_size = 256, 1024, 16
    gen = torch.Generator(device=device).manual_seed(0)
    rewards = torch.randn(batch, time_steps, generator=gen, device=device)
    values = torch.randn(batch, time_steps, generator=gen, device=device)
    lengths = torch.randint(1, time_steps + 1, (batch,), generator=gen, device=device)
    mask = (torch.arange(time_steps, device=device)[None, :] < lengths[:, None]).float()
    group_rewards = torch.randn(batch * group_size, generator=gen, device=device)
    cases = {
        "gae_advantages (ours, matmul)": lambda: gae_advantages(rewards, values, mask, gamma=1.0, lam=0.95),
        "gae Python loop over T": lambda: gae_python_loop(rewards, values, mask, 1.0, 0.95),
        "group_advantages (ours)": lambda: group_advantages(group_rewards, group_size),
        "group Python loop over groups": lambda: group_python_loop(group_rewards, group_size),
    }
    rows = []
    for name, step in cases.items():
        ms, _ = measure(step, device, warmup, repeats)
        rows.append({"shape": f"B={batch}, T={time_steps}, G={group_size}", "method": name, "ms": ms})
        print(f"  {name:<32} {ms:9.3f} ms", flush=True)
    return rows


def fmt_mib(mib):
    return "n/a" if mib is None else f"{mib:.0f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default="out/kernels_benchmark.json", help="where to write the results")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 20 GPU, 3 CPU)")
    parser.add_argument("--chunk-sizes", default=None,
                        help="comma-separated chunk sizes to sweep besides the automatic one "
                             "(default 1024,2048,4096 on GPU, none on CPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    repeats = args.repeats or (20 if on_gpu else 3)
    warmup = 3 if on_gpu else 1
    chunk_sizes = [int(c) for c in (args.chunk_sizes or ("1024,2048,4096" if on_gpu else "")).split(",") if c]
    dtype = torch.bfloat16 if on_gpu else torch.float32
    hardware = torch.cuda.get_device_name(device) if on_gpu else f"CPU ({os.cpu_count()} cores)"
    if not on_gpu:
        print("No CUDA device: running small CPU shapes in float32. The GPU figures need CUDA.")
    print(f"{hardware}, torch {torch.__version__}, dtype {dtype}, "
          f"kernels compiled: {compile_enabled(device)}")

    print("linear + cross-entropy, forward + backward:")
    results = {"hardware": hardware, "torch": torch.__version__, "dtype": str(dtype),
               "cross_entropy": bench_cross_entropy(GPU_SHAPES if on_gpu else CPU_SHAPES, dtype, device,
                                                    chunk_sizes, warmup, repeats)}
    print("linear_log_probs:")
    results["log_probs"] = bench_log_probs(GPU_LOGPROB_SHAPE if on_gpu else CPU_LOGPROB_SHAPE, dtype, device,
                                           warmup, repeats)
    print("advantages:")
    results["advantages"] = bench_advantages(device, warmup, repeats)
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
