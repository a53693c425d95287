"""Tests for the fused linear-plus-loss kernels: linear_cross_entropy and linear_log_probs.

Each kernel is compared with a plain reference that builds the full logits (F.linear followed by
F.cross_entropy or log_softmax), values and gradients w.r.t. hidden and weight, in float64 on CPU.
Awkward shapes on purpose: 37 tokens walked in chunks of 8, a chunk larger than the token count,
(B, T, d) inputs, ignored targets, temperature. Then bf16 inputs, the memory-flatness property
(no tensor as large as the full (N x V) logits is ever produced), the compiled path, and a
GPU-only check that skips without CUDA.
"""

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from kernels import linear_cross_entropy, linear_log_probs

ATOL = 1e-10
RTOL = 1e-10


@pytest.fixture(autouse=True)
def eager_kernels(monkeypatch):
    """Every test here runs the eager path unless it turns compilation on itself."""
    monkeypatch.setenv("KERNELS_COMPILE", "0")


# ---------------------------------------------------------------- plain references (full logits)

def reference_cross_entropy(hidden, weight, targets, ignore_index=-100, reduction="mean"):
    logits = F.linear(hidden, weight)  # (..., V)
    loss = F.cross_entropy(
        logits.reshape(-1, weight.shape[0]), targets.reshape(-1),
        ignore_index=ignore_index, reduction=reduction,
    )
    return loss.reshape(targets.shape) if reduction == "none" else loss


def reference_log_probs(hidden, weight, targets, temperature=1.0):
    logits = F.linear(hidden, weight) / temperature  # (..., V)
    log_probs = torch.log_softmax(logits, dim=-1)  # (..., V)
    logp = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # same shape as targets
    entropy = -(log_probs.exp() * log_probs).sum(-1)  # same shape as targets
    return logp, entropy


# ---------------------------------------------------------------- helpers

