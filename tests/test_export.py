"""`export_run`: a finished run's model as a folder that loads with plain transformers / PEFT in a fresh process and
answers exactly as the run's own model; the model card; one-line errors; nothing half-written."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import TINY_CHAT_TEMPLATE, build_tiny_lm
from continual_opd.config import ModelConfig
from continual_opd.errors import ConfigError, ContinualOPDError, RunDirError
from continual_opd.export import PushToHubError, data_sources, export_run
from continual_opd.models import ModelRef
from continual_opd.rundir import RunState

QA = [{"question": "Who leads the Oslo office?", "answer": "Ada Berg"},
      {"question": "What is the code of the Falcon product?", "answer": "FX-42"}]
CHAT = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                      {"role": "assistant", "content": f"It is {a + b}."}]} for a in range(3) for b in range(3)]
IF_ROWS = [{"key": 1, "prompt": "Name a fruit. Answer in lowercase letters only.",
            "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]}]
KWARGS = {"enable_thinking": False}
# The run's chat template reads `enable_thinking`, so a reload that drops the run's chat settings sees another prompt.
TEMPLATE = ("{% if enable_thinking is defined and not enable_thinking %}{{ '<|system|>\nno think<|end|>\n' }}"
            "{% endif %}" + TINY_CHAT_TEMPLATE)
MESSAGES = [{"role": "user", "content": "What is 2 plus 3?"}]

# Run in a fresh interpreter: load the export with plain transformers (or PEFT), greedy-decode 8 tokens.
RELOAD = r"""
import json, sys, torch
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
path, mode, messages = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
if mode == "peft":  # as the card says
    import os
    from peft import AutoPeftModelForCausalLM, PeftModel
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(os.path.join(path, "base")), str(path))
    os.chdir(path)  # base_model_name_or_path is "base": AutoPeftModel finds it from inside the folder
    also = AutoPeftModelForCausalLM.from_pretrained(".")
else:
    model = AutoModelForCausalLM.from_pretrained(path)
tok = AutoTokenizer.from_pretrained(path)
kwargs = json.loads((path / "chat_template_kwargs.json").read_text())
enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True, **kwargs)
model.eval()
with torch.no_grad():
    logits = model(**enc).logits[0, -1]
    ids = model.generate(**enc, max_new_tokens=8, do_sample=False)[0, enc["input_ids"].shape[1]:]
    same = mode != "peft" or torch.equal(also.eval()(**enc).logits[0, -1], logits)
print(json.dumps({"text": tok.decode(ids), "ids": ids.tolist(), "logits": logits.tolist(),
                  "eos": model.generation_config.eos_token_id, "auto_peft_same": same}))
