"""Batched chat generation: order, determinism, stopping, and that the model/tokenizer come back unchanged."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from continual_opd.errors import ModelError
from continual_opd.generation import generate, render_prompts

PROMPTS = [
    "hi",
    "What is 2 plus 3?",
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a short poem about the cat."}],
    "Do not use any commas.",
    "x",
]


@contextlib.contextmanager
def forced_token(model, token_id: int):
    """Make the model always predict `token_id`: a known answer for stop/length tests."""

    def hook(module, inputs, logits):
        bias = torch.zeros(logits.shape[-1], dtype=logits.dtype)
        bias[token_id] = 1e4
        return logits + bias

    handle = model.lm_head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def test_render_prompts_wraps_strings_and_adds_generation_prompt(tiny_lm):
    _, tok = tiny_lm
    texts = render_prompts(tok, ["hello", [{"role": "user", "content": "hello"}]])
    assert texts[0] == texts[1] == "<|user|>\nhello<|end|>\n<|assistant|>\n"


def test_render_prompts_passes_template_kwargs(tiny_lm):
    _, tok = tiny_lm
    tok = copy.deepcopy(tok)
    tok.chat_template = "{% if shout %}LOUD {% endif %}{{ messages[0]['content'] }}"
    assert render_prompts(tok, ["a"], {"shout": True}) == ["LOUD a"]
    assert render_prompts(tok, ["a"]) == ["a"]


def test_missing_chat_template_is_a_clear_error(tiny_lm):
    _, tok = tiny_lm
    tok = copy.deepcopy(tok)
    tok.chat_template = None
    with pytest.raises(ModelError, match="no chat template"):
        render_prompts(tok, ["a"])


def test_one_output_per_prompt_in_order_and_independent_of_batching(tiny_lm):
    model, tok = tiny_lm
    batched = generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=3)
    one_by_one = [generate(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in PROMPTS]
    assert len(batched) == len(PROMPTS) and all(isinstance(s, str) for s in batched)
    # Length sorting reorders prompts internally; outputs must still line up with the inputs.
    assert batched == one_by_one


def test_greedy_is_deterministic(tiny_lm):
    model, tok = tiny_lm
    assert generate(model, tok, PROMPTS, max_new_tokens=8, batch_size=2) == generate(
        model, tok, PROMPTS, max_new_tokens=8, batch_size=2
    )


def test_sampling_is_reproducible_with_seed(tiny_lm):
    model, tok = tiny_lm
    kw = dict(max_new_tokens=8, batch_size=2, do_sample=True, temperature=1.0, top_p=0.9)
    a = generate(model, tok, PROMPTS, seed=3, **kw)
    assert a == generate(model, tok, PROMPTS, seed=3, **kw)


def test_respects_max_new_tokens(tiny_lm):
    model, tok = tiny_lm
    the = tok.convert_tokens_to_ids("the")
    assert tok.convert_ids_to_tokens(the) == "the"
    with forced_token(model, the):
        out = generate(model, tok, PROMPTS, max_new_tokens=3, batch_size=2)
    assert out == ["thethethe"] * len(PROMPTS)


def test_stops_at_eos_and_skips_special_tokens(tiny_lm):
    model, tok = tiny_lm
    with forced_token(model, tok.eos_token_id):
        out = generate(model, tok, PROMPTS, max_new_tokens=5, batch_size=5)
    assert out == [""] * len(PROMPTS)


def test_restores_model_mode_and_padding_side(tiny_lm):
    model, tok = tiny_lm
    model.train()
    tok.padding_side = "right"
    try:
        generate(model, tok, ["hi"], max_new_tokens=2, batch_size=1)
        assert model.training and tok.padding_side == "right"
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.eval()


def test_empty_prompt_list_and_bad_arguments(tiny_lm):
    model, tok = tiny_lm
    assert generate(model, tok, [], max_new_tokens=2, batch_size=1) == []
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, tok, ["hi"], max_new_tokens=0, batch_size=1)


def test_progress_bar_with_description(tiny_lm, capsys):
    model, tok = tiny_lm
    generate(model, tok, PROMPTS, max_new_tokens=2, batch_size=2, progress="eval demo")
    err = capsys.readouterr().err
    assert "eval demo" in err and f"{len(PROMPTS)}/{len(PROMPTS)}" in err


def test_tokenizer_without_pad_token_pads_with_eos_and_is_restored(tiny_lm):
    model, tok = tiny_lm
    tok = copy.deepcopy(tok)
    tok.pad_token = None
    out = generate(model, tok, PROMPTS, max_new_tokens=4, batch_size=5)
    assert out == generate(model, tiny_lm[1], PROMPTS, max_new_tokens=4, batch_size=5)
    assert tok.pad_token is None
