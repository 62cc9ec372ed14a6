"""`opd_step` on the tiny model: it learns (KL to a fixed teacher falls), its loss is pinned, micro-batching does not
change the gradient, a non-finite loss leaves the parameters alone, and the LR schedule is right."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from continual_opd.config import OPDStage
from continual_opd.generation import rollouts_from_ids
from continual_opd.stages import losses
from continual_opd.stages.opd import NonFiniteLoss, lr_factor, opd_step, response_logits, sample
from conftest import build_tiny_lm

PROMPTS = ["Name a fruit.", "Write a short poem.", "What is 2 plus 3?", "Answer in lowercase letters only.",
           "Do not use any commas.", "Say hello to Paris."]
ESTIMATORS = ["sampled", "full", "forward", "jsd"]


@pytest.fixture(scope="module")
def pair():
    """A student and a different (fixed, frozen) teacher with the same tokenizer."""
    student, tok = build_tiny_lm(seed=0)
    teacher, _ = build_tiny_lm(seed=1)
    with torch.no_grad():  # random tiny models are near-uniform; a peaked teacher is far from the student
        teacher.lm_head.weight.mul_(10.0)
    teacher.eval().requires_grad_(False)
    return student, teacher, tok


def _stage(**kw) -> OPDStage:
    kw = {"prompts_per_step": len(PROMPTS), "samples_per_prompt": 4, "max_new_tokens": 6, **kw}
    return OPDStage(name="opd", kind="opd", prompts=["p.jsonl"], **kw)


def _fixed_rollouts(tok, lengths=(1, 2, 3, 4, 5, 5)):
    """Deterministic rollouts of different response lengths (a stop token ends all but the last)."""
    g = torch.Generator().manual_seed(0)
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in PROMPTS[:len(lengths)]]
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    tok.padding_side = "right"
    L = max(lengths)
    resp = torch.randint(10, len(tok) - 10, (len(lengths), L), generator=g)
    for b, n in enumerate(lengths):
        if n < L or b < len(lengths) - 1:
            resp[b, n - 1] = tok.eos_token_id
            resp[b, n:] = tok.pad_token_id
    return rollouts_from_ids(enc["input_ids"], enc["attention_mask"], resp, [tok.eos_token_id])


def _exact_reverse_kl(student, teacher, r) -> float:
    L = r.response_mask_BL.shape[1]
    with torch.no_grad():
        s = response_logits(student, r.ids_BT, r.attention_BT, r.positions_BT, L)
        t = response_logits(teacher, r.ids_BT, r.attention_BT, r.positions_BT, L)
        return losses.full_reverse_kl_loss(s, t, r.response_mask_BL)[0].item()


@pytest.mark.parametrize("loss", ESTIMATORS)
def test_every_estimator_moves_the_student_toward_a_fixed_teacher(pair, loss):
    """Five on-policy steps lower the exact reverse KL on held-out rollouts, step after step (plain SGD, so the
    update is the estimator's gradient itself; 96 rollouts a step keep the sampled estimator's noise small)."""
    student0, teacher, tok = pair
    student = copy.deepcopy(student0).train()
    stage = _stage(loss=loss, lr=1.0, samples_per_prompt=16, max_grad_norm=1e9)
    torch.manual_seed(0)
    held_out = sample(student, tok, PROMPTS, stage, {})  # the initial student's answers, scored before and after
    kls = [_exact_reverse_kl(student, teacher, held_out)]
    opt = torch.optim.SGD(student.parameters(), lr=stage.learning_rate)
    start = {k: v.clone() for k, v in student.state_dict().items()}
    for _ in range(5):
        opd_step(student, teacher, sample(student, tok, PROMPTS, stage, {}), stage, opt)
        kls.append(_exact_reverse_kl(student, teacher, held_out))
    assert any(not torch.equal(start[k], v) for k, v in student.state_dict().items())
    assert all(b < a for a, b in zip(kls, kls[1:])), (loss, kls)
    assert kls[-1] < 0.985 * kls[0], (loss, kls)


def test_seeded_step_values_are_pinned(pair):
    """Fixed rollouts, fixed models: the step's numbers are a regression check for the whole update path."""
    student0, teacher, tok = pair
    r = _fixed_rollouts(tok)
    got = {}
    for loss in ESTIMATORS:
        student = copy.deepcopy(student0).train()
        stage = _stage(loss=loss, **({"beta": 0.5} if loss == "jsd" else {}))
        row = opd_step(student, teacher, r, stage, torch.optim.SGD(student.parameters(), lr=0.1))
        got[loss] = (row["loss"], row["teacher_kl"], _exact_reverse_kl(student, teacher, r))
    want = PINNED
    for loss in ESTIMATORS:
        assert got[loss] == pytest.approx(want[loss], rel=1e-4, abs=1e-6), (loss, got[loss])


