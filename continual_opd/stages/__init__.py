"""Training stages and the typed interface between them and the pipeline.

A stage is a function `run_<kind>(stage_config, ctx: StageContext) -> StageResult`: it trains `ctx.model` (it may
return a different object, e.g. the model TRL wraps), evaluates on the recipe's cadence through `ctx`, checkpoints
into `ctx.stage_dir`, and returns what it produced. The pipeline calls `run_sft` / `run_opd` by name; it decides the
order, snapshots and resume, and stages do not know about each other.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from continual_opd import models
from continual_opd.config import Recipe
from continual_opd.errors import ConfigError
from continual_opd.tracking import MetricsSink


@dataclass
class StageResult:
    model: torch.nn.Module  # the trained model (full weights, or the PEFT model with its adapter)
    results: dict[str, float]  # the last eval point: {"suite/metric": value}
    steps: int  # optimizer steps done in the stage (its length, also after a resume)


@dataclass
class StageContext:
    """What a training stage gets from the pipeline (read-only for the stage)."""

    model: torch.nn.Module  # the live model, prepared for the stage (LoRA adapter added, or full weights)
    tokenizer: object
    recipe: Recipe
    stage_index: int
    stage_dir: Path  # stages/NN-name/: checkpoints/ and evals/ go here
    sink: MetricsSink
    evaluate: Callable[[torch.nn.Module, int], dict]  # (model, step) -> {"suite/metric": value}; logs rows
    start_ref: models.ModelRef  # the model this stage started from (its base is a LoRA student's frozen base)
    snapshots: dict[str, models.ModelRef]  # snapshot names usable as a teacher at this point of the recipe
    resume_from: Path | None = None  # checkpoint directory to resume this stage from
    progress: bool = True
    checkpoint_meta: dict = field(default_factory=dict)  # written into every checkpoint's meta.json (+ step)

    def resolve_teacher(self, teacher: str) -> models.ModelRef:
        if teacher.startswith("snapshot:"):
            name = teacher.removeprefix("snapshot:")
            if name not in self.snapshots:
                raise ConfigError(f"{self.recipe.source}: stages.{self.stage_index}.teacher: no snapshot named {name!r}; "
                                  f"available here: {', '.join('snapshot:' + k for k in self.snapshots)}")
            return self.snapshots[name]
        return models.ModelRef(base=teacher)


class EvalCadence:
    """When a training stage evaluates, and the time split it logs; shared by SFT and OPD.

    Evals run every `eval_every` steps and at the last step; each eval point also logs `train_s` (wall time in
    the stage so far, minus evals) and `eval_total_s`. A stage resumed from its last step has nothing left to
    train: `final` then evaluates once, so every stage ends with results.
    """

    def __init__(self, stage, ctx: StageContext):
        self.stage, self.ctx = stage, ctx
        self.eval_s = 0.0
        self.results: dict[str, float] = {}
        self._t_start = time.time()

    def due(self, step: int) -> bool:
        return step == self.stage.steps or bool(self.stage.eval_every and step % self.stage.eval_every == 0)

    def evaluate(self, model, step: int) -> dict[str, float]:
        t0 = time.time()
        self.results = self.ctx.evaluate(model, step)
        self.eval_s += time.time() - t0
        self.ctx.sink.log(step, "time", {"train_s": time.time() - self._t_start - self.eval_s,
                                         "eval_total_s": self.eval_s})
        return self.results

    def final(self, model) -> StageResult:
        if not self.results:  # resumed at the very end: nothing left to evaluate in this process
            self.results = self.ctx.evaluate(model, self.stage.steps)
        return StageResult(model=model, results=self.results, steps=self.stage.steps)
