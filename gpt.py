"""The small GPT every stage trains: model, KV-cache sampling, checkpoint save/load.

The architecture is GPT-2's, as in nanoGPT. A token id becomes a vector by looking it up in the
token embedding, plus a learned vector for its position (0, 1, 2, ...). A stack of identical blocks
then refines these vectors. Each block is pre-norm: LayerNorm, then causal self-attention (every
position mixes in the positions before it, never after), added back to its input (the residual);
then LayerNorm, then an MLP (d -> 4d -> GELU -> d), added back again. A final LayerNorm gives the
hidden states h (B, T, d), and the logits are h @ W.T, where W (V, d) is the token embedding
itself (weight tying): a token's output score is how well h matches that token's input vector.

    logits = lm_head(hidden(idx))        # hidden: (B, T, d), logits: (B, T, V)

Later stages call `hidden` directly and feed it, with `lm_head.weight`, to the fused losses in
kernels/, which never build the full (tokens x vocab) logits.

The KV cache. Generating token t+1 needs attention from the newest position to every earlier one,
and the keys and values of the earlier positions do not change when a token is appended (attention
is causal). So instead of re-running the whole sequence for every new token, `generate` runs the
prompt once (the "prefill"), stores each layer's keys and values in preallocated tensors of shape
(B, n_head, T_max, head_dim), and from then on feeds one token per step: that token's query
attends to the stored keys. The cost per new token drops from the whole sequence to one position.
`use_cache=False` keeps the slow, obvious path (re-run everything) as the reference.

Batches of prompts of different lengths are left-padded to a common length, so every row's next
token is at the same column. Each row gets its own position ids (its first real token is position
0) and an attention mask that is causal and hides the pad keys; the result for each row is the
same as generating it alone.
"""
import dataclasses
import math
import os
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizer import Tokenizer, write_atomically


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int  # longest sequence the model sees (number of position embeddings)
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    tie_weights: bool = True  # lm_head.weight is the token embedding


# ---- the model ---------------------------------------------------------------------------------

