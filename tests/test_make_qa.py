"""make-qa: the offline extractor, checks, the fact-level split, unanswerable questions, the chat backends (against a
fake OpenAI-compatible server on 127.0.0.1), abstention scoring and the suite files it writes."""

from __future__ import annotations

import importlib.util
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from continual_opd.errors import DataError, RunDirError
from continual_opd.evals import load_suite
from continual_opd.evals.domain_qa import load_qa_rows, score_domain_qa
from continual_opd.io import read_jsonl
from continual_opd.make_qa import (EndpointBackend, EndpointError, LocalBackend, check_pair, extract_pairs, make_qa,
                                   normalize, parse_pairs, split_passages)
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]

HANDBOOK = """# IT handbook

## Remote access

The VPN gateway is owned by Marta Ilves. Access requests use form VPN-220 and are answered within 2 working days.

Our data centre has been certified to ISO 27001 since 14 March 2021. Questions go to netops@example.com.

## Hardware

Laptops are replaced every 4 years. Broken screens are reported in the channel #hw-help.
"""
TRAVEL = """# Travel

Trips abroad are approved by Jonas Weber. The daily meal allowance is 42 euros.

Flights are booked through Skyfare at least 10 days ahead. The travel desk opens at 08:30.
"""
DOCS = [("handbook.md", HANDBOOK), ("travel.md", TRAVEL)]


def _by_answer(passages):
    out: dict[str, list[dict]] = {}
    for p in passages:
        for pair in extract_pairs(p):
            if check_pair(pair, p) is None:
                out.setdefault(pair["answer"], []).append(dict(pair, passage=p.text))
    return out


def test_extractor_finds_facts_with_several_wordings_and_no_answer_in_question():
    passages = split_passages("handbook.md", HANDBOOK)
    assert [p.section for p in passages] == ["Remote access", "Remote access", "Hardware"]
    found = _by_answer(passages)
    for answer in ("Marta Ilves", "VPN-220", "2 working days", "ISO 27001", "14 March 2021", "netops@example.com",
                   "4 years", "#hw-help"):
        wordings = found.get(answer, [])
        assert len({w["question"] for w in wordings}) >= 3, (answer, wordings)
        for w in wordings:
            assert normalize(answer) not in normalize(w["question"]).replace("___", " "), w
            assert normalize(answer) in normalize(w["passage"])
            assert w["question"].endswith("?") or "___" in w["question"]
    wh = {w["question"] for w in found["Marta Ilves"] if w["wording"] == "wh"}
    assert wh == {"Who is the VPN gateway owned by?"}
    assert any(w["question"] == "Laptops are replaced every how many years?" for w in found["4 years"])
    assert "3" not in found and "4" not in found  # a number keeps its unit


def test_checks_reject_and_cloze_blanks_every_occurrence():
    p = split_passages("d.md", "The Atlas lamp costs 30 euros. The Atlas lamp is blue.")[0]
    assert check_pair({"question": "How much does it cost?", "answer": "31 euros"}, p) == "answer_not_in_passage"
    assert check_pair({"question": "Does the Atlas lamp cost 30 euros?", "answer": "30 euros"}, p) == \
        "answer_in_question"
    assert check_pair({"question": "Tell me the price", "answer": "30 euros"}, p) == "bad_question"
    assert check_pair({"question": "What does the lamp cost?", "answer": "30 euros"}, p) is None
    from continual_opd.make_qa import cloze

    assert cloze("Atlas is Atlas's name; atlas.", "Atlas") == "___ is ___'s name; ___."


