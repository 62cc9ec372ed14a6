"""A served teacher: `serve-teacher` (a vLLM-compatible subset) and the trainer's client, over loopback on CPU."""

import copy
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from continual_opd import models, teacher_client
from continual_opd.errors import ModelError
from continual_opd.generation import rollouts_from_ids
from continual_opd.teacher_client import ServedTeacher, TeacherServerError, local_sequence_logprobs
from continual_opd.teacher_server import make_server
from conftest import build_tiny_lm, free_port

REPO = Path(__file__).resolve().parents[1]
NAME = "tiny-teacher"


@pytest.fixture(scope="module")
def served():
    """(url, model, tokenizer): the tiny model served on a free loopback port in a background thread."""
    model, tok = build_tiny_lm()
    server = make_server(model, tok, name=NAME)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    yield f"http://{host}:{port}/v1", model, tok
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def _post(url: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.status, r.read()


def _seqs(vocab: int, lengths, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab, (n,), generator=g).tolist() for n in lengths]


def _alone(model, seq: list[int]) -> list[float]:
    """Log-probs of seq[1:] from one unpadded forward of the sequence alone."""
    with torch.no_grad():
        lp = model(input_ids=torch.tensor([seq])).logits[0].float().log_softmax(-1)
    return lp[:-1].gather(1, torch.tensor(seq[1:])[:, None])[:, 0].tolist()


def _close(a: list[list[float]], b: list[list[float]], atol: float = 1e-5) -> None:
    assert [len(x) for x in a] == [len(x) for x in b]
    for x, y in zip(a, b):
        torch.testing.assert_close(torch.tensor(x), torch.tensor(y), atol=atol, rtol=0)


def test_served_sequence_logprobs_equal_the_local_model_in_input_order(served):
    url, model, tok = served
    seqs = _seqs(len(tok), [2, 17, 5, 31, 9, 1, 12])  # uneven, one with nothing to score; 4 requests of 2
    teacher = ServedTeacher(url, NAME, batch_size=2, concurrency=3)
    got = teacher.sequence_logprobs(seqs)
    assert [len(x) for x in got] == [len(s) - 1 for s in seqs]
    local = local_sequence_logprobs(model, seqs, batch_size=3)
    _close(got, local)
    _close(local, [_alone(model, s) for s in seqs])  # a right-padded batch scores as each sequence alone
    _close(ServedTeacher(url, NAME, batch_size=8).sequence_logprobs(seqs), got)  # one request for all: the same
    assert all(v <= 0 for x in got for v in x)


def test_token_logprobs_of_rollouts_are_the_response_tokens_log_probs(served):
    url, model, tok = served
    end = tok.eos_token_id
    prompts = _seqs(len(tok), [4, 9, 6], seed=1)
    P, L = 9, 6
    prompt_BP = torch.full((3, P), tok.pad_token_id)
    attn_BP = torch.zeros((3, P), dtype=torch.long)
    for b, p in enumerate(prompts):
        prompt_BP[b, P - len(p):], attn_BP[b, P - len(p):] = torch.tensor(p), 1
    resp_BL = torch.tensor(_seqs(len(tok), [L] * 3, seed=2))
    resp_BL[0, 2], resp_BL[1, 5] = end, end  # stops after 3 and 6 tokens; row 2 is truncated
    resp_BL[0, 3:] = tok.pad_token_id
    part = rollouts_from_ids(prompt_BP, attn_BP, resp_BL, [end])
    mask_BL = part.response_mask_BL
    assert mask_BL.sum(1).tolist() == [3, 6, 6]
    q_BL = ServedTeacher(url, NAME, batch_size=2).token_logprobs(part, mask_BL)
    assert q_BL.dtype == torch.float32 and q_BL.shape == (3, L) and q_BL.device == mask_BL.device
    for b, p in enumerate(prompts):
        n = int(mask_BL[b].sum())
        want = _alone(model, p + resp_BL[b, :n].tolist())[-n:]
        torch.testing.assert_close(q_BL[b, :n], torch.tensor(want), atol=1e-5, rtol=0)
        assert (q_BL[b, n:] == 0).all()


