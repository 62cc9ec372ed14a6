"""Eval stage: the recipe's suites on the current model, no training."""

from __future__ import annotations

from continual_opd.config import EvalStage
from continual_opd.stages import StageContext, StageResult


def run_eval(stage: EvalStage, ctx: StageContext) -> StageResult:
    return StageResult(model=ctx.model, results=ctx.evaluate(ctx.model, 0), steps=0)