def test_split_keeps_eval_wordings_out_of_train_and_every_eval_fact_trains(tmp_path):
    m = make_qa(DOCS, tmp_path / "qa", seed=3)
    train = read_jsonl(tmp_path / "qa/train.jsonl")
    dev, test = (read_jsonl(tmp_path / f"qa/{s}.jsonl") for s in ("dev", "test"))
    train_q = {normalize(r["question"]) for r in train}
    train_facts = {r["fact_id"] for r in train}
    answerable = [r for r in dev + test if r["answerable"]]
    assert answerable and not train_q & {normalize(r["question"]) for r in dev + test}
    assert all(r["fact_id"] in train_facts for r in answerable)
    assert not {r["fact_id"] for r in dev} & {r["fact_id"] for r in test}  # a fact is in dev or in test, not both
    assert {normalize(r["question"]) for r in read_jsonl(tmp_path / "qa/doc_prompts.jsonl")} <= train_q
    facts = read_jsonl(tmp_path / "qa/facts.jsonl")
    assert {f["fact_id"] for f in facts} >= {r["fact_id"] for r in answerable}
    assert all(normalize(f["answer"]) in normalize(f["passage"]) for f in facts)
    c = m["counts"]
    assert (c["train"], c["dev"], c["test"]) == (len(train), sum(r["answerable"] for r in dev),
                                                 sum(r["answerable"] for r in test))
    assert len(m["documents"]) == 2 and all(len(d["sha256"]) == 64 for d in m["documents"])
    assert json.loads((tmp_path / "qa/manifest.json").read_text()) == m
    # the same inputs and seed give the same files; the split does not depend on where the files live
    make_qa([("elsewhere/" + p, t) for p, t in DOCS], tmp_path / "qa2", seed=3)
    for name in ("train.jsonl", "dev.jsonl", "test.jsonl"):
        assert (tmp_path / "qa" / name).read_text() == (tmp_path / "qa2" / name).read_text()


def test_unanswerable_questions_name_nothing_in_the_documents(tmp_path):
    make_qa(DOCS, tmp_path / "qa")
    rows = [r for s in ("dev", "test") for r in read_jsonl(tmp_path / f"qa/{s}.jsonl") if not r["answerable"]]
    assert len(rows) >= 3
    corpus = (HANDBOOK + TRAVEL).lower()
    for r in rows:
        assert r["entity"].lower() not in corpus and r["question"].endswith("?")
        assert "I don't know" in r["answer"]


def test_refuses_a_non_empty_out_dir(tmp_path):
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(RunDirError, match="not an empty directory"):
        make_qa(DOCS, tmp_path)


def test_suite_yaml_loads_and_points_at_the_rows(tmp_path):
    make_qa(DOCS, tmp_path / "qa")
    for split in ("dev", "test"):
        suite = load_suite(tmp_path / f"qa/domain_qa_{split}.yaml")
        assert (suite.name, suite.kind, suite.max_new_tokens, suite.batch_size) == (f"domain_qa_{split}",
                                                                                    "domain_qa", 64, 32)
        assert suite.data == (tmp_path / f"qa/{split}.jsonl").resolve() and "don't know" in suite.instruction
        assert load_qa_rows(suite.data)


def test_parse_pairs_is_lenient_and_counts_malformed_items():
    reply = 'Sure!\n```json\n[{"question": "Q1?", "answer": "A"}, {"question": 3}, {"questions": ["Q2?", "Q3?"], ' \
            '"answer": 42}]\n```\nHope this helps.'
    items, bad = parse_pairs(reply)
    assert [(i["question"], i["answer"]) for i in items] == [("Q1?", "A"), ("Q2?", "42"), ("Q3?", "42")] and bad == 1
    assert parse_pairs('{"pairs": [{"question": "Q?", "answer": "B"}]} trailing')[0][0]["answer"] == "B"
    assert parse_pairs("I cannot help with that.") is None


# ------------------------------------------------------------------------------------------ endpoint backend