def test_models_health_and_tokenize_shapes(served):
    url, model, tok = served
    root = url.removesuffix("/v1")
    status, raw = _get(f"{url}/models")
    body = json.loads(raw)
    assert status == 200 and body["object"] == "list"
    assert body["data"] == [{"id": NAME, "object": "model", "created": body["data"][0]["created"],
                             "owned_by": "continual-opd", "max_model_len": 512}]
    assert _get(f"{root}/health") == (200, b"")
    status, body = _post(f"{root}/tokenize", {"model": NAME, "prompt": "the cat is red."})
    assert status == 200 and body["tokens"] == tok("the cat is red.")["input_ids"]
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 512
    messages = models.PROBE_MESSAGES[1]
    status, body = _post(f"{root}/tokenize", {"model": NAME, "messages": messages})
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert status == 200 and body["tokens"] == tok(text, add_special_tokens=False)["input_ids"]
    status, body = _post(f"{root}/tokenize", {"model": NAME, "messages": messages, "add_generation_prompt": False})
    text = tok.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert status == 200 and body["tokens"] == tok(text, add_special_tokens=False)["input_ids"]


def test_prompt_logprobs_hold_the_prompt_token_and_the_top_k_with_ranks(served):
    url, model, tok = served
    seqs = _seqs(len(tok), [7, 3], seed=3)
    status, body = _post(f"{url}/completions", {"model": NAME, "prompt": seqs, "max_tokens": 1, "prompt_logprobs": 3,
                                                "temperature": 0, "unknown_field": True})
    assert status == 200 and body["object"] == "text_completion" and body["model"] == NAME
    assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}
    for choice, seq in zip(body["choices"], seqs):
        with torch.no_grad():
            lp_TV = model(input_ids=torch.tensor([seq])).logits[0].float().log_softmax(-1)
        assert choice["text"] == tok.decode([int(lp_TV[-1].argmax())]) and choice["finish_reason"] == "length"
        pl = choice["prompt_logprobs"]
        assert len(pl) == len(seq) and pl[0] is None
        for j in range(1, len(seq)):
            entry, row = pl[j], lp_TV[j - 1]
            top = row.topk(3)
            assert set(entry) == {str(seq[j])} | {str(t) for t in top.indices.tolist()}
            for r, (t, v) in enumerate(zip(top.indices.tolist(), top.values.tolist()), start=1):
                assert entry[str(t)]["rank"] == r and entry[str(t)]["logprob"] == pytest.approx(v, abs=1e-5)
                assert entry[str(t)]["decoded_token"] == tok.decode([t])
            own = entry[str(seq[j])]
            assert own["logprob"] == pytest.approx(row[seq[j]].item(), abs=1e-5)
            assert own["rank"] == int((row > row[seq[j]]).sum()) + 1
    # a string prompt is tokenized; prompt_logprobs 0 holds the prompt token only
    status, body = _post(f"{url}/completions", {"model": NAME, "prompt": "a dog sees JSON.", "prompt_logprobs": 0})
    ids = tok("a dog sees JSON.")["input_ids"]
    assert status == 200 and [list(e) for e in body["choices"][0]["prompt_logprobs"][1:]] == [[str(t)] for t in ids[1:]]


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "not JSON"),
    ({"model": NAME, "prompt": [1, 2], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": NAME, "prompt": [1, 2], "prompt_logprobs": -1}, 400, "prompt_logprobs"),
    ({"model": NAME, "prompt": []}, 400, "prompt"),
    ({"model": NAME, "prompt": [1, 10**6]}, 400, "out of vocabulary"),
    ({"model": NAME, "prompt": [5] * 513, "max_tokens": 1}, 400, "maximum context length is 512"),
    ({"model": "other", "prompt": [1, 2]}, 404, "The model `other` does not exist."),
])
def test_bad_requests_get_vllm_style_errors(served, body, status, words):
    url, _, _ = served
    got, reply = _post(f"{url}/completions", body)
    assert got == status and words in reply["error"]["message"]
    assert reply["error"]["type"] == ("NotFoundError" if status == 404 else "BadRequestError")


