"""IFEval: verifiable instructions ("answer in lowercase", "no commas", ...) scored by lm-eval's checkers.

We generate ourselves (batched, chat template, model already in memory) and reuse lm-eval's
`test_instruction_following_strict/loose` so our four headline numbers mean exactly what
lm-eval's `ifeval` task reports. Reported:
  prompt_level_strict_acc, inst_level_strict_acc, prompt_level_loose_acc, inst_level_loose_acc,
  type/<instruction_id> (strict, per instruction type), unscored_instructions.

Two checkers need NLTK's `punkt_tab` (sentence splitting and word tokenization). The package ships
its English model (continual_opd/resources/nltk_data, Apache-2.0, from NLTK's data), used when NLTK
finds none of its own (NLTK_DATA and NLTK's default folders win). If even that is gone, those
instructions are skipped with one warning instead of crashing or downloading.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import io
import logging
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

from continual_opd.errors import DataError
from continual_opd.io import read_jsonl, write_jsonl

log = logging.getLogger(__name__)

IFEVAL_KEYS = ("key", "prompt", "instruction_id_list", "kwargs")
METRICS = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc")
# Checkers that call NLTK's punkt_tab: NumberOfSentences (count_sentences → punkt sentence
# tokenizer) and CapitalWordFrequencyChecker (nltk.word_tokenize). count_words uses a regexp
# tokenizer and needs no data.
NLTK_INSTRUCTIONS = frozenset({"length_constraints:number_sentences", "change_case:capital_word_frequency"})
NLTK_RESOURCE = "tokenizers/punkt_tab"
BUNDLED_NLTK_DATA = Path(__file__).resolve().parents[1] / "resources" / "nltk_data"
_warned_unscored: set[str] = set()


def _add_bundled_nltk_data() -> None:
    """Put the shipped punkt_tab last on NLTK's search path, so any copy the user has comes first."""
    import nltk

    if str(BUNDLED_NLTK_DATA) not in nltk.data.path:
        nltk.data.path.append(str(BUNDLED_NLTK_DATA))


def punkt_available() -> bool:
    """Checked on every scoring call (not cached) so NLTK_DATA changes and test patches take effect."""
    import nltk

    _add_bundled_nltk_data()
    try:
        nltk.data.find(NLTK_RESOURCE)
        return True
    except LookupError:
        return False


@functools.lru_cache(maxsize=1)
def _lm_eval_ifeval():
    """Import lm-eval's IFEval modules (≈2 s the first time).

    Importing `instructions_util` calls `nltk.download("punkt_tab")` when the resource is missing.
    Offline that is at best noise and at worst a network timeout, so we neutralise the download
    (and its print) for the duration of the import; missing data is reported by `punkt_available`.
    """
    import nltk

    _add_bundled_nltk_data()
    real_download = nltk.download
    nltk.download = lambda *a, **k: False
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            from lm_eval.tasks.ifeval import instructions_registry, utils
    finally:
        nltk.download = real_download
    return utils, instructions_registry


def load_ifeval_rows(path: str | Path, limit: int | None = None) -> list[dict]:
    """Read IFEval-schema JSONL and check every instruction id and kwargs list (file:line errors)."""
    _, registry = _lm_eval_ifeval()
    rows = read_jsonl(path, required=IFEVAL_KEYS, what="IFEval prompts")
    for lineno, row in enumerate(rows, start=1):  # line numbers of non-blank rows
        ids, kwargs = row["instruction_id_list"], row["kwargs"]
        if not isinstance(ids, list) or not isinstance(kwargs, list) or len(ids) != len(kwargs):
            raise DataError(f"{path}: row {lineno} (key {row['key']}): instruction_id_list and kwargs must be lists "
                            "of the same length")
        for iid in ids:
            if iid not in registry.INSTRUCTION_DICT:
                near = difflib.get_close_matches(iid, registry.INSTRUCTION_DICT, n=1)
                fix = f"did you mean '{near[0]}'?" if near else "see lm_eval/tasks/ifeval/instructions_registry.py"
                raise DataError(f"{path}: row {lineno} (key {row['key']}): unknown instruction id '{iid}'; {fix}")
    return rows[:limit] if limit else rows


