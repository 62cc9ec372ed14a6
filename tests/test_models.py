"""Teacher snapshots and tokenizer compatibility."""

import copy

import pytest
import torch

from continual_opd import models
from continual_opd.config import LoraConfig, ModelConfig
from continual_opd.errors import ModelError
from conftest import build_tiny_lm


def _logits(m, ids):
    with torch.no_grad():
        return m(input_ids=ids).logits


def test_adapter_disabled_teacher_equals_base_before_and_differs_after_training(tmp_path):
    base, tok = build_tiny_lm()
    base.save_pretrained(tmp_path / "base")
    ids = torch.tensor([[5, 17, 40, 33, 9]])
    want = _logits(base, ids)
    student = models.prepare_for_stage(copy.deepcopy(base), "lora", LoraConfig(r=4, alpha=8))
    with models.teacher_view(student, models.ModelRef(str(tmp_path / "base")), str(tmp_path / "base"),
                             ModelConfig()) as teacher:
        assert isinstance(teacher, models._AdapterDisabled)  # no second model loaded
        torch.testing.assert_close(_logits(teacher, ids), want)
        torch.testing.assert_close(_logits(student, ids), want)  # fresh LoRA: B = 0
        opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(3):
            loss = student(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert (_logits(student, ids) - want).abs().max() > 1e-3  # the student moved
        torch.testing.assert_close(_logits(teacher, ids), want)  # the teacher did not
        assert not any(p.grad is not None and p.requires_grad is False for p in student.parameters())


def test_full_finetune_teacher_is_loaded_frozen(tmp_path):
    base, tok = build_tiny_lm()
    base.save_pretrained(tmp_path / "base")
    student = models.prepare_for_stage(copy.deepcopy(base), "full", LoraConfig())
    with models.teacher_view(student, models.ModelRef(str(tmp_path / "base")), str(tmp_path / "base"),
                             ModelConfig()) as teacher:
        assert teacher is not student and not teacher.training
        assert all(not p.requires_grad for p in teacher.parameters())


def test_same_tokenizer_passes_and_template_mismatch_is_an_error():
    _, tok = build_tiny_lm()
    models.check_same_tokenization(tok, copy.deepcopy(tok), {}, student="s", teacher="t")
    other = copy.deepcopy(tok)
    other.chat_template = other.chat_template.replace("<|assistant|>", "<|user|>")
    with pytest.raises(ModelError, match="render the chat template differently"):
        models.check_same_tokenization(tok, other, {}, student="s", teacher="t")


def test_vocab_mismatch_is_an_error():
    _, tok = build_tiny_lm()
    other = copy.deepcopy(tok)
    other.add_tokens(["<extra_token>"])
    with pytest.raises(ModelError, match="different vocabularies"):
        models.check_same_tokenization(tok, other, {}, student="s", teacher="t")


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="cannot load"):
        models.load_model(models.ModelRef(str(tmp_path / "nope")), ModelConfig())