# (loss, teacher_kl, exact reverse KL after one SGD step at lr 0.1); exact KL before the step: 0.62764.
# Measured on torch 2.13 CPU, fp32. `sampled` and `full` start from the same KL (0.5669 is the sampled-token
# estimate on these fixed tokens, 0.6276 the exact value); forward/jsd log the exact reverse KL as teacher_kl.
PINNED = {
    "sampled": (0.5668773651123047, 0.5668773651123047, 0.6268247365951538),
    "full": (0.6276394128799438, 0.6276394128799438, 0.6239678263664246),
    "forward": (0.6106937527656555, 0.6276394128799438, 0.624664306640625),
    "jsd": (0.5372804999351501, 0.6276394128799438, 0.6250494122505188),
}


@pytest.mark.parametrize("loss", ["sampled", "full"])
def test_micro_batch_of_one_gives_the_full_batch_update(pair, loss):
    student0, teacher, tok = pair
    r = _fixed_rollouts(tok)  # responses of 1..5 tokens: the micro-batches' token shares differ
    params, rows = {}, {}
    for mb in (None, 1, 4):
        student = copy.deepcopy(student0).train()
        stage = _stage(loss=loss, micro_batch_size=mb, max_grad_norm=1e9)
        rows[mb] = opd_step(student, teacher, r, stage, torch.optim.SGD(student.parameters(), lr=1.0))
        assert rows[mb]["micro_batch_size"] == (mb or len(r))
        params[mb] = student.state_dict()
    for mb in (1, 4):
        for k in ("loss", "teacher_kl", "student_entropy", "grad_norm", "response_len"):  # monitors too
            assert rows[mb][k] == pytest.approx(rows[None][k], rel=1e-5), (mb, k)
        for k, v in params[None].items():
            torch.testing.assert_close(params[mb][k], v, rtol=1e-5, atol=1e-6, msg=f"micro_batch_size={mb}: {k}")


def test_non_finite_loss_raises_before_the_update(pair):
    student0, teacher0, tok = pair
    student, teacher = copy.deepcopy(student0).train(), copy.deepcopy(teacher0)
    with torch.no_grad():
        teacher.lm_head.weight.fill_(float("nan"))
    start = {k: v.clone() for k, v in student.state_dict().items()}
    opt = torch.optim.SGD(student.parameters(), lr=1.0)
    with pytest.raises(NonFiniteLoss):
        opd_step(student, teacher, _fixed_rollouts(tok), _stage(loss="full"), opt)
    assert all(torch.equal(start[k], v) for k, v in student.state_dict().items())
    assert all(p.grad is None for p in student.parameters())


@pytest.mark.parametrize("schedule, want", [
    # steps=5, warmup=2: warmup (i + 1) / 2, then decay from 1 at i=2 towards 0 at i=5
    ("constant", [0.5, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [0.5, 1.0, 1.0, 2 / 3, 1 / 3]),
    ("cosine", [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 3)), 0.5 * (1 + math.cos(2 * math.pi / 3))]),
])
def test_lr_schedule_at_warmup_middle_and_end(schedule, want):
    stage = _stage(steps=5, warmup_steps=2, lr_scheduler=schedule)
    assert [lr_factor(i, stage) for i in range(5)] == pytest.approx(want)


def test_opd_step_logs_the_rate_each_update_used(pair):
    student0, teacher, tok = pair
    student = copy.deepcopy(student0).train()
    stage = _stage(loss="full", steps=4, warmup_steps=1, lr_scheduler="linear", lr=0.01)
    opt = torch.optim.SGD(student.parameters(), lr=stage.learning_rate)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, stage))
    r = _fixed_rollouts(tok)
    lrs = [opd_step(student, teacher, r, stage, opt, scheduler=sched)["lr"] for _ in range(4)]
    assert lrs == pytest.approx([0.01, 0.01, 0.01 * 2 / 3, 0.01 / 3])
