"""Two processes on CPU (gloo) under FSDP2, started with the shipped config:
`accelerate launch --config_file recipes/accelerate/fsdp2.yaml --num_processes 2` (see tests/fsdp_worker.py for the
one check of accelerate's that the worker lifts so its FSDP plugin applies on CPU).

- one OPD step on 2 x B/2 rollouts with sharded weights gives the update and the stats of 1 x B;
- a checkpoint saved under FSDP2 holds the full weights and optimizer state, in the files and format one process
  writes; a checkpoint written by one process (as the code before sharded saves wrote it) resumes under FSDP2, and
  an FSDP2 checkpoint resumes in one process, each to the one-process result;
- a pipeline (SFT, then OPD) under FSDP2 whose rank is killed mid-OPD resumes to the uninterrupted result.
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
from safetensors.torch import load_file

from conftest import free_port
from continual_opd import checkpoints
from continual_opd.stages.opd import opd_step
from dist_worker import grad_setup
from fsdp_worker import LOSSES, ckpt_setup

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
KINDS = ("full", "lora")  # full weights (model.safetensors), a LoRA adapter (adapter_model.safetensors)
pytestmark = pytest.mark.skipif(not hasattr(torch.distributed, "is_gloo_available")
                                or not torch.distributed.is_gloo_available(), reason="torch built without gloo")


def launch(*args, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """tests/fsdp_worker.py ARGS under the shipped FSDP2 config with 2 processes, one thread each."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(REPO / "recipes/accelerate/fsdp2.yaml"),
           "--num_processes", "2", "--main_process_port", str(free_port()), str(HERE / "fsdp_worker.py"), *args]
    # this checkout's package first: an editable install elsewhere must not stand in for it in the workers
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{HERE}",
                **(env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, cwd=REPO)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM, not subprocess.run's SIGKILL: the workers run in sessions of their own, and only the launcher,
        # terminated, stops them (a rank left waiting in a collective would otherwise hold a core for good)
        proc.terminate()
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"timed out after {timeout}s (a rank waiting in a collective?)\n{out[-2000:]}\n{err[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


# ----------------------------------------------------------------------------------------------- step + checkpoints


def _save_as_before(ckpt: Path, model, optimizer, scheduler, step: int) -> None:
    """A checkpoint as `save_training_state` wrote it before sharded saves (rank 0's own objects, written as is)."""
    from continual_opd.io import atomic_write_json

    ckpt.mkdir(parents=True)
    model.save_pretrained(ckpt)
    torch.save(optimizer.state_dict(), ckpt / "optimizer.pt")
    torch.save(scheduler.state_dict(), ckpt / "scheduler.pt")
    torch.save(checkpoints._rng_state(), ckpt / "rng_state.pth")
    atomic_write_json(ckpt / "trainer_state.json", {"global_step": step})
    checkpoints.mark_complete(ckpt, {"step": step})


def _one_process_step(kind: str, ckpt_in: Path | None, ckpt_out: Path, step: int) -> None:
    """One process: (load ckpt_in,) one OPD step on all rollouts, save."""
    student, teacher, rollouts, stage, optimizer, scheduler = ckpt_setup(kind)
    if ckpt_in is not None:
        assert checkpoints.load_training_state(ckpt_in, student, optimizer, scheduler) == step - 1
    opd_step(student, teacher, rollouts, stage, optimizer, scheduler=scheduler, chunk=False)  # as FSDP2 (sharded head)
    checkpoints.save_training_state(ckpt_out, student, optimizer, scheduler, step, {"step": step})


