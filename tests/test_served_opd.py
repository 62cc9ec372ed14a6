"""An OPD stage whose teacher is served (`teacher: {url, model}`), against `serve-teacher`'s server on loopback:
the same update as the in-process teacher, a server that dies mid-stage stops the run with its last checkpoint intact
and `--resume` finishes it, a teacher with another tokenizer is refused in preflight, the full-vocabulary losses are
refused by validation."""

from __future__ import annotations

import copy
import json
import threading
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import build_tiny_lm
from continual_opd.config import load_recipe
from continual_opd.errors import ConfigError, TrainingError
from continual_opd.pipeline import run_recipe
from continual_opd.preflight import preflight
from continual_opd.teacher_server import make_server

NAME = "tiny-teacher"
PROMPTS = [{"prompt": p} for p in ("Name a fruit.", "Write a short poem.", "What is 2 plus 3?", "Say hello.")]


class Server:
    """`serve-teacher`'s server in a thread; `stop()` and `start()` again on the same port."""

    def __init__(self, model, tok, port: int = 0):
        self.model, self.tok = model, tok
        self.start(port)

    def start(self, port: int | None = None) -> None:
        self.server = make_server(self.model, self.tok, name=NAME, port=self.port if port is None else port)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    model, tok = build_tiny_lm()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    teacher, _ = build_tiny_lm(seed=1)  # another model with the student's tokenizer, far from the student
    with torch.no_grad():
        teacher.lm_head.weight.mul_(10.0)
    teacher.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    (root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    server = Server(teacher.eval(), tok)
    yield root, server
    server.stop()


def _recipe(root: Path, out: str, teacher, **stage) -> Path:
    recipe = {"name": "served", "seed": 0, "output_dir": str(root / out), "model": {"name": "model"},
              "report": False, "evals": {"suites": []},
              "stages": [{"name": "opd", "kind": "opd", "teacher": teacher, "prompts": ["prompts.jsonl"],
                          "steps": 4, "prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 6,
                          "lr": 5e-2, "save_every": 1, "loss": "sampled", "finetune": "lora",
                          "lora": {"r": 4, "alpha": 8}, **stage}]}
    path = root / f"{out}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _served(server: Server, **kw) -> dict:
    return {"url": server.url, "model": NAME, "reference": "teacher", "timeout_s": 5, "max_retries": 0, **kw}


def _adapter(run: Path) -> dict:
    return load_file(next((run / "stages").glob("*-opd")) / "final" / "adapter_model.safetensors")


def _opd_rows(run: Path) -> list[dict]:
    """One dict of the OPD metrics per step."""
    steps: dict[int, dict] = {}
    for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()):
        if r.get("suite") == "opd":
            steps.setdefault(r["step"], {})[r["metric"]] = r["value"]
    return [steps[k] for k in sorted(steps)]


def _same(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="module")
def local_run(world):
    root, _ = world
    return run_recipe(load_recipe(_recipe(root, "local", "teacher")), progress=False)


@pytest.fixture(scope="module")
def served_run(world):
    root, server = world
    return run_recipe(load_recipe(_recipe(root, "served", _served(server))), progress=False)


def test_served_teacher_gives_the_in_process_update(local_run, served_run):
    """The server scores in other batch shapes, so its log-probs differ from the local teacher's by ~1e-7 (fp32);
    AdamW's per-parameter normalization turns that into weight differences of ~1e-5 after 4 steps of lr 0.05 (the
    weights are ~0.1-1). A shifted or mis-paired log-prob would move them by ~lr."""
    _same(_adapter(served_run), _adapter(local_run), atol=2e-4)
    assert any(float(v.abs().max()) > 0 for k, v in _adapter(local_run).items() if "lora_B" in k)  # it trained
    served, local = _opd_rows(served_run), _opd_rows(local_run)
    assert len(served) == len(local) == 4
    for s, ref in zip(served, local):
        for key in ("teacher_kl", "loss", "grad_norm", "tokens_sampled"):
            assert s[key] == pytest.approx(ref[key], rel=1e-4), key
    assert all(r["teacher_kl"] > 0.1 for r in local)  # a real signal, not numerical noise around 0


def test_a_server_that_dies_mid_stage_stops_the_run_and_resume_finishes_it(world, served_run, monkeypatch, tmp_path):
    from continual_opd.teacher_client import ServedTeacher

    root, server = world
    recipe = _recipe(root, "dies", _served(server))
    real, calls = ServedTeacher.token_logprobs, {"n": 0}

    def dying(self, part, mask_BL):
        calls["n"] += 1
        if calls["n"] == 3:  # step 3: the server goes away
            server.stop()
        return real(self, part, mask_BL)

    monkeypatch.setattr(ServedTeacher, "token_logprobs", dying)
    try:
        with pytest.raises(TrainingError, match=r"step 3: teacher server .*last good checkpoint: .*checkpoint-2.*"
                                                r"--resume") as e:
            run_recipe(load_recipe(recipe), progress=False)
        assert "\n" not in str(e.value)
    finally:
        server.start()  # the same port again
    stage_dir = next((root / "dies" / "stages").glob("*-opd"))
    from continual_opd import checkpoints

    assert checkpoints.latest(stage_dir).name == "checkpoint-2"
    monkeypatch.setattr(ServedTeacher, "token_logprobs", real)
    run_recipe(load_recipe(recipe), resume=True, progress=False)
    _same(_adapter(root / "dies"), _adapter(served_run))  # as if the server had never gone


def test_preflight_refuses_a_served_teacher_with_another_tokenizer(world):
    root, _ = world
    model, tok = build_tiny_lm()
    other = copy.deepcopy(tok)
    other.chat_template = tok.chat_template.replace("'<|assistant|>\n'", "'<|assistant|>'")
    assert other.chat_template != tok.chat_template
    wrong = Server(model.eval(), other)
    try:
        with pytest.raises(ConfigError, match=r"stages\.0\.teacher: teacher server .*tokenizer differs"):
            preflight(load_recipe(_recipe(root, "wrong", _served(wrong))))
    finally:
        wrong.stop()


def test_an_unreachable_server_is_checked_at_stage_start_not_in_validate(world, caplog):
    root, server = world
    recipe = load_recipe(_recipe(root, "gone", {**_served(server), "url": "http://127.0.0.1:9/v1"}))
    preflight(recipe)  # validate passes with a warning (the server may start later)
    assert "not checked now" in caplog.text
    with pytest.raises(Exception, match=r"teacher server http://127\.0\.0\.1:9.*continual-opd serve-teacher"):
        run_recipe(recipe, progress=False)


@pytest.mark.parametrize("loss", ["full", "forward", "jsd"])
def test_full_vocabulary_losses_are_refused_with_a_served_teacher(world, loss):
    root, server = world
    with pytest.raises(ConfigError, match=f"stages.0.*loss: {loss} needs the teacher's whole distribution"):
        load_recipe(_recipe(root, f"bad-{loss}", _served(server), loss=loss))