def _mean(xs: list[bool]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def score_ifeval(rows: list[dict], responses: list[str]) -> tuple[dict[str, float], list[dict]]:
    """Score responses with lm-eval's strict and loose checkers → (metrics, one record per row).

    Instructions whose checker needs missing NLTK data are left out of every metric (a prompt
    whose instructions are all unscored is left out of the prompt-level metrics too) and counted
    in `unscored_instructions`.
    """
    if len(rows) != len(responses):
        raise ValueError(f"{len(rows)} rows but {len(responses)} responses")
    utils, _ = _lm_eval_ifeval()
    # Checkers are randomised: langdetect's detector and build_description's defaults. Seed both so
    # the same responses always get the same scores.
    import langdetect

    langdetect.DetectorFactory.seed = 0
    random.seed(0)

    skip = set() if punkt_available() else set(NLTK_INSTRUCTIONS)
    unscored_types = sorted({i for r in rows for i in r["instruction_id_list"] if i in skip} - _warned_unscored)
    if unscored_types:  # once per type per process: a run evaluates many times, one warning is enough
        _warned_unscored.update(unscored_types)
        log.warning(
            "NLTK resource '%s' not found: IFEval instruction types %s are unscored and excluded from the "
            "metrics; provide it by pointing NLTK_DATA at a folder containing tokenizers/punkt_tab "
            "(e.g. from `python -m nltk.downloader -d DIR punkt_tab` on a machine with internet).",
            NLTK_RESOURCE, ", ".join(unscored_types),
        )

    prompt_strict, prompt_loose, inst_strict, inst_loose = [], [], [], []
    by_type: dict[str, list[bool]] = defaultdict(list)
    records, unscored = [], 0
    for row, response in zip(rows, responses):
        keep = [j for j, iid in enumerate(row["instruction_id_list"]) if iid not in skip]
        unscored += len(row["instruction_id_list"]) - len(keep)
        ids = [row["instruction_id_list"][j] for j in keep]
        record: dict[str, Any] = {"key": row["key"], "prompt": row["prompt"], "response": response,
                                  "instruction_id_list": row["instruction_id_list"]}
        if ids:
            inp = utils.InputExample(key=row["key"], instruction_id_list=ids, prompt=row["prompt"],
                                     kwargs=[row["kwargs"][j] for j in keep])
            strict = utils.test_instruction_following_strict(inp, response)
            loose = utils.test_instruction_following_loose(inp, response)
            prompt_strict.append(strict.follow_all_instructions)
            prompt_loose.append(loose.follow_all_instructions)
            inst_strict += strict.follow_instruction_list
            inst_loose += loose.follow_instruction_list
            for iid, ok in zip(ids, strict.follow_instruction_list):
                by_type[iid].append(ok)
            record.update(scored_instruction_ids=ids, follow_instruction_list=strict.follow_instruction_list,
                          loose_follow_instruction_list=loose.follow_instruction_list,
                          strict=strict.follow_all_instructions, loose=loose.follow_all_instructions)
        else:
            record.update(scored_instruction_ids=[], follow_instruction_list=[],
                          loose_follow_instruction_list=[], strict=None, loose=None)
        records.append(record)

    metrics = {
        "prompt_level_strict_acc": _mean(prompt_strict),
        "inst_level_strict_acc": _mean(inst_strict),
        "prompt_level_loose_acc": _mean(prompt_loose),
        "inst_level_loose_acc": _mean(inst_loose),
    }
    metrics.update({f"type/{iid}": _mean(oks) for iid, oks in sorted(by_type.items())})
    metrics["unscored_instructions"] = float(unscored)
    return metrics, records


def run_ifeval(suite, model, tokenizer, *, out_dir: Path | None, seed: int, chat_template_kwargs,
               progress, engine="continuous") -> dict[str, float]:
    """Generate greedy answers to each IFEval prompt (as one user turn) and score them."""
    from continual_opd.evals import select_rows
    from continual_opd.generation import generate

    rows = select_rows(load_ifeval_rows(suite.data), suite)
    responses = generate(
        model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=suite.max_new_tokens,
        batch_size=suite.batch_size, seed=seed, chat_template_kwargs=chat_template_kwargs,
        progress=f"eval {suite.name}" if progress else None, engine=engine,
    )
    metrics, records = score_ifeval(rows, responses)
    if out_dir is not None:
        write_jsonl(Path(out_dir) / f"{suite.name}.jsonl", records)
    return metrics
