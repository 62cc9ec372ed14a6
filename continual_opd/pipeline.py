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

from continual_opd import checkpoints, distributed, models
from continual_opd.config import OPDStage, Recipe, SFTStage, recipe_to_yaml
from continual_opd.errors import ConfigError, ContinualOPDError, ModelError, RunDirError
from continual_opd.self_chat import check_no_eval_overlap, if_eval_prompts
from continual_opd.evals import seed_everything
from continual_opd.io import atomic_write_json, atomic_write_text
from continual_opd.stages import StageContext
from continual_opd.tracking import KL_TO_STAGE_START, MetricsSink, read_rows

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
        # every rank generates its share of the answers (generation.generate gathers them); rank 0 writes them
        out_dir = stage_dir / "evals" / f"step-{step:06d}" if distributed.is_main() else None
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
        if _normalized(run_dir / "recipe.resolved.yaml") != yaml.safe_load(resolved):
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


# Recipe keys that do not change what a stage computes: runs that differ only in these can share stages.
_FORK_FREE_KEYS = ("name", "output_dir", "stages", "report", "report_to", "headline")


def shared_stages(recipe: Recipe, from_run: Path) -> int:
    """How many completed leading stages of `from_run` this recipe can reuse; an error if none."""
    src = from_run.expanduser().resolve()
    if not (src / "recipe.resolved.yaml").is_file() or not (src / STATE_FILE).is_file():
        raise RunDirError(f"{src}: --from-run needs a run directory (recipe.resolved.yaml and {STATE_FILE}); check the path")
    old = _normalized(src / "recipe.resolved.yaml")
    new = yaml.safe_load(recipe_to_yaml(recipe))
    for key in new:
        if key not in _FORK_FREE_KEYS and old.get(key) != new.get(key):
            raise ConfigError(f"{recipe.source}: {key}: differs from {src}/recipe.resolved.yaml, so no stage of that run "
                              "can be reused; use the same value or drop --from-run")
    done = json.loads((src / STATE_FILE).read_text())["completed"]
    n = 0
    while n < min(len(done), len(new["stages"]), len(old["stages"])) and old["stages"][n] == new["stages"][n]:
        n += 1
    if n == 0:
        why = "its first stage differs from this recipe's" if done else "it has no completed stage"
        raise ConfigError(f"{src}: --from-run: nothing to reuse ({why}); run without --from-run")
    return n


def fork_run(src: Path, run_dir: Path, n: int) -> None:
    """Start `run_dir` with the first `n` completed stages of `src`: their state, metric rows and summary. Models
    stay where they are (the new run's refs point into `src`, so keep that run)."""
    src = src.expanduser().resolve()
    state = json.loads((src / STATE_FILE).read_text())
    completed = state["completed"][:n]
    names = {c["name"] for c in completed}
    rows = [r for r in read_rows(src / "metrics.jsonl") if r.get("stage_index", -1) < n] \
        if (src / "metrics.jsonl").exists() else []
    summary = json.loads((src / "summary.json").read_text()) if (src / "summary.json").exists() else {}
    global_step = completed[-1].get("global_step", max([int(r.get("global_step", 0)) for r in rows] or [0]))
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_json(run_dir / "summary.json", {k: v for k, v in summary.items() if k in names})
    atomic_write_json(run_dir / "forked_from.json", {"run": str(src), "stages": [c["name"] for c in completed]})
    atomic_write_json(run_dir / STATE_FILE, {"completed": completed, "global_step": global_step})
    log.info("reusing %d stage(s) of %s: %s", n, src, ", ".join(c["name"] for c in completed))


def _normalized(resolved: Path) -> dict:
    """A run's recipe.resolved.yaml read through today's schema: options added since (with their defaults) do not
    make an old run look different. A file the schema no longer accepts is compared as written."""
    from continual_opd.config import normalized_recipe

    return normalized_recipe(yaml.safe_load(resolved.read_text(encoding="utf-8")), str(resolved))


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


