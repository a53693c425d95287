"""Tests for gpt.py: the model's shapes and causality, KV-cache generation, checkpoints."""
import math
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpt import (GPT, GPTConfig, cosine_lr, load_checkpoint, pack_sequences, padding_attention_mask,  # noqa: E402
                 sample_next_token, save_checkpoint)

VOCAB, BLOCK, LAYERS, HEADS, D = 50, 64, 2, 4, 32
PROMPTS = [[3, 17, 9, 41, 5, 22, 8], [11], [7, 7, 30, 2], [45, 1, 19, 33, 12, 6, 29, 40, 4, 13]]


def tiny_config(**overrides):
    return GPTConfig(**{**dict(vocab_size=VOCAB, block_size=BLOCK, n_layer=LAYERS, n_head=HEADS,
                                n_embd=D), **overrides})


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(tiny_config(**overrides))


def opinionated_model(seed=0):
    """A random model with large weights, in float64.

    At the standard 0.02 init a random GPT barely looks at its context, so a generation bug
    (wrong positions, a leaking pad) could go unnoticed. Large weights make every output depend
    sharply on the context; float64 keeps rounding differences between the cached and uncached
    paths far below the gaps between logits, so "identical" can be asserted exactly.
    """
    model = tiny_model(seed).double()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.3)
    return model


# ---- the model -----------------------------------------------------------------------------------

def test_forward_and_hidden_shapes():
    model = tiny_model()
    idx = torch.randint(0, VOCAB, (3, 10))
    assert model(idx).shape == (3, 10, VOCAB)
    assert model.hidden(idx).shape == (3, 10, D)


def test_logits_equal_hidden_times_lm_head_weight():
    model = tiny_model()
    idx = torch.randint(0, VOCAB, (2, 12))
    assert torch.equal(model(idx), model.hidden(idx) @ model.lm_head.weight.T)


def test_lm_head_is_tied_to_token_embedding():
    model = tiny_model()
    assert model.lm_head.weight is model.token_embedding.weight
    untied = tiny_model(tie_weights=False)
    assert untied.lm_head.weight is not untied.token_embedding.weight


def test_changing_a_later_token_leaves_earlier_logits_unchanged():
    model = tiny_model()
    idx = torch.randint(0, VOCAB, (1, 16))
    changed = idx.clone()
    changed[0, 9] = (idx[0, 9] + 1) % VOCAB
    before, after = model(idx), model(changed)
    torch.testing.assert_close(before[:, :9], after[:, :9], rtol=0, atol=1e-6)
    assert not torch.allclose(before[:, 9:], after[:, 9:])  # the change is visible from position 9 on


def test_sequence_longer_than_block_size_is_rejected():
    with pytest.raises(ValueError, match="block_size"):
        tiny_model()(torch.zeros(1, BLOCK + 1, dtype=torch.long))


def test_num_params_matches_hand_count_and_counts_tied_matrix_once():
    per_layer = 2 * 2 * D + 3 * D * D + D * D + 4 * D * D + 4 * D * D  # 2 LayerNorms, qkv, proj, MLP
    tied_total = VOCAB * D + BLOCK * D + LAYERS * per_layer + 2 * D
    assert tiny_model().num_params() == tied_total
    assert tiny_model(tie_weights=False).num_params() == tied_total + VOCAB * D
    assert tiny_model().num_params(non_embedding=True) == tied_total - BLOCK * D


def test_flops_per_token_is_six_n_plus_attention_term():
    model = tiny_model()
    n = model.num_params(non_embedding=True)
    assert model.flops_per_token(40) == 6 * n + 12 * LAYERS * D * 40


def test_residual_projections_have_scaled_init():
    model = tiny_model(seed=1)
    scaled_std = 0.02 / math.sqrt(2 * LAYERS)
    for block in model.blocks:
        assert block.mlp.proj.weight.std().item() == pytest.approx(scaled_std, rel=0.1)
        assert block.mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_every_query_sees_some_key_so_a_padded_batch_has_no_nan():
    # A query that may attend to nothing gets softmax over nothing = 0/0 = NaN on some backends
    # (recent CPU kernels return 0 instead, so the mask itself is what is checked here).
    is_real = torch.tensor([[False, False, True, True], [True, True, True, True], [False, False, False, True]])
    for query_start in range(4):
        assert padding_attention_mask(is_real, query_start).any(dim=-1).all()
    model = tiny_model()
    positions = (is_real.long().cumsum(1) - 1).clamp(min=0)
    idx = torch.randint(0, VOCAB, (3, 4))
    hidden = model.hidden(idx, positions=positions, attn_mask=padding_attention_mask(is_real))
    assert torch.isfinite(hidden).all()