class FakeOpenAI:
    """An OpenAI-compatible /v1/chat/completions that answers by the passage it is sent."""

    def __init__(self, mode="ok"):
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(dict(body, path=self.path, auth=self.headers.get("Authorization")))
                if outer.mode == "http500":
                    self.send_response(500)
                    self.end_headers()
                    self.wfile.write(b"model overloaded\nretry later")
                    return
                text = body["messages"][-1]["content"]
                if "VPN gateway" in text:  # two good pairs, one hallucinated answer, one malformed item
                    content = ('```json\n[{"question": "Who owns the VPN gateway?", "answer": "Marta Ilves"},\n'
                               '{"question": "Which person is in charge of the VPN gateway?", "answer": "marta ilves"},'
                               '\n{"question": "Which form do VPN access requests use?", "answer": "VPN-220"},\n'
                               '{"question": "What form number is used to ask for VPN access?", "answer": "VPN-220"},\n'
                               '{"question": "Who audits the VPN?", "answer": "Karl Smith"},\n'
                               '{"answer": "no question here"}]\n```')
                else:
                    content = "I am sorry, I cannot produce JSON today."
                reply = b"<html>not json</html>" if outer.mode == "badjson" else json.dumps(
                    {"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(reply)

        self.mode = mode
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_openai():
    srv = FakeOpenAI()
    yield srv
    srv.close()


def test_endpoint_backend_pairs_are_checked_and_rejections_counted(fake_openai, tmp_path, monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-test")
    be = EndpointBackend(fake_openai.url, "m1", allow_remote=True, api_key_env="MY_KEY", max_tokens=300)
    docs = [("handbook.md", HANDBOOK.split("\n\nOur data")[0])]  # one passage: the VPN paragraph
    m = make_qa(docs + [("other.md", "Nothing here but plain words about the weather.")], tmp_path / "qa",
                generator=be, progress=False)
    req = fake_openai.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["model"] == "m1" and req["temperature"] == 0
    assert req["max_tokens"] == 300 and req["auth"] == "Bearer sk-test" and len(fake_openai.requests) == 2
    assert m["rejected"]["answer_not_in_passage"] == 1  # the hallucinated "Karl Smith"
    assert m["rejected"]["malformed_item"] == 1 and m["rejected"]["unparseable_reply"] == 1
    facts = read_jsonl(tmp_path / "qa/facts.jsonl")
    assert sorted(f["answer"] for f in facts) == ["Marta Ilves", "VPN-220"]  # the passage's own spelling
    rows = read_jsonl(tmp_path / "qa/train.jsonl") + [r for s in ("dev", "test") for r in
                                                      read_jsonl(tmp_path / f"qa/{s}.jsonl") if r["answerable"]]
    assert len(rows) == 4 and "Karl Smith" not in json.dumps(rows)
    assert m["generator"].startswith("endpoint:m1@")


def test_endpoint_needs_allow_remote_and_sends_nothing_without_it(fake_openai):
    with pytest.raises(EndpointError, match="allow_remote=True") as e:
        EndpointBackend(fake_openai.url, "m1")
    assert "\n" not in str(e.value) and "--send-documents-to-endpoint" in str(e.value)
    assert fake_openai.requests == []


def test_endpoint_errors_are_one_line_and_name_the_url():
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(EndpointError, match="cannot connect") as e:
        EndpointBackend(url, "m", allow_remote=True).complete([[{"role": "user", "content": "hi"}]])
    assert f"{url}/chat/completions" in str(e.value) and "\n" not in str(e.value)
    for mode, pattern in (("http500", "HTTP 500"), ("badjson", "not an OpenAI chat completion")):
        srv = FakeOpenAI(mode)
        try:
            with pytest.raises(EndpointError, match=pattern) as e:
                EndpointBackend(srv.url, "m", allow_remote=True).complete([[{"role": "user", "content": "hi"}]])
            assert srv.url in str(e.value) and "\n" not in str(e.value)
        finally:
            srv.close()


def test_local_backend_runs_through_generate(tiny_lm, tmp_path):
    model, tok = tiny_lm
    be = LocalBackend(model, tok, max_new_tokens=4, batch_size=2, name="tiny")
    assert len(be.complete([[{"role": "user", "content": "hi"}]] * 3)) == 3
    with pytest.raises(DataError, match="'unparseable_reply': 1"):  # a random model writes no JSON: nothing to hold out
        make_qa([("d.md", "Laptops are replaced every 4 years.")], tmp_path / "qa", generator=be, progress=False)


def test_quality_script_runs_with_a_fake_chat_backend(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("make_qa_quality", REPO / "bench/make_qa_quality.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    class Fake:
        name = "fake"

        def complete(self, convs):
            return ['[{"question": "When was Veloran founded?", "answer": "12 May 2009"}, '
                    '{"question": "What is the founding date?", "answer": "12 May 2009"}, '
                    '{"question": "How many people work there?", "answer": "340 people"}]'] * len(convs)

    monkeypatch.setattr(bench, "backend", lambda args: Fake())
    res = bench.main(["--generator", "local", "--limit-docs", "1", "--max-facts", "3", "--show", "2"])
    assert res["covered"] == 2 and res["gold_facts"] == 10  # 12 May 2009; 340 (inside "340 people")
    assert 0 < res["precision"] < 1  # "340 people" overlaps the gold "340" but is not it
    monkeypatch.undo()
    res = bench.main(["--generator", "extract", "--limit-docs", "1", "--show", "0"])
    assert res["coverage"] > 0.9 and res["precision"] == 1.0


# ------------------------------------------------------------------------------------------ abstention scoring


def test_abstention_scoring_is_separate_from_answerable_rows():
    rows = [{"question": "Where is HQ?", "answer": "Ghent"},
            {"question": "Who runs the lab?", "answer": "Kaarel Sepp"},
            {"question": "Where is the Zorvel plant?", "answer": ["I don't know"], "answerable": False},
            {"question": "Who runs the Quintaro lab?", "answer": ["I don't know"], "answerable": False}]
    responses = ["Ghent.", "I don't know.", "That is not in the documents.", "Kaarel Sepp"]
    metrics, records = score_domain_qa(rows, responses)
    # an abstention on an answerable row scores nothing; a factual answer on an unanswerable row scores nothing
    assert metrics["exact_match"] == 0.5 and metrics["contains"] == 0.5
    assert metrics["abstain_acc"] == 0.5
    assert [r.get("abstained") for r in records] == [None, None, 1.0, 0.0]
    assert "exact_match" not in records[2] and records[1]["exact_match"] == 0.0
    plain, _ = score_domain_qa(rows[:2], responses[:2])
    assert "abstain_acc" not in plain and plain["exact_match"] == 0.5


def test_adding_a_document_leaves_every_other_fact_in_its_split(tmp_path):
    # fact ids name files relative to the folder they share; the split must follow the facts, not those names
    before = make_qa([("company/handbook/" + p, t) for p, t in DOCS], tmp_path / "a", seed=0)
    after = make_qa([("company/handbook/" + p, t) for p, t in DOCS]
                    + [("company/README.md", "# Readme\n\nThe wiki moved to Confluence in 2022.\n")],
                    tmp_path / "b", seed=0)
    assert after["counts"]["facts"] > before["counts"]["facts"]
    split = {}
    for out in ("a", "b"):
        split[out] = {(f["sentence"], f["answer"]): f["split"] for f in read_jsonl(tmp_path / out / "facts.jsonl")}
    assert all(split["b"][k] == v for k, v in split["a"].items())


def test_a_guess_after_a_refusal_is_not_an_abstention_and_a_split_without_answers_has_no_answer_score():
    from continual_opd.evals.domain_qa import abstains

    assert abstains("I don't know.") and abstains("The documents do not say; ask HR.")
    assert not abstains("I am not sure, but I think it is Zorvel.") and not abstains("It is probably 42.")
    rows = [{"question": "Who runs the Quintaro lab?", "answer": ["I don't know"], "answerable": False}]
    metrics, _ = score_domain_qa(rows, ["I don't know"])
    assert metrics == {"abstain_acc": 1.0}  # no exact_match of 0 from an empty set of answerable rows
