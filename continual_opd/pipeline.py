"""run_recipe: the run directory, stage order, snapshots, evals and resume.

Stages do not know about each other: each gets a `StageContext` (the live model, its tokenizer, the
metrics sink, an `evaluate(step)` callback, where to write, where to resume from) and returns a
`StageResult` (stages/__init__.py). The pipeline records after every stage how to get that model back
(`ModelRef`), which is what makes `snapshot:before-<stage>` teachers and `--resume` possible.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import yaml

from continual_opd import checkpoints, models
from continual_opd.config import OPDStage, Recipe, SFTStage, recipe_to_yaml
from continual_opd.errors import ConfigError, ModelError, RunDirError
from continual_opd.evals import seed_everything
from continual_opd.io import atomic_write_json, atomic_write_text
from continual_opd.stages import StageContext
from continual_opd.tracking import KL_TO_STAGE_START, MetricsSink

log = logging.getLogger(__name__)

STATE_FILE = "run_state.json"


class Evaluator:
    """Runs the recipe's suites (and the KL monitor) on the live model and logs them to the sink."""

    def __init__(self, recipe: Recipe, tokenizer, sink: MetricsSink, run_dir: Path, progress: bool = True):
        from continual_opd.evals import load_suite

        self.recipe, self.tokenizer, self.sink, self.run_dir, self.progress = recipe, tokenizer, sink, run_dir, progress
        self.kl_monitor = None
        self.suites = {ref: load_suite(ref, Path(recipe.source).parent if recipe.source else None)
                       for stage in recipe.stages for ref in (stage.suites or recipe.evals.suites)}

    def __call__(self, model, stage, stage_dir: Path, step: int) -> dict[str, float]:
        from continual_opd.evals import run_suite

        results: dict[str, float] = {}
        t0 = time.time()
        out_dir = stage_dir / "evals" / f"step-{step:06d}"
        for ref in stage.suites or self.recipe.evals.suites:
            suite = self.suites[ref]
            values = run_suite(suite, model, self.tokenizer, out_dir, seed=self.recipe.seed,
                               chat_template_kwargs=self.recipe.model.chat_template_kwargs, progress=self.progress)
            self.sink.log(step, suite.name, values)
            results.update({f"{suite.name}/{k}": v for k, v in values.items()})
        if self.kl_monitor is not None:
            kl = self.kl_monitor.kl(model)
            self.sink.log(step, "kl_monitor", {KL_TO_STAGE_START: kl})
            results[f"kl_monitor/{KL_TO_STAGE_START}"] = kl
        self.sink.log(step, "time", {"eval_s": time.time() - t0})
        return results


# ---------------------------------------------------------------------------------------------- run dir


def prepare_run_dir(recipe: Recipe, resume: bool) -> Path:
    run_dir = Path(recipe.output_dir).expanduser().resolve()
    resolved = recipe_to_yaml(recipe)
    if resume:
        if not (run_dir / "recipe.resolved.yaml").exists():
            raise RunDirError(f"{run_dir}: nothing to resume (no recipe.resolved.yaml); run without --resume to start it")
        old = (run_dir / "recipe.resolved.yaml").read_text(encoding="utf-8")
        if yaml.safe_load(old) != yaml.safe_load(resolved):
            raise RunDirError(f"{run_dir}: the recipe differs from the run's recipe.resolved.yaml; resume with the "
                              "same recipe and overrides, or start a new output_dir")
        return run_dir
    check_output_dir(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise RunDirError(f"{run_dir}: run directory exists and is not empty; pick a new output_dir=... "
                          "or continue it with --resume (nothing was changed)")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"{run_dir}: cannot create the run directory ({e.strerror}); pick another output_dir=...") from None
    atomic_write_text(run_dir / "recipe.resolved.yaml", resolved)
    # From here on the directory is a run: if anything fails before a stage completes, `--resume` restarts it
    # from the beginning in place (the state below says no stage is done).
    atomic_write_json(run_dir / STATE_FILE, {"completed": [], "global_step": 0})
    return run_dir


