"""Any lm-evaluation-harness task, run in process on the model we already hold (no reload, no server).

The suite names either a task YAML (`task_yaml:`, usually with local `data_files`) or a task lm-eval
ships (`task:`; those mostly download their data from the hub, so they need a connection). We wrap
the in-memory model with `HFLM(pretrained=model, tokenizer=tokenizer)` and call
`lm_eval.simple_evaluate`. The task's metrics come back flat: `acc`, `acc_norm`, ... (lm-eval's
"<metric>,<filter>" keys lose the default filter name "none"; other filters become "<metric>/<filter>").
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

from continual_opd.errors import ConfigError
from continual_opd.io import write_jsonl



def load_task_config(task_yaml: Path) -> dict[str, Any]:
    """Read a task YAML with lm-eval's loader (`include:` and `!function` work) → inline task config.

    lm-eval passes `dataset_kwargs.data_files` straight to `datasets.load_dataset`, which resolves
    relative paths against the *working directory*; we resolve them against the YAML's folder so a
    task folder works from anywhere.
    """
    from lm_eval.tasks._yaml_loader import load_yaml  # private module, but it is what TaskManager uses

    try:
        cfg = load_yaml(task_yaml, resolve_func=True)
    except Exception as e:  # yaml errors, missing include, bad !function: all config mistakes
        raise ConfigError(f"{task_yaml}: cannot load lm-eval task YAML ({type(e).__name__}: {e})") from None
    if "task" not in cfg or "group" in cfg or isinstance(cfg.get("task"), list):
        raise ConfigError(
            f"{task_yaml}: expected a single lm-eval task (a 'task: name' key, no 'group'); "
            "point task_yaml at one task's YAML, or use 'task: <name>' for a task lm-eval ships"
        )
    data_files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if data_files is not None:
        cfg["dataset_kwargs"]["data_files"] = _resolve_data_files(data_files, task_yaml.parent)
    return cfg


def _resolve_data_files(spec, base: Path):
    """data_files may be a str, a list, or {split: str | list}; make every local relative path absolute."""
    if isinstance(spec, dict):
        return {split: _resolve_data_files(v, base) for split, v in spec.items()}
    if isinstance(spec, list):
        return [_resolve_data_files(v, base) for v in spec]
    if isinstance(spec, str) and "://" not in spec and not Path(spec).is_absolute():
        return str((base / spec).resolve())
    return spec


def flatten_results(task_results: dict[str, Any]) -> dict[str, float]:
    """{"acc,none": 0.4, "acc_stderr,none": "N/A", "alias": ...} → {"acc": 0.4}: numeric metrics only."""
    flat = {}
    for key, value in task_results.items():
        if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # alias, name, sample_len, "N/A" stderrs
        metric, filt = key.split(",", 1)
        if metric.endswith("_stderr"):
            continue  # bootstrap stderr; we run with bootstrap_iters=0 (it costs seconds per metric)
        flat[metric if filt == "none" else f"{metric}/{filt}"] = float(value)
    return flat


class _DropExpectedWarnings(logging.Filter):
    """HFLM warns on every call that `pretrained` is not a string: passing a live model is our design."""

    EXPECTED = ("`pretrained` model kwarg is not of type", "Passed an already-initialized model")

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.EXPECTED)


@contextlib.contextmanager
def _preserve(model, tokenizer):
    """HFLM puts the model in eval mode and may set a pad token / padding side; undo that after."""
    was_training = model.training
    saved = {k: getattr(tokenizer, k) for k in ("padding_side", "pad_token")}
    hf_logger, quiet = logging.getLogger("lm_eval.models.huggingface"), _DropExpectedWarnings()
    hf_logger.addFilter(quiet)
    try:
        yield
    finally:
        hf_logger.removeFilter(quiet)
        model.train(was_training)
        for k, v in saved.items():
            setattr(tokenizer, k, v)


def run_lm_eval_task(suite, model, tokenizer, *, out_dir: Path | None, seed: int, chat_template_kwargs,
                     progress) -> dict[str, float]:
    """Evaluate the in-memory model on one lm-eval task; per-sample logs go to out_dir/<name>.jsonl."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if suite.task_yaml is not None:
        spec: str | dict = load_task_config(Path(suite.task_yaml))
        include_path = str(Path(suite.task_yaml).parent)  # lets the YAML's siblings be found by name
    else:
        spec, include_path = suite.task, None
    # Indexing lm-eval's bundled tasks walks ~10k YAML files; only do it when asked (or needed).
    task_manager = TaskManager(include_path=include_path,
                               include_defaults=suite.include_defaults or suite.task is not None)
    if isinstance(spec, str) and spec not in task_manager.all_tasks:
        raise ConfigError(f"suite '{suite.name}': lm-eval has no task '{spec}'; check the name (`lm-eval ls tasks`)")

    # The suite's max_new_tokens overrides the task's max_gen_toks only when the suite sets it.
    gen_kwargs = {"max_gen_toks": suite.max_new_tokens} if "max_new_tokens" in suite.model_fields_set else None
    with _preserve(model, tokenizer):
        lm = HFLM(
            pretrained=model, tokenizer=tokenizer, batch_size=suite.batch_size,
            enable_thinking=(chat_template_kwargs or {}).get("enable_thinking"),
            chat_template_args=chat_template_kwargs or None,
        )
        results = lm_eval.simple_evaluate(
            model=lm, tasks=[spec], task_manager=task_manager, num_fewshot=suite.num_fewshot,
            limit=suite.limit, apply_chat_template=suite.apply_chat_template, gen_kwargs=gen_kwargs,
            bootstrap_iters=0, log_samples=out_dir is not None, cache_requests=False,
            # simple_evaluate reseeds python/numpy/torch globally; tie its seeds to ours.
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        )
    if results is None:  # only happens on non-zero ranks in distributed runs
        return {}
    metrics: dict[str, float] = {}
    task_names = list(results["results"])
    for name in task_names:
        flat = flatten_results(results["results"][name])
        # One task → bare metric names; several (a task that expands) → "<task>/<metric>".
        metrics.update(flat if len(task_names) == 1 else {f"{name}/{k}": v for k, v in flat.items()})
    if out_dir is not None:
        rows = []
        for name, samples in (results.get("samples") or {}).items():
            for s in samples:
                row = {"task": name, "doc_id": s.get("doc_id"), "doc": s.get("doc"), "target": s.get("target"),
                       "resps": s.get("filtered_resps")}
                row.update({m: s.get(m) for m in s.get("metrics", []) if m in s})
                rows.append(json.loads(json.dumps(row, default=str)))  # tensors/numpy → JSON-safe
        write_jsonl(Path(out_dir) / f"{suite.name}.jsonl", rows)
    return metrics