def make_inputs(leading_shape, d, vocab, seed, dtype=torch.float64, ignore_index=None, ignore_share=0.25):
    """Random hidden (*leading_shape, d), weight (V, d), targets (*leading_shape,) with some ignored."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*leading_shape, d, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, d, generator=g, dtype=torch.float64) / d ** 0.5
    targets = torch.randint(0, vocab, leading_shape, generator=g)
    if ignore_index is not None:
        ignored = torch.rand(leading_shape, generator=g) < ignore_share
        ignored.view(-1)[0] = True  # at least one ignored token, whatever the seed
        targets = torch.where(ignored, torch.full_like(targets, ignore_index), targets)
    return hidden.to(dtype), weight.to(dtype), targets


def values_and_grads(fn, hidden, weight, upstream=None):
    """Run fn(hidden, weight) -> tensor; return (output, d hidden, d weight) for sum(upstream * output)."""
    hidden = hidden.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(True)
    out = fn(hidden, weight)
    scalar = out.sum() if upstream is None else (upstream * out).sum()
    grad_hidden, grad_weight = torch.autograd.grad(scalar, (hidden, weight))
    return out.detach(), grad_hidden, grad_weight


def assert_all_close(actual, expected, atol=ATOL, rtol=RTOL):
    for a, e in zip(actual, expected):
        assert a.shape == e.shape
        torch.testing.assert_close(a, e, atol=atol, rtol=rtol)


# ---------------------------------------------------------------- linear_cross_entropy

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_matches_reference_for_each_reduction(reduction):
    hidden, weight, targets = make_inputs((37,), d=12, vocab=29, seed=0, ignore_index=-100)
    g = torch.Generator().manual_seed(100)
    upstream = torch.randn(37, generator=g, dtype=torch.float64) if reduction == "none" else None

    actual = values_and_grads(
        lambda h, w: linear_cross_entropy(h, w, targets, reduction=reduction, chunk_size=8),
        hidden, weight, upstream)
    expected = values_and_grads(
        lambda h, w: reference_cross_entropy(h, w, targets, reduction=reduction),
        hidden, weight, upstream)
    assert_all_close(actual, expected)


def test_linear_cross_entropy_reduction_none_is_zero_at_ignored_tokens():
    hidden, weight, targets = make_inputs((37,), d=12, vocab=29, seed=1, ignore_index=-100)
    loss = linear_cross_entropy(hidden, weight, targets, reduction="none", chunk_size=8)
    ignored = targets == -100
    assert loss.shape == targets.shape
    assert torch.all(loss[ignored] == 0)
    assert torch.all(loss[~ignored] > 0)


def test_linear_cross_entropy_gives_zero_gradient_to_ignored_hidden_rows():
    hidden, weight, targets = make_inputs((37,), d=12, vocab=29, seed=2, ignore_index=-100)
    _, grad_hidden, _ = values_and_grads(
        lambda h, w: linear_cross_entropy(h, w, targets, chunk_size=8), hidden, weight)
    ignored = targets == -100
    assert torch.all(grad_hidden[ignored] == 0)
    assert torch.all(grad_hidden[~ignored].abs().sum(-1) > 0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_accepts_batched_hidden(reduction):
    hidden, weight, targets = make_inputs((3, 11), d=10, vocab=23, seed=3, ignore_index=-100)
    g = torch.Generator().manual_seed(103)
    upstream = torch.randn(3, 11, generator=g, dtype=torch.float64) if reduction == "none" else None

    actual = values_and_grads(
        lambda h, w: linear_cross_entropy(h, w, targets, reduction=reduction, chunk_size=5),
        hidden, weight, upstream)
    expected = values_and_grads(
        lambda h, w: reference_cross_entropy(h, w, targets, reduction=reduction),
        hidden, weight, upstream)
    assert_all_close(actual, expected)


@pytest.mark.parametrize("chunk_size", [None, 1, 37, 64, 1000])
def test_linear_cross_entropy_is_independent_of_chunk_size(chunk_size):
    hidden, weight, targets = make_inputs((37,), d=12, vocab=29, seed=4, ignore_index=-100)
    actual = values_and_grads(
        lambda h, w: linear_cross_entropy(h, w, targets, chunk_size=chunk_size), hidden, weight)
    expected = values_and_grads(
        lambda h, w: reference_cross_entropy(h, w, targets), hidden, weight)
    assert_all_close(actual, expected)


@pytest.mark.parametrize("ignore_index", [-1, 0])
def test_linear_cross_entropy_respects_custom_ignore_index(ignore_index):
    # 0 is also a real vocabulary id here (a pad token): every target equal to it must be skipped.
    hidden, weight, targets = make_inputs((37,), d=12, vocab=29, seed=5, ignore_index=ignore_index)
    for reduction in ["mean", "sum"]:
        actual = values_and_grads(
            lambda h, w: linear_cross_entropy(
                h, w, targets, ignore_index=ignore_index, reduction=reduction, chunk_size=8),
            hidden, weight)
        expected = values_and_grads(
            lambda h, w: reference_cross_entropy(
                h, w, targets, ignore_index=ignore_index, reduction=reduction),
            hidden, weight)
        assert_all_close(actual, expected)


def test_linear_cross_entropy_mean_averages_over_non_ignored_tokens_only():
    hidden, weight, targets = make_inputs((37,), d=12, vocab=29, seed=6, ignore_index=-100)
    mean = linear_cross_entropy(hidden, weight, targets, reduction="mean", chunk_size=8)
    total = linear_cross_entropy(hidden, weight, targets, reduction="sum", chunk_size=8)
    n_valid = int((targets != -100).sum())
    assert n_valid < 37
    torch.testing.assert_close(mean, total / n_valid, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_cross_entropy_with_every_target_ignored_behaves_like_pytorch(reduction):
    # A batch with nothing to learn (all padding): "mean" is 0/0 = NaN and "sum" is 0, with zero
    # gradients in both, on the gradient path as on the no-grad path.
    hidden, weight, _ = make_inputs((9,), d=6, vocab=11, seed=22)
    targets = torch.full((9,), -100)
    actual = values_and_grads(
        lambda h, w: linear_cross_entropy(h, w, targets, reduction=reduction, chunk_size=4), hidden, weight)
    expected = values_and_grads(
        lambda h, w: reference_cross_entropy(h, w, targets, reduction=reduction), hidden, weight)
    torch.testing.assert_close(actual[0], expected[0], equal_nan=True)
    assert torch.equal(actual[1], torch.zeros_like(hidden)) and torch.equal(actual[2], torch.zeros_like(weight))
    assert_all_close(actual[1:], expected[1:])
    with torch.no_grad():
        no_grad_loss = linear_cross_entropy(hidden, weight, targets, reduction=reduction, chunk_size=4)
    torch.testing.assert_close(no_grad_loss, expected[0], equal_nan=True)


def test_linear_cross_entropy_accepts_shifted_non_contiguous_hidden():
    # The language-model pattern: position t predicts token t + 1, so hidden[:, :-1] is a strided view.
    hidden, weight, tokens = make_inputs((3, 12), d=10, vocab=23, seed=20)
    targets = tokens[:, 1:]  # (B, T - 1)
    assert not hidden[:, :-1].is_contiguous()
    actual = values_and_grads(
        lambda h, w: linear_cross_entropy(h[:, :-1], w, targets, chunk_size=8), hidden, weight)
    expected = values_and_grads(
        lambda h, w: reference_cross_entropy(h[:, :-1], w, targets), hidden, weight)
    assert_all_close(actual, expected)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_under_no_grad_matches_reference(reduction):
    # The evaluation path: no autograd graph, so the kernel takes its forward-only sweep.
    hidden, weight, targets = make_inputs((37,), d=12, vocab=29, seed=21, ignore_index=-100)
    hidden.requires_grad_(True)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, reduction=reduction, chunk_size=8)
        expected = reference_cross_entropy(hidden, weight, targets, reduction=reduction)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, expected, atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------- linear_log_probs

@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_linear_log_probs_matches_reference_log_softmax(temperature):
    hidden, weight, targets = make_inputs((37,), d=12, vocab=29, seed=7)
    g = torch.Generator().manual_seed(107)
    upstream = torch.randn(37, generator=g, dtype=torch.float64)

    actual = values_and_grads(
        lambda h, w: linear_log_probs(h, w, targets, temperature=temperature, chunk_size=8),
        hidden, weight, upstream)
    expected = values_and_grads(
        lambda h, w: reference_log_probs(h, w, targets, temperature)[0],
        hidden, weight, upstream)
    assert_all_close(actual, expected)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_linear_log_probs_entropy_matches_reference_with_gradients(temperature):
    hidden, weight, targets = make_inputs((3, 13), d=10, vocab=23, seed=8)
    g = torch.Generator().manual_seed(108)
    upstream_logp = torch.randn(3, 13, generator=g, dtype=torch.float64)
    upstream_entropy = torch.randn(3, 13, generator=g, dtype=torch.float64)

    def combined(fn):
        def run(h, w):
            logp, entropy = fn(h, w)
            assert logp.shape == targets.shape and entropy.shape == targets.shape
            return torch.stack([logp, entropy])  # (2, B, T)
        return run

    upstream = torch.stack([upstream_logp, upstream_entropy])
    actual = values_and_grads(
        combined(lambda h, w: linear_log_probs(
            h, w, targets, temperature=temperature, chunk_size=8, return_entropy=True)),
        hidden, weight, upstream)
    expected = values_and_grads(
        combined(lambda h, w: reference_log_probs(h, w, targets, temperature)),
        hidden, weight, upstream)
    assert_all_close(actual, expected)


@pytest.mark.parametrize("chunk_size", [None, 5, 39, 1000])
def test_linear_log_probs_accepts_batched_hidden_and_any_chunk_size(chunk_size):
    hidden, weight, targets = make_inputs((3, 13), d=10, vocab=23, seed=9)
    g = torch.Generator().manual_seed(109)
    upstream = torch.randn(3, 13, generator=g, dtype=torch.float64)

    actual = values_and_grads(
        lambda h, w: linear_log_probs(h, w, targets, chunk_size=chunk_size), hidden, weight, upstream)
    expected = values_and_grads(
        lambda h, w: reference_log_probs(h, w, targets)[0], hidden, weight, upstream)
    assert_all_close(actual, expected)


def test_linear_log_probs_entropy_is_log_vocab_for_uniform_logits():
    hidden, _, targets = make_inputs((37,), d=12, vocab=29, seed=10)
    weight = torch.zeros(29, 12, dtype=torch.float64)
    logp, entropy = linear_log_probs(hidden, weight, targets, chunk_size=8, return_entropy=True)
    log_vocab = torch.log(torch.tensor(29.0, dtype=torch.float64))
    torch.testing.assert_close(logp, torch.full_like(logp, -log_vocab.item()), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(entropy, torch.full_like(entropy, log_vocab.item()), atol=ATOL, rtol=RTOL)


def test_linear_log_probs_without_entropy_returns_a_single_tensor():
    hidden, weight, targets = make_inputs((37,), d=12, vocab=29, seed=11)
    logp = linear_log_probs(hidden, weight, targets, chunk_size=8)
    assert isinstance(logp, torch.Tensor)
    assert logp.shape == targets.shape


def test_linear_log_probs_under_no_grad_returns_tensors_without_grad():
    hidden, weight, targets = make_inputs((3, 13), d=10, vocab=23, seed=12)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    with torch.no_grad():
        logp, entropy = linear_log_probs(hidden, weight, targets, chunk_size=8, return_entropy=True)
    assert not logp.requires_grad and not entropy.requires_grad
    expected_logp, expected_entropy = reference_log_probs(hidden.detach(), weight.detach(), targets)
    torch.testing.assert_close(logp, expected_logp, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(entropy, expected_entropy, atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------- bf16 inputs

def bf16_and_float32_copies(hidden, weight):
    """The inputs rounded to bf16, and float32 copies of those same rounded values."""
    hidden_bf16, weight_bf16 = hidden.to(torch.bfloat16), weight.to(torch.bfloat16)
    return (hidden_bf16, weight_bf16), (hidden_bf16.float(), weight_bf16.float())


def assert_bf16_close(bf16, fp32):
    """bf16 carries 8 bits of mantissa (relative step 2**-8 = 0.4%): allow a few steps, scaled."""
    out, grad_hidden, grad_weight = bf16
    ref_out, ref_grad_hidden, ref_grad_weight = fp32
    torch.testing.assert_close(out.float(), ref_out, atol=2e-2, rtol=2e-2)
    for grad, ref in [(grad_hidden, ref_grad_hidden), (grad_weight, ref_grad_weight)]:
        assert grad.dtype == torch.bfloat16
        scale = ref.abs().max().item()
        torch.testing.assert_close(grad.float(), ref, atol=3e-2 * scale, rtol=3e-2)


def test_linear_cross_entropy_bf16_inputs_close_to_float32_reference():
    hidden, weight, targets = make_inputs((64,), d=32, vocab=128, seed=13, ignore_index=-100)
    inputs_bf16, inputs_fp32 = bf16_and_float32_copies(hidden, weight)
    bf16 = values_and_grads(lambda h, w: linear_cross_entropy(h, w, targets, chunk_size=24), *inputs_bf16)
    fp32 = values_and_grads(lambda h, w: reference_cross_entropy(h, w, targets), *inputs_fp32)
    assert_bf16_close(bf16, fp32)


def test_linear_log_probs_bf16_inputs_close_to_float32_reference():
    hidden, weight, targets = make_inputs((64,), d=32, vocab=128, seed=14)
    inputs_bf16, inputs_fp32 = bf16_and_float32_copies(hidden, weight)
    bf16 = values_and_grads(lambda h, w: linear_log_probs(h, w, targets, chunk_size=24), *inputs_bf16)
    fp32 = values_and_grads(lambda h, w: reference_log_probs(h, w, targets)[0], *inputs_fp32)
    assert_bf16_close(bf16, fp32)


# ---------------------------------------------------------------- memory flatness

class LargestTensorRecorder(TorchDispatchMode):
    """Records the numel of every tensor any op produces while the mode is active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def largest_tensor_in_forward_and_backward(loss_fn, hidden, weight):
    hidden = hidden.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(True)
    with LargestTensorRecorder() as recorder:
        loss_fn(hidden, weight).sum().backward()
    return recorder.largest