def check_output_dir(path: Path) -> None:
    """An output directory that is a file, lies under a file, or sits in a folder we cannot write to is an
    error now, not after hours of training."""
    path = Path(path).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{path}: output_dir is a file; pick a directory path for output_dir=...")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise RunDirError(f"{path}: output_dir lies under the file {parent}; pick a directory path for output_dir=...")
    if not os.access(parent, os.W_OK | os.X_OK) or str(parent).startswith(("/proc", "/sys")):
        raise RunDirError(f"{path}: cannot create the run directory ({parent} is not writable); pick another output_dir=...")


def _stage_dir(run_dir: Path, i: int, name: str) -> Path:
    return run_dir / "stages" / f"{i:02d}-{name}"


# ---------------------------------------------------------------------------------------------- main loop


def run_recipe(recipe: Recipe, *, resume: bool = False, progress: bool = True) -> Path:
    """Run every stage of the recipe; return the run directory."""
    preflight(recipe)  # bad data fails here, before the run dir is touched
    run_dir = prepare_run_dir(recipe, resume)
    fresh = {"completed": [], "global_step": 0}
    state = json.loads((run_dir / STATE_FILE).read_text()) if (run_dir / STATE_FILE).exists() else fresh
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    sink = MetricsSink(run_dir, recipe.report_to, run_name=recipe.name)
    recipe_hash = hashlib.sha256(recipe_to_yaml(recipe).encode()).hexdigest()[:16]
    seed_everything(recipe.seed)
    try:
        base = models.resolve_base(recipe.model, recipe.cache_dir, progress=progress)
        tokenizer = models.load_tokenizer(base, recipe.model)
        snapshots = {"base": models.ModelRef(base)}
        current = models.ModelRef(base)
        for done in state["completed"]:
            snapshots.update({k: models.ModelRef(**v) for k, v in done["snapshots"].items()})
            current = models.ModelRef(**done["ref"])
        model = models.load_model(current, recipe.model)
        evaluator = Evaluator(recipe, tokenizer, sink, run_dir, progress)
        n_done = len(state["completed"])
        for i, stage in enumerate(recipe.stages):
            if i < n_done:
                continue
            stage_dir = _stage_dir(run_dir, i, stage.name)
            stage_dir.mkdir(parents=True, exist_ok=True)
            global_offset = state["global_step"]
            sink.set_stage(stage.name, i, stage.kind, global_offset)
            stage_snaps = {f"before-{stage.name}": current}
            snapshots.update(stage_snaps)
            log.info("stage %d/%d: %s (%s)", i + 1, len(recipe.stages), stage.name, stage.kind)
            t0 = time.time()
            if stage.kind == "eval":
                sink.truncate_after(i, -1)  # rows of an eval stage that was killed half-way
                results = evaluator(model, stage, stage_dir, 0)
                steps = 0
            else:
                resume_from = checkpoints.latest(stage_dir) if resume else None
                if resume_from is not None:
                    step = checkpoints.step_of(resume_from)
                    dropped = sink.truncate_after(i, step)
                    log.info("resuming %s from %s (%d later metric rows dropped)", stage.name, resume_from, dropped)
                else:
                    sink.truncate_after(i, -1)  # rows of a stage killed before its first checkpoint
                model = models.prepare_for_stage(model, stage.finetune, stage.lora)
                evaluator.kl_monitor = _make_kl_monitor(recipe, tokenizer, model)
                ctx = StageContext(model=model, tokenizer=tokenizer, recipe=recipe, stage_index=i, stage_dir=stage_dir,
                                   sink=sink, evaluate=lambda m, step, _s=stage, _d=stage_dir: evaluator(m, _s, _d, step),
                                   start_ref=current, snapshots=dict(snapshots), resume_from=resume_from, progress=progress,
                                   checkpoint_meta={"stage": stage.name, "stage_index": i, "kind": stage.kind,
                                                    "recipe_hash": recipe_hash, "parent": current.to_dict()})
                if isinstance(stage, SFTStage):
                    from continual_opd.stages.sft import run_sft  # imports TRL: only when a stage trains

                    out = run_sft(stage, ctx)
                else:
                    from continual_opd.stages.opd import run_opd

                    out = run_opd(stage, ctx)
                model, results, steps = out.model, out.results, out.steps
                evaluator.kl_monitor = None
                # a LoRA adapter is saved on top of the base it was trained on; full weights stand alone
                current = models.save_model(model, tokenizer, stage_dir / "final", current.base)
            stage_snaps[f"after-{stage.name}"] = current
            snapshots.update(stage_snaps)
            sink.log(steps, "time", {"stage_s": time.time() - t0})
            summary[stage.name] = {k: v for k, v in results.items() if not k.startswith("time/")}
            atomic_write_json(run_dir / "summary.json", summary)
            state["global_step"] = global_offset + steps
            state["completed"].append({"index": i, "name": stage.name, "ref": current.to_dict(),
                                       "snapshots": {k: v.to_dict() for k, v in stage_snaps.items()}})
            atomic_write_json(run_dir / STATE_FILE, state)
    finally:
        sink.close()
    if recipe.report:
        try:
            from continual_opd.report import write_report

            write_report(run_dir)
        except Exception as e:  # a report problem must not hide a finished run
            log.warning("could not write the report for %s: %s", run_dir, e)
    return run_dir


