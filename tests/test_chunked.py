"""Chunked divergences (stages/chunked.py): the OPD step computed from hidden states a chunk of positions at a time
gives the loss, the stats and the gradients of the step on full (B, L, V) logits, for every estimator and every
teacher placement; the KL monitor keeps no (B, T, V) tensor and still gives the exact KL."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import build_tiny_lm
from continual_opd import models
from continual_opd.config import LoraConfig
from continual_opd.evals.kl_monitor import KLMonitor
from continual_opd.stages import chunked, losses
from continual_opd.stages.opd import opd_step, response_logits
from test_opd_step import PROMPTS, _fixed_rollouts, _stage

ESTIMATORS = [("sampled", {}), ("sampled", {"gamma": 0.9}), ("full", {}), ("forward", {}), ("jsd", {"beta": 0.3})]
TINY_BUDGET_MB = 0.12  # 3 rows per chunk at the tiny vocabulary: every micro-batch spans several chunks


def _tied(seed: int = 0):
    model, tok = build_tiny_lm(seed)
    cfg = copy.deepcopy(model.config)
    cfg.tie_word_embeddings = True
    torch.manual_seed(seed)
    tied = type(model)(cfg)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    return tied, tok


def _students():
    """name -> (student, teacher): full fine-tuning with a separate teacher (untied and tied heads), LoRA with the
    adapter-disabled teacher, LoRA that also adapts lm_head (the teacher's head must run with the adapter off)."""
    base, tok = build_tiny_lm(seed=0)
    teacher, _ = build_tiny_lm(seed=1)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(10.0)
    teacher.eval().requires_grad_(False)
    tied, _ = _tied(seed=2)
    out = {"full": (base, teacher), "full-tied": (tied, teacher)}
    for name, targets in (("lora", "all-linear"), ("lora-head", ["q_proj", "v_proj", "lm_head"])):
        student = models.prepare_for_stage(copy.deepcopy(base), "lora", LoraConfig(r=4, alpha=8,
                                                                                   target_modules=targets))
        with torch.no_grad():  # a trained adapter: the student differs from its adapter-disabled teacher
            for n, p in student.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(n)))
        out[name] = (student, None)
    return out, tok


@pytest.fixture(scope="module")
def setups():
    return _students()


def _step(student0, teacher0, rollouts, stage, chunk: bool):
    student = copy.deepcopy(student0).train()
    with models.teacher_view(student, models.ModelRef("base"), "base", None) if teacher0 is None else \
            _same(teacher0) as teacher:
        opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.0)
        row = opd_step(student, teacher, rollouts, stage, opt, chunk=chunk)
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return row, grads


class _same:
    def __init__(self, x):
        self.x = x

    def __enter__(self):
        return self.x

    def __exit__(self, *a):
        return False


@pytest.mark.parametrize("name", ["full", "full-tied", "lora", "lora-head"])
@pytest.mark.parametrize("loss,kw", ESTIMATORS)
def test_chunked_step_equals_the_step_on_full_logits(setups, name, loss, kw):
    """Uneven masks (answers of 1-5 tokens), 2 micro-batches, 3 positions a chunk: within 1e-5 relative (fp32)."""
    (student, teacher), tok = setups[0][name], setups[1]
    rollouts = _fixed_rollouts(tok)
    stage = _stage(loss=loss, micro_batch_size=4, logits_budget_mb=TINY_BUDGET_MB, max_grad_norm=1e9, **kw)
    assert chunked.rows_per_chunk(len(tok), TINY_BUDGET_MB) < int(rollouts.response_mask_BL[:4].sum())
    assert chunked.can_chunk(student)
    row0, g0 = _step(student, teacher, rollouts, stage, chunk=False)
    row1, g1 = _step(student, teacher, rollouts, stage, chunk=True)
    assert set(g0) == set(g1) and g0
    for n in g0:
        scale = float(g0[n].abs().max())
        assert scale > 0 or "lora_A" in n, n  # the gradient reaches every trainable parameter
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-5 * max(scale, 1e-8),
                                   msg=lambda m, n=n: f"{n}: {m}")
    for k in ("loss", "teacher_kl", "student_entropy", "grad_norm", "tokens_sampled"):
        assert row1[k] == pytest.approx(row0[k], rel=1e-5, abs=1e-7), k  # abs: a loss near 0 by cancellation
    if loss != "sampled":
        assert row1["forward_kl"] == pytest.approx(row0["forward_kl"], rel=1e-5)
    if name.startswith("lora"):
        assert abs(row0["teacher_kl"]) > 1e-3  # the adapter-disabled teacher differs from the student