def run_recipe(recipe: Recipe, *, resume: bool = False, progress: bool = True, from_run: str | Path | None = None) -> Path:
    """Run every stage of the recipe; return the run directory.

    `from_run`: an earlier run whose completed leading stages this recipe shares (same model, seed, evals and stage
    settings); they are reused, not re-run, and the new run continues from the first stage that differs.
    """
    preflight(recipe)  # bad data fails here, before the run dir is touched
    if from_run is not None:
        if resume:
            raise ConfigError("--from-run starts a new run; it cannot be combined with --resume")
        n_shared = shared_stages(recipe, Path(from_run))  # checked before the new run dir exists

    def make_run_dir() -> Path:  # rank 0 only: the one writer of the run directory
        run_dir = prepare_run_dir(recipe, resume)
        if from_run is not None:
            fork_run(Path(from_run), run_dir, n_shared)
        return run_dir

    run_dir = distributed.on_main(make_run_dir)
    writer = distributed.is_main()
    fresh = {"completed": [], "global_step": 0}
    state = json.loads((run_dir / STATE_FILE).read_text()) if (run_dir / STATE_FILE).exists() else fresh
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    sink = MetricsSink(run_dir, recipe.report_to, run_name=recipe.name, write=writer)
    recipe_hash = hashlib.sha256(recipe_to_yaml(recipe).encode()).hexdigest()[:16]
    seed_everything(recipe.seed)
    try:
        # rank 0 builds the demo model / converts a GGUF file once; the others then find it in the cache
        base = distributed.on_main(lambda: models.resolve_base(recipe.model, recipe.cache_dir, progress=progress))
        if not writer:
            base = models.resolve_base(recipe.model, recipe.cache_dir, progress=False)
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
            if writer:
                stage_dir.mkdir(parents=True, exist_ok=True)
            distributed.barrier()  # every rank sees the same checkpoints when it looks for one to resume
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
                current = models.save_model(model, tokenizer, stage_dir / "final", current.base, write=writer)
            stage_snaps[f"after-{stage.name}"] = current
            snapshots.update(stage_snaps)
            sink.log(steps, "time", {"stage_s": time.time() - t0})
            summary[stage.name] = {k: v for k, v in results.items() if not k.startswith("time/")}
            if writer:
                atomic_write_json(run_dir / "summary.json", summary)
            state["global_step"] = global_offset + steps
            state["completed"].append({"index": i, "name": stage.name, "ref": current.to_dict(),
                                       "global_step": state["global_step"],
                                       "snapshots": {k: v.to_dict() for k, v in stage_snaps.items()}})
            if writer:
                atomic_write_json(run_dir / STATE_FILE, state)
            distributed.barrier()
    finally:
        sink.close()
    if recipe.report and writer:
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
        if isinstance(stage, SFTStage) and stage.data.self_chat:  # the answering snapshot must exist here
            _check_snapshot(recipe, stage.data.self_chat.model, snapshots, f"stages.{i}.data.self_chat.model")
        if isinstance(stage, OPDStage):  # a teacher must exist at this point of the stage order
            if stage.teacher.startswith("snapshot:"):
                _check_snapshot(recipe, stage.teacher, snapshots, f"stages.{i}.teacher")
            else:
                models.check_model_ref(stage.teacher, f"stages.{i}.teacher")
                _check_teacher_tokenizer(recipe, stage.teacher, i)
        snapshots.append(f"after-{stage.name}")
    suites = []
    for i, stage in enumerate(recipe.stages):
        field = f"stages.{i}.suites" if stage.suites else "evals.suites"
        for ref in stage.suites or recipe.evals.suites:
            try:
                suites.append(load_suite(ref, base))
            except ConfigError as e:  # say which recipe field named the suite
                raise ConfigError(f"{recipe.source}: {field}: {e}") from None
    eval_prompts = if_eval_prompts(suites)
    for i, stage in enumerate(recipe.stages):
        if isinstance(stage, SFTStage):
            check_sources(stage.data)
            if stage.data.self_chat:
                for p in stage.data.self_chat.prompts:
                    read_prompts(p)
                n = check_no_eval_overlap(stage.data.self_chat.prompts, eval_prompts, f"stages.{i}.data.self_chat.prompts")
                log.info("self-chat prompts of stage %s: none of the %d is among the %d IF eval prompts", stage.name, n,
                         len(eval_prompts))
        if isinstance(stage, OPDStage):
            for p in stage.prompts + stage.doc_prompts:
                read_prompts(p)
            _warn_eval_overlap(stage.prompts, eval_prompts, f"stages.{i}.prompts")
            if stage.replay.batch_size > 0:
                check_sources(stage.replay.data)
    if recipe.evals.kl_prompts:
        read_prompts(recipe.evals.kl_prompts)


def _check_snapshot(recipe: Recipe, ref: str, available: list[str], field: str) -> None:
    name = ref.removeprefix("snapshot:")
    if name not in available:
        raise ConfigError(f"{recipe.source}: {field}: no snapshot named {name!r}; available here: "
                          f"{', '.join('snapshot:' + k for k in available)}")


def _warn_eval_overlap(prompt_files: list[str], eval_prompts: dict[str, str], field: str) -> None:
    """OPD on an eval prompt is legal (a user may distil on their own eval set on purpose) but inflates the score."""
    try:
        check_no_eval_overlap(prompt_files, eval_prompts, field)
    except ContinualOPDError as e:
        log.warning("%s (and possibly more)", e)


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
