"""Fused linear + loss: the language-model head without the (tokens x vocab) logits tensor.

A GPT's last step is logits = hidden @ W.T, shape (N, V), then a loss on each row. With N = 32768
tokens and V = 50304 that one tensor is 3.3 GB in bf16, and autograd keeps it (and its float32
softmax) alive until the backward pass: it is usually the largest thing in memory. But every row's
loss and gradient only need that row's logits:

    loss_i      = logsumexp(z_i) - z_i[t_i]                  z_i = W h_i          (V,)
    dloss_i/dz  = softmax(z_i) - onehot(t_i)                 (V,)
    dL/dh_i     = W.T @ dz_i                                 (d,)
    dL/dW      += dz_i outer h_i                             (V, d), summed over rows

So we walk the tokens in chunks of C rows: compute the chunk's logits, its loss, its logit gradient,
turn that into the chunk's hidden gradient and its share of the weight gradient, and throw the
logits away. Peak memory is O(C x V) instead of O(N x V), flat in N. The weight gradient is summed
across chunks in float32 (bf16 would lose the small contributions of late chunks).

Two ways to get gradients, used where each fits:
- loss is a scalar (reduction "mean"/"sum"): the gradient of every row is known up to one scalar,
  so the forward pass computes loss and gradients in one sweep (3 matmuls per chunk, as many as the
  unfused head) and the backward pass only multiplies by the incoming scalar (Liger-Kernel's trick);
- the output is per token (reduction "none", log-probs, entropy): the backward pass receives one
  weight per token, so it recomputes each chunk's logits and applies them (one extra matmul).
Without gradients (scoring rollouts under torch.no_grad) only the forward sweep runs and nothing is
saved for backward.

Chunk size: about 2^24 logits per chunk (V = 8192 -> 2048 rows, V = 50304 -> 1024 rows), between 1024
and 4096 rows, and never more than the token count rounded up to a power of two (min 256). The last,
short chunk is padded up to the chunk size so a compiled chunk function only ever sees one shape.
"""

import torch

from .compile import maybe_compiled

MIN_CHUNK = 256


