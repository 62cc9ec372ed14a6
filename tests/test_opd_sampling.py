"""OPD rollouts on a tiny model: every end token stops a rollout (as in evals), and the micro-batch default."""

from __future__ import annotations

import copy

import pytest
import torch

from continual_opd.config import OPDStage
from continual_opd.generation import generate, stop_token_ids
from continual_opd.stages.opd import auto_micro_batch_size, sample


def _always_emits(model, token_id: int):
    """Replace the LM head so that every position predicts `token_id` with probability ~1."""
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-30.0)
        head.bias[token_id] = 30.0
    model.lm_head = head
    return model


def _stage(**kw):
    return OPDStage(name="opd", kind="opd", prompts=["p.jsonl"], **kw)


def test_rollouts_stop_on_every_end_token_of_the_generation_config(tiny_lm):
    model, tok = tiny_lm
    model = copy.deepcopy(model)
    second_end = tok.convert_tokens_to_ids("<|system|>")  # stands in for Qwen's <|endoftext|>
    model.generation_config.eos_token_id = [tok.eos_token_id, second_end]
    _always_emits(model, second_end)
    assert stop_token_ids(model, tok) == [tok.eos_token_id, second_end]
    r = sample(model, tok, ["Say hi.", "Write a longer poem please."],
               _stage(max_new_tokens=8, samples_per_prompt=2), {})
    ids_BT, mask_BL, truncated_B = r.ids_BT, r.response_mask_BL, r.truncated_B
    assert mask_BL.shape == (4, 1)  # generation stopped right after the second end token
    assert mask_BL.all() and not truncated_B.any()  # the end token is part of the response
    assert (ids_BT[:, -1] == second_end).all()
    # evals stop on the same ids
    assert generate(model, tok, ["Say hi."], max_new_tokens=8, batch_size=1) == [""]


def test_response_mask_includes_the_first_end_token_and_excludes_what_follows(tiny_lm):
    model, tok = tiny_lm
    model = copy.deepcopy(model)
    _always_emits(model, tok.eos_token_id)
    r = sample(model, tok, ["a", "a much longer prompt than a"], _stage(max_new_tokens=5, samples_per_prompt=1), {})
    assert r.response_mask_BL.tolist() == [[True], [True]]
    # left-padded prompts: attention covers the real prompt tokens and the response; positions count from 0
    for row_attn, row_pos in zip(r.attention_BT, r.positions_BT):
        first = int(row_attn.argmax())
        assert row_attn[first:].all() and not row_attn[:first].any()
        assert row_pos[first:].tolist() == list(range(len(row_attn) - first))


def test_truncated_rollouts_are_flagged_and_fully_masked(tiny_lm):
    model, tok = tiny_lm
    model = copy.deepcopy(model)
    _always_emits(model, tok.convert_tokens_to_ids("<|user|>"))  # never an end token
    r = sample(model, tok, ["a"], _stage(max_new_tokens=4, samples_per_prompt=3), {})
    assert r.response_mask_BL.shape == (3, 4) and r.response_mask_BL.all() and r.truncated_B.all()


def test_rollout_masks_and_positions_from_known_ids():
    """Two rows after left-padded prompts: stop in the middle (then padding), and no stop at all."""
    from continual_opd.generation import rollouts_from_ids

    END, PAD = 2, 0
    prompt = torch.tensor([[PAD, 7, 8], [5, 6, 7]])
    prompt_attn = torch.tensor([[0, 1, 1], [1, 1, 1]])
    resp = torch.tensor([[9, END, PAD, PAD], [9, 9, 9, 9]])
    r = rollouts_from_ids(prompt, prompt_attn, resp, [END, 99])
    assert r.response_mask_BL.tolist() == [[True, True, False, False], [True] * 4]  # the end token is included
    assert r.truncated_B.tolist() == [False, True]
    assert r.attention_BT.tolist() == [[0, 1, 1, 1, 1, 0, 0], [1] * 7]
    assert r.positions_BT[0, 1:5].tolist() == [0, 1, 2, 3] and r.positions_BT[1].tolist() == list(range(7))
    assert r.tokens_BL.tolist() == resp.tolist()


@pytest.mark.parametrize("n, L, V, budget, want", [
    (256, 1024, 151_936, 1024, 1),   # Qwen3, 1024-token answers: 594 MiB per rollout
    (256, 128, 151_936, 1024, 13),   # 129 * 151936 * 4 B = 74.8 MiB per rollout
    (32, 48, 2048, 1024, 32),        # the demo: everything in one pass
    (8, 4096, 262_144, 1024, 1),     # one rollout over budget: still 1, never 0
])
def test_auto_micro_batch_size(n, L, V, budget, want):
    got = auto_micro_batch_size(n, L, V, budget)
    assert got == want
    if got > 1:  # within budget, and one more would not be
        assert got * (L + 1) * V * 4 <= budget * 2**20 < (got + 1) * (L + 1) * V * 4 or got == n


def test_micro_batch_default_is_auto_and_bounded():
    stage = _stage()
    assert stage.micro_batch_size is None and stage.logits_budget_mb == 256
    # SmolLM2 at 128 new tokens: 129 x 49152 x 4 B = 24.2 MiB a rollout -> 10 per micro-batch of 16
    assert auto_micro_batch_size(16, 128, 49152, stage.logits_budget_mb) == 10