class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_index: int):
        super().__init__()
        if config.n_embd % config.n_head != 0:
            raise ValueError(f"n_embd={config.n_embd} must be divisible by n_head={config.n_head}")
        self.n_head = config.n_head
        self.layer_index = layer_index  # which slot of a KVCache this layer uses
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, attn_mask=None, kv_cache=None):
        B, T, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (t.view(B, T, self.n_head, d // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        if kv_cache is not None:
            k, v = kv_cache.store(self.layer_index, k, v)  # (B, H, S, hd): every position so far
        dropout_p = self.dropout if self.training else 0.0
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, d)  # (B, T, d): heads side by side again
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_index: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, layer_index)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask=None, kv_cache=None):
        x = x + self.attn(self.ln_1(x), attn_mask, kv_cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd)
        self.position_embedding = nn.Embedding(config.block_size, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.token_embedding.weight = self.lm_head.weight  # one parameter, two uses
        self.apply(self._init_weights)
        # Each block adds two projections to the residual stream; scale them down so the sum of
        # 2 * n_layer contributions keeps roughly unit variance at init (GPT-2 paper).
        for name, param in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def hidden(self, idx, *, positions=None, attn_mask=None, kv_cache=None):
        """Final normalised hidden states (B, T, d) for token ids idx (B, T).

        Training passes idx alone: positions 0..T-1 and a plain causal mask. `generate` also
        passes per-row positions (B, T), a boolean attn_mask (B, 1, T, S) that is True where a
        query may look at a key, and a KVCache that holds the S - T earlier positions.
        """
        B, T = idx.shape
        if positions is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens is longer than block_size={self.config.block_size}")
            positions = torch.arange(T, device=idx.device)  # (T,), broadcast over the batch
        x = self.token_embedding(idx) + self.position_embedding(positions)  # (B, T, d)
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x, attn_mask, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.ln_f(x)  # (B, T, d)

    def forward(self, idx, **kwargs):
        """Logits (B, T, V) for token ids idx (B, T); exactly lm_head(hidden(idx))."""
        return self.lm_head(self.hidden(idx, **kwargs))

    # ---- bookkeeping ---------------------------------------------------------------------------

    def num_params(self, non_embedding=False):
        """Parameter count; a tied matrix counts once (parameters() yields it once).

        non_embedding=True leaves out the lookup tables that do no matrix multiply: the position
        embedding, and the token embedding when it is not tied to lm_head (nanoGPT's convention).
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.position_embedding.weight.numel()
            if not self.config.tie_weights:
                n -= self.token_embedding.weight.numel()
        return n

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward), PaLM appendix B / nanoGPT's estimate_mfu:
        6 per matmul parameter, plus 12 * n_layer * n_embd * seq_len for the attention scores."""
        c = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layer * c.n_embd * seq_len

    # ---- generation ----------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, *, temperature=1.0, top_k=None, stop_ids=(),
                 use_cache=True, seed=None):
        """Continue each prompt (a list of token ids; lengths may differ) by up to max_new_tokens.

        Returns one list per prompt with the new tokens only, ending at (and including) the first
        token in stop_ids, or after max_new_tokens tokens. temperature=0 is greedy (argmax);
        top_k keeps only the k most likely tokens before sampling; seed makes sampling
        reproducible (a torch.Generator on the model's device), independent of the global RNG.

        Context limit: prompt + new tokens must fit block_size. A prompt longer than
        block_size - max_new_tokens is cut from the left (its most recent tokens are kept), with a
        warning. If max_new_tokens alone does not leave room for one prompt token, it is capped at
        block_size - 1, with a warning.

        Runs in eval mode and restores the previous train/eval mode afterwards.
        """
        prompts, max_new_tokens = self._fit_to_context(prompts, max_new_tokens)
        device = self.lm_head.weight.device
        generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
        was_training = self.training
        self.eval()
        try:
            return self._generate(prompts, max_new_tokens, temperature, top_k, set(stop_ids),
                                  use_cache, generator)
        finally:
            self.train(was_training)

    def _fit_to_context(self, prompts, max_new_tokens):
        block_size = self.config.block_size
        if any(len(prompt) == 0 for prompt in prompts):
            raise ValueError("every prompt needs at least one token")
        if max_new_tokens > block_size - 1:
            warnings.warn(f"max_new_tokens={max_new_tokens} capped at {block_size - 1}: "
                          f"block_size={block_size} must also hold at least one prompt token")
            max_new_tokens = block_size - 1
        room = block_size - max(max_new_tokens, 0)
        num_cut = sum(len(prompt) > room for prompt in prompts)
        if num_cut:
            warnings.warn(f"{num_cut} prompt(s) cut from the left to their last {room} tokens so that "
                          f"prompt + max_new_tokens={max_new_tokens} fits block_size={block_size}")
        return [list(prompt)[-room:] for prompt in prompts], max_new_tokens

    def _generate(self, prompts, max_new_tokens, temperature, top_k, stop_ids, use_cache, generator):
        device = self.lm_head.weight.device
        B, P = len(prompts), max(len(prompt) for prompt in prompts)
        tokens = torch.zeros(B, P, dtype=torch.long, device=device)  # (B, P), left-padded with 0
        is_real = torch.zeros(B, P, dtype=torch.bool, device=device)  # (B, P), False on padding
        for row, prompt in enumerate(prompts):
            tokens[row, P - len(prompt):] = torch.tensor(prompt, dtype=torch.long, device=device)
            is_real[row, P - len(prompt):] = True
        kv_cache = KVCache(max_len=P + max_new_tokens) if use_cache else None

        new_tokens = [[] for _ in range(B)]
        rows = list(range(B))  # the prompt each row of `tokens` continues; finished rows are dropped
        done = [False] * B  # per row of `tokens`: its reply has ended (the row leaves at the next compaction)
        for step in range(max_new_tokens):
            logits = self._next_token_logits(tokens, is_real, kv_cache)  # (b, V), b <= B rows still in the batch
            # Sample as if all B prompts were still there (rows that left get a dummy uniform row):
            # torch.multinomial draws B x V random numbers whatever the probabilities, so each prompt's
            # draw does not depend on when the other replies ended. (Its logits may still round
            # differently in a smaller batch on some BLAS/GPU kernels; on this CPU they are identical.)
            all_logits = logits.new_zeros(B, logits.shape[1])
            all_logits[rows] = logits
            next_token = sample_next_token(all_logits, temperature, top_k, generator)[rows]  # (b,)
            for i, token in enumerate(next_token.tolist()):
                if not done[i]:
                    new_tokens[rows[i]].append(token)
                    done[i] = token in stop_ids
            if all(done):
                break
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)  # (b, S + 1)
            is_real = torch.cat([is_real, torch.ones_like(is_real[:, :1])], dim=1)
            if sum(done) >= len(done) / 4:  # drop finished rows (a copy of the cache) in a few large steps
                keep = [i for i in range(len(done)) if not done[i]]
                index = torch.tensor(keep, device=device)
                tokens, is_real = tokens[index], is_real[index]
                if kv_cache is not None:
                    kv_cache.keep_rows(index)
                rows, done = [rows[i] for i in keep], [False] * len(keep)
        return new_tokens

    def _next_token_logits(self, tokens, is_real, kv_cache):
        """Logits (B, V) for the token after the last column of tokens (B, S).

        Without a cache, the whole sequence is run again. With one, only the columns not yet in
        it: the whole prompt on the first call (prefill), then the one newest token."""
        positions = (is_real.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, S): 0 at each row's first real token
        start = 0 if kv_cache is None else kv_cache.length
        attn_mask = padding_attention_mask(is_real, query_start=start)  # (B, 1, S - start, S)
        h = self.hidden(tokens[:, start:], positions=positions[:, start:], attn_mask=attn_mask,
                        kv_cache=kv_cache)  # (B, S - start, d)
        return self.lm_head(h[:, -1])  # (B, V)


