"""Benchmark: OPD step time per estimator and eval time per suite on the demo model (CPU).

    python bench/bench_opd.py [--steps 10] [--out bench/results.json]

Runs each estimator for a few steps from the same start (the demo model, teacher = itself after one
perturbation-free copy) and reports mean wall time split into generate / teacher / student, plus the
time of each eval suite. Compare ratios inside one run: shared machines are noisy.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from continual_opd import models
from continual_opd.config import ModelConfig, OPDStage
from continual_opd.evals import load_suite, run_suite
from continual_opd.stages.opd import load_prompts, opd_step, pick_prompts, sample

REPO = Path(__file__).resolve().parents[1]


def bench_estimators(model, teacher, tok, steps: int) -> dict:
    out = {}
    for loss in ("sampled", "full", "forward", "jsd"):
        stage = OPDStage(name="b", kind="opd", loss=loss, prompts=[str(REPO / "data_samples/chat/opd_prompts.jsonl")],
                         prompts_per_step=16, samples_per_prompt=2, max_new_tokens=48)
        chat, docs = load_prompts(stage)
        student = copy.deepcopy(model).train()
        opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
        times = {"generate": [], "teacher": [], "student": []}
        for step in range(steps):
            prompts = pick_prompts(chat, docs, 16, 0.0, random.Random(step))
            t0 = time.perf_counter()
            rollouts = sample(student, tok, prompts, stage, {})
            t1 = time.perf_counter()
            row = opd_step(student, teacher, rollouts, stage, opt)  # the shipped update, as the stage runs it
            times["generate"].append(t1 - t0)
            times["teacher"].append(row["time_teacher_s"])
            times["student"].append(row["time_student_s"])
        out[loss] = {k: statistics.median(v) for k, v in times.items()}
        out[loss]["total"] = sum(out[loss].values())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = ModelConfig(name="demo")
    base = models.resolve_base(cfg, None)
    tok = models.load_tokenizer(base, cfg)
    model = models.load_model(models.ModelRef(base), cfg)
    teacher = models.load_frozen(models.ModelRef(base), cfg)
    n_params = sum(p.numel() for p in model.parameters())
    res = {"params": n_params, "torch_threads": torch.get_num_threads(),
           "opd_step_s": bench_estimators(model, teacher, tok, args.steps)}
    res["eval_s"] = {}
    with tempfile.TemporaryDirectory() as d:
        for name in ("ifeval", "domain_qa"):
            suite = load_suite(name)
            t0 = time.perf_counter()
            vals = run_suite(suite, model, tok, Path(d), progress=False)
            res["eval_s"][name] = {"seconds": time.perf_counter() - t0, "n": suite.limit or "all",
                                   "headline": vals.get("prompt_level_strict_acc", vals.get("exact_match"))}
    print(json.dumps(res, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