def test_attention_mask_is_causal_and_hides_pad_keys_but_lets_pads_see_themselves():
    is_real = torch.tensor([[False, True, True]])
    expected = torch.tensor([[True, False, False],
                             [False, True, False],
                             [False, True, True]])
    assert torch.equal(padding_attention_mask(is_real)[0, 0], expected)
    assert torch.equal(padding_attention_mask(is_real, query_start=2)[0, 0], expected[2:])


# ---- generation ------------------------------------------------------------------------------------

def test_greedy_generation_is_the_same_with_and_without_kv_cache():
    model = opinionated_model()
    cached = model.generate(PROMPTS, 12, temperature=0, use_cache=True)
    uncached = model.generate(PROMPTS, 12, temperature=0, use_cache=False)
    assert cached == uncached
    assert all(len(tokens) == 12 for tokens in cached)
    assert len({tuple(tokens) for tokens in cached}) == len(PROMPTS)  # the prompts matter


def test_greedy_batch_generation_equals_each_prompt_generated_alone():
    model = opinionated_model()
    batch = model.generate(PROMPTS, 12, temperature=0)
    alone = [model.generate([prompt], 12, temperature=0)[0] for prompt in PROMPTS]
    assert batch == alone


def test_cached_generation_matches_a_plain_argmax_loop():
    model = opinionated_model()
    prompt = PROMPTS[0]
    sequence = torch.tensor([prompt])
    for _ in range(8):
        next_token = model(sequence)[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, next_token], dim=1)
    assert model.generate([prompt], 8, temperature=0) == [sequence[0, len(prompt):].tolist()]


def test_stop_id_ends_a_row_and_is_included_while_other_rows_run_to_max_new_tokens():
    model = opinionated_model()
    prompts = PROMPTS[:2]
    full = model.generate(prompts, 10, temperature=0)
    # A stop id that row 0 first emits at position 2 or later and row 1 never emits.
    candidates = [(i, t) for i, t in enumerate(full[0]) if i >= 2 and t not in full[0][:i] and t not in full[1]]
    assert candidates, "test setup: no usable stop id in this model's output"
    stop_at, stop_id = candidates[0]
    stopped = model.generate(prompts, 10, temperature=0, stop_ids=(stop_id,))
    assert stopped[0] == full[0][:stop_at + 1]
    assert stopped[0][-1] == stop_id
    assert stopped[1] == full[1] and len(stopped[1]) == 10


def test_generation_stops_when_every_row_has_hit_a_stop_id():
    model = tiny_model()
    final_norm_calls = []  # one per forward pass through the model
    model.ln_f.register_forward_hook(lambda *args: final_norm_calls.append(1))
    out = model.generate(PROMPTS, 10, temperature=0, stop_ids=range(VOCAB))
    assert all(len(tokens) == 1 for tokens in out)
    assert len(final_norm_calls) == 1  # only the prefill ran


@pytest.mark.parametrize("use_cache, temperature, top_k", [(True, 1.0, None), (False, 1.0, None), (True, 0.0, None),
                                                         (True, 1.0, 3)])
def test_finished_rows_leave_the_batch_and_the_other_rows_sample_as_if_they_had_stayed(use_cache, temperature, top_k):
    """Replies that end are dropped from the batch (their KV-cache rows too); every other row's
    tokens, random draws included, must be what they would have been without any stop."""
    model = opinionated_model()
    prompts = [PROMPTS[i % 4][i % 3:] or [i] for i in range(12)]
    stop_ids = (2, 5, 11, 23, 37)
    options = dict(temperature=temperature, top_k=top_k, use_cache=use_cache, seed=7)
    batch_rows = []  # rows in each forward pass
    model.ln_f.register_forward_hook(lambda module, inputs, output: batch_rows.append(output.shape[0]))
    stopped = model.generate(prompts, 24, stop_ids=stop_ids, **options)
    shrank = batch_rows[-1] < len(prompts)
    full = model.generate(prompts, 24, **options)  # nothing stops: the batch never shrinks
    for got, whole in zip(stopped, full):
        first_stop = next((i for i, t in enumerate(whole) if t in stop_ids), len(whole) - 1)
        assert got == whole[:first_stop + 1]
    assert shrank, "no row left the batch: pick stop ids that end some replies early"
    assert any(len(reply) < 24 for reply in stopped) and any(len(reply) > 3 for reply in stopped)


