"""Smoke test of the demo model build with the tiny config (a few seconds)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from continual_opd.demo import build
from continual_opd.demo.build import DemoModelConfig, demo_model_hash, ensure_demo_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return ensure_demo_model(tmp_path_factory.mktemp("cache"), DemoModelConfig.tiny(), progress=False)


def test_tiny_model_loads_with_auto_classes(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert tiny_dir.name == f"demo-model-{demo_model_hash(DemoModelConfig.tiny())}"
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert model.config.model_type == "llama" and model.config.vocab_size == len(tok)
    assert tok.pad_token and tok.eos_token and tok.bos_token and tok.pad_token_id != tok.eos_token_id
    assert model.generation_config.eos_token_id == tok.eos_token_id
    info = json.loads((tiny_dir / "build_info.json").read_text())
    assert info["config"] == dataclasses.asdict(DemoModelConfig.tiny()) and info["final_loss"] < 7


def test_chat_template_renders_and_marks_assistant_tokens(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What colour is a lime?"}]
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert prompt == "<|bos|><|system|>\nBe brief.\n<|user|>\nWhat colour is a lime?\n<|assistant|>\n"
    full = msgs + [{"role": "assistant", "content": "A lime is green."}]
    enc = tok.apply_chat_template(full, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    answer_ids = [t for t, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
    assert tok.decode(answer_ids) == "A lime is green.<|eos|>"  # the answer and its EOS, nothing else
    assert enc["input_ids"][: len(tok(prompt, add_special_tokens=False)["input_ids"])] == \
        tok(prompt, add_special_tokens=False)["input_ids"]  # prompt is a prefix of the full conversation


def test_batched_greedy_generation_terminates(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
             for q in ("Name some fruits.", "What is 2 plus 2? Reply in lowercase letters only.")]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**enc, do_sample=False, max_new_tokens=8)
    assert out.shape[0] == 2 and out.shape[1] <= enc["input_ids"].shape[1] + 8
    assert all(isinstance(tok.decode(o), str) for o in out)


def test_second_call_reuses_the_cache(tiny_dir, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setattr(build, "_build", no_build)
    assert ensure_demo_model(tiny_dir.parent, DemoModelConfig.tiny(), progress=False) == tiny_dir


def test_a_killed_build_leaves_no_folder_behind(tmp_path, monkeypatch):
    """A build killed mid-way (no `finally`) leaves its temporary folder; the next build removes it, but not the
    folder of a build that is still running."""
    import os
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    killed = tmp_path / f".tmp-demo-model-{dead.stdout.strip()}@{host}-abc"
    running = tmp_path / f".tmp-demo-model-{os.getpid()}@{host}-def"
    other_host = tmp_path / f".tmp-demo-model-{dead.stdout.strip()}@another-host-ghi"
    for d in (killed, running, other_host):
        d.mkdir()
    monkeypatch.setattr(build, "_build", lambda out, *a, **k: (out / "build_info.json").write_text("{}"))
    ensure_demo_model(tmp_path, DemoModelConfig.tiny(), progress=False)
    assert sorted(p.name for p in tmp_path.glob(".tmp-demo-model-*")) == sorted([running.name, other_host.name])


def test_cache_root_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CONTINUAL_OPD_CACHE", str(tmp_path))
    assert build.cache_root() == tmp_path
    assert build.cache_root(tmp_path / "x") == tmp_path / "x"


def test_hash_follows_the_config():
    tiny = DemoModelConfig.tiny()
    assert demo_model_hash(tiny) == demo_model_hash(DemoModelConfig.tiny())
    assert demo_model_hash(tiny) != demo_model_hash(dataclasses.replace(tiny, steps=tiny.steps + 1))
    assert demo_model_hash(tiny) != demo_model_hash(DemoModelConfig())


def test_build_is_deterministic(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    again = ensure_demo_model(tmp_path, DemoModelConfig.tiny(), progress=False)
    a, b = load_file(tiny_dir / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tiny_dir / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()
