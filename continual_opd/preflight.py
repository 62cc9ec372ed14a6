"""Every check a recipe can pass or fail without model weights: `validate` runs them all, `recipe` runs them first.

Order: the output directory, the model source, the stage order (snapshots named as teachers or self-chat authors exist
at that point; a teacher path or hub id is there and tokenizes like the student), the eval suites, every data file and
prompt file, eval prompts leaking into training prompts, and how each per-update count splits over the processes of a
launch. The messages are the ones a run would give, one line each, naming the recipe field and the fix.
"""

from __future__ import annotations

import logging
from pathlib import Path

from continual_opd import models
from continual_opd.config import OPDStage, Recipe, SFTStage
from continual_opd.errors import ConfigError, ContinualOPDError, ModelError

log = logging.getLogger(__name__)


def preflight(recipe: Recipe, *, num_processes: int = 1, resume: bool | None = None) -> None:
    """Raise the first problem found. `resume`: check the output directory for a new run (False) or for `--resume`
    (True); None checks only that it can be written. `num_processes`: the launch the recipe will run under."""
    from continual_opd.rundir import check_output_dir, check_run_dir

    if resume is None:
        check_output_dir(Path(recipe.output_dir))
    else:
        check_run_dir(Path(recipe.output_dir), resume=resume)
    models.check_source(recipe.model)  # a missing model file or package fails here, not after the baseline eval
    check_stage_order(recipe)
    check_data(recipe, load_suites(recipe))
    check_splits(recipe, num_processes)


def check_stage_order(recipe: Recipe) -> None:
    """Snapshots named by a stage exist at that point; a teacher given as a path or hub id is a model."""
    available: dict[str, None] = {"base": None}
    for i, stage in enumerate(recipe.stages):
        available[f"before-{stage.name}"] = None
        where = f"{recipe.source}: stages.{i}"
        if isinstance(stage, SFTStage) and stage.data.self_chat:  # the answering snapshot must exist here
            stage.data.self_chat.model.snapshot_in(available, f"{where}.data.self_chat.model")
        if isinstance(stage, OPDStage) and stage.teacher.kind == "served":
            ref = stage.teacher.reference
            if ref is not None and ref.kind == "snapshot":
                ref.snapshot_in(available, f"{where}.teacher.reference")
            elif ref is not None:
                models.check_model_ref(ref.name, f"stages.{i}.teacher.reference")
            _check_served_teacher(recipe, stage.teacher, i)
        elif isinstance(stage, OPDStage):
            if stage.teacher.kind == "snapshot":
                stage.teacher.snapshot_in(available, f"{where}.teacher")
            else:
                models.check_model_ref(stage.teacher.name, f"stages.{i}.teacher")
                _check_teacher_tokenizer(recipe, stage.teacher.name, i)
        available[f"after-{stage.name}"] = None


def load_suites(recipe: Recipe) -> list:
    from continual_opd.evals import load_suite

    base = Path(recipe.source).parent if recipe.source else None
    suites = []
    for i, stage in enumerate(recipe.stages):
        field = f"stages.{i}.suites" if stage.suites else "evals.suites"
        for ref in stage.suites or recipe.evals.suites:
            try:
                suites.append(load_suite(ref, base))
            except ConfigError as e:  # say which recipe field named the suite
                raise ConfigError(f"{recipe.source}: {field}: {e}") from None
    return suites


def check_data(recipe: Recipe, suites: list) -> None:
    """Every data and prompt file parses; training prompts are not eval prompts (an error for self-chat, whose
    answers become SFT data; a warning for OPD prompts)."""
    from continual_opd.data import check_sources, read_prompts
    from continual_opd.self_chat import check_no_eval_overlap, if_eval_prompts

    eval_prompts = if_eval_prompts(suites)
    for i, stage in enumerate(recipe.stages):
        where = f"{recipe.source}: stages.{i}"
        if isinstance(stage, SFTStage):
            check_sources(stage.data, f"{where}.data")
            if stage.data.self_chat:
                for p in stage.data.self_chat.prompts:
                    read_prompts(p)
                field = f"stages.{i}.data.self_chat.prompts"
                n = check_no_eval_overlap(stage.data.self_chat.prompts, eval_prompts, field)
                log.info("self-chat prompts of stage %s: none of the %d is among the %d IF eval prompts", stage.name,
                         n, len(eval_prompts))
        if isinstance(stage, OPDStage):
            for p in stage.prompts + stage.doc_prompts:
                read_prompts(p)
            _warn_eval_overlap(stage.prompts, eval_prompts, f"stages.{i}.prompts")
            if stage.replay.batch_size > 0:
                check_sources(stage.replay.data, f"{where}.replay.data")
    if recipe.evals.kl_prompts:
        read_prompts(recipe.evals.kl_prompts)