def test_sampling_with_the_same_seed_is_reproducible_and_different_seeds_differ():
    model = tiny_model()
    first = model.generate(PROMPTS, 20, temperature=1.0, seed=123)
    torch.manual_seed(999)  # the global RNG must not matter
    second = model.generate(PROMPTS, 20, temperature=1.0, seed=123)
    other = model.generate(PROMPTS, 20, temperature=1.0, seed=124)
    assert first == second
    assert first != other


def test_top_k_of_one_is_greedy():
    model = opinionated_model()
    assert model.generate(PROMPTS, 8, temperature=1.0, top_k=1, seed=0) == \
        model.generate(PROMPTS, 8, temperature=0)


def test_top_k_samples_only_among_the_k_most_likely_tokens():
    model = tiny_model()
    prompt = PROMPTS[0]
    top3 = set(model(torch.tensor([prompt]))[0, -1].topk(3).indices.tolist())
    firsts = {model.generate([prompt], 1, temperature=1.0, top_k=3, seed=s)[0][0] for s in range(30)}
    assert firsts <= top3 and len(firsts) > 1


def test_long_prompt_is_cut_from_the_left_with_a_warning():
    model = opinionated_model()
    long_prompt = [(7 * i) % VOCAB for i in range(BLOCK + 20)]
    with pytest.warns(UserWarning, match="cut from the left"):
        out = model.generate([long_prompt], 5, temperature=0)
    assert out == model.generate([long_prompt[-(BLOCK - 5):]], 5, temperature=0)


def test_prompt_is_cut_further_so_prompt_plus_new_tokens_fit_block_size():
    model = opinionated_model()
    prompt = list(range(40))  # fits alone, but 40 + 30 > 64
    with pytest.warns(UserWarning, match="cut from the left"):
        out = model.generate([prompt], 30, temperature=0)
    assert len(out[0]) == 30
    assert out == model.generate([prompt[-(BLOCK - 30):]], 30, temperature=0)


def test_max_new_tokens_beyond_block_size_is_capped_with_a_warning():
    model = tiny_model()
    with pytest.warns(UserWarning) as warned:
        out = model.generate([[1, 2, 3]], BLOCK + 10, temperature=0)
    assert any("capped" in str(w.message) for w in warned)
    assert any("cut from the left" in str(w.message) for w in warned)  # one prompt token is left
    assert len(out[0]) == BLOCK - 1


def test_empty_prompt_is_rejected():
    with pytest.raises(ValueError, match="at least one token"):
        tiny_model().generate([[1, 2], []], 3)


def test_generate_restores_train_or_eval_mode():
    model = tiny_model(dropout=0.1)
    model.train()
    model.generate(PROMPTS, 3, temperature=0)
    assert model.training
    model.eval()
    model.generate(PROMPTS, 3, temperature=0)
    assert not model.training


def test_generation_uses_eval_mode_so_dropout_is_off():
    model = tiny_model(dropout=0.5).train()
    assert model.generate(PROMPTS, 6, temperature=0) == model.generate(PROMPTS, 6, temperature=0)


# ---- checkpoints -----------------------------------------------------------------------------------

def test_checkpoint_round_trip_restores_config_weights_and_meta(tmp_path):
    model = tiny_model(seed=3)
    path = tmp_path / "stage" / "nested" / "model.pt"  # parent folders are created
    save_checkpoint(path, model, meta={"stage": "pretrain", "step": 7})
    loaded, tokenizer, meta = load_checkpoint(path)
    idx = torch.randint(0, VOCAB, (2, 9))
    assert torch.equal(loaded(idx), model.eval()(idx))
    assert loaded.config == model.config
    assert meta == {"stage": "pretrain", "step": 7}
    assert tokenizer is None
    assert loaded.lm_head.weight is loaded.token_embedding.weight  # still one tied parameter


