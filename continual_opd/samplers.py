"""Where OPD rollouts come from: HF `generate` (any device, the default), the continuous-batching engine (any device)
or vLLM colocated with training (GPU).

Both return `Rollouts` with the same masks and stop tokens (generation.rollouts_from_ids), so the step, the losses
and the monitors do not know which sampler ran. `weights_changed()` is called after every optimizer step.

The vLLM sampler is TRL's `VLLMGeneration` in colocate mode (each rank holds an engine for its own prompts), not a
home-made engine wrapper: TRL already solves pushing the student's weights into the engine under DDP, FSDP,
ZeRO-3 and PEFT (merge the adapter, rename the parameters, unmerge), sleep mode between rollouts, and tensor
parallel groups. We add prompt rendering, one row per sample grouped by prompt, our stop tokens, and the weight
push after every step. vLLM is imported only when a recipe asks for it.
"""

from __future__ import annotations

import logging


from continual_opd.config import OPDStage
from continual_opd.generation import (Rollouts, generation_mode, render_prompts, rollouts_from_lists, sample_rollouts,
                                      stop_token_ids)

log = logging.getLogger(__name__)


class HFSampler:
    """The student's own KV-cached `generate` (under several processes: the unwrapped model, this rank's prompts)."""

    def __init__(self, model, tokenizer, stage: OPDStage, chat_template_kwargs: dict | None = None):
        self.model, self.tokenizer, self.stage, self.kw = model, tokenizer, stage, chat_template_kwargs

    def sample(self, prompts: list) -> Rollouts:
        s = self.stage
        return sample_rollouts(self.model, self.tokenizer, prompts, max_new_tokens=s.max_new_tokens,
                               samples_per_prompt=s.samples_per_prompt, temperature=s.temperature, top_p=s.top_p,
                               chat_template_kwargs=self.kw)

    def weights_changed(self) -> None:  # generate reads the live weights
        pass


class EngineSampler:
    """Rollouts from a generation engine (`continuous` or `vllm`, engines.py): one row per sample, grouped by prompt,
    masked like HF rollouts. The vllm engine pushes the student's weights in before sampling after a step."""

    def __init__(self, engine, model, tokenizer, stage: OPDStage, chat_template_kwargs: dict | None = None):
        self.engine, self.model, self.tokenizer, self.stage = engine, model, tokenizer, stage
        self.kw = chat_template_kwargs
        self.stop_ids = stop_token_ids(model, tokenizer)

    def weights_changed(self) -> None:
        getattr(self.engine, "weights_changed", lambda: None)()

    def sample(self, prompts: list) -> Rollouts:
        from continual_opd.engines import SamplingParams

        s = self.stage
        texts = render_prompts(self.tokenizer, prompts, self.kw)
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        ids = [p for p in ids for _ in range(s.samples_per_prompt)]  # rows grouped by prompt, as HF's
        with generation_mode(self.model, self.tokenizer):
            done = self.engine.generate(ids, SamplingParams(max_new_tokens=s.max_new_tokens, do_sample=True,
                                                            temperature=s.temperature, top_p=s.top_p))
        return rollouts_from_lists(ids, [c.token_ids for c in done], self.tokenizer.pad_token_id, self.stop_ids,
                                   device=next(self.model.parameters()).device)


def VLLMSampler(model, tokenizer, stage: OPDStage, accelerator, chat_template_kwargs: dict | None = None,
                engine=None) -> EngineSampler:
    """vLLM rollouts through TRL's `VLLMGeneration` (colocate). `engine` replaces it in tests (a fake on CPU)."""
    from continual_opd.engines import VLLMEngine, trl_vllm

    stop = stop_token_ids(model, tokenizer)
    if engine is None:
        v = stage.vllm
        engine = trl_vllm(model, tokenizer, stop, accelerator=accelerator,
                          gpu_memory_utilization=v.gpu_memory_utilization, max_model_len=v.max_model_len,
                          enable_sleep_mode=v.enable_sleep_mode, tensor_parallel_size=v.tensor_parallel_size,
                          temperature=stage.temperature, top_p=stage.top_p, max_new_tokens=stage.max_new_tokens)
    return EngineSampler(VLLMEngine(model, tokenizer, stop, llm=engine), model, tokenizer, stage, chat_template_kwargs)


def make_sampler(stage: OPDStage, model, tokenizer, accelerator, chat_template_kwargs: dict | None = None):
    if stage.sampler == "vllm":
        return VLLMSampler(model, tokenizer, stage, accelerator, chat_template_kwargs)
    if stage.sampler == "continuous":
        from continual_opd.engines import make_engine

        rows = stage.prompts_per_step * stage.samples_per_prompt
        engine = make_engine("continuous", model, tokenizer, max_batch=rows)
        return EngineSampler(engine, model, tokenizer, stage, chat_template_kwargs)
    return HFSampler(model, tokenizer, stage, chat_template_kwargs)
