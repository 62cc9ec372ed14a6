"""Domain QA: does the model answer held-out questions about the new documents? (exact match, token F1, contains)

Rows are JSONL {"question", "answer"} with optional "id"/"fact_id"; "answer" is a string or a list
of acceptable answers. Each question is asked as one user turn (optionally after the suite's
`instruction`), answered greedily, and scored with SQuAD normalization (`contains`: the answer is stated
somewhere in the response, for chat models that answer in full sentences) by the local `evaluate`
module in `metrics/squad_em_f1/` (loaded by path: works offline, no hub lookup).

Abstention: a row with `"answerable": false` (a question the documents cannot answer, written by make-qa) is
correct when the response abstains, i.e. contains one of `ABSTAIN_PHRASES` (SQuAD-normalized, whole words). Such
rows are scored only by `abstain_acc`; exact_match / f1 / contains are computed on the answerable rows alone, so a
suite without unanswerable rows scores exactly as before (and has no `abstain_acc`).
"""

from __future__ import annotations

import functools
from pathlib import Path

from continual_opd.errors import DataError
from continual_opd.io import read_jsonl, write_jsonl

METRIC_DIR = Path(__file__).resolve().parent / "metrics" / "squad_em_f1"
# Responses that decline to answer. Matched after SQuAD normalization ("I don't know." -> "i dont know").
ABSTAIN_PHRASES = ("i don't know", "i do not know", "i dont know", "not in the documents", "not in the document",
                   "documents do not say", "documents don't say", "no information", "cannot find", "can't find",
                   "could not find", "couldn't find", "not mentioned", "not sure", "not specified", "not stated",
                   "no mention", "cannot answer", "can't answer", "unable to answer", "unknown", "no idea")


@functools.lru_cache(maxsize=1)
def load_metric():
    """The local EM/F1 module. `evaluate.load` with a folder path reads our script, never the hub."""
    import evaluate

    return evaluate.load(str(METRIC_DIR), keep_in_memory=True)


def _answers(row: dict, where: str) -> list[str]:
    ans = row["answer"]
    if isinstance(ans, str):
        return [ans]
    if isinstance(ans, list) and ans and all(isinstance(a, str) for a in ans):
        return list(ans)
    raise DataError(f"{where}: 'answer' must be a string or a non-empty list of strings, got {ans!r}")


# words that turn a refusal into a guess; normalized form (lowercase, no punctuation or articles)
GUESS_MARKERS = ("i think", "i believe", "i guess", "my guess", "probably", "maybe", "perhaps", "might be",
                 "could be", "likely")


def load_qa_rows(path: str | Path, limit: int | None = None) -> list[dict]:
    """Read QA JSONL; check each row's question and answer types (errors name the row)."""
    rows = read_jsonl(path, required=("question", "answer"), what="QA rows")
    for i, row in enumerate(rows, start=1):
        where = f"{path}: row {i}" + (f" (id {row['id']})" if "id" in row else "")
        if not isinstance(row["question"], str) or not row["question"].strip():
            raise DataError(f"{where}: 'question' must be a non-empty string")
        _answers(row, where)
        if not isinstance(row.get("answerable", True), bool):
            raise DataError(f"{where}: 'answerable' must be true or false, got {row['answerable']!r}")
    return rows[:limit] if limit else rows


def abstains(response: str) -> bool:
    """The response declines to answer: it states one of `ABSTAIN_PHRASES` (normalized, whole words) and does not
    go on to guess ("I am not sure, but I think it is X" is an invented answer, not an abstention)."""
    from continual_opd.evals.metrics.squad_em_f1.squad_em_f1 import normalize_answer

    text = f" {normalize_answer(response)} "
    return (any(f" {normalize_answer(p)} " in text for p in ABSTAIN_PHRASES)
            and not any(f" {g} " in text for g in GUESS_MARKERS))


def build_prompt(question: str, instruction: str | None = None) -> list[dict[str, str]]:
    """One user turn: the optional instruction, a blank line, then the question."""
    content = f"{instruction.strip()}\n\n{question}" if instruction else question
    return [{"role": "user", "content": content}]


def score_domain_qa(rows: list[dict], responses: list[str]) -> tuple[dict[str, float], list[dict]]:
    """EM/F1/contains of each answerable row's response against its acceptable answers, and `abstain_acc` on the
    rows marked `"answerable": false` (present only when there are some) → (metrics, one record per row)."""
    if len(rows) != len(responses):
        raise ValueError(f"{len(rows)} rows but {len(responses)} responses")
    references = [_answers(r, f"row {i}") for i, r in enumerate(rows, start=1)]
    answerable = [i for i, r in enumerate(rows) if r.get("answerable", True) is not False]
    unanswerable = [i for i, r in enumerate(rows) if r.get("answerable", True) is False]
    # Models often end with a newline or restate with trailing spaces; normalization handles the
    # rest (case, punctuation, articles). We do not cut at the first line: a multi-line answer that
    # buries the fact is not an exact match, but token F1 still gives it partial credit.
    preds = [r.strip() for r in responses]
    scores = load_metric().compute(predictions=[preds[i] for i in answerable],
                                   references=[references[i] for i in answerable], per_example=True)
    per_row = {i: (em, f1, inc) for i, em, f1, inc in zip(answerable, scores["exact_match_per_example"],
                                                           scores["f1_per_example"], scores["contains_per_example"])}
    records = []
    for i, (row, response) in enumerate(zip(rows, responses)):
        rec = {k: row[k] for k in ("id", "fact_id") if k in row}
        rec.update(question=row["question"], answer=row["answer"], response=response)
        if i in per_row:
            em, f1, inc = per_row[i]
            rec.update(exact_match=em, f1=f1, contains=inc)
        else:
            rec.update(answerable=False, abstained=float(abstains(response)))
        records.append(rec)
    # a split with no answerable row has no answer score (not a score of 0)
    metrics = ({"exact_match": scores["exact_match"], "f1": scores["f1"], "contains": scores["contains"]}
               if answerable else {})
    if unanswerable:
        metrics["abstain_acc"] = sum(records[i]["abstained"] for i in unanswerable) / len(unanswerable)
    return metrics, records


def run_domain_qa(suite, model, tokenizer, *, out_dir: Path | None, seed: int, chat_template_kwargs,
                  progress, engine="continuous") -> dict[str, float]:
    """Generate greedy answers to the held-out questions and score them."""
    from continual_opd.generation import generate

    from continual_opd.evals import select_rows

    rows = select_rows(load_qa_rows(suite.data), suite)
    responses = generate(
        model, tokenizer, [build_prompt(r["question"], suite.instruction) for r in rows],
        max_new_tokens=suite.max_new_tokens, batch_size=suite.batch_size, seed=seed,
        chat_template_kwargs=chat_template_kwargs, progress=f"eval {suite.name}" if progress else None, engine=engine,
    )
    metrics, records = score_domain_qa(rows, responses)
    if out_dir is not None:
        write_jsonl(Path(out_dir) / f"{suite.name}.jsonl", records)
    return metrics
