"""Your own documents: `data inspect`, `init` (the recipe template) and the path from a docs folder to an export."""

import json
from pathlib import Path

import pytest
import yaml

from continual_opd.cli import main
from continual_opd.config import load_recipe
from conftest import build_tiny_lm, write_pdf

REPO = Path(__file__).resolve().parents[1]
CHAT = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                      {"role": "assistant", "content": f"It is {a + b}."}]} for a in range(3) for b in range(3)]
QA = [{"question": "Who leads the Oslo office?", "answer": "Ada Berg"},
      {"question": "What is the code of the Falcon product?", "answer": "FX-42"}]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model, tok = build_tiny_lm()
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return root


def _world(root: Path) -> Path:
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "handbook.md").write_text("# Handbook\n\nAda Berg leads the Oslo office since 2019. "
                                               "The Falcon product code is FX-42.\n" * 3)
    (root / "docs" / "NOTES.MD").write_text("# Notes\n\nThe VPN token rotates every 90 days, owned by Li Wei.\n")
    (root / "docs" / "empty.md").write_text("\n")
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CHAT))
    long_chat = {"messages": [{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "ok"}]}
    (root / "long.jsonl").write_text(json.dumps(long_chat) + "\n")
    (root / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in QA))
    return root


def _recipe(root: Path, model: Path, **sft) -> Path:
    recipe = {"name": "t", "output_dir": str(root / "runs" / "t"), "model": {"name": str(model)},
              "stages": [{"name": "sft", "kind": "sft", "steps": 5, "batch_size": 4, "max_seq_len": 48,
                          "data": {"documents": ["docs"], "chat": ["chat.jsonl", "long.jsonl"], "qa": ["qa.jsonl"],
                                   "mix": {"documents": 0.5, "qa": 0.2, "chat": 0.3}}, **sft},
                         {"name": "opd", "kind": "opd", "prompts": ["chat.jsonl"], "steps": 3, "prompts_per_step": 2,
                          "replay": {"batch_size": 2, "data": {"qa": ["qa.jsonl"], "mix": {"qa": 1.0}}}}]}
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_data_inspect_reports_sources_epochs_mix_truncation_and_the_template(tmp_path, tiny_model, capsys):
    root = _world(tmp_path)
    out = tmp_path / "inspect.json"
    assert main(["data", "inspect", str(_recipe(root, tiny_model)), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    sft, opd = json.loads(out.read_text())
    assert sft["examples_drawn"] == 5 * 4 and opd["prompts"] == len(CHAT) and opd["prompts_drawn"] == 3 * 2
    src = sft["sources"]
    # the long conversation loses its whole answer at max_seq_len, so it is read but not an example
    assert src["qa"]["examples"] == len(QA) and src["chat"]["examples"] == len(CHAT)
    assert src["chat"]["read"] == f"{len(CHAT) + 1} rows"
    assert src["chat"]["cut"] == 1 and src["chat"]["cut_lost_answer"] == 1  # the 60-word prompt fills max_seq_len
    assert src["documents"]["read"] == "2 files, 1 skipped"  # the empty .md is skipped, the .MD is read
    assert sum(s["drawn"] for s in src.values()) == 20
    for s in src.values():
        assert s["epochs"] == pytest.approx(s["drawn"] / s["examples"])
    assert sum(s["realized_share"] for s in src.values()) == pytest.approx(1.0)
    # the chat template on one example, with the trained part marked: the answer is inside the marks, the prompt not
    qa_example = src["qa"]["example"]
    assert qa_example.index("\u27e6") > qa_example.index("Who leads the Oslo office?")
    assert "Ada Berg" in qa_example.split("\u27e6", 1)[1]
    assert opd["replay"]["sources"]["qa"]["examples"] == len(QA)
    assert "empty.md" in printed and "near-empty" in printed and "NOTES.MD" in printed
    assert "lose their whole answer" in printed


def test_init_writes_a_recipe_that_validates_and_names_your_data(tmp_path, tiny_model, capsys):
    root = _world(tmp_path)
    qa = root / "qa"
    qa.mkdir()
    (qa / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in QA))
    for split in ("dev", "test"):
        (qa / f"{split}.jsonl").write_text(json.dumps(QA[0]) + "\n")
        (qa / f"domain_qa_{split}.yaml").write_text(f"name: domain_qa_{split}\nkind: domain_qa\ndata: {split}.jsonl\n")
    out = root / "recipes" / "mine.yaml"
    assert main(["init", str(root / "docs"), "--model", str(tiny_model), "--out", str(out), "--qa", str(qa),
                 "--chat", str(root / "chat.jsonl")]) == 0
    assert "CPU form" in capsys.readouterr().out
    text = out.read_text()
    assert "continual-opd data inspect mine.yaml" in text  # comments on what to do first
    recipe = load_recipe(out)
    sft = recipe.stages[1]
    assert sft.data.documents == [str((root / "docs").resolve())] and sft.data.qa == [str(qa / "train.jsonl")]
    assert sft.data.chat == [str(root / "chat.jsonl")] and sft.finetune == "lora" and sft.lora.r == 16
    assert recipe.headline.domain_qa == "domain_qa_test/contains"
    assert recipe.evals.suites[0] == "ifeval_official_120_256"
    assert "../docs" in text  # written relative to the recipe, so the folder can move as a whole
    assert main(["validate", str(out)]) == 0
    # without generated QA: the model's own chat, and a placeholder for the QA
    out2 = root / "plain.yaml"
    assert main(["init", str(root / "docs"), "--model", str(tiny_model), "--out", str(out2)]) == 0
    plain = load_recipe(out2)
    assert plain.stages[1].data.self_chat is not None and not plain.stages[1].data.qa
    assert "# qa: [qa/train.jsonl]" in out2.read_text()


def test_init_bad_input_is_one_line_and_writes_nothing(tmp_path, tiny_model, capsys):
    root = _world(tmp_path)
    (root / "blank").mkdir()
    (root / "blank" / "a.md").write_text(" ")
    taken = root / "taken.yaml"
    taken.write_text("keep: me\n")
    cases = [
        (["init", str(root / "blank"), "--model", str(tiny_model), "--out", str(root / "x.yaml")],
         "no readable document"),
        (["init", str(root / "docs"), "--model", str(tiny_model), "--out", str(taken)], "exists; choose another"),
        (["init", str(root / "docs"), "--model", str(tiny_model), "--out", str(root / "y.yaml"), "--qa",
          str(root / "docs")], "no train.jsonl"),
        (["init", str(root / "docs"), "--model", str(root / "nope"), "--out", str(root / "z.yaml")], "nope"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error: ") and expected in err, err
    assert taken.read_text() == "keep: me\n"
    assert not any((root / f).exists() for f in ("x.yaml", "y.yaml", "z.yaml"))


def test_the_gpu_form_fits_the_memory_plan():
    from continual_opd.init_recipe import ModelFacts, render_recipe

    text = render_recipe(REPO / "data_samples" / "docs", "Qwen/Qwen3-8B", REPO / "recipes" / "x.yaml",
                         ModelFacts(params=8.19e9, context=40960, thinking=True, where="Qwen/Qwen3-8B"))
    data = yaml.safe_load(text)
    sft, opd = data["stages"][1], data["stages"][2]
    assert data["model"]["dtype"] == "bfloat16" and data["model"]["chat_template_kwargs"] == {"enable_thinking": False}
    assert sft["lora"]["r"] == 128 and sft["gradient_checkpointing"] is True and sft["max_seq_len"] == 2048
    # docs/multi-gpu.md: one 80 GB GPU with HF generate holds the KV cache of 16 prompts x 4 samples, not 64 x 4
    assert opd["prompts_per_step"] * opd["samples_per_prompt"] <= 64 and opd.get("sampler", "hf") == "hf"
    assert data["evals"]["suites"] == ["ifeval_official_120"]


def test_init_refuses_a_model_without_a_chat_template(tmp_path, capsys):
    model, tok = build_tiny_lm()
    tok.chat_template = None
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    root = _world(tmp_path / "w")
    assert main(["init", str(root / "docs"), "--model", str(tmp_path / "base"), "--out", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "tokenizer has no chat template" in err and not (tmp_path / "r.yaml").exists()


def _mixed_folder(docs: Path) -> None:
    """Markdown, HTML, PDF and DOCX about one small company, as a team's folder would hold them."""
    from docx import Document

    docs.mkdir(parents=True)
    (docs / "handbook.md").write_text("# Handbook\n\nAda Berg leads the Oslo office since 2019.\n\n"
                                      "- The Falcon product code is FX-42.\n- Badges are renewed every 90 days.\n")
    (docs / "security.html").write_text(
        "<html><head><script>var x = 1;</script></head><body><h1>Security</h1><p>The VPN gateway is VPN-220, "
        "owned by Li Wei.</p><ul><li>Passwords rotate every 60 days.</li></ul></body></html>")
    write_pdf(docs / "travel.pdf", [["Travel policy", "Hotel nights cost at most 140 euros. Trips over 5 days need "
                                                  "approval from Maria Lopez."]])
    doc = Document()
    doc.add_heading("Onboarding", level=1)
    doc.add_paragraph("New hires meet the Falcon team on their first Monday in Room B12.")
    doc.add_paragraph("The laptop budget is 1800 euros.", style="List Bullet")
    doc.save(str(docs / "onboarding.docx"))


def test_from_a_docs_folder_to_an_exported_model(tmp_path, tiny_model, capsys):
    """data inspect, make-qa (offline extractor), init, validate, a tiny run, export, reload in a fresh process."""
    from test_export import assert_same_answers, greedy, reload_in_fresh_process

    from continual_opd import models
    from continual_opd.config import ModelConfig
    from continual_opd.rundir import RunState

    docs = tmp_path / "docs"
    _mixed_folder(docs)
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CHAT))
    assert main(["data", "make-qa", str(docs), "--out", str(tmp_path / "qa")]) == 0
    made = capsys.readouterr().out
    assert "from 4 documents" in made
    facts = [json.loads(line) for line in (tmp_path / "qa" / "facts.jsonl").read_text().splitlines()]
    assert {Path(f["source"]).suffix for f in facts} == {".md", ".html", ".pdf", ".docx"}  # every format gave facts
    assert any(f["answer"] == "VPN-220" for f in facts) and any(f["answer"] == "Maria Lopez" for f in facts)

    recipe = tmp_path / "recipe.yaml"
    assert main(["init", str(docs), "--model", str(tiny_model), "--qa", str(tmp_path / "qa"), "--chat",
                 str(tmp_path / "chat.jsonl"), "--out", str(recipe)]) == 0
    assert main(["validate", str(recipe)]) == 0
    assert main(["data", "inspect", str(recipe)]) == 0
    inspected = capsys.readouterr().out
    for name in ("handbook.md", "security.html", "travel.pdf", "onboarding.docx"):
        assert name in inspected
    assert "var x" not in inspected  # the HTML's script is not a document

    run_dir = tmp_path / "run"
    # the recipe's IF suite on 8 prompts (120 x 256 tokens at three eval points is most of this test's time)
    official = REPO / "data_samples" / "ifeval_official" / "input_data.jsonl"
    (tmp_path / "if8.yaml").write_text(f"name: if8\nkind: ifeval\ndata: {official}\nlimit: 8\nmax_new_tokens: 32\n")
    qa_suites = [str(tmp_path / "qa" / f"domain_qa_{s}.yaml") for s in ("dev", "test")]
    tiny = [f"output_dir={run_dir}", f"evals.suites=[{tmp_path / 'if8.yaml'}, {', '.join(qa_suites)}]",
            "headline.if_eval=if8/prompt_level_strict_acc", "stages.1.steps=2", "stages.1.batch_size=4",
            "stages.2.steps=2", "stages.2.prompts_per_step=2", "stages.2.max_new_tokens=8", "stages.2.eval_every=0",
            "stages.2.replay.batch_size=2"]
    assert main(["recipe", str(recipe), *tiny, "--no-progress"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert list(summary) == ["baseline", "sft", "opd"]
    assert "domain_qa_test/contains" in summary["opd"] and "domain_qa_test/abstain_acc" in summary["opd"]
    documents = json.loads((run_dir / "stages" / "01-sft" / "documents.json").read_text())
    assert documents["totals"]["read"] == 4 and all(f["tokens"] for f in documents["files"])

    out = tmp_path / "exported"
    assert main(["export", str(run_dir), "--out", str(out), "--merge"]) == 0
    ref = RunState.load(run_dir / "run_state.json").completed[-1].ref
    assert ref.adapter  # the template trains LoRA: the export merged it
    cfg = ModelConfig(name=ref.base)
    want = greedy(models.load_model(ref, cfg, trainable_adapter=False), models.load_tokenizer(ref.base, cfg), {})
    assert_same_answers(reload_in_fresh_process(out, "plain", tmp_path), want)
    card = (out / "README.md").read_text()
    assert "domain_qa_test/contains" in card and "travel.pdf" in card


def test_the_shipped_qwen3_recipe_is_the_templates_gpu_form():
    """recipes/qwen3-8b-personalize.yaml is `init`'s output for Qwen3-8B (8.19 B parameters, a thinking template) on
    the demo documents and their generated QA: the template and the shipped recipe cannot drift apart."""
    from continual_opd.init_recipe import ModelFacts, render_recipe

    shipped = REPO / "recipes" / "qwen3-8b-personalize.yaml"
    facts = ModelFacts(params=8.19e9, context=40960, thinking=True, where="Qwen/Qwen3-8B")
    assert render_recipe(REPO / "data_samples" / "docs", "Qwen/Qwen3-8B", shipped, facts,
                         qa_dir=REPO / "data_samples" / "generated_qa") == shipped.read_text()


def test_init_quotes_names_yaml_would_misread(tmp_path, tiny_model):
    root = tmp_path / "w"
    _world(root)
    odd = root / "Q1, Q2 #docs"
    (root / "docs").rename(odd)
    out = root / "2024.yaml"
    assert main(["init", str(odd), "--model", str(tiny_model), "--out", str(out)]) == 0
    recipe = load_recipe(out)
    assert recipe.name == "2024" and recipe.stages[1].data.documents == [str(odd.resolve())]


def test_make_qa_and_inspect_refuse_flags_they_would_ignore(tmp_path, capsys):
    root = _world(tmp_path)
    cases = [(["data", "make-qa", str(root / "docs"), "--out", str(root / "qa"), "--model", "demo"],
              "--model only applies to --generator model"),
             (["data", "make-qa", str(root / "docs"), "--out", str(root / "qa"), "--max-facts", "0"],
              "--max-facts 0: must be >= 1"),
             (["data", "make-qa", str(root / "docs"), "--out", str(root / "qa"), "--generator", "endpoint",
               "--base-url", "http://127.0.0.1:9/v1", "--endpoint-model", "m"], "--send-documents-to-endpoint"),
             (["data", "inspect", str(root / "chat.jsonl"), "--json", str(root / "qa.jsonl")],
              "exists; choose a new file")]
    for argv, expected in cases:
        assert main(argv) != 0, argv
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error: ") and expected in err, err
    assert not (root / "qa").exists() and json.loads((root / "qa.jsonl").read_text().splitlines()[0]) == QA[0]
