"""Generation engines against the hardware floor, on the official IFEval prompts (the eval path the toolkit ships).

    python bench/bench_generation.py [--model smollm2|demo] [--dtype float32|bfloat16] [--engines continuous,hf]
        [--prompts 541] [--max-new-tokens 256] [--hf-batch 16] [--max-batch 64] [--compare-to RUN/ifeval.jsonl]
        [--out bench/results/generation-<model>-<dtype>.json]

For each engine: wall time of `generation.generate` (render, tokenize, sort, generate, decode: what an IFEval eval
point runs), generated tokens, tokens/s, and the share of answers that hit the cap. The floor is measured in the
same run: the time of one decode forward pass of the same model (one new token per row) at the engine's batch
size, with a KV cache as long as the workload's mean (mean prompt + half the mean answer), so floor tokens/s =
rows / that time. `ratio` = engine tokens/s / floor tokens/s.

`--rollouts`: instead of the eval, OPD rollout batches through `samplers.make_sampler` with each engine as the
stage's `sampler` (prompts_per_step = --prompts from the OPD prompt file, one sample each, temperature 1,
--max-new-tokens): median seconds per batch over --reps batches, and tokens/s.

`--compare-to` takes an IFEval answers file (`continual-opd eval ... --out RUN`, RUN/<suite>.jsonl) and reports how
many answers are the identical text and how many get the same prompt-level strict verdict, listing the others.
Run it on a quiet machine: another torch process on 2 cores makes every number meaningless.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from bench_opd_floor import _load  # noqa: E402

IFEVAL = REPO / "data_samples/ifeval_official/input_data.jsonl"


def decode_floor_s(model, rows: int, kv_len: int, reps: int = 5) -> float:
    """Median seconds of one decode pass: `rows` new tokens on a KV cache of `kv_len` (random keys and values)."""
    from transformers import DynamicCache

    cfg = model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dtype = next(model.parameters()).dtype
    cache = DynamicCache()
    for layer in range(cfg.num_hidden_layers):
        cache.update(torch.randn(rows, heads, kv_len, head_dim, dtype=dtype),
                     torch.randn(rows, heads, kv_len, head_dim, dtype=dtype), layer)
    ids = torch.randint(100, 1000, (rows, 1))
    pos = torch.full((rows, 1), kv_len)
    mask = torch.ones((rows, kv_len + 1), dtype=torch.long)
    times = []
    with torch.no_grad():
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            model(input_ids=ids, position_ids=pos, attention_mask=mask, cache=cache, use_cache=True)
            times.append(time.perf_counter() - t0)
            cache.crop(-1)
    return statistics.median(times[1:])  # the first pass warms up


class Counting:
    """Wraps an engine to count what it generated (the engine itself is the shipped one)."""

    def __init__(self, engine):
        self.engine, self.name, self.per_batch = engine, engine.name, engine.per_batch
        self.tokens = self.capped = self.answers = 0

    def generate(self, prompts, params, progress=None):
        done = self.engine.generate(prompts, params, progress)
        self.tokens += sum(len(c.token_ids) for c in done)
        self.capped += sum(not c.stopped for c in done)
        self.answers += len(done)
        return done


def compare(rows, responses, path: Path) -> dict:
    from continual_opd.evals.ifeval import score_ifeval

    ref = {r["key"]: r for r in map(json.loads, path.read_text().splitlines())}
    _, mine = score_ifeval(rows, responses)
    same_text = [r["key"] for r in mine if ref[r["key"]]["response"] == r["response"]]
    same_verdict = [r["key"] for r in mine if ref[r["key"]]["strict"] == r["strict"]]
    differ = [{"key": r["key"], "verdict_ref": ref[r["key"]]["strict"], "verdict": r["strict"],
               "first_diff_char": next((i for i, (a, b) in enumerate(zip(ref[r["key"]]["response"], r["response"]))
                                        if a != b), min(len(ref[r["key"]]["response"]), len(r["response"])))}
              for r in mine if r["key"] not in same_text]
    return {"prompts": len(mine), "identical_text": len(same_text), "same_verdict": len(same_verdict),
            "strict_acc": sum(bool(r["strict"]) for r in mine) / len(mine),
            "strict_acc_ref": sum(bool(ref[r["key"]]["strict"]) for r in mine) / len(mine), "differ": differ}


def rollouts(tok, model, args) -> dict:
    import random

    from continual_opd.config import OPDStage
    from continual_opd.samplers import make_sampler
    from continual_opd.stages.opd import load_prompts, pick_prompts

    out = {}
    for name in args.engines.split(","):
        stage = OPDStage(name="b", kind="opd", prompts=[str(REPO / "data_samples/chat/opd_prompts.jsonl")],
                         prompts_per_step=args.prompts, samples_per_prompt=1, max_new_tokens=args.max_new_tokens,
                         sampler=name)
        chat, docs = load_prompts(stage)
        sampler = make_sampler(stage, model, tok, None, {})
        times, tokens = [], []
        for rep in range(args.reps):
            torch.manual_seed(rep)
            prompts = pick_prompts(chat, docs, stage.prompts_per_step, 0.0, random.Random(rep))
            t0 = time.perf_counter()
            ro = sampler.sample(prompts)
            times.append(time.perf_counter() - t0)
            tokens.append(int(ro.response_mask_BL.sum()))
        out[name] = {"median_s": round(statistics.median(times), 3), "tokens": tokens,
                     "tokens_per_s": round(sum(tokens) / sum(times), 1)}
        print(json.dumps({name: out[name]}), flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "demo"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--engines", default="continuous,hf")
    ap.add_argument("--prompts", type=int, default=541)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--hf-batch", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--compare-to", type=Path)
    ap.add_argument("--rollouts", action="store_true", help="time OPD rollout batches instead of the eval")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    from continual_opd.engines import make_engine
    from continual_opd.evals.ifeval import load_ifeval_rows
    from continual_opd.generation import generate, render_prompts

    tok, model, _, _ = _load(args.model, args.dtype)
    model.eval()
    if args.rollouts:
        res = {"model": args.model, "dtype": args.dtype, "rollouts": rollouts(tok, model, args)}
        out = args.out or REPO / "bench" / "results" / f"rollouts-{args.model}-{args.dtype}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1))
        return 0
    rows = load_ifeval_rows(IFEVAL)[: args.prompts]
    prompts = [r["prompt"] for r in rows]
    prompt_len = statistics.mean(len(x) for x in tok(render_prompts(tok, prompts), add_special_tokens=False)
                                 ["input_ids"])
    result = {"model": args.model, "dtype": args.dtype, "prompts": len(rows), "max_new_tokens": args.max_new_tokens,
              "threads": torch.get_num_threads(), "mean_prompt_tokens": round(prompt_len, 1), "engines": {}}
    for name in args.engines.split(","):
        batch = args.hf_batch if name == "hf" else args.max_batch
        eng = Counting(make_engine(name, model, tok, max_batch=batch))
        t0 = time.perf_counter()
        responses = generate(model, tok, prompts, max_new_tokens=args.max_new_tokens, batch_size=batch, engine=eng,
                             progress=f"{name} {args.dtype}")
        wall = time.perf_counter() - t0
        kv = int(prompt_len + eng.tokens / eng.answers / 2)
        floor_s = decode_floor_s(model, batch, kv)
        res = {"batch": batch, "wall_s": round(wall, 1), "tokens": eng.tokens,
               "tokens_per_s": round(eng.tokens / wall, 1),
               "capped_share": round(eng.capped / eng.answers, 3), "floor_kv_len": kv,
               "floor_step_s": round(floor_s, 4), "floor_tokens_per_s": round(batch / floor_s, 1),
               "ratio": round(eng.tokens / wall / (batch / floor_s), 3)}
        if args.compare_to:
            res["compare"] = compare(rows, responses, args.compare_to)
        result["engines"][name] = res
        print(json.dumps({name: {k: v for k, v in res.items() if k != "compare"}}), flush=True)
        if "compare" in res:
            c = res["compare"]
            print(f"  vs {args.compare_to}: identical text {c['identical_text']}/{c['prompts']}, same verdict "
                  f"{c['same_verdict']}/{c['prompts']}, strict acc {c['strict_acc']:.4f} "
                  f"(ref {c['strict_acc_ref']:.4f})")
    out = args.out or REPO / "bench" / "results" / f"generation-{args.model}-{args.dtype}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