def test_wrong_model_name_is_a_clear_error_and_not_retried(served):
    url, _, tok = served
    t0 = time.perf_counter()
    with pytest.raises(TeacherServerError, match="does not exist.*teacher.model") as e:
        ServedTeacher(url, "nope", max_retries=3).sequence_logprobs([[5, 6, 7]])
    assert time.perf_counter() - t0 < 0.4  # the first retry would wait 0.5 s
    assert f"{url}/completions" in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, ModelError)


def test_closed_port_names_the_url_after_retries():
    url = f"http://127.0.0.1:{free_port()}/v1"
    t0 = time.perf_counter()
    with pytest.raises(TeacherServerError, match="after 1 retry.*continual-opd serve-teacher") as e:
        ServedTeacher(url, NAME, max_retries=1, timeout_s=2).sequence_logprobs([[5, 6, 7]])
    assert url in str(e.value) and "\n" not in str(e.value)
    assert 0.5 <= time.perf_counter() - t0 < 5


class _Stub(BaseHTTPRequestHandler):
    """Answers /v1/completions from a script: a list of (status, body) replies, the last one repeated."""

    replies: list = []
    calls: list = []

    def do_POST(self):
        self.calls.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        status, body = self.replies[min(len(self.calls), len(self.replies)) - 1]
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub(monkeypatch):
    monkeypatch.setattr(teacher_client, "_BACKOFF_S", 0.01)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    _Stub.calls = []
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def _reply(seqs: list[list[int]], shift: float = 0.0) -> dict:
    """A completion whose log-prob at position j is -j + shift (position-based, so any order gives the same)."""
    return {"choices": [{"index": i, "text": "x", "prompt_logprobs": [None] + [
        {str(t): {"logprob": -1.0 * j + shift, "rank": 1, "decoded_token": "x"}} for j, t in enumerate(s[1:], 1)]}
        for i, s in enumerate(seqs)]}


def test_5xx_is_retried_then_succeeds(stub):
    _Stub.replies = [(503, {"error": {"message": "busy"}}), (500, {}), (200, _reply([[5, 6, 7]]))]
    assert ServedTeacher(stub, NAME, max_retries=3).sequence_logprobs([[5, 6, 7]]) == [[-1.0, -2.0]]
    assert len(_Stub.calls) == 3 and _Stub.calls[0]["prompt_logprobs"] == 0 and _Stub.calls[0]["max_tokens"] == 1
    _Stub.calls = []
    _Stub.replies = [(503, {"error": {"message": "busy"}})]
    with pytest.raises(TeacherServerError, match="after 2 retries \\(HTTP 503 busy\\)"):
        ServedTeacher(stub, NAME, max_retries=2).sequence_logprobs([[5, 6, 7]])
    assert len(_Stub.calls) == 3


def test_a_reply_without_the_prompt_token_is_an_error_naming_the_position(stub):
    reply = _reply([[5, 6, 7]])
    reply["choices"][0]["prompt_logprobs"][2] = {"8": {"logprob": -2.0, "rank": 1}}  # position 2 scores another token
    _Stub.replies = [(200, reply)]
    with pytest.raises(TeacherServerError, match="sequence 0, position 2: .* token 7") as e:
        ServedTeacher(stub, NAME).sequence_logprobs([[5, 6, 7]])
    assert stub in str(e.value)


def test_check_tokenizer_passes_for_the_same_tokenizer_and_names_the_first_differing_probe(served):
    url, _, tok = served
    teacher = ServedTeacher(url, NAME)
    teacher.check_tokenizer(copy.deepcopy(tok), {}, student="tiny")
    other_template = copy.deepcopy(tok)
    other_template.chat_template = tok.chat_template.replace("'<|assistant|>\n'", "'<|assistant|>'")
    with pytest.raises(ModelError, match=f"{url}.*student 'tiny' on probe chat messages #0: first difference") as e:
        teacher.check_tokenizer(other_template, {}, student="tiny")
    assert not isinstance(e.value, TeacherServerError)  # a wrong teacher, not a server problem: preflight refuses it
    other_vocab = copy.deepcopy(tok)
    other_vocab.add_tokens(["Café"])
    with pytest.raises(ModelError, match="on probe text 'Café naïve"):
        teacher.check_tokenizer(other_vocab, {}, student="tiny")


