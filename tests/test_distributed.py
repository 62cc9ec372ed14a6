"""Two processes on CPU (gloo), started the way users start them: `accelerate launch --multi_gpu --num_processes 2`
(without GPUs, accelerate hands this to torchrun and the processes use gloo; `--cpu --num_processes 2` would start
one process, as accelerate only spreads CPU jobs with mpirun).

- one OPD step on 2 x B/2 rollouts gives the update and the stats of 1 x B, for every estimator;
- a sharded eval gives exactly the one-process scores and answers;
- a 2-process pipeline writes one clean run dir (no duplicate rows, one demo-model build), and after a rank is
  killed the run stops with a clear message, leaves only complete checkpoints, and resumes to the same result.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import free_port
from continual_opd import checkpoints
from continual_opd.stages.opd import opd_step
from dist_worker import grad_setup, run_eval

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
pytestmark = pytest.mark.skipif(not hasattr(torch.distributed, "is_gloo_available")
                                or not torch.distributed.is_gloo_available(), reason="torch built without gloo")


def launch(*args, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes 2 <args>`, one thread per process (2 cores, 2 processes)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), *args]
    # this checkout's package first: an editable install elsewhere must not stand in for it in the workers
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{HERE}",
                "ACCELERATE_CONFIG_FILE": "/nonexistent", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


# ----------------------------------------------------------------------------------------------- one OPD step


@pytest.mark.parametrize("loss", ["sampled", "full"])
def test_ddp_step_on_two_halves_equals_one_step_on_all(tmp_path, loss):
    """The ranks compute the loss chunk by chunk from hidden states (chunked.py); the reference is one process on
    full logits, so this also checks chunked against unchunked under DDP."""
    student, teacher, rollouts, stage, optimizer = grad_setup(loss)
    ref_row = opd_step(student, teacher, rollouts, stage, optimizer, chunk=False)
    ref = {n: p.detach() for n, p in student.named_parameters()}
    _ok(launch(str(HERE / "dist_worker.py"), "grad", loss, str(tmp_path)))
    got = torch.load(tmp_path / "params.pt")
    row = json.loads((tmp_path / "row.json").read_text())
    assert row["num_processes"] == 2 and row["chunked"]
    moved = max(float((got[n] - p).abs().max()) for n, p in ref.items())
    for n, p in ref.items():
        torch.testing.assert_close(got[n], p, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    assert moved < 1e-5
    for k in ("loss", "teacher_kl", "student_entropy", "grad_norm", "response_len", "tokens_sampled"):
        assert row[k] == pytest.approx(ref_row[k], rel=1e-5), k


# ----------------------------------------------------------------------------------------------- sharded eval


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory) -> Path:
    from continual_opd.demo.build import DemoModelConfig, ensure_demo_model

    return ensure_demo_model(tmp_path_factory.mktemp("cache"), DemoModelConfig.tiny(), progress=False)


def test_sharded_eval_gives_exactly_the_one_process_scores(tmp_path, tiny_demo):
    one = tmp_path / "one"
    scores = run_eval(str(tiny_demo), one)
    two = tmp_path / "two"
    two.mkdir()
    _ok(launch(str(HERE / "dist_worker.py"), "eval", str(tiny_demo), str(two)))
    assert json.loads((two / "scores.json").read_text()) == {**scores, "num_processes": 2}
    for name in ("ifeval.jsonl", "domain_qa.jsonl"):  # the very same answers, in the same order
        assert (two / name).read_text() == (one / name).read_text()


# ----------------------------------------------------------------------------------------------- pipeline


def _recipe(tmp_path: Path, out: Path) -> Path:
    data = REPO / "data_samples"
    for name, kind, src, limit in (("if_small", "ifeval", "ifeval/eval.jsonl", 12),
                                   ("qa_small", "domain_qa", "domain_qa/eval.jsonl", 12)):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(
            {"name": name, "kind": kind, "data": str(data / src), "limit": limit, "batch_size": 4,
             "max_new_tokens": 16}))
    recipe = {
        "name": "two-procs", "seed": 0, "output_dir": str(out), "cache_dir": str(tmp_path / "cache"),
        "model": {"name": "demo"},
        "evals": {"suites": [str(tmp_path / "if_small.yaml"), str(tmp_path / "qa_small.yaml")]},
        "headline": {"domain_qa": "qa_small/exact_match", "if_eval": "if_small/prompt_level_strict_acc"},
        "stages": [
            {"name": "baseline", "kind": "eval"},
            {"name": "sft", "kind": "sft", "steps": 4, "batch_size": 4, "max_seq_len": 32, "lr": 1e-3,
             "eval_every": 2, "save_every": 2,
             "data": {"documents": [str(data / "docs")], "qa": [str(data / "domain_qa/train.jsonl")],
                      "mix": {"documents": 0.5, "qa": 0.5}}},
            {"name": "opd", "kind": "opd", "teacher": "snapshot:before-sft", "loss": "full", "steps": 4, "lr": 1e-3,
             "prompts": [str(data / "chat/opd_prompts.jsonl")], "prompts_per_step": 4, "samples_per_prompt": 1,
             "max_new_tokens": 8, "eval_every": 2, "save_every": 1,
             "replay": {"batch_size": 2, "max_seq_len": 32, "data": {"qa": [str(data / "domain_qa/train.jsonl")],
                                                                      "mix": {"qa": 1.0}}}},
        ],
    }
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _check_clean_run(run: Path) -> None:
    rows = [r for r in _rows(run) if r["suite"] != "time"]  # timings differ per run; everything else is unique
    keys = [(r["stage_index"], r["step"], r["suite"], r["metric"]) for r in rows]
    assert len(keys) == len(set(keys)), "duplicate metric rows: more than one writer"
    state = json.loads((run / "run_state.json").read_text())
    assert [c["name"] for c in state["completed"]] == ["baseline", "sft", "opd"]
    for stage in ("01-sft", "02-opd"):
        for ckpt in (run / "stages" / stage / "checkpoints").glob("checkpoint-*"):
            assert (ckpt / checkpoints.COMPLETE).is_file(), f"{ckpt} is not complete"
    assert (run / "report" / "report.md").is_file()


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    out = tmp / "run"
    log = tmp / "builds.log"
    proc = launch(str(HERE / "dist_worker.py"), "cli", "recipe", str(_recipe(tmp, out)), "--no-progress",
                  env={"DEMO_BUILD_LOG": str(log)})
    return tmp, out, log, proc


def test_two_process_pipeline_writes_one_clean_run_dir(clean_run):
    tmp, out, log, proc = clean_run
    _ok(proc)
    assert sorted(Path(f"{log}.ranks").read_text().splitlines()) == ["rank 0 of 2", "rank 1 of 2"]
    assert log.read_text().splitlines() == ["rank 0"], "the demo model must be built once, by rank 0"
    writes = Path(f"{log}.writes").read_text().splitlines()
    assert any("metrics" in w for w in writes) and any("summary.json" in w for w in writes)
    assert {w.split()[1] for w in writes} == {"0"}, "only rank 0 may write the run directory"
    _check_clean_run(out)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"baseline", "sft", "opd"} and "qa_small/exact_match" in summary["opd"]
    assert proc.stdout.count("run written to") == 1  # one rank speaks
    opd_rows = [r for r in _rows(out) if r["suite"] == "opd" and r["metric"] == "tokens_sampled"]
    assert [r["step"] for r in opd_rows] == [1, 2, 3, 4]


def test_killed_rank_stops_the_run_cleanly_and_resume_finishes_it(clean_run):
    tmp, ref, log, _ = clean_run
    out = tmp / "killed"
    recipe = _recipe(tmp, out)
    proc = launch(str(HERE / "dist_worker.py"), "cli", "--die-at", "3", "recipe", str(recipe), "--no-progress",
                  env={"DEMO_BUILD_LOG": str(log)}, timeout=300)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    # the launcher names the process that died and how (rank 1, exit code 3)
    assert re.search(r"rank\s*:\s*1\b", text) and re.search(r"exitcode\s*:\s*3\b", text), text[-3000:]
    ckpts = sorted((out / "stages/02-opd/checkpoints").glob("checkpoint-*"))
    assert ckpts and all((c / checkpoints.COMPLETE).is_file() for c in ckpts), "a half-written checkpoint was left"
    assert checkpoints.step_of(checkpoints.latest(out / "stages/02-opd")) == 2
    _ok(launch(str(HERE / "dist_worker.py"), "cli", "recipe", str(recipe), "--resume", "--no-progress",
               env={"DEMO_BUILD_LOG": str(log)}))
    _check_clean_run(out)
    a, b = json.loads((ref / "summary.json").read_text()), json.loads((out / "summary.json").read_text())
    for stage in a:
        for k, v in a[stage].items():
            if "eval_time" not in k and "eval_s" not in k:
                assert b[stage][k] == pytest.approx(v, rel=1e-4, abs=1e-6), (stage, k)


def test_module_entry_point_runs_under_the_launcher(tmp_path):
    """The documented form, `accelerate launch ... -m continual_opd <command>`; both ranks agree and one speaks."""
    proc = launch("-m", "continual_opd", "validate", str(REPO / "recipes/personalize.yaml"),
                  f"output_dir={tmp_path / 'x'}")
    _ok(proc)
    assert proc.stdout.count("ok: ") == 1  # both ranks checked the recipe; rank 0 speaks
    bad = launch("-m", "continual_opd", "recipe", str(REPO / "recipes/personalize.yaml"), "stages.1.lr=-1")
    assert bad.returncode != 0 and bad.stderr.count("error: ") == 1, bad.stderr[-2000:]
