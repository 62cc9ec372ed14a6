"""The demo world generator: reproducible output, clean splits, responses that pass lm-eval's IFEval checkers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from continual_opd.demo import world
from continual_opd.demo.world import WorldConfig, build_world, company_facts, write_world

DATA = Path(__file__).resolve().parents[1] / "data_samples"


def _rows(rel: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / rel).read_text(encoding="utf-8").splitlines()]


def _prompt(row: dict) -> str:
    return row["prompt"] if "prompt" in row else row["messages"][0]["content"]


def test_regenerating_gives_the_committed_files(tmp_path):
    files = write_world(tmp_path)
    owned = {rel.split("/")[0] for rel in files}  # other data_samples/ folders are not generated
    committed = {p.relative_to(DATA).as_posix() for d in owned for p in (DATA / d).rglob("*") if p.is_file()}
    assert committed == set(files), "data_samples differs from the generator; run python -m continual_opd.demo.world"
    for rel in files:
        assert (tmp_path / rel).read_bytes() == (DATA / rel).read_bytes(), rel


def test_data_is_small():
    # the generated demo world (about 2.0 MB) plus the official IFEval prompts (0.2 MB)
    assert sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file()) < 2_500_000


def test_splits_do_not_share_prompts():
    splits = {rel: {_prompt(r) for r in _rows(rel)} for rel in
              ("chat/demo_model_train.jsonl", "chat/sft_chat.jsonl", "chat/opd_prompts.jsonl", "ifeval/eval.jsonl")}
    names = list(splits)
    for i, a in enumerate(names):
        assert len(splits[a]) == len(_rows(a)), f"duplicate prompts inside {a}"
        for b in names[i + 1:]:
            assert not splits[a] & splits[b], f"{a} and {b} share prompts"


def test_eval_combinations_are_held_out():
    """No (question, instruction set) of the eval set is trained on, in any wording."""
    sampler_prompts = {}
    bases = world.base_items()
    phrasing_to_qid = {q: b.qid for b in bases for q in b.phrasings}

    def combo(prompt: str, ids: list[str]):
        qids = {qid for q, qid in phrasing_to_qid.items() if q in prompt}
        return frozenset(qids), frozenset(ids)

    eval_combos = {combo(r["prompt"], r["instruction_id_list"]) for r in _rows("ifeval/eval.jsonl")}
    for rel in ("chat/demo_model_train.jsonl", "chat/opd_prompts.jsonl"):
        for r in _rows(rel):
            if r["instruction_id_list"]:
                sampler_prompts[_prompt(r)] = combo(_prompt(r), r["instruction_id_list"])
    assert not eval_combos & set(sampler_prompts.values())


def test_ifeval_rows_use_the_official_schema_and_argument_names():
    from lm_eval.tasks.ifeval import instructions_registry

    for rel in ("ifeval/eval.jsonl", "chat/opd_prompts.jsonl"):
        rows = _rows(rel)
        assert len({r["key"] for r in rows}) == len(rows)
        for r in rows:
            assert set(r) == {"key", "prompt", "instruction_id_list", "kwargs"}
            assert len(r["instruction_id_list"]) == len(r["kwargs"]) >= 1
            for iid, kw in zip(r["instruction_id_list"], r["kwargs"]):
                checker = instructions_registry.INSTRUCTION_DICT[iid](iid)
                checker.build_description(**kw)
                assert set(kw) == set(checker.get_instruction_args_keys()), (rel, iid, kw)
    assert 100 <= len(_rows("ifeval/eval.jsonl")) <= 150


def test_every_constrained_response_passes_its_checkers():
    langdetect = pytest.importorskip("langdetect")
    from lm_eval.tasks.ifeval.utils import InputExample, test_instruction_following_strict

    langdetect.DetectorFactory.seed = 0  # the case checkers use langdetect, which is random unless seeded
    n = 0
    for rel in ("chat/demo_model_train.jsonl", "chat/sft_chat.jsonl"):
        for r in _rows(rel):
            if not r["instruction_id_list"]:
                continue
            inp = InputExample(key=0, instruction_id_list=r["instruction_id_list"], prompt=_prompt(r),
                               kwargs=r["kwargs"])
            out = test_instruction_following_strict(inp, r["messages"][1]["content"])
            assert out.follow_all_instructions, (r["instruction_id_list"], r["messages"])
            n += 1
    assert n > 1000


def test_chat_rows_and_instruction_mix():
    demo = _rows("chat/demo_model_train.jsonl")
    constrained = [r for r in demo if r["instruction_id_list"]]
    assert 0.5 < len(constrained) / len(demo) < 0.95  # constrained and plain chat
    used = {i for r in constrained for i in r["instruction_id_list"]}
    assert used == set(world.ALL_TYPES)
    for r in demo + _rows("chat/sft_chat.jsonl"):
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"] and r["messages"][1]["content"].strip()
    sft = _rows("chat/sft_chat.jsonl")  # default: mostly plain chat; the rest uses only the types it covers
    covered = {i for r in sft for i in r["instruction_id_list"]}
    assert covered == set(WorldConfig().sft_chat_types) and len(covered) < len(world.ALL_TYPES) / 2
    assert sum(bool(r["instruction_id_list"]) for r in sft) / len(sft) < 0.5


def test_sft_chat_instruction_types_are_one_knob():
    files = build_world(WorldConfig(sft_chat_types=(world.LOWER, world.NO_COMMA)))
    rows = [json.loads(line) for line in files["chat/sft_chat.jsonl"].splitlines()]
    used = {i for r in rows for i in r["instruction_id_list"]}
    assert used == {world.LOWER, world.NO_COMMA}
    assert len(rows) == WorldConfig().n_sft_chat
    other = {r["prompt"] for r in map(json.loads, files["ifeval/eval.jsonl"].splitlines())}
    assert not other & {r["messages"][0]["content"] for r in rows}


def test_company_facts_and_domain_qa():
    facts = company_facts()
    assert len(facts) >= 60 and len({f.fact_id for f in facts}) == len(facts)
    docs = "\n".join(p.read_text(encoding="utf-8") for p in sorted((DATA / "docs").glob("*.md")))
    train, ev = _rows("domain_qa/train.jsonl"), _rows("domain_qa/eval.jsonl")
    for r in train + ev:
        assert r["answer"] in docs, r
    assert {r["fact_id"] for r in ev} == {f.fact_id for f in facts}
    assert all(sum(r["fact_id"] == f.fact_id for r in train) >= 3 for f in facts)
    train_q = {r["question"].lower() for r in train}
    assert not any(r["question"].lower() in train_q for r in ev)
    assert 60 <= len(ev) <= 90