def test_chunked_loss_matches_a_softcapped_head():
    """A head with a final logit soft-cap (Gemma 2): the chunks apply it as the model's forward does."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    _, tok = build_tiny_lm(0)
    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=0.05,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    student, teacher = Gemma2ForCausalLM(cfg), Gemma2ForCausalLM(cfg).requires_grad_(False)
    rollouts = _fixed_rollouts(tok)
    stage = _stage(loss="full", logits_budget_mb=TINY_BUDGET_MB, max_grad_norm=1e9)
    L = rollouts.response_mask_BL.shape[1]
    with torch.no_grad():  # the cap binds: raw logits exceed it
        z = student(input_ids=rollouts.ids_BT, attention_mask=rollouts.attention_BT).logits
        h = chunked.response_hidden(student, rollouts.ids_BT, rollouts.attention_BT, rollouts.positions_BT, L)
        assert float(z.abs().max()) <= 0.05 < float(chunked.Head(student).module(h).abs().max())
    row0, g0 = _step(student, teacher, rollouts, stage, chunk=False)
    row1, g1 = _step(student, teacher, rollouts, stage, chunk=True)
    assert row1["loss"] == pytest.approx(row0["loss"], rel=1e-5)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-5 * float(g0[n].abs().max()))


def test_response_hidden_is_what_the_head_reads(tiny_lm):
    model, tok = tiny_lm
    r = _fixed_rollouts(tok)
    L = r.response_mask_BL.shape[1]
    with torch.no_grad():
        h = chunked.response_hidden(model, r.ids_BT, r.attention_BT, r.positions_BT, L)
        torch.testing.assert_close(chunked.Head(model)(h), response_logits(model, r.ids_BT, r.attention_BT,
                                                                            r.positions_BT, L))


@pytest.mark.parametrize("vocab,budget,want", [(49_152, 256, 48), (151_936, 256, 15), (151_936, 1, 1),
                                               (100, 0.12, 11)])
def test_rows_per_chunk(vocab, budget, want):
    assert chunked.rows_per_chunk(vocab, budget) == want
    assert (want + 1) * vocab * 4 * chunked.CHUNK_COPIES > budget * 2**20 or want == 1


def test_an_empty_mask_gives_zero_loss_with_a_graph(tiny_lm):
    model, tok = tiny_lm
    student = copy.deepcopy(model).train()
    h = torch.zeros(0, 32, requires_grad=True)
    loss, _ = chunked.full_vocab_loss(losses.full_reverse_kl_loss, chunked.Head(student),
                                      chunked.Head(model, frozen=True), h, h.detach(), 4)
    assert float(loss.detach()) == 0.0 and loss.requires_grad


# ------------------------------------------------------------------------------------------------ KL monitor


def _exact_kl(model, ref, mon: KLMonitor) -> float:
    with torch.no_grad():
        s = model(input_ids=mon.input_ids, attention_mask=mon.attention_mask).logits[:, :-1]
        q = ref(input_ids=mon.input_ids, attention_mask=mon.attention_mask).logits[:, :-1]
        return losses.full_reverse_kl_loss(s, q, mon.response_mask[:, 1:])[0].item()


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_kl_monitor_is_exact_and_stores_no_vocabulary_sized_tensor(tmp_path, tiny_lm, finetune):
    model, tok = tiny_lm
    prompts = tmp_path / "kl.jsonl"
    prompts.write_text("".join(f'{{"prompt": "{p}"}}\n' for p in PROMPTS))
    student = models.prepare_for_stage(copy.deepcopy(model), finetune, LoraConfig(r=4, alpha=8))
    ref = copy.deepcopy(student).eval()
    mon = KLMonitor.from_file(prompts, tok, student, n=6, max_new_tokens=8)
    assert mon.kl(student) == pytest.approx(0.0, abs=1e-6)
    V = len(tok)
    held = [v for v in vars(mon).values() if isinstance(v, torch.Tensor)]
    assert held and all(V not in t.shape for t in held), [t.shape for t in held]
    with torch.no_grad():  # training moves the student (and, under full fine-tuning, its head)
        for n, p in student.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.2)
    want = _exact_kl(student, ref, mon)
    assert want > 1e-3
    assert mon.kl(student) == pytest.approx(want, rel=1e-5)