@pytest.mark.parametrize("kernel", ["linear_cross_entropy", "linear_log_probs"])
def test_fused_kernel_never_materialises_full_logits(kernel):
    n_tokens, vocab = 256, 512
    hidden, weight, targets = make_inputs((n_tokens,), d=16, vocab=vocab, seed=15, dtype=torch.float32)
    if kernel == "linear_cross_entropy":
        fused = lambda h, w: linear_cross_entropy(h, w, targets, chunk_size=32)
        plain = lambda h, w: reference_cross_entropy(h, w, targets)
    else:
        fused = lambda h, w: linear_log_probs(h, w, targets, chunk_size=32, return_entropy=True)[1]
        plain = lambda h, w: reference_log_probs(h, w, targets)[1]

    # The recorder sees the (N x V) logits of the plain version, so it can catch them.
    assert largest_tensor_in_forward_and_backward(plain, hidden, weight) >= n_tokens * vocab
    assert largest_tensor_in_forward_and_backward(fused, hidden, weight) < n_tokens * vocab


# ---------------------------------------------------------------- compiled path
# SLOW: the one compiled test of the suite (about 30-60 s of torch.compile on CPU).

def test_compiled_kernels_match_eager_on_cpu(monkeypatch):
    """KERNELS_COMPILE=1 turns torch.compile on for CPU; results must match the eager path."""
    try:
        torch.compile(lambda x: x * 2)(torch.ones(2))
    except Exception as error:  # no C++ toolchain or no inductor backend
        pytest.skip(f"torch.compile unavailable on this machine: {error}")

    hidden, weight, targets = make_inputs((2, 19), d=16, vocab=40, seed=16, dtype=torch.float32,
                                          ignore_index=-100)
    logp_targets = targets.clamp(min=0)
    g = torch.Generator().manual_seed(116)
    upstream = torch.randn(2, 2, 19, generator=g)

    def cross_entropy(h, w):
        return linear_cross_entropy(h, w, targets, chunk_size=8)

    def log_probs_and_entropy(h, w):
        return torch.stack(linear_log_probs(h, w, logp_targets, temperature=0.8, chunk_size=8,
                                            return_entropy=True))  # (2, B, T)

    monkeypatch.setenv("KERNELS_COMPILE", "0")
    eager_ce = values_and_grads(cross_entropy, hidden, weight)
    eager_lp = values_and_grads(log_probs_and_entropy, hidden, weight, upstream)

    monkeypatch.setenv("KERNELS_COMPILE", "1")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled_ce = values_and_grads(cross_entropy, hidden, weight)
    compiled_lp = values_and_grads(log_probs_and_entropy, hidden, weight, upstream)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0, "KERNELS_COMPILE=1 compiled nothing"

    assert_all_close(compiled_ce, eager_ce, atol=1e-5, rtol=1e-5)
    assert_all_close(compiled_lp, eager_lp, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- GPU only

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_linear_cross_entropy_bf16_on_cuda_matches_reference():
    hidden, weight, targets = make_inputs((4, 300), d=64, vocab=1000, seed=17, ignore_index=-100)
    hidden, weight, targets = hidden.cuda(), weight.cuda(), targets.cuda()
    inputs_bf16, inputs_fp32 = bf16_and_float32_copies(hidden, weight)
    bf16 = values_and_grads(lambda h, w: linear_cross_entropy(h, w, targets, chunk_size=256), *inputs_bf16)
    fp32 = values_and_grads(lambda h, w: reference_cross_entropy(h, w, targets), *inputs_fp32)
    assert_bf16_close(bf16, fp32)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_cross_entropy_scales_its_gradients_by_the_incoming_gradient(reduction):
    # Loss scaling (a data-parallel share weight, gradient accumulation) multiplies the upstream gradient;
    # every other test backpropagates a plain loss, i.e. an upstream gradient of exactly 1.
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 12, generator=g, dtype=torch.float64)
    weight = torch.randn(29, 12, generator=g, dtype=torch.float64) / 12 ** 0.5
    targets = torch.randint(0, 29, (37,), generator=g)
    targets[::5] = -100
    grads = []
    for fused in (True, False):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        if fused:
            loss = linear_cross_entropy(h, w, targets, reduction=reduction, chunk_size=8)
        else:
            loss = F.cross_entropy(h @ w.T, targets, reduction=reduction)
        grads.append(torch.autograd.grad(2.5 * loss, (h, w)))
    for actual, expected in zip(*grads):
        torch.testing.assert_close(actual, expected, atol=1e-10, rtol=1e-10)
