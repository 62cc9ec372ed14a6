"""The vLLM sampler on CPU, with a fake engine behind TRL's real `VLLMGeneration`: the student's weights reach the
engine after every OPD step (full fine-tuning and LoRA, with and without sleep mode), and its rollouts are masked
like HF's."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from continual_opd.config import OPDStage
from continual_opd.generation import stop_token_ids
from continual_opd.generation import rollouts_from_lists
from continual_opd.samplers import VLLMSampler
from continual_opd.stages.opd import opd_step
from conftest import build_tiny_lm

vllm_generation = pytest.importorskip("trl.generation.vllm_generation")
PROMPTS = ["Name a fruit.", "Write a short poem.", "What is 2 plus 3?", "Say hello to Paris."]


class FakeLLM:
    """What `VLLMGeneration` uses of `vllm.LLM`: load_weights on the driver's model, generate, sleep/wake, cache reset.
    It keeps its own copy of the model (as vLLM does), so it only sees weights that were pushed to it."""

    def __init__(self, hf_model):
        from peft import PeftModel

        # vLLM loads the checkpoint from disk: for a LoRA student, that is the base without the adapter
        self.copy = (copy.deepcopy(hf_model).unload() if isinstance(hf_model, PeftModel)
                     else copy.deepcopy(hf_model)).eval()
        for p in self.copy.parameters():
            p.requires_grad_(False)
        self.loads = 0
        runner = SimpleNamespace(model=SimpleNamespace(load_weights=self._load_weights))
        self.llm_engine = SimpleNamespace(
            model_executor=SimpleNamespace(driver_worker=SimpleNamespace(model_runner=runner)))

    def _load_weights(self, weights):
        params = dict(self.copy.named_parameters())
        for name, tensor in weights:
            params[name].data.copy_(tensor)  # a wrong name (an adapter's, say) is a KeyError: vLLM has no such weight
        self.loads += 1

    def generate(self, prompts, sampling_params, use_tqdm=False):
        outs = []
        for p in prompts:
            ids = torch.tensor([p["prompt_token_ids"]])
            gen = self.copy.generate(ids, attention_mask=torch.ones_like(ids),
                                     do_sample=sampling_params["temperature"] > 0,
                                     max_new_tokens=sampling_params["max_tokens"], pad_token_id=0,
                                     eos_token_id=sampling_params["stop_token_ids"])
            outs.append(SimpleNamespace(prompt_token_ids=p["prompt_token_ids"],
                                        outputs=[SimpleNamespace(token_ids=gen[0, ids.shape[1]:].tolist(),
                                                                 logprobs=None)]))
        return outs

    def sleep(self, level=1):
        pass

    def wake_up(self, tags=None):
        pass

    def reset_prefix_cache(self):
        pass


class FakeEngine(vllm_generation.VLLMGeneration):
    def _init_vllm(self):  # the only vLLM-specific part: the engine itself
        self.llm = FakeLLM(self.model)
        self._llm_weights_sleeping = self.enable_sleep_mode


def _engine_matches(engine, model) -> bool:
    """The engine's weights equal the student's (a LoRA student's merged weights)."""
    from peft import PeftModel

    ref = copy.deepcopy(model).merge_and_unload() if isinstance(model, PeftModel) else model
    mine = dict(ref.named_parameters())
    return all(torch.equal(p, mine[n]) for n, p in engine.llm.copy.named_parameters())


@pytest.mark.parametrize("finetune", ["full", "lora"])
@pytest.mark.parametrize("sleep", [False, True])
def test_vllm_sampler_gets_the_students_weights_after_every_step(monkeypatch, finetune, sleep):
    from accelerate import Accelerator

    monkeypatch.setattr(vllm_generation, "SamplingParams", lambda **kw: kw, raising=False)
    torch.manual_seed(0)
    student, tok = build_tiny_lm(seed=0)
    teacher, _ = build_tiny_lm(seed=1)
    teacher.eval().requires_grad_(False)
    if finetune == "lora":
        from peft import LoraConfig, get_peft_model

        student = get_peft_model(student, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                     init_lora_weights=False))
    stage = OPDStage(name="opd", kind="opd", prompts=["p.jsonl"], prompts_per_step=4, samples_per_prompt=2,
                     max_new_tokens=5, lr=0.05, sampler="vllm", finetune=finetune)
    engine = FakeEngine(student, Accelerator(cpu=True), tok, mode="colocate", enable_sleep_mode=sleep,
                        max_completion_length=stage.max_new_tokens, logprobs=None,
                        generation_kwargs={"stop_token_ids": stop_token_ids(student, tok)})
    sampler = VLLMSampler(student, tok, stage, None, engine=engine)
    optimizer = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=stage.learning_rate)
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
    assert not _engine_matches(engine, student) or finetune == "full"  # LoRA: the engine starts from the plain base
    for _ in range(3):
        rollouts = sampler.sample(prompts)
        assert _engine_matches(engine, student)  # it sampled with the current weights
        assert len(rollouts) == 8 and rollouts.response_mask_BL.shape[1] <= stage.max_new_tokens
        before = [p.detach().clone() for p in student.parameters() if p.requires_grad]
        opd_step(student, teacher, rollouts, stage, optimizer)
        sampler.weights_changed()
        assert any(not torch.equal(a, p) for a, p in zip(before, (p for p in student.parameters() if p.requires_grad)))
        assert not _engine_matches(engine, student)  # the update is not in the engine until the next rollout
    # one push of every weight per rollout: after each update, not more
    assert engine.llm.loads == 3 * len(list(engine.llm.copy.named_parameters()))


def test_vllm_rollouts_are_masked_like_hf_rollouts():
    stop = [7]
    # answer 0 ends with the stop token; answer 1 hit the cap (no stop); answer 2 is shorter and ends early
    r = rollouts_from_lists([[1, 2], [3], [4, 5, 6]], [[9, 7], [9, 9, 9], [7]], pad_id=7, stop_ids=stop, device="cpu")
    assert r.ids_BT.shape == (3, 6)
    assert r.response_mask_BL.tolist() == [[True, True, False], [True, True, True], [True, False, False]]
    assert r.truncated_B.tolist() == [False, True, False]
    assert r.attention_BT[:, :3].tolist() == [[0, 1, 1], [0, 0, 1], [1, 1, 1]]
    assert r.positions_BT[1].tolist() == [0, 0, 0, 1, 2, 3]


def test_vllm_sampler_without_vllm_is_a_clear_error(monkeypatch):
    import importlib

    from continual_opd.errors import ConfigError

    monkeypatch.setattr(importlib.import_module("trl.import_utils"), "is_vllm_available", lambda: False)
    student, tok = build_tiny_lm(seed=0)
    stage = OPDStage(name="opd", kind="opd", prompts=["p.jsonl"], sampler="vllm")
    with pytest.raises(ConfigError, match="vllm needs the vllm package"):
        VLLMSampler(student, tok, stage, None)
