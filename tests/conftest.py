"""Fixtures shared by the test files: a small tokenizer trained on the toy internet, tiny seeded GPTs,
and the numbered scripts loaded as modules (their names start with a digit, so `import` cannot)."""

import importlib.util
from pathlib import Path

import pytest
import torch

import world
from gpt import GPT, GPTConfig
from tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def toy_tokenizer():
    docs = world.toy_internet(400, seed=0)
    return Tokenizer.train([world.document_text(d) for d in docs], 400)


@pytest.fixture
def make_gpt(toy_tokenizer):
    """A tiny GPT over the toy tokenizer, seeded (block 256 holds the longest chat prompts)."""
    def make(seed=0, block_size=256):
        torch.manual_seed(seed)
        return GPT(GPTConfig(toy_tokenizer.vocab_size, block_size, n_layer=1, n_head=2, n_embd=32))
    return make


def load_script(filename):
    """A numbered script as a module (its main() is not run)."""
    spec = importlib.util.spec_from_file_location(filename.replace(".py", "").replace("0", "s0", 1),
                                                  ROOT / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
