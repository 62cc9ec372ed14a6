"""Eval suites: scoring on hand-made answers with known scores, suite loading errors, and each kind end to end
on the tiny model (offline, seconds)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from continual_opd.errors import ConfigError, DataError
from continual_opd.evals import SUITES_DIR, SuiteSpec, load_suite, run_suite
from continual_opd.evals import ifeval
from continual_opd.evals.domain_qa import METRIC_DIR, load_metric, score_domain_qa
from continual_opd.evals.ifeval import NLTK_INSTRUCTIONS, load_ifeval_rows, score_ifeval

END = "Is there anything else I can help with?"
IF_ROWS = [
    {"key": 1, "prompt": "Greet me. No commas.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
    {"key": 2, "prompt": "Lowercase JSON.",
     "instruction_id_list": ["change_case:english_lowercase", "detectable_format:json_format"], "kwargs": [{}, {}]},
    {"key": 3, "prompt": "Under 3 sentences, end with a phrase.",
     "instruction_id_list": ["length_constraints:number_sentences", "startend:end_checker"],
     "kwargs": [{"relation": "less than", "num_sentences": 3}, {"end_phrase": END}]},
    {"key": 4, "prompt": "Two bullets, capitals.",
     "instruction_id_list": ["change_case:capital_word_frequency", "detectable_format:number_bullet_lists"],
     "kwargs": [{"capital_relation": "at least", "capital_frequency": 2}, {"num_bullets": 2}]},
    {"key": 5, "prompt": "No commas again.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
]
IF_RESPONSES = [
    "hello there my friend",                      # no comma: pass
    # A preamble line breaks strict lowercase and strict JSON; loose drops the first line: both pass.
    'Sure here it is:\n{"answer": "the weather is nice today and we are going to the park"}',
    f"I like tea. {END}",                         # 2 sentences (< 3), right ending: pass both
    "* FIRST item\n* SECOND item",                # 2 capital words, 2 bullets: pass both
    "hello, world",                               # comma: fail
]


def test_ifeval_scores_match_hand_computed_values():
    metrics, records = score_ifeval(IF_ROWS, IF_RESPONSES)
    assert metrics["prompt_level_strict_acc"] == pytest.approx(3 / 5)   # rows 1, 3, 4
    assert metrics["inst_level_strict_acc"] == pytest.approx(5 / 8)     # 8 instructions, fails: 2 in row 2, row 5
    assert metrics["prompt_level_loose_acc"] == pytest.approx(4 / 5)
    assert metrics["inst_level_loose_acc"] == pytest.approx(7 / 8)
    assert metrics["type/punctuation:no_comma"] == pytest.approx(1 / 2)
    assert metrics["type/change_case:english_lowercase"] == 0.0
    assert metrics["type/length_constraints:number_sentences"] == 1.0
    assert metrics["unscored_instructions"] == 0.0
    assert [r["strict"] for r in records] == [True, False, True, True, False]
    assert records[1]["follow_instruction_list"] == [False, False]
    assert set(records[0]) >= {"key", "prompt", "response", "instruction_id_list", "follow_instruction_list", "strict"}


def test_ifeval_scoring_is_reproducible():
    assert score_ifeval(IF_ROWS, IF_RESPONSES) == score_ifeval(IF_ROWS, IF_RESPONSES)


def test_ifeval_without_nltk_data_skips_two_types_with_one_warning(monkeypatch, caplog):
    import nltk

    def missing(resource, *a, **k):
        raise LookupError(resource)

    monkeypatch.setattr(nltk.data, "find", missing)
    monkeypatch.setattr(ifeval, "_warned_unscored", set())
    with caplog.at_level(logging.WARNING):
        metrics, records = score_ifeval(IF_ROWS, IF_RESPONSES)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "punkt_tab" in warnings[0].getMessage() and "NLTK_DATA" in warnings[0].getMessage()
    assert metrics["unscored_instructions"] == 2.0
    assert not any(k.removeprefix("type/") in NLTK_INSTRUCTIONS for k in metrics)
    # Remaining: row1 [T], row2 [F,F], row3 [end: T], row4 [bullets: T], row5 [F] → 3/6 instructions.
    assert metrics["inst_level_strict_acc"] == pytest.approx(3 / 6)
    assert metrics["prompt_level_strict_acc"] == pytest.approx(3 / 5)
    assert records[2]["scored_instruction_ids"] == ["startend:end_checker"]
    caplog.clear()
    score_ifeval(IF_ROWS, IF_RESPONSES)  # evaluated again later in the run: no second warning
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_ifeval_row_validation(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"key": 1, "prompt": "p", "instruction_id_list": ["punctuation:no_coma"],
                               "kwargs": [{}]}) + "\n")
    with pytest.raises(DataError, match="did you mean 'punctuation:no_comma'"):
        load_ifeval_rows(bad)
    bad.write_text(json.dumps({"key": 1, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"],
                               "kwargs": []}) + "\n")
    with pytest.raises(DataError, match="same length"):
        load_ifeval_rows(bad)


OFFICIAL = Path(__file__).resolve().parents[1] / "data_samples" / "ifeval_official" / "input_data.jsonl"


def test_shipped_official_ifeval_is_the_published_file(shared_dir):
    assert OFFICIAL.read_bytes() == (shared_dir / "ifeval" / "input_data.jsonl").read_bytes()


def test_official_suites_use_the_shipped_file_and_a_fixed_subset():
    from continual_opd.evals import load_suite, select_rows

    full, sub = load_suite("ifeval_official"), load_suite("ifeval_official_120")
    assert full.data == sub.data == OFFICIAL and full.max_new_tokens == sub.max_new_tokens == 1280
    rows = load_ifeval_rows(full.data)
    picked = select_rows(rows, sub)
    assert len(picked) == 120 and len({r["key"] for r in picked}) == 120
    index = {r["key"]: i for i, r in enumerate(rows)}
    assert [index[r["key"]] for r in picked] == sorted(index[r["key"]] for r in picked)  # file order
    assert [r["key"] for r in picked] == [r["key"] for r in select_rows(rows, sub)]  # the same every time
    assert picked[:3] != rows[:3]  # a sample, not the head of the file


def test_official_ifeval_file_loads_and_scores():
    rows = load_ifeval_rows(OFFICIAL)
    assert len(rows) == 541
    by_key = {r["key"]: r for r in rows}
    # key 1001: only "no commas"; key 1005: at least 12 [placeholders].
    picked = [by_key[1001], by_key[1001], by_key[1005]]
    answers = ["Fair Kyoto awaits thee", "Fair Kyoto, awaits thee", " ".join(f"[p{i}]" for i in range(12))]
    metrics, _ = score_ifeval(picked, answers)
    assert metrics["prompt_level_strict_acc"] == pytest.approx(2 / 3)
    # Empty answers fail every instruction (lm-eval's rule), across all 541 prompts and 25 types.
    some = rows[::10]
    metrics, _ = score_ifeval(some, [""] * len(some))
    assert metrics["prompt_level_strict_acc"] == 0.0 and metrics["inst_level_loose_acc"] == 0.0


QA_ROWS = [
    {"id": "q1", "fact_id": "f1", "question": "Who founded Acme?", "answer": "Ada Lovelace"},
    {"id": "q2", "question": "What colour is the logo?", "answer": ["teal", "blue-green"]},
    {"question": "Which floor is the canteen on?", "answer": "the third floor"},
    {"question": "What is the code?", "answer": "ZX-9"},
]


def test_domain_qa_em_and_f1_known_values():
    responses = ["ada lovelace.", "Blue-green!", "Third floor of the east wing", "no idea"]
    metrics, records = score_domain_qa(QA_ROWS, responses)
    # EM: 1, 1 (second reference), 0, 0. F1 row 3: pred {third, floor, of, east, wing} vs {third, floor}
    # → P=2/5, R=1 → 4/7.
    assert metrics["exact_match"] == pytest.approx(2 / 4)
    assert metrics["f1"] == pytest.approx((1 + 1 + 4 / 7 + 0) / 4)
    assert [r["exact_match"] for r in records] == [1.0, 1.0, 0.0, 0.0]
    assert records[0]["id"] == "q1" and records[0]["fact_id"] == "f1" and "id" not in records[2]
    # contains: rows 1-3 state an answer ("the third floor" normalizes to "third floor"); row 4 does not
    assert [r["contains"] for r in records] == [1.0, 1.0, 1.0, 0.0] and metrics["contains"] == 0.75


def test_domain_qa_contains_needs_whole_words():
    rows = [{"question": "q", "answer": "2009"}, {"question": "q", "answer": "Ghent"},
            {"question": "q", "answer": "12 May 2009"}]
    responses = ["It was founded in 20091.", "Our head office is in Ghent, Belgium.", "On 12 may 2009, in a greenhouse"]
    _, records = score_domain_qa(rows, responses)
    assert [r["contains"] for r in records] == [0.0, 1.0, 1.0]


def test_local_evaluate_module_loads_offline():
    assert os.environ.get("HF_EVALUATE_OFFLINE") == "1"
    assert (METRIC_DIR / "squad_em_f1.py").is_file()
    metric = load_metric()
    out = metric.compute(predictions=["The Eiffel Tower", "x"], references=[["eiffel tower"], ["y", "z"]])
    assert out == {"exact_match": 0.5, "f1": 0.5, "contains": 0.5}


# ---------------------------------------------------------------------------------------------- load_suite


def write_suite(tmp_path, text: str, name="s.yaml"):
    path = tmp_path / name
    path.write_text(text)
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in QA_ROWS))
    return path


def test_load_suite_resolves_relative_data_against_the_yaml(tmp_path, monkeypatch):
    path = write_suite(tmp_path, "kind: domain_qa\ndata: qa.jsonl\nmax_new_tokens: 8\n")
    monkeypatch.chdir("/")
    suite = load_suite(path)
    assert suite.name == "s" and suite.data == (tmp_path / "qa.jsonl").resolve()
    assert load_suite("s", base_dir=tmp_path).data == suite.data  # bare name looks in base_dir first


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("kind: domain_qa\ndata: qa.jsonl\nmax_new_token: 8\n",
         r"unknown key 'max_new_token'; did you mean 'max_new_tokens'\?"),
        ("kind: domain_qa\ndata: qa.jsonl\nbatch_size: 0\n", r"batch_size=0: .*greater than or equal to 1"),
        ("kind: ifevall\ndata: qa.jsonl\n", r"kind='ifevall'"),
        ("kind: domain_qa\ndata: missing.jsonl\n", r"data='missing.jsonl': file not found"),
        ("kind: ifeval\ndata: qa.jsonl\nnum_fewshot: 2\n", r"option 'num_fewshot' only applies to kind 'lm_eval_task'"),
        ("kind: domain_qa\n", r"needs 'data"),
        ("kind: lm_eval_task\n", r"exactly one of 'task_yaml"),
        ("name: x\n", r"missing required key 'kind'"),
        ("kind: [unclosed\n", r"s\.yaml:\d+: invalid YAML"),
        ("- a list\n", r"expected a mapping"),
    ],
)
def test_load_suite_errors_are_one_line_and_name_the_fix(tmp_path, text, pattern):
    path = write_suite(tmp_path, text)
    with pytest.raises(ConfigError, match=pattern) as exc:
        load_suite(path)
    assert "\n" not in str(exc.value) and str(path) in str(exc.value)


def test_unknown_suite_name_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'ifeval'"):
        load_suite("ifevl")


@pytest.mark.parametrize("yaml_path", sorted(SUITES_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_suites_are_valid(yaml_path):
    suite = load_suite(yaml_path.stem, check_files=False)
    assert suite.name == yaml_path.stem
    assert yaml_path.read_text().startswith("#") and "continual-opd eval" in yaml_path.read_text()


# ------------------------------------------------------------------------------------ run_suite end to end


def test_run_domain_qa_and_ifeval_on_tiny_model(tiny_lm, tmp_path):
    model, tok = tiny_lm
    (tmp_path / "if.jsonl").write_text("".join(json.dumps(r) + "\n" for r in IF_ROWS))
    for text in ("kind: domain_qa\ndata: qa.jsonl\nmax_new_tokens: 4\nbatch_size: 2\ninstruction: Answer briefly.\n",
                 "kind: ifeval\ndata: if.jsonl\nmax_new_tokens: 4\nbatch_size: 2\nlimit: 3\n"):
        suite = load_suite(write_suite(tmp_path, text, name=text.split()[1] + ".yaml"))
        metrics = run_suite(suite, model, tok, out_dir=tmp_path / "out", progress=False)
        assert metrics["eval_time_s"] > 0 and all(isinstance(v, float) for v in metrics.values())
        assert metrics == {**run_suite(suite, model, tok, progress=False), "eval_time_s": metrics["eval_time_s"]}
        lines = (tmp_path / "out" / f"{suite.name}.jsonl").read_text().splitlines()
        assert len(lines) == (3 if suite.kind == "ifeval" else len(QA_ROWS))
        assert "response" in json.loads(lines[0])


def test_run_lm_eval_task_sample_on_tiny_model(tiny_lm, tmp_path, monkeypatch):
    model, tok = tiny_lm
    monkeypatch.chdir(tmp_path)  # the task's relative data_files must resolve against its YAML, not the cwd
    suite = load_suite("mc_sample")
    model.train()
    try:
        metrics = run_suite(suite, model, tok, out_dir=tmp_path, progress=False)
        assert model.training  # lm-eval's HFLM calls model.eval(); we put it back
    finally:
        model.eval()
    assert set(metrics) == {"acc", "acc_norm", "eval_time_s"}
    assert 0.0 <= metrics["acc"] <= 1.0 and 0.0 <= metrics["acc_norm"] <= 1.0
    rows = [json.loads(line) for line in (tmp_path / "mc_sample.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and rows[0]["doc"]["question"] == "What is the capital of France?"
    # Same model, same data → same metrics (log-likelihood scoring is deterministic).
    again = run_suite(suite.model_copy(update={"limit": 4}), model, tok, progress=False)
    assert set(again) == set(metrics)


def test_suite_spec_can_be_built_in_code():
    spec = SuiteSpec(name="x", kind="lm_eval_task", task="hellaswag", num_fewshot=0)
    assert spec.task == "hellaswag" and spec.data is None
