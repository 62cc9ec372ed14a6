"""SFT data: loss masks on chat, document chunking, token-ratio mixing, source errors."""

import json

import pytest

from continual_opd.data import (build_mixture, load_chat, load_documents, n_loss_tokens, tokenize_chat,
                                tokenize_documents)
from continual_opd.errors import DataError
from conftest import build_tiny_lm


@pytest.fixture(scope="module")
def tok():
    return build_tiny_lm()[1]


def test_chat_loss_only_on_the_assistant_turn(tok):
    conv = [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "It is 5."}]
    (ex,) = tokenize_chat([conv], tok, max_seq_len=256)
    prompt = tok.apply_chat_template(conv[:1], add_generation_prompt=True, tokenize=False)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert ex["labels"][:n_prompt] == [-100] * n_prompt  # no loss on prompt tokens
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]  # loss on every answer token
    answer = tok.decode([t for t in ex["labels"] if t != -100])
    assert "It is 5." in answer and "What is" not in answer


def test_documents_are_chunked_with_loss_everywhere(tok):
    exs = tokenize_documents(["the cat is red. " * 40, "a dog sees blue."], tok, max_seq_len=16)
    assert all(len(e["input_ids"]) <= 16 for e in exs) and len(exs) > 2
    assert all(e["labels"] == e["input_ids"] for e in exs)
    flat = [t for e in exs for t in e["input_ids"]]
    assert flat.count(tok.eos_token_id) == 2  # one EOS after each document


def test_mixture_realizes_the_token_ratio():
    pools = {"documents": [{"input_ids": [1] * 64, "labels": [1] * 64}] * 5,
             "chat": [{"input_ids": [1] * 20, "labels": [-100] * 12 + [1] * 8}] * 50}
    mix = build_mixture(pools, {"documents": 0.7, "chat": 0.3}, n_examples=4000, seed=0)
    assert mix.token_share["documents"] == pytest.approx(0.7, abs=0.02)
    tokens = {k: sum(n_loss_tokens(e) for e in mix.examples if e["source"] == k) for k in pools}
    assert tokens["documents"] / sum(tokens.values()) == pytest.approx(mix.token_share["documents"])
    only = build_mixture(pools, {"documents": 1.0, "chat": 0.0}, n_examples=10, seed=0)
    assert {e["source"] for e in only.examples} == {"documents"}


def test_mixture_is_deterministic_and_cycles_epochs():
    pools = {"chat": [{"input_ids": [i], "labels": [i, i]} for i in range(10)]}
    a = build_mixture(pools, {"chat": 1.0}, 20, seed=3)
    b = build_mixture(pools, {"chat": 1.0}, 20, seed=3)
    assert [e["input_ids"] for e in a.examples] == [e["input_ids"] for e in b.examples]
    first_epoch = sorted(e["input_ids"][0] for e in a.examples[:10])
    assert first_epoch == list(range(10))  # every example once before any repeats


def test_source_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "c.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]})
                   + "\n\n" + json.dumps({"messages": [{"role": "bot", "content": "x"}]}) + "\n")
    with pytest.raises(DataError, match=r"c.jsonl:3: each turn needs role"):
        load_chat([str(bad)])
    with pytest.raises(DataError, match=r"empty_dir: no readable document in the folder \(it is empty\); add .txt"):
        (tmp_path / "empty_dir").mkdir()
        load_documents([str(tmp_path / "empty_dir")])
    # an empty document is skipped (tests/test_ingest.py); only a source list with nothing readable is an error
    (tmp_path / "blank.md").write_text("  \n")
    with pytest.raises(DataError, match=r"blank.md: no readable document \(1 skipped: 1 near-empty\)"):
        load_documents([str(tmp_path / "blank.md")])


def test_long_conversations_are_cut_with_one_warning_per_source(tiny_lm, caplog):
    from continual_opd.data import tokenize_chat

    _, tok = tiny_lm
    convs = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a long answer " * 50}]] * 3
    convs += [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]]
    with caplog.at_level("WARNING"):
        out = tokenize_chat(convs, tok, 16, source="chat big.jsonl")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith("chat big.jsonl: 3 of 4 conversations are longer than "
                                                          "max_seq_len=16 tokens and were cut")
    assert len(out) == 4 and all(len(e["input_ids"]) <= 16 for e in out)