"""


def greedy(model, tok, kwargs: dict) -> dict:
    import torch

    enc = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True,
                                  **kwargs)
    model.eval()
    with torch.no_grad():
        logits = model(**enc).logits[0, -1]
        ids = model.generate(**enc, max_new_tokens=8, do_sample=False)[0, enc["input_ids"].shape[1]:]
    return {"text": tok.decode(ids), "ids": ids.tolist(), "logits": logits.tolist()}


def reload_in_fresh_process(path: Path, mode: str, cwd: Path) -> dict:
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "HOME": str(cwd)}
    r = subprocess.run([sys.executable, "-c", RELOAD, str(path), mode, json.dumps(MESSAGES)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_model(run: Path, stage: str | None = None):
    """(model, tokenizer) of a completed stage, loaded the way the run loads it (continual_opd.models)."""
    from continual_opd import models

    done = RunState.load(run / "run_state.json").completed
    ref = next(c.ref for c in done if c.name == stage) if stage else done[-1].ref
    cfg = ModelConfig(name=ref.base, chat_template_kwargs=KWARGS)
    return models.load_model(ModelRef(ref.base, ref.adapter), cfg, trainable_adapter=False), \
        models.load_tokenizer(ref.adapter or ref.base, cfg)


def assert_same_answers(got: dict, want: dict) -> None:
    assert got["text"] == want["text"] and got["ids"] == want["ids"]
    assert max(abs(a - b) for a, b in zip(got["logits"], want["logits"])) < 1e-4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny world and two finished runs of baseline eval -> 2 SFT steps: full fine-tune and LoRA."""
    from continual_opd.config import load_recipe
    from continual_opd.pipeline import run_recipe

    root = tmp_path_factory.mktemp("export-world")
    model, tok = build_tiny_lm()
    tok.chat_template = TEMPLATE
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "docs" / "sub").mkdir(parents=True)
    (root / "docs" / "handbook.md").write_text("Ada Berg leads the Oslo office. The Falcon code is FX-42.\n" * 3)
    (root / "docs" / "sub" / "more.txt").write_text("The Oslo office opens at nine.\n" * 3)
    for name, rows in [("ifeval.jsonl", IF_ROWS), ("qa.jsonl", QA), ("chat.jsonl", CHAT)]:
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "ifeval.yaml").write_text("name: ifeval\nkind: ifeval\ndata: ifeval.jsonl\nmax_new_tokens: 4\n")
    (root / "domain_qa.yaml").write_text("name: domain_qa\nkind: domain_qa\ndata: qa.jsonl\nmax_new_tokens: 4\n")
    recipe = {
        "name": "tiny-export", "seed": 0, "output_dir": str(root / "runs" / "full"), "report": False,
        "model": {"name": "model", "chat_template_kwargs": KWARGS},
        "evals": {"suites": ["ifeval.yaml", "domain_qa.yaml"]},
        "stages": [
            {"name": "baseline", "kind": "eval"},
            {"name": "sft", "kind": "sft", "steps": 2, "batch_size": 2, "lr": 1e-2, "max_seq_len": 64,
             "data": {"documents": ["docs"], "chat": ["chat.jsonl"], "qa": ["qa.jsonl"],
                      "mix": {"documents": 0.4, "qa": 0.3, "chat": 0.3}}},
        ],
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    full = run_recipe(load_recipe(root / "recipe.yaml"), progress=False)
    lora = run_recipe(load_recipe(root / "recipe.yaml", [f"output_dir={root / 'runs' / 'lora'}",
                                                         "stages.1.finetune=lora", "stages.1.lr=5e-2"]), progress=False)
    return {"root": root, "full": full, "lora": lora}


# ---------------------------------------------------------------------------------------------- the three formats


def test_full_export_reloads_with_plain_transformers_and_answers_as_the_run(runs, tmp_path):
    out = export_run(runs["full"], tmp_path / "export", progress=False)
    info = json.loads((out / "continual_opd_export.json").read_text())
    assert info["stage"] == "sft" and info["format"] == "full" and info["merge"] is False
    assert info["ref"] == RunState.load(runs["full"] / "run_state.json").completed[-1].ref.to_dict()
    assert json.loads((out / "chat_template_kwargs.json").read_text()) == KWARGS
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md"} <= \
        {p.name for p in out.iterdir()}
    model, tok = run_model(runs["full"])
    want = greedy(model, tok, KWARGS)
    got = reload_in_fresh_process(out, "plain", tmp_path)
    assert_same_answers(got, want)
    assert got["eos"] == tok.eos_token_id  # the generation config (stop token) came along
    # the test can tell models apart: the base model answers otherwise, and so does a prompt without the run's kwargs
    base, base_tok = run_model(runs["full"], "baseline")
    assert greedy(base, base_tok, KWARGS)["logits"] != want["logits"]
    assert greedy(model, tok, {})["logits"] != want["logits"]


def test_lora_export_merged_is_a_plain_model_with_the_adapters_answers(runs, tmp_path):
    out = export_run(runs["lora"], tmp_path / "merged", merge=True, progress=False)
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").is_file()
    assert json.loads((out / "continual_opd_export.json").read_text())["format"] == "merged"
    model, tok = run_model(runs["lora"])
    want = greedy(model, tok, KWARGS)
    assert_same_answers(reload_in_fresh_process(out, "plain", tmp_path), want)
    base, _ = run_model(runs["lora"], "baseline")
    assert greedy(base, tok, KWARGS)["logits"] != want["logits"]  # the adapter changed the model


def test_lora_export_unmerged_is_a_standalone_adapter_on_its_copied_base(runs, tmp_path):
    out = export_run(runs["lora"], tmp_path / "adapter", progress=False)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "base"
    assert (out / "adapter_model.safetensors").is_file() and (out / "base" / "config.json").is_file()
    assert (out / "generation_config.json").is_file() and (out / "tokenizer.json").is_file()
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and 'AutoModelForCausalLM.from_pretrained(os.path.join(path, "base"))' in card
    # standalone: a copy elsewhere loads while the run (and the original base) are out of reach
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(out, moved)
    model, tok = run_model(runs["lora"])
    want = greedy(model, tok, KWARGS)
    hidden = runs["root"].with_name(runs["root"].name + "-hidden")
    runs["root"].rename(hidden)
    try:
        got = reload_in_fresh_process(moved, "peft", tmp_path)
    finally:
        hidden.rename(runs["root"])
    assert_same_answers(got, want)
    assert got["auto_peft_same"]


def test_stage_option_exports_that_stages_model(runs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export_run(runs["full"], tmp_path / "baseline", stage="baseline", progress=False)
    assert json.loads((out / "continual_opd_export.json").read_text())["stage"] == "baseline"
    base, tok = run_model(runs["full"], "baseline")
    got = greedy(AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out), KWARGS)
    assert_same_answers(got, greedy(base, tok, KWARGS))


# ---------------------------------------------------------------------------------------------- the card


def test_card_has_scores_load_snippet_settings_data_hashes_and_recipe(runs, tmp_path):
    # the run's files with distinctive scores and a report table of intervals (the models stay where the run has them)
    run = tmp_path / "run"
    (run / "report").mkdir(parents=True)
    for name in ("recipe.resolved.yaml", "run_state.json"):
        shutil.copy(runs["full"] / name, run / name)
    summary = {"baseline": {"ifeval/prompt_level_strict_acc": 0.25, "domain_qa/f1": 0.98765,
                            "domain_qa/exact_match": 0.12345, "ifeval/eval_time_s": 3.25, "time/stage_s": 9.0},
               "sft": {"ifeval/prompt_level_strict_acc": 0.5, "domain_qa/f1": 0.4444,
                       "domain_qa/exact_match": 0.6666, "ifeval/eval_time_s": 2.5}}
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "report" / "intervals.csv").write_text("metric,stage,value,ci_low,ci_high\n"
                                                  "domain_qa/exact_match,sft,0.5,0.12345,0.87654\n")
    out = export_run(run, tmp_path / "export", progress=False)
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "transformers" and "continual-opd" in front["tags"]
    assert "base_model" not in front  # a local model is no hub id
    assert "# tiny-export: stage sft" in card
    # every stage, headline columns first, 3 decimals, no timings
    assert "| stage | domain_qa/exact_match | ifeval/prompt_level_strict_acc | domain_qa/f1 |\n" in card
    assert "| baseline | 0.123 | 0.250 | 0.988 |\n" in card
    assert "| **sft** (exported) | 0.667 | 0.500 | 0.444 |\n" in card
    assert "eval_time_s" not in card.split("## How to load")[0]
    assert "| domain_qa/exact_match | sft | 0.500 | 0.123 | 0.877 |" in card  # the report's interval table
    for f in [runs["root"] / "qa.jsonl", runs["root"] / "chat.jsonl", runs["root"] / "docs" / "handbook.md",
              runs["root"] / "docs" / "sub" / "more.txt"]:
        assert hashlib.sha256(f.read_bytes()).hexdigest() in card, f
    assert "sub/more.txt" in card
    assert "chat_template_kwargs = {\"enable_thinking\": false}" in card
    assert "kwargs = {'enable_thinking': False}" in card and "add_generation_prompt=True" in card
    assert "AutoModelForCausalLM.from_pretrained(path)" in card
    assert (runs["full"] / "recipe.resolved.yaml").read_text().strip() in card
    info = json.loads((out / "continual_opd_export.json").read_text())
    assert {s["source"] for s in info["sources"]} == {str(runs["root"] / n) for n in ("docs", "chat.jsonl", "qa.jsonl")}
    assert info["versions"]["continual_opd"] and info["run_dir"] == str(run)