def check_splits(recipe: Recipe, num_processes: int) -> None:
    """The recipe's batch numbers are per update, over all processes: each must split evenly over them."""
    for i, stage in enumerate(recipe.stages):
        counts = {"batch_size": stage.batch_size} if isinstance(stage, SFTStage) else {}
        if isinstance(stage, OPDStage):
            counts = {"prompts_per_step": stage.prompts_per_step, "replay.batch_size": stage.replay.batch_size}
            if stage.sampler == "vllm" and num_processes % stage.vllm.tensor_parallel_size:
                raise ConfigError(f"{recipe.source}: stages.{i}.vllm.tensor_parallel_size: "
                                  f"{stage.vllm.tensor_parallel_size} does not divide the {num_processes} processes; "
                                  f"use a divisor of {num_processes}")
        for field, n in counts.items():
            if n % num_processes:
                raise ConfigError(f"{recipe.source}: stages.{i}.{field}: {n} does not split over {num_processes} "
                                  f"processes; use a multiple of {num_processes}")


def _warn_eval_overlap(prompt_files: list[str], eval_prompts: dict[str, str], field: str) -> None:
    """OPD on an eval prompt is legal (a user may distil on their own eval set on purpose) but inflates the score."""
    from continual_opd.self_chat import check_no_eval_overlap

    try:
        check_no_eval_overlap(prompt_files, eval_prompts, field)
    except ContinualOPDError as e:
        log.warning("%s (and possibly more)", e)


def _check_served_teacher(recipe: Recipe, teacher, i: int) -> None:
    """A served teacher must tokenize and template like the student: checked now when the server answers and the
    student's tokenizer is on disk (no weights), otherwise when the stage starts."""
    from continual_opd.teacher_client import ServedTeacher, TeacherServerError

    student = recipe.model.name
    if not Path(student).is_dir() or recipe.model.gguf_file:
        return
    client = ServedTeacher(teacher.url, teacher.model, timeout_s=min(teacher.timeout_s, 10.0), max_retries=0,
                           tokenizer=teacher.tokenizer)
    try:
        client.check_tokenizer(models.load_tokenizer(student, recipe.model), recipe.model.chat_template_kwargs,
                               student=student)
    except TeacherServerError as e:
        if e.status is not None and e.status < 500:  # it answered: a wrong model name or URL path is the recipe's
            raise ConfigError(f"{recipe.source}: stages.{i}.teacher: {e}") from None
        log.warning("stages.%d.teacher: not checked now (%s); it is checked when the stage starts", i, e)
    except ModelError as e:
        raise ConfigError(f"{recipe.source}: stages.{i}.teacher: {e}") from None


def _check_teacher_tokenizer(recipe: Recipe, teacher: str, i: int) -> None:
    """Teacher and student must tokenize and template alike; checked up front when both are local directories
    (tokenizers only, no weights). A demo, GGUF or hub student is checked when the OPD stage starts."""
    student = recipe.model.name
    if not (Path(student).is_dir() and Path(teacher).is_dir()) or recipe.model.gguf_file:
        return
    s_tok = models.load_tokenizer(student, recipe.model)
    t_tok = models.load_tokenizer(teacher, recipe.model)
    try:
        models.check_same_tokenization(s_tok, t_tok, recipe.model.chat_template_kwargs, student=student,
                                       teacher=teacher)
    except ModelError as e:
        raise ConfigError(f"{recipe.source}: stages.{i}.teacher: {e}") from None