def test_check_tokenizer_without_tokenize_uses_the_declared_tokenizer(served, tmp_path):
    url, _, tok = served
    tok.save_pretrained(tmp_path / "tok")
    base = url.removesuffix("/v1") + "/elsewhere/v1"  # its root has no /tokenize (404)
    ServedTeacher(base, NAME, tokenizer=str(tmp_path / "tok")).check_tokenizer(tok, {}, student="tiny")
    other = copy.deepcopy(tok)
    other.add_tokens(["Café"])
    with pytest.raises(ModelError, match="different vocabularies"):
        ServedTeacher(base, NAME, tokenizer=str(tmp_path / "tok")).check_tokenizer(other, {}, student="tiny")
    with pytest.raises(TeacherServerError, match="no /tokenize endpoint.*declare teacher.tokenizer"):
        ServedTeacher(base, NAME).check_tokenizer(tok, {}, student="tiny")


def test_self_test_passes_on_the_same_weights_and_reports_the_difference_on_others(served):
    url, model, tok = served
    probes = _seqs(len(tok), [12, 5, 20], seed=4)
    teacher = ServedTeacher(url, NAME, batch_size=2)
    out = teacher.self_test(lambda s: local_sequence_logprobs(model, s), probes, tolerance=1e-4)
    assert out["tokens"] == 11 + 4 + 19 and out["max_abs_diff_reference"] < 1e-5 and out["max_abs_diff_repeat"] < 1e-5
    assert teacher.self_test(None, probes, tolerance=1e-4)["max_abs_diff_reference"] is None
    other, _ = build_tiny_lm(seed=1)
    with pytest.raises(TeacherServerError, match=r"differ from the local teacher's by up to [0-9.e-]+ \(tolerance "
                                                 r"0.0001\); disable prefix caching") as e:
        teacher.self_test(lambda s: local_sequence_logprobs(other, s), probes, tolerance=1e-4)
    assert url in str(e.value)


def test_self_test_catches_a_server_whose_log_probs_move_between_scorings(stub):
    probes = [[5, 6, 7], [8, 9, 10, 11]]
    again = list(reversed(probes)) + [probes[0], probes[0][:1] + probes[-1][::-1]]  # as self_test sends them
    _Stub.replies = [(200, _reply(probes)), (200, _reply(again))]
    assert ServedTeacher(stub, NAME).self_test(None, probes, tolerance=1e-3)["max_abs_diff_repeat"] == 0
    assert _Stub.calls[1]["prompt"] == again
    _Stub.calls = []
    _Stub.replies = [(200, _reply(probes)), (200, _reply(again, shift=-0.01))]  # the second scoring moved
    with pytest.raises(TeacherServerError, match=r"moved log-probs by up to 0.01 \(tolerance 0.001\)"):
        ServedTeacher(stub, NAME).self_test(None, probes, tolerance=1e-3)
    _Stub.calls = []
    _Stub.replies = [(200, _reply(probes, shift=1.5)), (200, _reply(again, shift=1.5))]  # log-probs above 0
    with pytest.raises(TeacherServerError, match="is not finite or is above 0"):
        ServedTeacher(stub, NAME).self_test(None, probes, tolerance=1e-3)


def test_serve_teacher_cli_answers_models_and_stops_on_ctrl_c(tmp_path):
    model, tok = build_tiny_lm()
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_EVALUATE_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "continual_opd", "serve-teacher", str(tmp_path / "tiny"),
                             "--port", str(port), "--served-model-name", "t", "--dtype", "float32"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, body = time.monotonic() + 120, None
        while body is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                body = json.loads(_get(f"http://127.0.0.1:{port}/v1/models")[1])
            except OSError:
                time.sleep(0.3)
        assert body is not None, proc.stderr.read() if proc.poll() is not None else "no answer within 120 s"
        assert body["data"][0]["id"] == "t"
        assert ServedTeacher(f"http://127.0.0.1:{port}/v1", "t").sequence_logprobs([[5, 6, 7]])[0] == \
            pytest.approx(_alone(model, [5, 6, 7]), abs=1e-5)
        proc.send_signal(2)  # Ctrl-C
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert f"serving t on http://127.0.0.1:{port}/v1" in err and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
