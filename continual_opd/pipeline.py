"""run_recipe: the stage loop. Checks, run directory, models, then each stage in order, then the report.

    preflight   every check that needs no weights (preflight.py)
    plan        the run directory: fresh, resumed or forked from another run (rundir.py); nothing written yet
    load        the starting model: the recipe's, or the last completed stage's when resuming
    start       the run directory is written (so a model that does not load leaves nothing behind)
    stages      for each stage not completed: resume point → prepare the model → run_<kind> (stages/) →
                save the model → record the stage's model and snapshots (`snapshot:before-/after-<stage>`)
    report      report/ from metrics.jsonl

Stages do not know about each other: each gets a `StageContext` and returns a `StageResult` (stages/__init__.py).
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

from continual_opd import checkpoints, distributed, models
from continual_opd.config import Recipe, TrainStageBase, recipe_to_yaml
from continual_opd.evals import seed_everything
from continual_opd.evals.runner import Evaluator
from continual_opd.preflight import preflight
from continual_opd.rundir import CompletedStage, RunDir, plan_run, start_run
from continual_opd.stages import StageContext, runner
from continual_opd.tracking import MetricsSink

log = logging.getLogger(__name__)


def run_recipe(recipe: Recipe, *, resume: bool = False, progress: bool = True,
               from_run: str | Path | None = None) -> Path:
    """Run every stage of the recipe; return the run directory.

    `resume`: continue the run in `output_dir` from its last complete checkpoint. `from_run`: an earlier run whose
    completed leading stages this recipe shares (same model, seed, evals and stage settings); they are reused, not
    re-run, and the new run continues from the first stage that differs.
    """
    preflight(recipe, num_processes=distributed.world_size(), resume=resume)  # bad input fails before any work
    resolved = recipe_to_yaml(recipe)
    plan = distributed.on_main(lambda: plan_run(recipe.output_dir, recipe.source, resolved, resume=resume,
                                                from_run=from_run))
    seed_everything(recipe.seed)
    base = models.resolve_base_once(recipe.model, recipe.cache_dir, progress=progress)
    tokenizer = models.load_tokenizer(base, recipe.model)
    snapshots, current = plan.state.models(models.ModelRef(base))
    model = models.load_model(current, recipe.model)
    run = RunDir(distributed.on_main(lambda: start_run(plan)), plan.state, write=distributed.is_main())
    sink = MetricsSink(run.path, recipe.report_to, run_name=recipe.name, write=run.write)
    try:
        stages = _StageRunner(recipe, run, sink, Evaluator(recipe, tokenizer, sink, progress), tokenizer, snapshots,
                              current, recipe_hash=hashlib.sha256(resolved.encode()).hexdigest()[:16], resume=resume,
                              progress=progress)
        for i, stage in enumerate(recipe.stages):
            if i >= len(run.state.completed):
                model = stages.run(i, stage, model)
    finally:
        sink.close()
    if recipe.report and run.write:
        try:
            from continual_opd.report import write_report

            write_report(run.path)
        except Exception as e:  # a report problem must not hide a finished run
            log.warning("could not write the report for %s: %s", run.path, e)
    return run.path


class _StageRunner:
    """Runs one stage at a time and records it; holds what passes from one stage to the next (the current model's
    ref and the snapshots so far)."""

    def __init__(self, recipe: Recipe, run: RunDir, sink: MetricsSink, evaluator: Evaluator, tokenizer,
                 snapshots: dict[str, models.ModelRef], current: models.ModelRef, *, recipe_hash: str, resume: bool,
                 progress: bool):
        self.recipe, self.run_dir, self.sink, self.evaluator, self.tokenizer = recipe, run, sink, evaluator, tokenizer
        self.snapshots, self.current, self.resume, self.progress = snapshots, current, resume, progress
        self.recipe_hash = recipe_hash  # written into every checkpoint's meta.json

    def run(self, i: int, stage, model):
        run, sink, start_ref = self.run_dir, self.sink, self.current
        stage_dir = run.stage_dir(i, stage.name)
        distributed.barrier()  # every rank sees the same checkpoints when it looks for one to resume
        sink.set_stage(stage.name, i, stage.kind, run.state.global_step)
        self.snapshots[f"before-{stage.name}"] = start_ref
        log.info("stage %d/%d: %s (%s)", i + 1, len(self.recipe.stages), stage.name, stage.kind)
        t0 = time.time()
        resume_from = checkpoints.latest(stage_dir) if self.resume else None
        # rows logged after the resume point (or by a stage killed before its first checkpoint) are logged again
        dropped = sink.truncate_after(i, checkpoints.step_of(resume_from) if resume_from else -1)
        if resume_from is not None:
            log.info("resuming %s from %s (%d later metric rows dropped)", stage.name, resume_from, dropped)
        trains = isinstance(stage, TrainStageBase)
        if trains:
            model = models.prepare_for_stage(model, stage.finetune, stage.lora)
            self.evaluator.start_training_stage(model)
        ctx = StageContext(
            model=model, tokenizer=self.tokenizer, model_config=self.recipe.model, seed=self.recipe.seed,
            where=f"{self.recipe.source}: stages.{i}", stage_dir=stage_dir, sink=sink,
            evaluate=lambda m, step: self.evaluator(m, stage, stage_dir, step), start_ref=start_ref,
            snapshots=dict(self.snapshots), resume_from=resume_from, progress=self.progress,
            checkpoint_meta={"stage": stage.name, "stage_index": i, "kind": stage.kind,
                             "recipe_hash": self.recipe_hash, "parent": start_ref.to_dict()})
        out = runner(stage.kind)(stage, ctx)
        if trains:
            self.evaluator.end_training_stage()
            # a LoRA adapter is saved on top of the base it was trained on; full weights stand alone
            self.current = models.save_model(out.model, self.tokenizer, stage_dir / "final", start_ref.base,
                                             write=run.write)
        self.snapshots[f"after-{stage.name}"] = self.current
        sink.log(out.steps, "time", {"stage_s": time.time() - t0})
        run.complete_stage(CompletedStage(index=i, name=stage.name, ref=self.current,
                                          global_step=run.state.global_step + out.steps,
                                          snapshots={f"before-{stage.name}": start_ref,
                                                     f"after-{stage.name}": self.current}), out.results)
        distributed.barrier()
        return out.model