def padding_attention_mask(is_real, query_start=0):
    """Boolean mask (B, 1, S - query_start, S), True where a query may attend to a key.

    is_real (B, S) is False at left padding. Queries are the columns query_start..S-1, keys are
    all S columns. A query sees the keys at or before it (causal) that are real tokens. A pad
    query would then see nothing, and a softmax over nothing is 0/0 = NaN, so every query also
    sees itself: pad positions compute harmless numbers that no real token ever reads.
    """
    S = is_real.shape[1]
    key_col = torch.arange(S, device=is_real.device)  # (S,)
    query_col = torch.arange(query_start, S, device=is_real.device)  # (Tq,)
    causal = key_col[None, :] <= query_col[:, None]  # (Tq, S)
    is_self = key_col[None, :] == query_col[:, None]  # (Tq, S)
    allowed = causal & (is_real[:, None, :] | is_self)  # (B, Tq, S)
    return allowed[:, None]  # (B, 1, Tq, S): one mask shared by all heads


def sample_next_token(logits, temperature, top_k, generator):
    """One token id per row of logits (B, V): argmax when temperature is 0, else a sample."""
    if temperature == 0:
        return logits.argmax(dim=-1)  # (B,)
    logits = logits.float() / temperature
    if top_k is not None:
        kth_largest = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = F.softmax(logits, dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)  # (B,)


class KVCache:
    """Every layer's keys and values for the positions generated so far.

    Each layer gets two tensors (B, n_head, max_len, head_dim), allocated on the first `store`
    (the prefill) in the dtype and device the keys arrive in. `length` counts the filled columns.
    """

    def __init__(self, max_len):
        self.max_len = max_len
        self.keys, self.values = {}, {}
        self.length = 0

    def store(self, layer, k, v):
        """Write k, v (B, H, T, hd) after the filled columns; return all keys and values so far."""
        if layer not in self.keys:
            B, H, _, hd = k.shape
            self.keys[layer] = k.new_zeros(B, H, self.max_len, hd)  # (B, H, max_len, hd)
            self.values[layer] = v.new_zeros(B, H, self.max_len, hd)
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked for {end}")
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]  # (B, H, end, hd)

    def keep_rows(self, index):
        """Keep only the batch rows in index (a 1-D tensor), e.g. to drop prompts whose reply has ended."""
        for layer in self.keys:
            self.keys[layer] = self.keys[layer][index]
            self.values[layer] = self.values[layer][index]

    def advance(self, num_tokens):
        """Called once all layers have stored the new columns."""
        self.length += num_tokens


