"""Eval suites: a YAML file says what to measure; `run_suite` measures it on a model already in memory.

    suite = load_suite("ifeval")                       # eval_suites/ifeval.yaml
    metrics = run_suite(suite, model, tokenizer, out_dir=run_dir / "evals")
    # {"prompt_level_strict_acc": 0.62, ..., "eval_time_s": 41.3}; generations in out_dir/ifeval.jsonl

Kinds: `ifeval` (verifiable instructions, lm-eval's checkers), `domain_qa` (held-out questions,
exact match / F1), `lm_eval_task` (any lm-evaluation-harness task YAML, run in process).
"""

from __future__ import annotations

import difflib
import random
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from continual_opd.errors import ConfigError
from continual_opd.io import read_text

from continual_opd.resources import SUITES_DIR  # eval_suites/ of the checkout or the wheel

# Options that only mean something for one kind; setting them on another kind is a mistake we report.
_KIND_OPTIONS = {
    "domain_qa": {"instruction"},
    "lm_eval_task": {"task_yaml", "task", "num_fewshot", "apply_chat_template", "include_defaults"},
}
_ROW_SUITES = ("ifeval", "domain_qa")  # kinds whose rows `sample` selects from


class SuiteSpec(BaseModel):
    """One eval suite. Relative paths are resolved against the suite YAML's folder by `load_suite`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)  # metric namespace and generations file name: <out_dir>/<name>.jsonl
    kind: Literal["ifeval", "domain_qa", "lm_eval_task"]
    data: Path | None = None  # JSONL; required for ifeval and domain_qa
    max_new_tokens: int = Field(256, ge=1)  # generation cap per answer (also lm-eval's max_gen_toks)
    batch_size: int = Field(16, ge=1)  # prompts per generate() call
    limit: int | None = Field(None, ge=1)  # evaluate only the first N rows (None = all)
    # ifeval/domain_qa: evaluate a fixed random subset of N rows (drawn with `sample_seed`, kept in file order),
    # e.g. 120 of IFEval's 541 prompts for curves inside training; applied before `limit`.
    sample: int | None = Field(None, ge=1)
    sample_seed: int = 0
    # domain_qa: text put before each question in the user turn (e.g. "Answer in a few words.")
    instruction: str | None = None
    # lm_eval_task: a task YAML (with local data_files), or the name of a task lm-eval ships.
    task_yaml: Path | None = None
    task: str | None = None
    num_fewshot: int | None = Field(None, ge=0)  # None = the task's own default
    apply_chat_template: bool = False  # lm-eval: wrap requests in the model's chat template
    include_defaults: bool = False  # lm-eval: also index its ~10k built-in task YAMLs (slow, ~seconds)

    @model_validator(mode="after")
    def _check_kind_options(self) -> "SuiteSpec":
        for kind, options in _KIND_OPTIONS.items():
            for opt in sorted(options):
                if self.kind != kind and opt in self.model_fields_set:
                    raise ValueError(f"option '{opt}' only applies to kind '{kind}'; remove it")
        if self.kind not in _ROW_SUITES and ({"sample", "sample_seed"} & self.model_fields_set):
            raise ValueError(f"option 'sample' only applies to kinds {', '.join(_ROW_SUITES)}; use 'limit'")
        if self.kind in ("ifeval", "domain_qa") and self.data is None:
            raise ValueError(f"kind '{self.kind}' needs 'data: path/to/file.jsonl'")
        if self.kind == "lm_eval_task":
            if (self.task_yaml is None) == (self.task is None):
                raise ValueError("kind 'lm_eval_task' needs exactly one of 'task_yaml: path.yaml' or 'task: name'")
            if self.data is not None:
                raise ValueError("kind 'lm_eval_task' reads its data from the task YAML; remove 'data'")
        return self


def _closest(key: str, valid) -> str:
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"did you mean '{match[0]}'?" if match else f"valid keys: {', '.join(sorted(valid))}"


def _config_error(path: Path, err: ValidationError) -> ConfigError:
    """First pydantic error → one line: file, field, bad value, fix."""
    e = err.errors()[0]
    field = ".".join(str(p) for p in e["loc"]) or "(suite)"
    if e["type"] == "extra_forbidden":
        return ConfigError(f"{path}: unknown key '{field}'; {_closest(field, SuiteSpec.model_fields)}")
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "missing":
        return ConfigError(f"{path}: missing required key '{field}'; add it (see eval_suites/*.yaml for examples)")
    if e["loc"]:
        return ConfigError(f"{path}: {field}={e.get('input')!r}: {msg}")
    return ConfigError(f"{path}: {msg}")


def resolve_suite_path(ref: str | Path, base_dir: Path | None = None) -> Path:
    """NAME → base_dir/NAME.yaml, else <repo>/eval_suites/NAME.yaml; anything path-like is a path."""
    ref_s = str(ref)
    looks_like_path = isinstance(ref, Path) or "/" in ref_s or ref_s.endswith((".yaml", ".yml"))
    if looks_like_path:
        path = Path(ref_s).expanduser()
        if not path.is_absolute() and base_dir is not None and (base_dir / path).exists():
            path = base_dir / path
        if not path.is_file():
            raise ConfigError(f"{path}: suite file not found; check the path or use a suite name from {SUITES_DIR}")
        return path
    candidates = ([base_dir / f"{ref_s}.yaml"] if base_dir is not None else []) + [SUITES_DIR / f"{ref_s}.yaml"]
    for cand in candidates:
        if cand.is_file():
            return cand
    known = sorted({p.stem for d in {c.parent for c in candidates} if d.is_dir() for p in d.glob("*.yaml")
                    if _looks_like_suite(p)})
    hint = difflib.get_close_matches(ref_s, known, n=1)
    fix = f"did you mean '{hint[0]}'?" if hint else f"known suites: {', '.join(known) or '(none)'}"
    raise ConfigError(f"suite '{ref_s}' not found (looked in {', '.join(str(c.parent) for c in candidates)}); {fix}")


def _looks_like_suite(path: Path) -> bool:
    """A YAML file whose top level names a suite kind (so a recipe next to a suite is not listed as one)."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and raw.get("kind") in ("ifeval", "domain_qa", "lm_eval_task")


