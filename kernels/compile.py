"""When to run a kernel through torch.compile.

torch.compile turns a chain of PyTorch ops into one generated kernel (on CUDA, Triton code), which
saves memory traffic and launch overhead. It pays off on a GPU; on a laptop CPU the compile takes
longer than the run saves, so the default is:

    on CUDA tensors: compiled        on CPU tensors: eager

and the environment variable KERNELS_COMPILE forces either way ("1" = always compile, "0" = never).
The variable is read at every call, so a test can flip it.

Recompiles: a compiled function is specialised to the shapes it sees, and after dynamo's recompile
limit (8 by default) it silently falls back to eager. The chunked kernels therefore only ever call
their compiled chunk functions with a fixed number of rows (the last, short chunk is padded up to the
chunk size: "pad to buckets"), so a whole training run with varying sequence lengths compiles once per
(chunk size, d, V, dtype).
"""

import os

import torch


def compile_enabled(device: torch.device) -> bool:
    """True if kernels on `device` should run compiled (see the module docstring)."""
    flag = os.environ.get("KERNELS_COMPILE", "").strip().lower()
    if flag in ("1", "true", "yes", "on"):
        return True
    if flag in ("0", "false", "no", "off"):
        return False
    if flag:
        raise ValueError(f"KERNELS_COMPILE must be 1 or 0, got {flag!r}")
    return device.type == "cuda"


def maybe_compiled(fn):
    """Wrap `fn` so it runs compiled or eager by the device of its first tensor argument.

    The compiled version is built on first use, with static shapes (dynamic=False): callers bound the
    shapes they pass (see the module docstring).
    """
    compiled = None

    def dispatch(*args):
        nonlocal compiled
        if not compile_enabled(args[0].device):
            return fn(*args)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=False)
        return compiled(*args)

    dispatch.__name__ = fn.__name__
    dispatch.__doc__ = fn.__doc__
    dispatch.eager = fn
    return dispatch