# ---- training mechanics -------------------------------------------------------------------------

def lm_loss(hidden, weight, targets, ignore_index=-100):
    """Mean next-token cross-entropy of logits = hidden @ weight.T over targets != ignore_index.

    Goes through kernels.linear_cross_entropy, which never builds the (tokens x vocab) logits. Under
    autocast the LayerNorm output is float32; both operands are cast to the autocast dtype (bf16) so
    the chunked matmuls run at bf16 speed.
    """
    from kernels import linear_cross_entropy

    hidden, weight = autocast_operands(hidden, weight)
    return linear_cross_entropy(hidden, weight, targets, ignore_index=ignore_index)


def autocast_operands(hidden, weight):
    """hidden and the lm_head weight in one dtype for the chunked kernels: the autocast dtype (bf16)
    under autocast, else hidden's. Casting by hand matters: autocast would run the kernels' forward
    matmuls in bf16, but their backward runs outside autocast and would redo them in float32, so the
    gradients would belong to a slightly different function (and the matmuls would run slower)."""
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    return hidden.to(dtype), weight.to(dtype)


def configure_optimizer(model, lr, weight_decay, betas=(0.9, 0.95)):
    """AdamW with weight decay on matrices only (not on LayerNorm gains and biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def shuffled_minibatches(items, batch_size, epochs, rng):
    """Yield (epoch, minibatch) over `epochs` passes of items, reshuffled (in place, by rng) every pass."""
    for epoch in range(epochs):
        rng.shuffle(items)
        for start in range(0, len(items), batch_size):
            yield epoch, items[start:start + batch_size]


def set_lr(optimizer, lr):
    """Set the learning rate of every parameter group (the schedule is computed by the caller)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def update(model, optimizer, loss, grad_clip, step):
    """One optimiser step on `loss`: stop with a one-line error if it is not finite (nothing is saved, so the
    last good checkpoint stays), otherwise backpropagate, average the gradients over data-parallel
    processes (if any), clip the gradient norm to grad_clip, step."""
    if not all_finite(loss):
        raise SystemExit(f"error: loss is {loss.item()} at step {step}; nothing saved. Try a lower --lr.")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients(model)
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()


# ---- data parallel over processes (torchrun --nproc_per_node=N) --------------------------------
# Every process holds the whole model, builds the same global batch (same seed), keeps its own slice of
# it, and averages gradients with the others before each step: N processes take the steps one process
# takes on the global batch. RL sampling is split the other way round: each process generates its share
# of the replies and all of them receive the whole rollout (split_and_gather). One process (no torchrun)
# is the default, and then all of this is a no-op.