def default_chunk_size(n_tokens: int, vocab_size: int) -> int:
    """Rows per chunk for `n_tokens` tokens and a `vocab_size` vocabulary (see the module docstring)."""
    by_vocab = 1 << max(0, (2**24 // vocab_size).bit_length() - 1)  # power of two <= 2^24 / V
    by_vocab = min(max(by_vocab, 1024), 4096)
    by_tokens = max(MIN_CHUNK, 1 << max(0, (n_tokens - 1).bit_length()))  # next power of two >= N
    return min(by_vocab, by_tokens)


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision inputs, the input's own dtype for float32/float64."""
    return torch.promote_types(dtype, torch.float32)


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """Pad dim 0 of x with zeros up to `rows` (the short last chunk becomes a full one)."""
    if x.shape[0] == rows:
        return x
    pad = x.new_zeros((rows - x.shape[0],) + tuple(x.shape[1:]))
    return torch.cat([x, pad])


def _chunks(n: int, chunk: int):
    """(start, stop) of each chunk of `chunk` rows covering range(n); the last may be short."""
    return [(start, min(start + chunk, n)) for start in range(0, n, chunk)]


# ---------------------------------------------------------------------------------------------
# Per-chunk math. These are the functions torch.compile sees (always with `chunk` rows).
# ---------------------------------------------------------------------------------------------

@maybe_compiled
def _ce_chunk_loss(h, weight, targets, valid):
    """Cross-entropy of one chunk. h (C, d), weight (V, d), targets (C,), valid (C,) -> loss (C,)."""
    logits = (h @ weight.T).to(_accumulate_dtype(h.dtype))  # (C, V)
    target_logit = logits.gather(1, targets[:, None]).squeeze(1)  # (C,)
    return (torch.logsumexp(logits, dim=1) - target_logit) * valid


@maybe_compiled
def _ce_chunk_loss_and_grads(h, weight, targets, row_scale):
    """Loss of one chunk and the gradients of sum_i row_scale_i * loss_i.

    h (C, d), weight (V, d), targets (C,), row_scale (C,) -> loss (C,), grad_h (C, d), grad_w (V, d)
    row_scale is 1/n_valid (mean), 1 (sum) or the incoming per-token gradient (none), 0 where ignored.
    """
    logits = (h @ weight.T).to(_accumulate_dtype(h.dtype))  # (C, V)
    target_logit = logits.gather(1, targets[:, None]).squeeze(1)  # (C,)
    lse = torch.logsumexp(logits, dim=1)  # (C,)
    loss = lse - target_logit
    grad_logits = torch.exp(logits - lse[:, None])  # softmax; d loss / d logits = softmax - onehot
    grad_logits.scatter_add_(1, targets[:, None], -torch.ones_like(target_logit[:, None]))
    grad_logits = (grad_logits * row_scale[:, None]).to(h.dtype)  # back to the matmul dtype
    return loss * (row_scale != 0), grad_logits @ weight, grad_logits.T @ h


@maybe_compiled
def _logp_chunk(h, weight, targets, temperature, with_entropy):
    """log p(target) and (if with_entropy, else None) the entropy of softmax(h W^T / temperature)."""
    z = (h @ weight.T).to(_accumulate_dtype(h.dtype)) / temperature  # (C, V)
    logp_all = torch.log_softmax(z, dim=1)
    logp = logp_all.gather(1, targets[:, None]).squeeze(1)  # (C,)
    return logp, -(logp_all.exp() * logp_all).sum(dim=1) if with_entropy else None


@maybe_compiled
def _logp_chunk_grads(h, weight, targets, grad_logp, grad_entropy, temperature):
    """Gradients of sum_i (grad_logp_i * logp_i + grad_entropy_i * H_i) w.r.t. h and weight.

    With z = logits / temperature, p = softmax(z):
        d logp_t / dz = onehot(t) - p
        d H / dz_k    = -p_k * (log p_k + H)
    and d/dlogits = d/dz / temperature.
    """
    z = (h @ weight.T).to(_accumulate_dtype(h.dtype)) / temperature  # (C, V)
    logp_all = torch.log_softmax(z, dim=1)
    p = logp_all.exp()
    entropy = -(p * logp_all).sum(dim=1, keepdim=True)  # (C, 1)
    grad_z = -p * (grad_logp[:, None] + grad_entropy[:, None] * (logp_all + entropy))
    grad_z.scatter_add_(1, targets[:, None], grad_logp[:, None].to(grad_z.dtype))
    grad_logits = (grad_z / temperature).to(h.dtype)
    return grad_logits @ weight, grad_logits.T @ h


# ---------------------------------------------------------------------------------------------
# Chunk walkers.
# ---------------------------------------------------------------------------------------------

def _walk_ce_loss(h, weight, targets, valid, chunk):
    """Per-token cross-entropy, chunk by chunk, without gradients. -> (N,)"""
    n = h.shape[0]
    losses = []
    for start, stop in _chunks(n, chunk):
        loss = _ce_chunk_loss(_pad_rows(h[start:stop], chunk), weight,
                              _pad_rows(targets[start:stop], chunk), _pad_rows(valid[start:stop], chunk))
        losses.append(loss[: stop - start])
    return torch.cat(losses)


def _walk_ce_grads(h, weight, targets, row_scale, chunk):
    """Per-token loss plus the gradients of sum_i row_scale_i * loss_i. -> (N,), (N, d), (V, d)"""
    n = h.shape[0]
    losses = []
    grad_h = torch.empty_like(h)
    grad_w = torch.zeros(weight.shape, dtype=_accumulate_dtype(weight.dtype), device=weight.device)
    for start, stop in _chunks(n, chunk):
        loss, grad_h_chunk, grad_w_chunk = _ce_chunk_loss_and_grads(
            _pad_rows(h[start:stop], chunk), weight,
            _pad_rows(targets[start:stop], chunk), _pad_rows(row_scale[start:stop], chunk))
        losses.append(loss[: stop - start])
        grad_h[start:stop] = grad_h_chunk[: stop - start]
        grad_w += grad_w_chunk  # float32 accumulation across chunks
    return torch.cat(losses), grad_h, grad_w.to(weight.dtype)


def _walk_logp(h, weight, targets, temperature, chunk, with_entropy):
    """Per-token log-prob of the target and entropy (or None), without gradients. -> (N,), (N,)"""
    n = h.shape[0]
    logps, entropies = [], []
    for start, stop in _chunks(n, chunk):
        logp, entropy = _logp_chunk(_pad_rows(h[start:stop], chunk), weight,
                                    _pad_rows(targets[start:stop], chunk), temperature, with_entropy)
        logps.append(logp[: stop - start])
        if with_entropy:
            entropies.append(entropy[: stop - start])
    return torch.cat(logps), torch.cat(entropies) if with_entropy else None


def _walk_logp_grads(h, weight, targets, grad_logp, grad_entropy, temperature, chunk):
    """Gradients w.r.t. h and weight given per-token upstream gradients. -> (N, d), (V, d)"""
    n = h.shape[0]
    grad_h = torch.empty_like(h)
    grad_w = torch.zeros(weight.shape, dtype=_accumulate_dtype(weight.dtype), device=weight.device)
    for start, stop in _chunks(n, chunk):
        grad_h_chunk, grad_w_chunk = _logp_chunk_grads(
            _pad_rows(h[start:stop], chunk), weight, _pad_rows(targets[start:stop], chunk),
            _pad_rows(grad_logp[start:stop], chunk), _pad_rows(grad_entropy[start:stop], chunk),
            temperature)
        grad_h[start:stop] = grad_h_chunk[: stop - start]
        grad_w += grad_w_chunk
    return grad_h, grad_w.to(weight.dtype)


# ---------------------------------------------------------------------------------------------
# autograd Functions.
# ---------------------------------------------------------------------------------------------

class _ScalarLinearCrossEntropy(torch.autograd.Function):
    """reduction mean/sum: gradients computed in the forward sweep, scaled in backward."""

    @staticmethod
    def forward(ctx, h, weight, targets, valid, reduction, chunk):
        n_valid = valid.sum()
        # clamp: with no valid target every row_scale is 0 (zero gradients) and the mean is 0/0 = NaN, as in PyTorch
        row_scale = valid / n_valid.clamp(min=1) if reduction == "mean" else valid
        losses, grad_h, grad_w = _walk_ce_grads(h, weight, targets, row_scale, chunk)
        ctx.save_for_backward(grad_h, grad_w)
        total = losses.sum()
        return total / n_valid if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss, grad_w * grad_loss, None, None, None, None


class _PerTokenLinearCrossEntropy(torch.autograd.Function):
    """reduction none: losses in forward, gradients recomputed chunk by chunk in backward."""

    @staticmethod
    def forward(ctx, h, weight, targets, valid, chunk):
        ctx.save_for_backward(h, weight, targets, valid)
        ctx.chunk = chunk
        return _walk_ce_loss(h, weight, targets, valid.to(h.dtype), chunk)

    @staticmethod
    def backward(ctx, grad_losses):
        h, weight, targets, valid = ctx.saved_tensors
        row_scale = grad_losses.to(_accumulate_dtype(h.dtype)) * valid
        _, grad_h, grad_w = _walk_ce_grads(h, weight, targets, row_scale, ctx.chunk)
        return grad_h, grad_w, None, None, None


class _LinearLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, temperature, chunk):
        ctx.save_for_backward(h, weight, targets)
        ctx.temperature, ctx.chunk = temperature, chunk
        return _walk_logp(h, weight, targets, temperature, chunk, with_entropy=True)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        h, weight, targets = ctx.saved_tensors
        dtype = _accumulate_dtype(h.dtype)
        grad_logp = torch.zeros(h.shape[0], dtype=dtype, device=h.device) if grad_logp is None else grad_logp
        grad_entropy = torch.zeros_like(grad_logp) if grad_entropy is None else grad_entropy
        grad_h, grad_w = _walk_logp_grads(h, weight, targets, grad_logp.to(dtype), grad_entropy.to(dtype),
                                          ctx.temperature, ctx.chunk)
        return grad_h, grad_w, None, None, None


# ---------------------------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------------------------

def _flatten(hidden, weight, targets, name):
    """Check shapes and flatten (B, T, d) / (B, T) to (N, d) / (N,)."""
    if hidden.dim() not in (2, 3) or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{name}: want hidden (N, d) or (B, T, d) and weight (V, d), "
                         f"got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{name}: targets shape {tuple(targets.shape)} must equal hidden's leading "
                         f"shape {tuple(hidden.shape[:-1])}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"{name}: hidden is {hidden.dtype} but weight is {weight.dtype}")
    return hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def linear_cross_entropy(hidden, weight, targets, *, ignore_index=-100, reduction="mean", chunk_size=None):
    """Cross-entropy of logits = hidden @ weight.T against targets, without building the logits.

        loss_i = logsumexp_v(z_iv) - z_i[t_i],   z_i = weight @ hidden_i

    Same result as F.cross_entropy(hidden @ weight.T, targets, ignore_index=..., reduction=...):
    "mean" averages over the tokens whose target is not ignore_index (NaN if there are none, as
    in PyTorch), "sum" adds them, "none" returns one loss per token (0 where ignored).

    hidden (N, d) or (B, T, d); weight (V, d); targets (N,) or (B, T) integer ids.
    chunk_size: rows per chunk (default: default_chunk_size). Memory is O(chunk_size x V).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    h, t = _flatten(hidden, weight, targets, "linear_cross_entropy")
    chunk = chunk_size or default_chunk_size(h.shape[0], weight.shape[0])
    valid = t != ignore_index
    safe_targets = torch.where(valid, t, torch.zeros_like(t))  # any in-range id; masked out below
    if reduction == "none":
        if _needs_grad(hidden, weight):
            losses = _PerTokenLinearCrossEntropy.apply(h, weight, safe_targets, valid, chunk)
        else:
            losses = _walk_ce_loss(h, weight, safe_targets, valid.to(h.dtype), chunk)
        return losses.to(hidden.dtype).reshape(targets.shape)
    if _needs_grad(hidden, weight):
        loss = _ScalarLinearCrossEntropy.apply(h, weight, safe_targets, valid.to(_accumulate_dtype(h.dtype)),
                                               reduction, chunk)
    else:
        total = _walk_ce_loss(h, weight, safe_targets, valid.to(h.dtype), chunk).sum()
        loss = total / valid.sum() if reduction == "mean" else total
    return loss.to(hidden.dtype)


def linear_log_probs(hidden, weight, targets, *, temperature=1.0, chunk_size=None, return_entropy=False):
    """Log-probability of each target token (and optionally the entropy), without building the logits.

        logp_i = log softmax(z_i / temperature)[t_i]
        H_i    = -sum_v p_iv log p_iv,   p_i = softmax(z_i / temperature)

    This is what RL needs from the policy: log pi(a_t | s_t) of the sampled tokens (policy-gradient
    ratios, KL to the reference) and the entropy of pi (a health signal). Dividing by the sampling
    temperature makes the scored distribution the one the rollout was sampled from.

    hidden (N, d) or (B, T, d); weight (V, d); targets (N,) or (B, T).
    Returns logp with targets' shape (float32 for half-precision inputs), and entropy if asked.
    Differentiable w.r.t. hidden and weight; under torch.no_grad (old and reference log-probs of
    rollouts) nothing is kept for backward.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    h, t = _flatten(hidden, weight, targets, "linear_log_probs")
    chunk = chunk_size or default_chunk_size(h.shape[0], weight.shape[0])
    if _needs_grad(hidden, weight):
        logp, entropy = _LinearLogProbs.apply(h, weight, t, float(temperature), chunk)
    else:
        logp, entropy = _walk_logp(h, weight, t, float(temperature), chunk, with_entropy=return_entropy)
    logp = logp.reshape(targets.shape)
    return (logp, entropy.reshape(targets.shape)) if return_entropy else logp
