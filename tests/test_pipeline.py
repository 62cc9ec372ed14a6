"""End-to-end pipeline on a tiny model: run-dir contract, snapshots, SFT/OPD stages, resume, bad input."""

import json
from pathlib import Path

import pytest
import yaml

from continual_opd.cli import main
from continual_opd.config import load_recipe
from continual_opd.errors import DataError, RunDirError
from continual_opd.pipeline import run_recipe
from conftest import build_tiny_lm

IF_ROWS = [
    {"key": 1, "prompt": "Name a fruit. Answer in lowercase letters only.",
     "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]},
    {"key": 2, "prompt": "Say hello. Do not use any commas.",
     "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
]
QA = [{"question": "Who leads the Oslo office?", "answer": "Ada Berg"},
      {"question": "What is the code of the Falcon product?", "answer": "FX-42"}]
CHAT = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                      {"role": "assistant", "content": f"It is {a + b}."}]} for a in range(4) for b in range(4)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    model, tok = build_tiny_lm()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "docs").mkdir()
    (root / "docs" / "handbook.md").write_text(
        "Ada Berg leads the Oslo office. The Falcon product code is FX-42.\n" * 3)
    for name, rows in [("ifeval.jsonl", IF_ROWS), ("qa.jsonl", QA), ("chat.jsonl", CHAT)]:
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "ifeval.yaml").write_text("name: ifeval\nkind: ifeval\ndata: ifeval.jsonl\nmax_new_tokens: 8\n")
    (root / "domain_qa.yaml").write_text("name: domain_qa\nkind: domain_qa\ndata: qa.jsonl\nmax_new_tokens: 8\n")
    recipe = {
        "name": "tiny", "seed": 0, "output_dir": str(root / "runs" / "default"),
        "model": {"name": "model"}, "report": False,
        "evals": {"suites": ["ifeval.yaml", "domain_qa.yaml"], "kl_prompts": "chat.jsonl", "kl_num_prompts": 4,
                  "kl_max_new_tokens": 6},
        "stages": [
            {"name": "baseline", "kind": "eval"},
            {"name": "sft", "kind": "sft", "steps": 4, "batch_size": 4, "lr": 1e-3, "eval_every": 2, "save_every": 2,
             "max_seq_len": 32, "data": {"documents": ["docs"], "chat": ["chat.jsonl"], "qa": ["qa.jsonl"],
                                         "mix": {"documents": 0.4, "qa": 0.3, "chat": 0.3}}},
            {"name": "after-sft", "kind": "eval"},
            {"name": "opd", "kind": "opd", "teacher": "snapshot:before-sft", "prompts": ["ifeval.jsonl"],
             "steps": 3, "prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 6, "lr": 1e-3,
             "eval_every": 2, "save_every": 1, "loss": "full",
             "replay": {"batch_size": 2, "data": {"qa": ["qa.jsonl"], "mix": {"qa": 1.0}}}},
        ],
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root


def _reference_run(world, overrides: tuple[str, ...] = ()) -> Path:
    """The uninterrupted run of the world's recipe with `overrides` (made once per module)."""
    ref_dir = world / "runs" / ("default" if not overrides else "-".join(overrides).replace("=", "_"))
    if not (ref_dir / "summary.json").exists():
        run_recipe(load_recipe(world / "recipe.yaml", [*overrides, f"output_dir={ref_dir}"]), progress=False)
    return ref_dir


def _run_until_killed(world, out: Path, monkeypatch, when, overrides: tuple[str, ...] = ()) -> None:
    """Run the recipe into `out` and simulate a kill at the first metrics row where when(sink, step, suite)."""
    from continual_opd import tracking

    original = tracking.MetricsSink.log

    def crashing_log(self, step, suite, values, **kw):
        if when(self, step, suite):
            raise KeyboardInterrupt("simulated kill")
        return original(self, step, suite, values, **kw)

    monkeypatch.setattr(tracking.MetricsSink, "log", crashing_log)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(load_recipe(world / "recipe.yaml", [*overrides, f"output_dir={out}"]), progress=False)
    monkeypatch.setattr(tracking.MetricsSink, "log", original)


def rows_of(run: Path):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_full_run_writes_the_contract(world):
    run = run_recipe(load_recipe(world / "recipe.yaml"), progress=False)
    assert (run / "recipe.resolved.yaml").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert list(summary) == ["baseline", "sft", "after-sft", "opd"]
    for stage in summary.values():
        assert 0.0 <= stage["ifeval/prompt_level_strict_acc"] <= 1.0 and "domain_qa/exact_match" in stage
    rows = rows_of(run)
    for r in rows:
        assert {"stage", "step", "suite", "metric", "value", "time", "global_step", "stage_index"} <= set(r)
    sft_evals = sorted({r["step"] for r in rows if r["stage"] == "sft" and r["suite"] == "ifeval"})
    assert sft_evals == [2, 4]
    opd = [r for r in rows if r["stage"] == "opd" and r["suite"] == "opd"]
    assert ({"teacher_kl", "student_entropy", "truncation_rate", "time_generate_s", "replay_loss"}
            <= {r["metric"] for r in opd})
    assert max(r["global_step"] for r in rows) == 4 + 3  # global step continues across stages
    assert any(r["suite"] == "kl_monitor" for r in rows)
    assert any(r["suite"] == "data" and r["metric"] == "token_share/documents" for r in rows)
    # the model after each training stage is on disk, and evals saved their generations
    assert (run / "stages" / "01-sft" / "final" / "config.json").exists()
    assert (run / "stages" / "00-baseline" / "evals" / "step-000000" / "ifeval.jsonl").exists()


def test_existing_run_dir_is_never_overwritten(world, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(RunDirError, match="output_dir is not empty .1 entry: keep.txt. and holds no run"):
        run_recipe(load_recipe(world / "recipe.yaml", [f"output_dir={out}"]), progress=False)
    assert (out / "keep.txt").read_text() == "precious" and len(list(out.iterdir())) == 1


@pytest.mark.parametrize("crash_stage,crash_step,overrides", [
    ("sft", 3, ()), ("opd", 2, ()),
    # rollouts from the continuous-batching engine, evals from hf: both engines resume to the same numbers
    ("opd", 2, ("stages.3.sampler=continuous", "evals.engine=hf"))])
def test_resume_matches_uninterrupted_run(world, tmp_path, monkeypatch, crash_stage, crash_step, overrides):
    ref_dir = _reference_run(world, overrides)
    out = tmp_path / "run"
    _run_until_killed(world, out, monkeypatch,
                      lambda sink, step, suite: (sink.stage == crash_stage and step == crash_step
                                                 and suite in ("train", "opd")), overrides)
    run_recipe(load_recipe(world / "recipe.yaml", [*overrides, f"output_dir={out}"]), resume=True, progress=False)
    got = json.loads((out / "summary.json").read_text())
    want = json.loads((ref_dir / "summary.json").read_text())
    assert got.keys() == want.keys()
    for stage in want:
        for k, v in want[stage].items():
            if "time" not in k:
                assert got[stage][k] == pytest.approx(v, abs=1e-6), (stage, k)

    def key(r):
        return (r["stage"], r["step"], r["suite"], r["metric"])

    def evals(rows):
        return {key(r): r["value"] for r in rows
                if r["suite"] in ("ifeval", "domain_qa", "train") and "time" not in r["metric"]}

    assert evals(rows_of(out)) == pytest.approx(evals(rows_of(ref_dir)), abs=1e-6)


def test_bad_data_fails_before_anything_is_written(world, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(CHAT[0]) + "\n{not json\n")
    out = tmp_path / "run"
    code = main(["recipe", str(world / "recipe.yaml"), f"output_dir={out}", f"stages.1.data.chat=[{bad}]"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == (f"error: {bad}:2: invalid JSON (Expecting property name enclosed in double quotes "
                                 "at column 2); fix or remove the line")
    assert not out.exists()


def test_chat_row_without_assistant_turn(world, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: chat row has no final assistant turn"):
        run_recipe(load_recipe(world / "recipe.yaml", [f"output_dir={tmp_path / 'r'}", f"stages.1.data.chat=[{bad}]"]))


def test_missing_and_empty_data(world, tmp_path):
    with pytest.raises(DataError, match="documents source not found"):
        run_recipe(load_recipe(world / "recipe.yaml", [f"output_dir={tmp_path / 'r'}",
                                                       "stages.1.data.documents=[nope]"]))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.jsonl: no chat rows found"):
        run_recipe(load_recipe(world / "recipe.yaml", [f"output_dir={tmp_path / 'r'}",
                                                       f"stages.1.data.chat=[{empty}]"]))


def test_lora_target_module_the_model_lacks(world, tmp_path, capsys):
    code = main(["recipe", str(world / "recipe.yaml"), f"output_dir={tmp_path / 'r'}", "--no-progress",
                 "stages.1.finetune=lora", "stages.1.lora.target_modules=[q_proj,query_key_value]"])
    err = capsys.readouterr().err
    assert code == 2 and "lora.target_modules: ['query_key_value'] not found in LlamaForCausalLM" in err


def test_nan_loss_stops_the_stage_and_keeps_the_last_good_checkpoint(world, tmp_path, monkeypatch):
    from continual_opd.errors import TrainingError
    from continual_opd.stages import opd

    real = opd.chunked_divergence  # the loss of an unsharded student
    calls = {"n": 0}

    def flaky(*a, **kw):
        loss, stats = real(*a, **kw)
        calls["n"] += 1
        return (loss * float("nan"), stats) if calls["n"] >= 3 else (loss, stats)

    monkeypatch.setattr(opd, "chunked_divergence", flaky)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"stage opd: loss is nan at step 3; last good checkpoint: .*checkpoint-2"):
        run_recipe(load_recipe(world / "recipe.yaml", [f"output_dir={out}", "stages.3.micro_batch_size=4"]),
                   progress=False)
    assert (out / "stages" / "03-opd" / "checkpoints" / "checkpoint-2" / "COMPLETE").exists()


def test_lora_student_with_its_adapter_disabled_base_as_teacher(world, tmp_path, monkeypatch):
    """LoRA SFT then LoRA OPD: one adapter trained across both stages, the teacher is the base with the adapter
    disabled (no second model loaded), and every stage's model is reloadable from its ref."""
    from continual_opd import models

    loaded = []
    real_load_frozen = models.load_frozen
    monkeypatch.setattr(models, "load_frozen", lambda *a, **k: loaded.append(a) or real_load_frozen(*a, **k))
    out = tmp_path / "run"
    recipe = load_recipe(world / "recipe.yaml", [f"output_dir={out}", "stages.1.finetune=lora",
                                                 "stages.3.finetune=lora", "stages.1.lr=1e-2", "stages.3.lr=1e-2"])
    run_recipe(recipe, progress=False)
    assert loaded == []  # the teacher was the adapter-disabled student
    state = json.loads((out / "run_state.json").read_text())
    sft_ref, opd_ref = state["completed"][1]["ref"], state["completed"][3]["ref"]
    assert sft_ref["base"] == opd_ref["base"] == str(world / "model")  # both adapters sit on the original base
    assert Path(opd_ref["adapter"], "adapter_config.json").is_file()
    kl = [r["value"] for r in rows_of(out) if r["stage"] == "opd" and r["metric"] == "teacher_kl"]
    assert len(kl) == 3 and all(v == v for v in kl)  # logged every step, finite
    # the saved OPD adapter reloads and differs from the SFT adapter
    import torch

    ids = torch.tensor([[5, 17, 40, 33, 9]])
    with torch.no_grad():
        a = models.load_model(models.ModelRef(**sft_ref), recipe.model)(input_ids=ids).logits
        b = models.load_model(models.ModelRef(**opd_ref), recipe.model)(input_ids=ids).logits
    assert (a - b).abs().max() > 1e-6


def test_every_stage_writes_one_checkpoint_layout_with_meta(world):
    from transformers import AutoModelForCausalLM

    from continual_opd import checkpoints

    run = _reference_run(world)
    state = json.loads((run / "run_state.json").read_text())
    for stage_dir, kind, steps in [(run / "stages/01-sft", "sft", [2, 4]), (run / "stages/03-opd", "opd", [1, 2, 3])]:
        ckpts = sorted((stage_dir / "checkpoints").glob("checkpoint-*"), key=checkpoints.step_of)
        assert [checkpoints.step_of(c) for c in ckpts] == steps
        assert checkpoints.latest(stage_dir) == ckpts[-1]
        for c in ckpts:
            files = {p.name for p in c.iterdir()}
            assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
                    "meta.json", "COMPLETE"} <= files, (kind, files)
            meta = checkpoints.read_meta(c)
            assert meta["kind"] == kind and meta["step"] == checkpoints.step_of(c) and len(meta["recipe_hash"]) == 16
            # the model the stage started from
            assert meta["parent"] == state["completed"][meta["stage_index"] - 1]["ref"]
        AutoModelForCausalLM.from_pretrained(ckpts[-1])  # any checkpoint is a loadable model
    # a checkpoint without its COMPLETE marker is never resumed from
    (ckpts[-1] / "COMPLETE").rename(ckpts[-1] / "COMPLETE.bak")
    try:
        assert checkpoints.latest(run / "stages/03-opd") == ckpts[-2]
    finally:
        (ckpts[-1] / "COMPLETE.bak").rename(ckpts[-1] / "COMPLETE")


def test_run_that_fails_before_its_first_stage_completes_resumes_from_the_beginning(world, tmp_path, monkeypatch,
                                                                                   capsys):
    ref_dir = _reference_run(world)
    out = tmp_path / "run"
    # killed after the baseline's ifeval rows were written, before its domain_qa rows
    _run_until_killed(world, out, monkeypatch,
                      lambda sink, step, suite: sink.stage == "baseline" and suite == "domain_qa")
    # starting it again is refused with the way forward; nothing is touched
    assert main(["recipe", str(world / "recipe.yaml"), f"output_dir={out}"]) == 2
    assert "continue it with --resume" in capsys.readouterr().err
    run_recipe(load_recipe(world / "recipe.yaml", [f"output_dir={out}"]), resume=True, progress=False)
    got, want = json.loads((out / "summary.json").read_text()), json.loads((ref_dir / "summary.json").read_text())
    assert list(got) == list(want)
    assert got["baseline"]["ifeval/prompt_level_strict_acc"] == want["baseline"]["ifeval/prompt_level_strict_acc"]
    keys = [(r["stage"], r["step"], r["suite"], r["metric"]) for r in rows_of(out)]
    assert len(keys) == len(set(keys))  # the half-finished baseline's rows were not duplicated


# ---------------------------------------------------------------------------------------------- self-generated chat


def _self_chat_recipe(world, out: Path, **self_chat) -> Path:
    recipe = yaml.safe_load((world / "recipe.yaml").read_text())
    recipe["output_dir"] = str(out)
    sft = recipe["stages"][1]
    sft["data"] = {"documents": ["docs"], "qa": ["qa.jsonl"], "mix": {"documents": 0.4, "qa": 0.3, "chat": 0.3},
                   "self_chat": {"prompts": ["chat.jsonl"], "num_prompts": 6, "max_new_tokens": 6,
                                 "keep_truncated": True, **self_chat}}
    recipe["stages"] = recipe["stages"][:2]
    path = world / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize("engine", ["hf", "continuous"])
def test_self_chat_is_the_models_own_answers_and_is_reused_on_resume(world, tmp_path, monkeypatch, engine):
    from continual_opd import self_chat

    out = tmp_path / "selfchat"
    run_recipe(load_recipe(_self_chat_recipe(world, out, engine=engine)), progress=False)
    path = out / "stages/01-sft/self_chat.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 6 and [r["messages"][0] for r in rows] == [c["messages"][0] for c in CHAT[:6]]
    # the answers are the model's, not the file's
    assert all(r["messages"][-1]["role"] == "assistant" for r in rows)
    assert [r["messages"][-1]["content"] for r in rows] != [c["messages"][-1]["content"] for c in CHAT[:6]]
    meta = json.loads((out / "stages/01-sft/self_chat.meta.json").read_text())
    assert meta["stats"]["prompts"] == 6 and meta["model"]["base"].endswith("model")
    rows_logged = {r["metric"]: r["value"] for r in rows_of(out) if r["suite"] == "data"}
    assert rows_logged["self_chat/kept"] == 6 and rows_logged["token_share/chat"] > 0
    before = path.read_bytes()
    # reused: a second stage run with the same settings does not generate again
    monkeypatch.setattr("continual_opd.generation.sample_rollouts",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("generated again")))
    cfg = load_recipe(_self_chat_recipe(world, out, engine=engine)).stages[1].data.self_chat
    p, stats = self_chat.ensure_self_chat(cfg, out / "stages/01-sft", None, None, model_ref=meta["model"], seed=0)
    assert p == path and path.read_bytes() == before and stats == meta["stats"]
    # other settings: generated again (with the real sampler), never reused
    monkeypatch.undo()
    model, tok = build_tiny_lm()
    changed = load_recipe(_self_chat_recipe(world, out, engine=engine)).stages[1].data.self_chat.model_copy(
        update={"num_prompts": 4})
    _, stats = self_chat.ensure_self_chat(changed, out / "stages/01-sft", model, tok, model_ref=meta["model"], seed=0,
                                          progress=False)
    assert stats["prompts"] == 4 and len(path.read_text().splitlines()) == 4


def test_self_chat_prompts_that_are_if_eval_prompts_are_refused(world, tmp_path, capsys):
    leaky = world / "leaky.jsonl"
    leaky.write_text(json.dumps({"prompt": "What is 1 plus 1?"}) + "\n"
                     + json.dumps({"prompt": "  say hello.   do not use any commas. "}) + "\n")
    recipe = _self_chat_recipe(world, tmp_path / "leak", prompts=[str(leaky)])
    assert main(["validate", str(recipe)]) != 0
    err = capsys.readouterr().err
    assert f"{leaky}:2: stages.1.data.self_chat.prompts: this prompt is also an eval prompt of suite 'ifeval'" in err
    assert not (tmp_path / "leak").exists()


def test_self_chat_snapshot_must_exist_at_that_point(world, tmp_path, capsys):
    recipe = _self_chat_recipe(world, tmp_path / "x", model="snapshot:after-sft")
    assert main(["validate", str(recipe)]) != 0
    assert "stages.1.data.self_chat.model: no snapshot named 'after-sft'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- --from-run


def test_from_run_reuses_the_shared_stages_and_runs_the_rest(world, tmp_path, capsys):
    ref = _reference_run(world)
    out = tmp_path / "fork"
    code = main(["recipe", str(world / "recipe.yaml"), f"output_dir={out}", "stages.3.loss=forward",
                 "--from-run", str(ref), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    state = json.loads((out / "run_state.json").read_text())
    assert [c["name"] for c in state["completed"]] == ["baseline", "sft", "after-sft", "opd"]
    assert state["completed"][1]["ref"]["base"].startswith(str(ref))  # the SFT model is the source run's
    assert not (out / "stages/01-sft").exists() and (out / "stages/03-opd/final").is_dir()
    rows, ref_rows = rows_of(out), rows_of(ref)
    shared = [r for r in ref_rows if r["stage_index"] < 3]
    assert [r for r in rows if r["stage_index"] < 3] == shared  # the first three stages' rows, copied as they are
    opd = [r for r in rows if r["stage_index"] == 3]
    assert opd and opd[0]["global_step"] == state["completed"][2]["global_step"] + opd[0]["step"]
    ref_summary, summary = (json.loads((ref / "summary.json").read_text()),
                            json.loads((out / "summary.json").read_text()))
    assert summary["after-sft"] == ref_summary["after-sft"] and summary["opd"] != ref_summary["opd"]
    assert json.loads((out / "forked_from.json").read_text())["stages"] == ["baseline", "sft", "after-sft"]


def test_from_run_refuses_a_run_that_shares_nothing(world, tmp_path, capsys):
    ref = _reference_run(world)
    assert main(["recipe", str(world / "recipe.yaml"), f"output_dir={tmp_path / 'a'}", "seed=1",
                 "--from-run", str(ref)]) != 0
    assert "seed: differs from" in capsys.readouterr().err
    assert main(["recipe", str(world / "recipe.yaml"), f"output_dir={tmp_path / 'b'}", "stages.0.suites=[ifeval.yaml]",
                 "--from-run", str(ref)]) != 0
    assert "nothing to reuse (its first stage differs" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_headline_keys_come_from_the_recipe(world, tmp_path, capsys):
    out = tmp_path / "headline"
    recipe = yaml.safe_load((world / "recipe.yaml").read_text())
    recipe.update(output_dir=str(out), report=True, stages=recipe["stages"][:1],
                  headline={"domain_qa": "domain_qa/f1", "if_eval": "ifeval/inst_level_loose_acc"})
    (world / "headline.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["recipe", str(world / "headline.yaml"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "domain_qa/f1" in printed and "ifeval/inst_level_loose_acc" in printed
    report = (out / "report/report.md").read_text()
    assert "domain QA = domain_qa/f1, IF-eval = ifeval/inst_level_loose_acc" in report


@pytest.mark.parametrize("progress", [True, False])
def test_console_shows_no_trainer_log_dicts(world, tmp_path, capfd, progress):
    """The Trainer's per-step log dicts belong in metrics.jsonl, not between the progress bars (either mode)."""
    out = tmp_path / "run"
    stage = ("[{name: sft, kind: sft, steps: 3, batch_size: 4, max_seq_len: 32, "
             "data: {documents: [docs], mix: {documents: 1.0}}}]")
    argv = ["recipe", str(world / "recipe.yaml"), f"output_dir={out}", f"stages={stage}", "evals.kl_prompts=null"]
    assert main(argv + ([] if progress else ["--no-progress"])) == 0
    captured = capfd.readouterr()
    console = captured.out + captured.err
    assert "'loss'" not in console and "grad_norm" not in console, console[-2000:]
    assert "run written to" in captured.out
    train = {r["metric"] for r in rows_of(out) if r["suite"] == "train"}
    assert {"loss", "grad_norm", "learning_rate"} <= train  # the numbers are still logged, where they belong


def test_a_model_that_does_not_load_leaves_no_run_dir(world, tmp_path, capsys):
    """Weights that do not load fail before the run directory is written, so a plain rerun is not blocked."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(world / "model", broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    out = tmp_path / "run"
    assert main(["recipe", str(world / "recipe.yaml"), f"output_dir={out}", f"model.name={broken}"]) == 2
    assert "cannot load" in capsys.readouterr().err
    assert not out.exists()


def test_save_total_limit_keeps_the_newest_checkpoints(world, tmp_path):
    out = tmp_path / "limited"
    run_recipe(load_recipe(world / "recipe.yaml", [f"output_dir={out}", "stages.1.save_every=1",
                                                   "stages.1.save_total_limit=2", "stages.3.save_total_limit=1"]),
               progress=False)
    sft = sorted(p.name for p in (out / "stages" / "01-sft" / "checkpoints").glob("checkpoint-*"))
    opd = sorted(p.name for p in (out / "stages" / "03-opd" / "checkpoints").glob("checkpoint-*"))
    assert sft == ["checkpoint-3", "checkpoint-4"] and opd == ["checkpoint-3"]


def test_prune_never_deletes_the_resume_checkpoint_or_a_half_written_one(tmp_path):
    from continual_opd import checkpoints

    for step in (1, 2, 3, 5):
        ckpt = checkpoints.path(tmp_path, step)
        ckpt.mkdir(parents=True)
        if step != 5:  # checkpoint-5 is being written: no COMPLETE marker yet
            checkpoints.mark_complete(ckpt, {"step": step})
    gone = checkpoints.prune(tmp_path, 1)
    assert [p.name for p in gone] == ["checkpoint-1", "checkpoint-2"]
    assert checkpoints.latest(tmp_path).name == "checkpoint-3" and checkpoints.path(tmp_path, 5).exists()
    assert checkpoints.prune(tmp_path, None) == [] and checkpoints.latest(tmp_path).name == "checkpoint-3"