def test_checkpoint_round_trip_of_untied_model(tmp_path):
    model = tiny_model(seed=4, tie_weights=False)
    save_checkpoint(tmp_path / "model.pt", model)
    loaded, _, meta = load_checkpoint(tmp_path / "model.pt")
    assert meta == {}
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_checkpoint_round_trip_with_tokenizer(tmp_path):
    tokenizer_module = pytest.importorskip("tokenizer")
    tokenizer = tokenizer_module.Tokenizer.train("the cat sat on the mat. " * 20, vocab_size=270)
    save_checkpoint(tmp_path / "model.pt", tiny_model(), tokenizer=tokenizer)
    _, loaded_tokenizer, _ = load_checkpoint(tmp_path / "model.pt")
    assert loaded_tokenizer.to_dict() == tokenizer.to_dict()


def test_missing_checkpoint_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "absent.pt")


def assert_corrupt(path):
    with pytest.raises(ValueError, match="corrupt") as error:
        load_checkpoint(path)
    assert "\n" not in str(error.value)
    assert "re-run" in str(error.value)


def test_random_bytes_raise_value_error_saying_corrupt(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(os.urandom(2000))
    assert_corrupt(path)


def test_truncated_checkpoint_raises_value_error_saying_corrupt(tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(path, tiny_model())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert_corrupt(path)


def test_torch_file_that_is_not_a_checkpoint_raises_value_error(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    assert_corrupt(path)


def test_save_leaves_no_temporary_file(tmp_path):
    save_checkpoint(tmp_path / "model.pt", tiny_model())
    save_checkpoint(tmp_path / "model.pt", tiny_model(seed=1))  # overwriting too
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(path, tiny_model(), meta={"step": 1})
    with pytest.raises(Exception):
        save_checkpoint(path, tiny_model(seed=1), meta={"step": 2, "unsaveable": lambda: None})
    _, _, meta = load_checkpoint(path)
    assert meta == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_save_refuses_non_finite_weights_and_keeps_the_previous_checkpoint(tmp_path):
    # a finite loss can still make a non-finite step (a huge --lr): the loops' NaN guard only sees the loss
    path = tmp_path / "model.pt"
    save_checkpoint(path, tiny_model(), meta={"step": 1})
    broken = tiny_model(seed=1)
    with torch.no_grad():
        broken.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(SystemExit, match="not finite"):
        save_checkpoint(path, broken, meta={"step": 2})
    _, _, meta = load_checkpoint(path)
    assert meta == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_saved_checkpoint_follows_the_umask(tmp_path):
    # a temporary file from tempfile.mkstemp is 0600, so a shared out/ would be unreadable by others
    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "model.pt", tiny_model())
        save_checkpoint(tmp_path / "model.pt", tiny_model(seed=1))  # over an existing one
    finally:
        os.umask(old)
    assert (tmp_path / "model.pt").stat().st_mode & 0o777 == 0o644


def test_kv_cache_feeds_one_new_token_per_step_after_the_prefill():
    torch.manual_seed(0)
    model = GPT(GPTConfig(50, 64, n_layer=2, n_head=4, n_embd=32))
    columns = []  # columns of each forward pass
    model.ln_f.register_forward_hook(lambda module, inputs, output: columns.append(output.shape[1]))
    prompts = [[3, 17, 9, 41, 5], [11], [7, 7, 30]]
    model.generate(prompts, 6, temperature=0, use_cache=True)
    assert columns == [5] + [1] * 5


def test_sample_next_token_samples_from_softmax_of_logits_over_temperature():
    logits = torch.randn(64, 10, generator=torch.Generator().manual_seed(0)) * 2.0
    for temperature in (0.5, 2.0):
        got = sample_next_token(logits, temperature, None, torch.Generator().manual_seed(3))
        probs = torch.softmax(logits / temperature, dim=-1)
        expected = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(3)).squeeze(1)
        assert torch.equal(got, expected), temperature


def test_pack_sequences_right_pads_and_cuts_long_prompts_from_the_left():
    idx, prompt_lens = pack_sequences([[1, 2, 3, 4, 5, 6], [7]], [[8, 9], [10, 11, 12]], block_size=5)
    assert idx.tolist() == [[4, 5, 6, 8, 9], [7, 10, 11, 12, 0]]
    assert prompt_lens.tolist() == [3, 1]


def test_cosine_lr_warms_up_linearly_then_decays_to_the_floor():
    lr = lambda step: cosine_lr(step, max_steps=20, peak_lr=2.0, warmup_steps=4)  # noqa: E731
    assert [lr(s) for s in range(4)] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert lr(4) == pytest.approx(2.0)
    assert lr(12) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))  # halfway through the decay
    assert lr(20) == pytest.approx(0.2) and lr(30) == pytest.approx(0.2)