def load_suite(ref: str | Path, base_dir: Path | None = None, *, check_files: bool = True) -> SuiteSpec:
    """Load and validate a suite YAML; relative `data`/`task_yaml` resolve against the YAML's folder.

    `check_files=False` skips the existence check of the data files (to validate a suite whose
    data will be produced later).
    """
    path = resolve_suite_path(ref, base_dir)
    try:
        raw = yaml.safe_load(read_text(path, "suite file"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)}); fix the syntax") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of suite options, got {type(raw).__name__}")
    raw.setdefault("name", path.stem)
    try:
        suite = SuiteSpec.model_validate(raw)
    except ValidationError as err:
        raise _config_error(path, err) from None
    updates = {}
    for field in ("data", "task_yaml"):
        value = getattr(suite, field)
        if value is None:
            continue
        resolved = value.expanduser() if value.expanduser().is_absolute() else (path.parent / value).resolve()
        if check_files and not resolved.is_file():
            raise ConfigError(
                f"{path}: {field}={str(value)!r}: file not found at {resolved}; "
                "create it, or fix the path (relative paths resolve against the suite file's folder)"
            )
        updates[field] = resolved
    return suite.model_copy(update=updates)


def select_rows(rows: list, suite: "SuiteSpec", path: Path | None = None) -> list:
    """Apply `sample` (a seeded subset, in file order) and then `limit` (the first N) to a suite's rows."""
    if suite.sample is not None:
        if suite.sample > len(rows):
            raise ConfigError(f"suite '{suite.name}': sample={suite.sample} but {path or suite.data} has only "
                              f"{len(rows)} rows; lower sample or remove it")
        keep = sorted(random.Random(suite.sample_seed).sample(range(len(rows)), suite.sample))
        rows = [rows[i] for i in keep]
    return rows[: suite.limit] if suite.limit else rows


def seed_everything(seed: int) -> None:
    """Seed every RNG a suite touches (python, numpy, torch; langdetect is seeded by ifeval)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_suite(
    suite: SuiteSpec,
    model,
    tokenizer,
    out_dir: Path | None = None,
    *,
    seed: int = 0,
    chat_template_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
    engine: Any = "continuous",
) -> dict[str, float]:
    """Run one suite on a model in memory → flat {metric: value}, including `eval_time_s`.

    `engine`: the generation engine's name or an `engines.Engine` (lm_eval_task suites use lm-eval's own HF model).

    Generations (one JSON row per example, with its scores) go to `out_dir/<suite.name>.jsonl`
    when `out_dir` is given. The model is left in the train/eval mode it came in.
    """
    seed_everything(seed)
    start = time.perf_counter()
    kwargs = dict(out_dir=Path(out_dir) if out_dir is not None else None, seed=seed,
                  chat_template_kwargs=chat_template_kwargs, progress=progress)
    if suite.kind in ("ifeval", "domain_qa"):
        kwargs["engine"] = engine
    if suite.kind == "ifeval":
        from continual_opd.evals.ifeval import run_ifeval as runner
    elif suite.kind == "domain_qa":
        from continual_opd.evals.domain_qa import run_domain_qa as runner
    elif suite.kind == "lm_eval_task":
        from continual_opd.evals.lm_eval_task import run_lm_eval_task as runner
    else:  # unreachable: SuiteSpec validates kind
        raise ConfigError(f"suite '{suite.name}': unknown kind '{suite.kind}'")
    metrics = runner(suite, model, tokenizer, **kwargs)
    metrics = {k: float(v) for k, v in metrics.items()}
    metrics["eval_time_s"] = round(time.perf_counter() - start, 3)
    return metrics


__all__ = ["SuiteSpec", "load_suite", "resolve_suite_path", "run_suite", "seed_everything", "select_rows", "SUITES_DIR"]