def _assert_same_checkpoint(got: Path, want: Path) -> None:
    """The same files; weights and optimizer state equal within float tolerance (the ranks sum in another order)."""
    names = {p.name for p in want.iterdir()}
    assert {p.name for p in got.iterdir()} == names, "another file layout"
    for weights in sorted(want.glob("*.safetensors")):
        w_got, w_want = load_file(got / weights.name), load_file(weights)
        assert w_got.keys() == w_want.keys()
        for k, v in w_want.items():
            torch.testing.assert_close(w_got[k], v, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{got} weight {k}: {m}")
    o_got, o_want = (torch.load(c / "optimizer.pt", weights_only=False) for c in (got, want))
    assert o_got["state"].keys() == o_want["state"].keys(), "optimizer.pt is keyed differently"

    def groups(o):  # a group loaded through torch.distributed.checkpoint has its betas as a list: the same numbers
        return [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in o["param_groups"]]

    assert groups(o_got) == groups(o_want)
    for i, state in o_want["state"].items():
        assert o_got["state"][i].keys() == state.keys()
        for k, v in state.items():
            torch.testing.assert_close(o_got["state"][i][k], v, rtol=1e-3, atol=1e-7,
                                       msg=lambda m, i=i, k=k: f"{got} optimizer state {i}.{k}: {m}")
    assert torch.load(got / "scheduler.pt") == torch.load(want / "scheduler.pt")
    assert json.loads((got / "trainer_state.json").read_text()) == json.loads((want / "trainer_state.json").read_text())


@pytest.fixture(scope="module")
def step_run(tmp_path_factory):
    """The worker's step mode (one launch): each estimator's SGD step, then the AdamW checkpoint rounds. The
    one-process checkpoints it resumes from are written first, as the code before sharded saves wrote them."""
    out = tmp_path_factory.mktemp("fsdp2-step")
    for kind in KINDS:
        student, teacher, rollouts, stage, optimizer, scheduler = ckpt_setup(kind)
        opd_step(student, teacher, rollouts, stage, optimizer, scheduler=scheduler, chunk=False)
        _save_as_before(out / f"one-{kind}/checkpoint-1", student, optimizer, scheduler, 1)
    _ok(launch("step", str(out)))
    return out


@pytest.mark.parametrize("loss", LOSSES)
def test_fsdp2_step_on_two_halves_equals_one_step_on_all(step_run, loss):
    """No rescaling: FSDP2's reduce-scatter over gloo averages the ranks' gradients, as DDP does."""
    student, teacher, rollouts, stage, optimizer = grad_setup(loss)
    ref_row = opd_step(student, teacher, rollouts, stage, optimizer)
    got = torch.load(step_run / f"params-{loss}.pt")
    row = json.loads((step_run / f"row-{loss}.json").read_text())
    assert row["num_processes"] == 2
    for n, p in student.named_parameters():
        torch.testing.assert_close(got[n], p.detach(), rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    for k in ("loss", "teacher_kl", "student_entropy", "grad_norm", "response_len", "tokens_sampled"):
        assert row[k] == pytest.approx(ref_row[k], rel=1e-5), k


@pytest.mark.parametrize("kind", KINDS)
def test_fsdp2_checkpoint_holds_the_one_process_state(step_run, kind):
    """Saved under FSDP2 after one step: the full weights (or adapter) and optimizer state, as one process saves."""
    _assert_same_checkpoint(step_run / f"fsdp2-{kind}/checkpoint-1", step_run / f"one-{kind}/checkpoint-1")


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoints_resume_across_process_counts(step_run, kind):
    """A one-process checkpoint in the old code's files, resumed under FSDP2 for one more step, equals one process
    doing the same; and the FSDP2 checkpoint resumed in one process does too."""
    one, fsdp2 = step_run / f"one-{kind}", step_run / f"fsdp2-{kind}"
    _one_process_step(kind, one / "checkpoint-1", one / "checkpoint-2", 2)
    _assert_same_checkpoint(fsdp2 / "checkpoint-2", one / "checkpoint-2")
    _one_process_step(kind, fsdp2 / "checkpoint-1", step_run / f"from-fsdp2-{kind}", 2)
    _assert_same_checkpoint(step_run / f"from-fsdp2-{kind}", one / "checkpoint-2")


# ----------------------------------------------------------------------------------------------- pipeline


def _recipe(tmp_path: Path, out: Path) -> Path:
    data = REPO / "data_samples"
    (tmp_path / "qa_small.yaml").write_text(yaml.safe_dump(
        {"name": "qa_small", "kind": "domain_qa", "data": str(data / "domain_qa/eval.jsonl"), "limit": 4,
         "batch_size": 2, "max_new_tokens": 8}))
    recipe = {
        "name": "fsdp2", "seed": 0, "output_dir": str(out), "cache_dir": str(tmp_path / "cache"),
        "model": {"name": "demo"},
        "evals": {"suites": [str(tmp_path / "qa_small.yaml")]},
        "headline": {"domain_qa": "qa_small/exact_match", "if_eval": "qa_small/exact_match"},
        "stages": [
            {"name": "sft", "kind": "sft", "steps": 2, "batch_size": 4, "max_seq_len": 32, "lr": 1e-3, "save_every": 1,
             "data": {"qa": [str(data / "domain_qa/train.jsonl")], "mix": {"qa": 1.0}}},
            {"name": "opd", "kind": "opd", "teacher": "snapshot:before-sft", "loss": "full", "steps": 4, "lr": 1e-3,
             "prompts": [str(data / "chat/opd_prompts.jsonl")], "prompts_per_step": 4, "samples_per_prompt": 1,
             "max_new_tokens": 8, "save_every": 1,
             "replay": {"batch_size": 2, "max_seq_len": 32, "data": {"qa": [str(data / "domain_qa/train.jsonl")],
                                                                      "mix": {"qa": 1.0}}}},
        ],
    }
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _opd_rows(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {(r["step"], r["metric"]): r["value"] for r in rows
            if r["suite"] == "opd" and not r["metric"].startswith("time_")}


def _sharded(log: Path) -> set[str]:
    return set(Path(f"{log}.sharded").read_text().splitlines())


def test_fsdp2_pipeline_killed_in_sft_and_in_opd_resumes_to_the_uninterrupted_result(tmp_path):
    """SFT (HF Trainer under accelerate's FSDP2) then OPD, both sharded. One run goes through uninterrupted; the other
    loses rank 1 in SFT step 2, resumes, loses it again in OPD step 3, and resumes to the end. Both end the same."""
    log = tmp_path / "builds.log"
    env = {"DEMO_BUILD_LOG": str(log)}
    ref = tmp_path / "ref"
    _ok(launch("cli", "recipe", str(_recipe(tmp_path, ref)), "--no-progress", env=env))
    assert _sharded(log) == {f"{s} rank {r} sharded=True" for s in ("sft", "opd") for r in (0, 1)}

    out = tmp_path / "killed"
    recipe = _recipe(tmp_path, out)
    for args, stage in ((["--die-in-sft", "2", "recipe", str(recipe)], "00-sft"),
                        (["--die-at", "3", "recipe", str(recipe), "--resume"], "01-opd")):
        proc = launch("cli", *args, "--no-progress", env=env)
        assert proc.returncode != 0
        text = proc.stdout + proc.stderr
        assert re.search(r"rank\s*:\s*1\b", text) and re.search(r"exitcode\s*:\s*3\b", text), text[-3000:]
        ckpts = list((out / "stages" / stage / "checkpoints").glob("checkpoint-*"))
        assert all((c / checkpoints.COMPLETE).is_file() for c in ckpts), "a half-written checkpoint was left"
        assert checkpoints.step_of(checkpoints.latest(out / "stages" / stage)) == (1 if stage == "00-sft" else 2)
    _ok(launch("cli", "recipe", str(recipe), "--resume", "--no-progress", env=env))

    a, b = _opd_rows(ref), _opd_rows(out)
    assert sorted({s for s, _ in b}) == [1, 2, 3, 4]
    for key, v in a.items():
        assert b[key] == pytest.approx(v, rel=1e-4, abs=1e-6), key
    a, b = json.loads((ref / "summary.json").read_text()), json.loads((out / "summary.json").read_text())
    assert a.keys() == b.keys() == {"sft", "opd"}
    for stage in a:
        for k, v in a[stage].items():
            if "eval_time" not in k and "eval_s" not in k:
                assert b[stage][k] == pytest.approx(v, rel=1e-4, abs=1e-6), (stage, k)
    for stage, step in (("00-sft", 2), ("01-opd", 4)):
        w_ref, w_out = (load_file(checkpoints.path(run / "stages" / stage, step) / "model.safetensors")
                        for run in (ref, out))
        assert w_ref.keys() == w_out.keys()
        for k, v in w_ref.items():
            torch.testing.assert_close(w_out[k], v, rtol=1e-4, atol=1e-6,
                                       msg=lambda m, stage=stage, k=k: f"{stage} {k}: {m}")
