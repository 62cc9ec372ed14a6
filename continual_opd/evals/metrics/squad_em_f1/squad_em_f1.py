"""SQuAD-style exact match and token F1 against one or more acceptable answers, as an `evaluate` module.

Shipped inside the package and loaded by path (`evaluate.load(<this folder>)`), so it works offline
(HF_EVALUATE_OFFLINE=1) and never depends on the hub's `squad` script. Scores are fractions in
[0, 1] (the hub's `squad` metric reports percentages), matching the scale of every other suite.
"""

import collections
import re
import string

import datasets
import evaluate

_DESCRIPTION = """Exact match and bag-of-tokens F1 after SQuAD normalization (lowercase, strip punctuation,
drop the articles a/an/the, collapse whitespace); each prediction takes its best score over its references."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of predicted answer strings.
    references: list of lists of acceptable answer strings (one list per prediction).
    per_example: if True, also return `exact_match_per_example`, `f1_per_example` and `contains_per_example`.
Returns:
    exact_match: mean exact match in [0, 1].
    f1: mean token F1 in [0, 1].
    contains: share of predictions that state a reference answer somewhere (normalized, whole words).
Examples:
    >>> m = evaluate.load("continual_opd/evals/metrics/squad_em_f1")
    >>> m.compute(predictions=["The Eiffel tower"], references=[["Eiffel Tower", "la tour Eiffel"]])
    {'exact_match': 1.0, 'f1': 1.0, 'contains': 1.0}
"""

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """The official SQuAD v1.1 normalization."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def contains(prediction: str, reference: str) -> float:
    """The normalized reference occurs in the normalized prediction as whole words (a chat model's full sentence
    that states the answer counts; a longer number or name that merely starts with it does not)."""
    ref = normalize_answer(reference)
    return float(bool(ref) and f" {ref} " in f" {normalize_answer(prediction)} ")


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:  # both empty → agree; one empty → nothing in common
        return float(pred == ref)
    common = collections.Counter(pred) & collections.Counter(ref)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SquadEmF1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Rajpurkar et al., SQuAD: 100,000+ Questions for Machine Comprehension of Text, 2016.",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references, per_example: bool = False):
        em = [max(exact_match(p, r) for r in refs) if refs else 0.0 for p, refs in zip(predictions, references)]
        f1 = [max(token_f1(p, r) for r in refs) if refs else 0.0 for p, refs in zip(predictions, references)]
        inc = [max(contains(p, r) for r in refs) if refs else 0.0 for p, refs in zip(predictions, references)]
        n = max(len(em), 1)
        out = {"exact_match": sum(em) / n, "f1": sum(f1) / n, "contains": sum(inc) / n}
        if per_example:
            out.update(exact_match_per_example=em, f1_per_example=f1, contains_per_example=inc)
        return out