def test_card_of_an_adapter_on_a_hub_model_names_that_model():
    from continual_opd.export import model_card

    info = {"format": "adapter", "chat_template_kwargs": {}, "run_name": "r", "stage": "opd", "stage_index": 3,
            "global_step": 7, "run_dir": "/runs/r", "versions": {"continual_opd": "0.1.0"}, "sources": []}
    card = model_card(info, {}, "name: r\n", {}, [], "Qwen/Qwen3-8B", origin="Qwen/Qwen3-8B", repo="me/r")
    front = yaml.safe_load(card.split("---")[1])
    assert front == {"library_name": "peft", "tags": ["continual-opd"], "base_model": "Qwen/Qwen3-8B"}
    assert "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('Qwen/Qwen3-8B'), path)" in card
    assert "path = 'me/r'" in card and "add_generation_prompt=True)" in card


def test_data_sources_hash_files_and_directories_and_list_hub_sources_unhashed(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("a")
    (tmp_path / "p.jsonl").write_text('{"prompt": "x"}\n')
    recipe = {"stages": [
        {"name": "sft", "kind": "sft", "data": {"documents": [str(tmp_path / "d"), "hf:org/docs:train"]}},
        {"name": "opd", "kind": "opd", "prompts": [str(tmp_path / "p.jsonl")], "doc_prompts": [str(tmp_path / "gone")],
         "replay": {"data": {"qa": []}}}]}
    rows = data_sources(recipe, upto=0)
    assert [(r["stage"], r["field"], r["used"]) for r in rows] == [
        ("sft", "data.documents", True), ("sft", "data.documents", True), ("opd", "prompts", False),
        ("opd", "doc_prompts", False)]
    assert rows[0]["files"] == [{"path": "a.txt", "sha256": hashlib.sha256(b"a").hexdigest(), "bytes": 1}]
    assert rows[1]["files"] == [] and "not hashed" in rows[1]["note"]
    assert rows[2]["files"][0]["sha256"] == hashlib.sha256(b'{"prompt": "x"}\n').hexdigest()
    assert rows[3]["files"] == [] and "missing" in rows[3]["note"]


# ---------------------------------------------------------------------------------------------- errors


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_existing_non_empty_out_is_never_overwritten(runs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(RunDirError) as e:
        export_run(runs["full"], out, progress=False)
    assert "not empty" in _one_line(e) and str(out) in str(e.value)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    # an empty folder is fine
    (out / "keep.txt").unlink()
    assert (export_run(runs["full"], out, progress=False) / "config.json").is_file()


def test_unknown_stage_lists_the_completed_ones(runs, tmp_path):
    with pytest.raises(ConfigError) as e:
        export_run(runs["full"], tmp_path / "out", stage="opd", progress=False)
    assert "'opd'" in _one_line(e) and "completed stages: baseline, sft" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_a_folder_that_is_no_run_or_has_no_completed_stage_is_named(tmp_path):
    with pytest.raises(RunDirError) as e:
        export_run(tmp_path, tmp_path / "out", progress=False)
    assert str(tmp_path) in _one_line(e) and "run_state.json" in str(e.value)
    RunState().save(tmp_path / "run_state.json")
    with pytest.raises(RunDirError) as e:
        export_run(tmp_path, tmp_path / "out", progress=False)
    assert str(tmp_path) in _one_line(e) and "no stage has completed" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_a_failure_midway_leaves_nothing_behind(runs, tmp_path, monkeypatch):
    import continual_opd.export as export

    monkeypatch.setattr(export, "model_card", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        export_run(runs["full"], tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_push_to_hub_offline_is_one_line_and_keeps_the_export(runs, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    with pytest.raises(PushToHubError) as e:
        export_run(runs["full"], out, push_to_hub="me/tiny", progress=False)
    assert isinstance(e.value, ContinualOPDError)
    assert "HF_HUB_OFFLINE" in _one_line(e) and f"hf upload me/tiny {out}" in str(e.value)
    assert (out / "config.json").is_file() and (out / "README.md").is_file()


def test_push_to_hub_connection_error_and_success(runs, tmp_path, monkeypatch):
    import huggingface_hub

    import continual_opd.export as export

    calls = []

    class FakeApi:
        def create_repo(self, repo, **kw):
            calls.append(("create_repo", repo, kw))
            if fail:
                raise ConnectionError("Failed to resolve 'huggingface.co'\nmore detail")

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw))

    monkeypatch.setattr(export, "_offline", lambda: False)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    fail = True
    with pytest.raises(PushToHubError) as e:
        export_run(runs["full"], tmp_path / "a", push_to_hub="me/tiny", progress=False)
    assert "ConnectionError: Failed to resolve" in _one_line(e) and (tmp_path / "a" / "config.json").is_file()
    fail, calls[:] = False, []
    out = export_run(runs["full"], tmp_path / "b", push_to_hub="me/tiny", progress=False)
    assert calls[0] == ("create_repo", "me/tiny", {"repo_type": "model", "exist_ok": True})
    assert calls[1][0] == "upload_folder" and calls[1][1]["repo_id"] == "me/tiny"
    assert Path(calls[1][1]["folder_path"]) == out
    assert "path = 'me/tiny'" in (out / "README.md").read_text()  # the card loads from the repo it was pushed to
