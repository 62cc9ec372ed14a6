"""The generation engines' contract (engines.py), run on every engine: hf, continuous and vllm (a fake vLLM behind
TRL's real `VLLMGeneration`, as in test_samplers.py). Answers in the prompts' order, every stop token honoured,
max_new_tokens respected, the same greedy text through the chat-template front end, reproducible sampling, and
log-probs of sampled tokens equal to a teacher-forced forward pass."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import build_tiny_lm
from continual_opd.engines import ContinuousEngine, SamplingParams, make_engine
from continual_opd.errors import ConfigError, ModelError
from continual_opd.generation import generate, render_prompts, stop_token_ids

PROMPTS = ["the cat is", "What is 2 plus 3?", "Write a short poem about Paris and the dog, with no commas.", "a",
           "our team makes", "Answer in lowercase letters only. What is the capital of France?", "the end", "42"]
ENGINES = ["hf", "continuous", "vllm"]


@pytest.fixture(scope="module")
def lm():
    model, tok = build_tiny_lm(seed=0)
    return model.float().eval(), tok


def _fake_vllm(model, tok):
    from accelerate import Accelerator

    samplers = pytest.importorskip("test_samplers")
    return samplers.FakeEngine(model, Accelerator(cpu=True), tok, mode="colocate", enable_sleep_mode=False,
                               max_completion_length=16, logprobs=None,
                               generation_kwargs={"stop_token_ids": stop_token_ids(model, tok)})


def _engine(name, model, tok, **kw):
    if name == "vllm":
        import trl.generation.vllm_generation as vg

        vg.SamplingParams = lambda **k: k  # the fake engine takes the settings as a dict
        return make_engine("vllm", model, tok, llm=_fake_vllm(model, tok))
    return make_engine(name, model, tok, **kw)


def _ids(tok, prompts=PROMPTS):
    return tok(render_prompts(tok, prompts), add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", ENGINES)
def test_greedy_text_is_the_same_on_every_engine_and_in_order(lm, name):
    model, tok = lm
    ref = generate(model, tok, PROMPTS, max_new_tokens=24, batch_size=3, engine="hf")
    got = generate(model, tok, PROMPTS, max_new_tokens=24, batch_size=3,
                   engine=name if name != "vllm" else _engine("vllm", model, tok))
    assert got == ref
    assert len(set(ref)) > 3  # the prompts get different answers: a mix-up of rows would show


@pytest.mark.parametrize("name", ENGINES)
def test_every_stop_token_ends_an_answer_and_max_new_tokens_caps_it(name):
    model, tok = build_tiny_lm(seed=0)
    model.float()
    ids = _ids(tok)
    # the most frequent greedy token becomes a second stop token (as Qwen lists <|im_end|> and <|endoftext|>)
    free = make_engine("hf", model, tok).generate(ids, SamplingParams(max_new_tokens=12))
    common = max({t for c in free for t in c.token_ids}, key=lambda t: sum(c.token_ids.count(t) for c in free))
    model.generation_config.eos_token_id = [tok.eos_token_id, common]
    done = _engine(name, model, tok).generate(ids, SamplingParams(max_new_tokens=12))
    assert len(done) == len(ids)
    for c, f in zip(done, free):
        assert len(c.token_ids) <= 12
        cut = next((k for k, t in enumerate(f.token_ids) if t in (tok.eos_token_id, common)), None)
        if cut is None:
            assert c.token_ids == f.token_ids and not c.stopped
        else:  # ends on its first stop token, which is kept
            assert c.token_ids == f.token_ids[:cut + 1] and c.stopped
    assert any(c.stopped and c.token_ids[-1] == common for c in done)


@pytest.mark.parametrize("name", ["hf", "continuous"])
def test_sampled_tokens_logprobs_match_a_teacher_forced_forward_pass(lm, name):
    model, tok = lm
    ids = _ids(tok)
    done = _engine(name, model, tok, max_batch=3).generate(
        ids, SamplingParams(max_new_tokens=20, do_sample=True, seed=5, logprobs=True))
    worst = 0.0
    with torch.no_grad():
        for p, c in zip(ids, done):
            logp = model(torch.tensor([p + c.token_ids])).logits[0, len(p) - 1:-1].float().log_softmax(-1)
            ref = logp.gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
            worst = max(worst, (ref - torch.tensor(c.logprobs)).abs().max().item())
    assert worst < 1e-4


@pytest.mark.parametrize("name", ["hf", "continuous"])
def test_temperature_and_top_p_shape_the_sampled_distribution(lm, name):
    model, tok = lm
    ids = _ids(tok)[:4]
    warm = _engine(name, model, tok).generate(ids, SamplingParams(max_new_tokens=10, do_sample=True, seed=1,
                                                                  temperature=0.7, logprobs=True))
    with torch.no_grad():  # each token's log-prob is under softmax(logits / 0.7)
        for p, c in zip(ids, warm):
            logits = model(torch.tensor([p + c.token_ids])).logits[0, len(p) - 1:-1].float()
            ref = (logits / 0.7).log_softmax(-1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
            assert (ref - torch.tensor(c.logprobs)).abs().max() < 1e-4
    nucleus = _engine(name, model, tok).generate(ids, SamplingParams(max_new_tokens=10, do_sample=True, seed=1,
                                                                     top_p=0.3, logprobs=True))
    with torch.no_grad():  # each token is in the smallest set of tokens with probability >= 0.3, renormalized
        for p, c in zip(ids, nucleus):
            probs = model(torch.tensor([p + c.token_ids])).logits[0, len(p) - 1:-1].float().softmax(-1)
            for probs_V, t, lp in zip(probs, c.token_ids, c.logprobs):
                sorted_V, order = probs_V.sort(descending=True)
                keep = order[:int((sorted_V.cumsum(0) < 0.3).sum()) + 1]
                assert t in keep.tolist()
                assert abs(lp - float((probs_V[t] / probs_V[keep].sum()).log())) < 1e-4


@pytest.mark.parametrize("name", ["hf", "continuous"])
def test_sampling_is_reproducible_from_the_seed_or_the_global_rng(lm, name):
    model, tok = lm
    ids = _ids(tok)
    p = SamplingParams(max_new_tokens=16, do_sample=True, seed=7)
    a = _engine(name, model, tok, max_batch=3).generate(ids, p)
    b = _engine(name, model, tok, max_batch=3).generate(ids, p)
    other = _engine(name, model, tok, max_batch=3).generate(ids, SamplingParams(max_new_tokens=16, do_sample=True,
                                                                                 seed=8))
    assert [c.token_ids for c in a] == [c.token_ids for c in b] != [c.token_ids for c in other]
    unseeded = SamplingParams(max_new_tokens=16, do_sample=True)  # OPD seeds torch per (seed, step, rank)
    torch.manual_seed(3)
    c = _engine(name, model, tok, max_batch=3).generate(ids, unseeded)
    torch.manual_seed(3)
    d = _engine(name, model, tok, max_batch=3).generate(ids, unseeded)
    assert [x.token_ids for x in c] == [x.token_ids for x in d]


@pytest.mark.parametrize("case", ["many", "long_last"])
@pytest.mark.parametrize("max_batch", [1, 2, 5, 64])
def test_continuous_batching_slots_refill_shift_and_compact_without_changing_answers(lm, max_batch, case):
    model, tok = lm
    # many: more prompts than slots, so slots refill and the cache runs out of columns (compaction);
    # long_last: a newcomer longer than the live rows' columns (they shift right to make room)
    prompts = PROMPTS * 3 if case == "many" else PROMPTS + ["Write " + "a long question about the cat " * 12]
    ids = _ids(tok, prompts)
    ref = make_engine("hf", model, tok).generate(ids, SamplingParams(max_new_tokens=40, logprobs=True))
    eng = ContinuousEngine(model, tok, stop_token_ids(model, tok), max_batch=max_batch, headroom=4)
    got = eng.generate(ids, SamplingParams(max_new_tokens=40, logprobs=True))
    assert [c.token_ids for c in got] == [c.token_ids for c in ref]
    assert max(abs(x - y) for a, b in zip(got, ref) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4
    if 1 < max_batch < len(ids):
        assert (eng.compactions if case == "many" else eng.shifts) > 0
    assert (eng.forwards < sum(len(c.token_ids) for c in got)) == (max_batch > 1)  # rows share decode passes


def test_continuous_engine_refuses_models_it_cannot_batch_this_way(lm):
    model, tok = lm
    sliding = copy.deepcopy(model)
    sliding.config.layer_types = ["sliding_attention", "full_attention"]
    with pytest.raises(ModelError, match="use engine 'hf'"):
        ContinuousEngine(sliding, tok, [tok.eos_token_id])
    with pytest.raises(ConfigError, match="unknown generation engine 'fast'"):
        make_engine("fast", model, tok)


def test_vllm_engine_without_vllm_is_a_one_line_error(monkeypatch, lm):
    import importlib

    monkeypatch.setattr(importlib.import_module("trl.import_utils"), "is_vllm_available", lambda: False)
    with pytest.raises(ConfigError, match="engine vllm needs the vllm package"):
        make_engine("vllm", *lm)


def test_vllm_engine_pushes_changed_weights_before_generating(lm):
    model, tok = lm
    student = copy.deepcopy(model)
    eng = _engine("vllm", student, tok)
    ids = _ids(tok)[:3]
    before = eng.generate(ids, SamplingParams(max_new_tokens=8))
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    eng.weights_changed()
    after = eng.generate(ids, SamplingParams(max_new_tokens=8))
    want = make_engine("hf", student, tok).generate(ids, SamplingParams(max_new_tokens=8))
    assert [c.token_ids for c in after] == [c.token_ids for c in want] != [c.token_ids for c in before]


@pytest.mark.parametrize("name", ["hf", "continuous"])
def test_rollouts_are_masked_the_same_way_on_each_engine(lm, name):
    from continual_opd.generation import sample_rollouts

    model, tok = lm
    torch.manual_seed(0)
    ro = sample_rollouts(model, tok, PROMPTS[:4], max_new_tokens=12, samples_per_prompt=2, engine=name, max_batch=3)
    assert len(ro) == 8
    stop = set(stop_token_ids(model, tok))
    for tokens, mask, cut in zip(ro.tokens_BL.tolist(), ro.response_mask_BL.tolist(), ro.truncated_B.tolist()):
        kept = [t for t, m in zip(tokens, mask) if m]
        assert cut == (not any(t in stop for t in kept))
        assert all(t not in stop for t in kept[:-1])  # nothing after the first stop token is in the response


def test_eval_command_gives_the_same_answers_with_each_engine(tmp_path, lm, capsys):
    import importlib

    import yaml

    from continual_opd.cli import main

    model, tok = lm
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    data = tmp_path / "if.jsonl"
    data.write_text("".join(
        f'{{"key": {k}, "prompt": "{p}", "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{{}}]}}\n'
        for k, p in enumerate(PROMPTS)))
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"name": "s", "kind": "ifeval", "data": str(data),
                                                     "max_new_tokens": 12, "batch_size": 3}))
    answers = {}
    for engine in ("hf", "continuous"):
        out = tmp_path / engine
        assert main(["eval", "--model", str(tmp_path / "model"), "--suite", str(tmp_path / "s.yaml"), "--out", str(out),
                     "--engine", engine, "--no-progress"]) == 0
        answers[engine] = (out / "s.jsonl").read_text()
    assert answers["hf"] == answers["continuous"] and answers["hf"].count("\n") == len(PROMPTS)
    capsys.readouterr()
    trl_utils = importlib.import_module("trl.import_utils")
    saved = trl_utils.is_vllm_available
    trl_utils.is_vllm_available = lambda: False
    try:
        code = main(["eval", "--model", str(tmp_path / "model"), "--suite", str(tmp_path / "s.yaml"),
                     "--engine", "vllm", "--no-progress"])
    finally:
        trl_utils.is_vllm_available = saved
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "engine vllm needs the vllm package" in err