def preflight(recipe: Recipe) -> None:
    """Check every data source and suite a recipe names, so bad input fails before any model work."""
    from continual_opd.data import check_sources, read_prompts
    from continual_opd.evals import load_suite

    base = Path(recipe.source).parent if recipe.source else None
    check_output_dir(Path(recipe.output_dir))
    models.check_source(recipe.model)  # a missing model file or package fails here, not after the baseline eval
    snapshots = ["base"]
    for i, stage in enumerate(recipe.stages):
        snapshots.append(f"before-{stage.name}")
        if isinstance(stage, OPDStage):  # a teacher must exist at this point of the stage order
            if stage.teacher.startswith("snapshot:"):
                name = stage.teacher.removeprefix("snapshot:")
                if name not in snapshots:
                    raise ConfigError(f"{recipe.source}: stages.{i}.teacher: no snapshot named {name!r}; available "
                                      f"here: {', '.join('snapshot:' + k for k in snapshots)}")
            else:
                models.check_model_ref(stage.teacher, f"stages.{i}.teacher")
                _check_teacher_tokenizer(recipe, stage.teacher, i)
        snapshots.append(f"after-{stage.name}")
    for i, stage in enumerate(recipe.stages):
        field = f"stages.{i}.suites" if stage.suites else "evals.suites"
        for ref in stage.suites or recipe.evals.suites:
            try:
                load_suite(ref, base)
            except ConfigError as e:  # say which recipe field named the suite
                raise ConfigError(f"{recipe.source}: {field}: {e}") from None
        if isinstance(stage, SFTStage):
            check_sources(stage.data)
        if isinstance(stage, OPDStage):
            for p in stage.prompts + stage.doc_prompts:
                read_prompts(p)
            if stage.replay.batch_size > 0:
                check_sources(stage.replay.data)
    if recipe.evals.kl_prompts:
        read_prompts(recipe.evals.kl_prompts)


def _check_teacher_tokenizer(recipe: Recipe, teacher: str, i: int) -> None:
    """Teacher and student must tokenize and template alike; checked up front when both are local directories
    (tokenizers only, no weights). A demo, GGUF or hub student is checked when the OPD stage starts."""
    student = recipe.model.name
    if not (Path(student).is_dir() and Path(teacher).is_dir()) or recipe.model.gguf_file:
        return
    s_tok = models.load_tokenizer(student, recipe.model)
    t_tok = models.load_tokenizer(teacher, recipe.model)
    try:
        models.check_same_tokenization(s_tok, t_tok, recipe.model.chat_template_kwargs, student=student, teacher=teacher)
    except ModelError as e:
        raise ConfigError(f"{recipe.source}: stages.{i}.teacher: {e}") from None


def _make_kl_monitor(recipe: Recipe, tokenizer, model):
    if not recipe.evals.kl_prompts:
        return None
    from continual_opd.evals.kl_monitor import KLMonitor

    return KLMonitor.from_file(recipe.evals.kl_prompts, tokenizer, model, n=recipe.evals.kl_num_prompts,
                               max_new_tokens=recipe.evals.kl_max_new_tokens,
                               chat_template_kwargs=recipe.model.chat_template_kwargs)
