"""Stages and the typed interface between them and the pipeline.

A stage kind is three things: a schema class in config.py (`kind: Literal[...]`), one module here with
`run_<kind>(stage_config, ctx: StageContext) -> StageResult`, and one line in `RUNNERS`. A stage trains (or only
evaluates) `ctx.model`, evaluates through `ctx.evaluate` on its cadence, checkpoints into `ctx.stage_dir`, and returns
what it produced. The pipeline decides the order, snapshots and resume; stages do not know about each other.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch

from continual_opd import models
from continual_opd.config import ModelConfig, ModelSource
from continual_opd.tracking import MetricsSink

# kind -> "module:function", imported when a stage of that kind runs (SFT imports TRL, OPD may import vLLM)
RUNNERS = {
    "eval": "continual_opd.stages.eval:run_eval",
    "sft": "continual_opd.stages.sft:run_sft",
    "opd": "continual_opd.stages.opd:run_opd",
}


def runner(kind: str) -> Callable:
    module, fn = RUNNERS[kind].split(":")
    return getattr(importlib.import_module(module), fn)


@dataclass
class StageResult:
    model: torch.nn.Module  # the model the stage ends with (full weights, or the PEFT model with its adapter)
    results: dict[str, float]  # the last eval point: {"suite/metric": value}
    steps: int  # optimizer steps done in the stage (its length, also after a resume)


@dataclass(frozen=True)
class StageContext:
    """What a stage gets from the pipeline. Frozen: a stage reports through `sink` (metrics, counters) and its
    `StageResult`, never by changing the context."""

    model: torch.nn.Module  # the live model, prepared for the stage (LoRA adapter added, or full weights)
    tokenizer: object
    model_config: ModelConfig  # how models load (dtype, revision, chat_template_kwargs, ...)
    seed: int
    where: str  # this stage in the recipe, for error messages: "recipes/x.yaml: stages.3"
    stage_dir: Path  # stages/NN-name/: checkpoints/ and evals/ go here
    sink: MetricsSink
    evaluate: Callable[[torch.nn.Module, int], dict]  # (model, step) -> {"suite/metric": value}; logs rows
    start_ref: models.ModelRef  # the model this stage started from (its base is a LoRA student's frozen base)
    snapshots: Mapping[str, models.ModelRef]  # snapshot names usable as a teacher at this point of the recipe
    resume_from: Path | None = None  # checkpoint directory to resume this stage from
    progress: bool = True
    checkpoint_meta: dict = field(default_factory=dict)  # written into every checkpoint's meta.json (+ step)

    @property
    def chat_template_kwargs(self) -> dict:
        return self.model_config.chat_template_kwargs

    def resolve(self, source: ModelSource, field_name: str) -> models.ModelRef:
        """A model reference of the recipe (`teacher`, `self_chat.model`) as loadable weights."""
        if source.kind == "snapshot":
            return source.snapshot_in(self.snapshots, f"{self.where}.{field_name}")
        return models.ModelRef(base=source.name)