def init_distributed(device):
    """Join the process group when torchrun started us (WORLD_SIZE > 1): NCCL on CUDA, gloo on CPU."""
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def world_info():
    """(rank, number of processes); (0, 1) without torchrun."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main():
    """True in the process that prints, evaluates and writes files (rank 0)."""
    return world_info()[0] == 0


def barrier():
    if world_info()[1] > 1:
        import torch.distributed as dist
        dist.barrier()


def leave_distributed():
    """End of a run under torchrun: every process waits here until all are done (rank 0 evaluates and writes
    after the others have finished training), leaves the group, and ends at once with os._exit, skipping
    Python's interpreter shutdown. That shutdown can race PyTorch's own C++ threads (gloo's workers, which
    may still hold a finished collective's tensors): a thread that touches a Python object while the
    interpreter is torn down aborts the whole process ("terminate called without an active exception"), a
    failed run to torchrun though its work was done (pytorch/pytorch#190489; destroy_process_group alone
    does not prevent it). A no-op in one process."""
    if world_info()[1] > 1:
        import torch.distributed as dist
        barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # skips the interpreter's shutdown; every file the run wrote is already closed


@contextmanager
def main_process_first():
    """Rank 0 runs the block first (it builds a cache), then the others run it (and read the cache)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def local_slice(batch):
    """This process's contiguous share of a global batch (a list or a tensor's first dimension)."""
    rank, world = world_info()
    return batch[rank * len(batch) // world:(rank + 1) * len(batch) // world]


def local_share(batch):
    """(this process's share of a list batch, the weight of its mean loss). Shares can differ in size (the
    last batch of an epoch); weighting each mean by share size * processes / batch size makes the averaged
    gradient that of the global mean. A process whose share is empty gets one example with weight 0, so
    that it still takes part in the gradient average. One process: (batch, 1.0)."""
    share, world = local_slice(batch), world_info()[1]
    if not share:
        return batch[:1], 0.0
    return share, len(share) * world / len(batch)


def local_token_share(batch, count_tokens):
    """local_share for a loss averaged over tokens rather than examples: the weight is this share's tokens *
    processes / the batch's tokens (count_tokens(item) -> its number of loss tokens)."""
    share, weight = local_share(batch)
    if weight == 0 or world_info()[1] == 1:
        return share, weight
    return share, sum(map(count_tokens, share)) * world_info()[1] / sum(map(count_tokens, batch))


def average_gradients(model):
    """Mean of every gradient over the processes (summed by all-reduce, divided by their number)."""
    rank, world = world_info()
    if world > 1:
        import torch.distributed as dist
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world


def gather_lists(items):
    """Every process's list, concatenated in rank order, in every process. One process: items."""
    if world_info()[1] == 1:
        return list(items)
    import torch.distributed as dist
    parts = [None] * world_info()[1]
    dist.all_gather_object(parts, list(items))
    return [item for part in parts for item in part]


def split_and_gather(fn, items):
    """fn(items), computed as fn(this process's share of items) in each process; every process receives the
    whole result, in the order of items. fn returns a list, or a tuple of lists (one entry per item).
    How the RL scripts split generation: each process samples its share, all of them train on the whole."""
    result = fn(local_slice(items))
    if isinstance(result, tuple):
        return tuple(gather_lists(part) for part in result)
    return gather_lists(result)


def process_seed(seed):
    """A seed for this process's share of random work: two processes must not draw the same random numbers."""
    return seed + 1_000_003 * world_info()[0]


def average_over_processes(stats):
    """A dict of numbers averaged over the processes (NaN entries left out); for logging what each process
    measured on its own share. One process: the dict itself."""
    if world_info()[1] == 1:
        return stats
    import torch.distributed as dist
    values = torch.tensor([float(v) for v in stats.values()], dtype=torch.float64)
    finite = torch.isfinite(values)
    totals = torch.stack([torch.where(finite, values, torch.zeros_like(values)), finite.double()])
    dist.all_reduce(totals)
    means = totals[0] / totals[1]  # NaN where no process had a number
    return dict(zip(stats, means.tolist()))


def all_finite(loss):
    """Whether the loss is finite in every process (so that all of them stop together, or none)."""
    finite = torch.isfinite(loss.detach()).float().reshape(1)
    if world_info()[1] > 1:
        import torch.distributed as dist
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def cosine_lr(step, max_steps, peak_lr, warmup_steps, final_fraction=0.1):
    """Linear warmup to peak_lr, then cosine decay to final_fraction * peak_lr at max_steps."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return peak_lr * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---- scoring responses ------------------------------------------------------------------------

def pack_sequences(prompts, responses, block_size):
    """Concatenate each prompt with its response and right-pad them into one batch.

    Right padding needs no attention mask: causal attention never looks at the pads that follow.
    Prompts are cut from the left when prompt + response would exceed block_size.
    Returns idx (B, S) and the (possibly cut) prompt lengths (B,), both on the CPU.
    """
    if max(len(r) for r in responses) >= block_size:
        raise ValueError(f"a response of {max(len(r) for r in responses)} tokens leaves no room for its prompt "
                         f"in block_size={block_size}")
    prompts = [p[max(0, len(p) + len(r) - block_size):] for p, r in zip(prompts, responses)]
    idx = torch.zeros(len(prompts), max(len(p) + len(r) for p, r in zip(prompts, responses)), dtype=torch.long)
    for row, (p, r) in enumerate(zip(prompts, responses)):
        idx[row, : len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
    return idx, torch.tensor([len(p) for p in prompts])


def response_log_probs(model, prompts, responses, *, temperature=1.0, return_entropy=False):
    """Per-token log-probs of each response given its prompt: log pi(response_j | prompt, response_<j).

    prompts, responses: lists of token-id lists (see pack_sequences for padding and cutting).
    Returns logp (B, R) and mask (B, R), R = longest response, mask 1 on real response tokens
    [and the entropy (B, R) of pi at each response position when return_entropy].
    Differentiable unless called under torch.no_grad; the logits are never materialised
    (kernels.linear_log_probs walks the tokens in chunks).
    """
    from kernels import linear_log_probs

    device = model.lm_head.weight.device
    idx, prompt_lens = pack_sequences(prompts, responses, model.config.block_size)
    lengths = torch.tensor([len(r) for r in responses])
    steps = torch.arange(max(1, int(lengths.max())))
    mask = (steps[None, :] < lengths[:, None]).float()  # (B, R)
    # the hidden state at position prompt_len + j - 1 predicts response token j
    where = (prompt_lens[:, None] + steps[None, :] - 1).clamp(max=idx.shape[1] - 1) * mask.long()
    targets = idx.gather(1, (where + 1).clamp(max=idx.shape[1] - 1)) * mask.long()  # (B, R)
    hidden = model.hidden(idx.to(device))  # (B, S, d)
    where = where.to(device)
    response_hidden = hidden.gather(1, where[..., None].expand(-1, -1, hidden.shape[-1]))  # (B, R, d)
    response_hidden, weight = autocast_operands(response_hidden, model.lm_head.weight)
    mask = mask.to(device)
    if return_entropy:
        logp, entropy = linear_log_probs(response_hidden, weight, targets.to(device), temperature=temperature,
                                         return_entropy=True)
        return logp * mask, mask, entropy * mask
    logp = linear_log_probs(response_hidden, weight, targets.to(device), temperature=temperature)
    return logp * mask, mask


# ---- checkpoints -------------------------------------------------------------------------------

def save_checkpoint(path, model, *, tokenizer=None, meta=None):
    """Write config, weights, tokenizer (as plain data) and meta to path, atomically.

    The file is written to a temporary name and renamed over path only once it is complete
    (tokenizer.write_atomically), so a crash mid-write leaves the previous checkpoint in place. Weights that are not
    finite are never written: a finite loss does not make a finite step (a huge --lr, an overflowing
    backward pass), and the training loops' NaN guard only sees the loss.
    """
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd model wraps the real one
    if not all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()):
        raise SystemExit(f"error: the trained weights are not finite; {path} was not written "
                         "(the last good checkpoint is kept). Try a lower --lr.")
    checkpoint = {
        "config": dataclasses.asdict(model.config),
        "model": model.state_dict(),
        "tokenizer": tokenizer.to_dict() if tokenizer is not None else None,
        "meta": meta or {},
    }
    write_atomically(path, lambda f: torch.save(checkpoint, f), binary=True)


def load_checkpoint(path, device="cpu"):
    """Read a checkpoint written by save_checkpoint. Returns (model, tokenizer or None, meta).

    The model comes back on device in eval mode (call model.train() before training it).
    Raises FileNotFoundError when path does not exist and ValueError when it is not a readable
    checkpoint; both messages are one line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    corrupt = (f"checkpoint {path} is corrupt or not a checkpoint; "
               f"re-run the stage that writes it")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
        model = GPT(GPTConfig(**checkpoint["config"]))
        model.load_state_dict(checkpoint["model"])
        tokenizer_data, meta = checkpoint["tokenizer"], checkpoint["meta"]
    except Exception as error:
        raise ValueError(f"{corrupt} ({type(error).__name__})") from error
    tokenizer = None
    if tokenizer_data is not None:
        try:
            tokenizer = Tokenizer.from_dict(tokenizer_data)
        except ValueError as error:
            raise ValueError(f"{corrupt} (bad tokenizer data)") from error
    return model.to(device).eval(), tokenizer, meta
