"""Where OPD rollouts come from: HF `generate` (any device, the default) or vLLM colocated with training (GPU).

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

import torch

from continual_opd.config import OPDStage
from continual_opd.errors import ConfigError
from continual_opd.generation import Rollouts, render_prompts, rollouts_from_ids, sample_rollouts, stop_token_ids

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


class VLLMSampler:
    """vLLM rollouts through TRL's `VLLMGeneration` (colocate). `engine` replaces it in tests (a fake on CPU)."""

    def __init__(self, model, tokenizer, stage: OPDStage, accelerator, chat_template_kwargs: dict | None = None,
                 engine=None):
        self.model, self.tokenizer, self.stage, self.kw = model, tokenizer, stage, chat_template_kwargs
        self.stop_ids = stop_token_ids(model, tokenizer)
        if engine is None:
            engine = _trl_engine(model, tokenizer, stage, accelerator, self.stop_ids)
        self.engine = engine
        # With sleep mode, TRL drops the engine's weights after each rollout and pushes the live ones before the
        # next, so every rollout already sees the latest update; without it we push after every optimizer step.
        self._stale = not getattr(engine, "enable_sleep_mode", False)
        self.syncs = 0

    def weights_changed(self) -> None:
        self._stale = not getattr(self.engine, "enable_sleep_mode", False)

    def sample(self, prompts: list) -> Rollouts:
        if self._stale:
            self.engine.sync_weights()
            self.syncs += 1
            self._stale = False
        texts = render_prompts(self.tokenizer, prompts, self.kw)
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        ids = [p for p in ids for _ in range(self.stage.samples_per_prompt)]  # rows grouped by prompt, as HF's
        prompt_ids, completion_ids, _, _ = self.engine.generate(ids, None, 1)
        return _to_rollouts(prompt_ids, completion_ids, self.tokenizer.pad_token_id, self.stop_ids,
                            device=next(self.model.parameters()).device)


def _to_rollouts(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int, stop_ids,
                 device) -> Rollouts:
    """Lists of token ids → left-padded prompts + right-padded responses, masked like HF rollouts."""
    P = max(len(p) for p in prompt_ids)
    L = max(1, max(len(c) for c in completion_ids))
    B = len(prompt_ids)
    prompt_BP = torch.full((B, P), pad_id, dtype=torch.long)
    attn_BP = torch.zeros((B, P), dtype=torch.long)
    # Padding after an answer's end token is masked by rollouts_from_ids; a pad after an answer that hit the cap
    # must not read as an end token, so cap-length answers are padded with their own last token.
    resp_BL = torch.full((B, L), pad_id, dtype=torch.long)
    for b, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        prompt_BP[b, P - len(p):], attn_BP[b, P - len(p):] = torch.tensor(p), 1
        if c:
            resp_BL[b, :len(c)] = torch.tensor(list(c))
            if not any(t in stop_ids for t in c):
                resp_BL[b, len(c):] = c[-1]
    return rollouts_from_ids(prompt_BP.to(device), attn_BP.to(device), resp_BL.to(device), stop_ids)


def _trl_engine(model, tokenizer, stage: OPDStage, accelerator, stop_ids):
    from trl.import_utils import is_vllm_available

    if not is_vllm_available():
        raise ConfigError("sampler: vllm needs the vllm package on a CUDA machine (pip install vllm); "
                          "use sampler: hf on this machine")
    from trl.generation.vllm_generation import VLLMGeneration

    v = stage.vllm
    return VLLMGeneration(model, accelerator, tokenizer, mode="colocate",
                          gpu_memory_utilization=v.gpu_memory_utilization,
                          max_model_length=v.max_model_len, enable_sleep_mode=v.enable_sleep_mode,
                          tensor_parallel_size=v.tensor_parallel_size, temperature=stage.temperature, top_p=stage.top_p,
                          max_completion_length=stage.max_new_tokens, logprobs=None,
                          generation_kwargs={"stop_token_ids": list(stop_ids)})


def make_sampler(stage: OPDStage, model, tokenizer, accelerator, chat_template_kwargs: dict | None = None):
    if stage.sampler == "vllm":
        return VLLMSampler(model, tokenizer, stage, accelerator, chat_template_kwargs)
    return HFSampler(model, tokenizer, stage, chat_template_kwargs)
