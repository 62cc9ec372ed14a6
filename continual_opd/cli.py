"""`continual-opd recipe|validate|eval|data|init|export|report|compare|build-demo|serve-teacher`.

main(argv) -> exit code.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from continual_opd.errors import ContinualOPDError, RunDirError

log = logging.getLogger("continual_opd")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="continual-opd", description="Fine-tune on your documents, keep general skills.")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks (for reporting bugs)")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("recipe", help="run a recipe (eval → sft → opd → eval ...)")
    r.add_argument("path", help="recipe YAML, e.g. recipes/personalize.yaml")
    r.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. stages.1.lr=1e-4 output_dir=/tmp/x")
    r.add_argument("--resume", action="store_true", help="continue an interrupted run in its output_dir")
    r.add_argument("--from-run", metavar="RUN_DIR", help="reuse the completed leading stages this recipe shares with "
                   "an earlier run (e.g. sweep the OPD stage from one SFT checkpoint)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")

    v = sub.add_parser("validate", help="run every check of a recipe that needs no model weights")
    v.add_argument("path")
    v.add_argument("overrides", nargs="*")
    v.add_argument("--num-processes", type=int, metavar="N",
                   help="check the batch splits of a launch with N processes (accelerate launch --num_processes N; "
                        "default: this launch's, 1 without a launcher)")
    v.add_argument("--resume", action="store_true", help="check that output_dir holds a run that --resume continues")

    e = sub.add_parser("eval", help="run eval suites on a model")
    e.add_argument("--model", required=True,
                   help="hub id, local path, a .gguf file, package:NAME, or demo (as a recipe's model.name)")
    e.add_argument("--gguf-file", help="GGUF file inside --model (a directory, package:NAME or hub repo)")
    e.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="weights dtype (auto: bf16 on GPU, fp32 on CPU)")
    e.add_argument("--chat-template-kwargs", type=json.loads, default={}, metavar="JSON",
                   help='extra chat-template variables, e.g. \'{"enable_thinking": false}\'')
    e.add_argument("--revision", help="hub revision (branch, tag or commit)")
    e.add_argument("--trust-remote-code", action="store_true")
    e.add_argument("--attn-implementation", help="e.g. sdpa, flash_attention_2")
    e.add_argument("--limit", type=int, help="evaluate only the first N rows of each suite (quick checks)")
    e.add_argument("--batch-size", type=int, help="override each suite's generation batch size (answers in flight)")
    e.add_argument("--engine", choices=["continuous", "hf", "vllm"], default="continuous",
                   help="generation engine: continuous batching (default), transformers' generate, or vLLM (GPU)")
    e.add_argument("--max-new-tokens", type=int, help="override each suite's answer length cap")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.add_argument("--suite", action="append", required=True,
                   help="suite name in eval_suites/ or a YAML path (repeatable)")
    e.add_argument("--out", help="directory for results.json and per-suite generations")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--cache-dir", help="demo model cache directory")

    rep = sub.add_parser("report", help="write <run>/report/ (plots, report.md, report.html)")
    rep.add_argument("run_dir")
    for sp in (rep, c := sub.add_parser("compare", help="compare several runs side by side")):
        sp.add_argument("--domain-key", help="headline domain-QA metric, suite/metric (default: the recipe's headline)")
        sp.add_argument("--if-key", help="headline IF-eval metric, suite/metric (default: the recipe's headline)")

    c.add_argument("run_dirs", nargs="+")
    c.add_argument("--out", required=True, help="output directory for the comparison report")

    d = sub.add_parser("data", help="look at a recipe's data, or make domain QA from documents")
    dsub = d.add_subparsers(dest="data_command", required=True)
    di = dsub.add_parser("inspect", help="per stage: tokens per source, epochs, realized mix, truncation, the chat "
                         "template on one example of each source (tokenizer only, no weights)")
    di.add_argument("path", help="recipe YAML")
    di.add_argument("overrides", nargs="*")
    di.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    dq = dsub.add_parser("make-qa", help="question/answer pairs grounded in documents: train QA, dev/test eval "
                         "suites, unanswerable questions and OPD doc prompts")
    dq.add_argument("docs", nargs="+", help="documents: folders or files (.md .txt .html .pdf .docx .jsonl)")
    dq.add_argument("--out", required=True, help="new folder for the QA files and suite YAMLs")
    dq.add_argument("--generator", choices=["extract", "model", "endpoint"], default="extract",
                    help="extract: deterministic fact extractor, no model (default); model: a local chat model; "
                         "endpoint: an OpenAI-compatible server (vLLM, a hosted API)")
    dq.add_argument("--model", help="--generator model: hub id, local path, package:NAME, .gguf or demo")
    dq.add_argument("--gguf-file", help="GGUF file inside --model")
    dq.add_argument("--base-url", help="--generator endpoint: e.g. http://127.0.0.1:8000/v1")
    dq.add_argument("--endpoint-model", help="--generator endpoint: the served model's name")
    dq.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    dq.add_argument("--send-documents-to-endpoint", action="store_true",
                    help="required with --generator endpoint: you agree that document passages are sent to it")
    dq.add_argument("--wordings", type=int, default=3, help="question wordings per fact (one is held out for eval)")
    dq.add_argument("--max-facts", type=int, help="keep at most this many facts")
    dq.add_argument("--seed", type=int, default=0)
    dq.add_argument("--no-progress", action="store_true", help="no progress bars")

    i = sub.add_parser("init", help="write a starting recipe for your documents and model")
    i.add_argument("docs", help="the folder of your documents")
    i.add_argument("--model", required=True, help="hub id (e.g. Qwen/Qwen3-8B), local path, .gguf, package:NAME, demo")
    i.add_argument("--gguf-file", help="GGUF file inside --model")
    i.add_argument("--out", required=True, help="the recipe file to write, e.g. my-recipe.yaml")
    i.add_argument("--qa", metavar="DIR", help="the --out folder of `continual-opd data make-qa` (domain eval + QA)")
    i.add_argument("--chat", action="append", metavar="JSONL", help="your chat data ({messages} rows; repeatable); "
                   "default: the model's own answers to general prompts")
    i.add_argument("--cache-dir", help="model cache directory (demo model, GGUF conversions)")

    x = sub.add_parser("export", help="a finished run's model as a standalone directory (+ model card)")
    x.add_argument("run_dir")
    x.add_argument("--stage", help="a completed stage's name (default: the last)")
    x.add_argument("--out", required=True, help="new directory to write")
    x.add_argument("--merge", action="store_true", help="merge a LoRA adapter into its base")
    x.add_argument("--push-to-hub", metavar="REPO", help="also upload the export to this hub repo")
    x.add_argument("--no-progress", action="store_true", help="no progress bars")

    b = sub.add_parser("build-demo", help="build (or find in the cache) the offline demo chat model")
    b.add_argument("--cache-dir")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")

    t = sub.add_parser("serve-teacher", help="serve a teacher's per-token log-probs over HTTP (a vLLM-compatible "
                       "subset: /v1/models, /tokenize, /v1/completions with prompt_logprobs)")
    t.add_argument("model", help="hub id, local path, package:NAME or demo")
    t.add_argument("--port", type=int, default=8000)
    t.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    t.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="weights dtype (auto: bf16 on GPU, fp32 on CPU)")
    t.add_argument("--served-model-name", help="the name clients give as `model` (default: MODEL as written)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may come after flags (`recipe r.yaml --resume a.b=1`): argparse leaves those in `extra`
    if (extra and getattr(args, "overrides", None) is not None
            and all("=" in e and not e.startswith("-") for e in extra)):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "datasets", "lm_eval", "lm-eval", "evaluate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from continual_opd import distributed

    rank = distributed.env_rank()
    if rank:  # one voice: the other ranks of a multi-process run log warnings only
        logging.getLogger().setLevel(logging.WARNING)
    try:
        return _dispatch(args)
    except ContinualOPDError as e:
        if args.debug:
            raise
        if not rank:  # every rank raises the same error (distributed.on_main); rank 0 prints it
            for line in str(e).splitlines():
                print(f"error: {line}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted: continue with --resume", file=sys.stderr)
        return 130
    except Exception as e:  # not bad input: a bug (or the machine); one line, the traceback behind --debug
        if args.debug:
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        if distributed.launched() and _lost_peer(e):
            print(f"error: rank {rank}: another process of this run stopped (it failed or was killed), so this one "
                  "stopped too; complete checkpoints are kept: fix the cause and rerun with --resume", file=sys.stderr)
            return 1
        print(f"error: {f'rank {rank}: ' if distributed.launched() else ''}internal error "
              f"({type(e).__name__}: {first}); rerun with --debug for the traceback and report it", file=sys.stderr)
        return 1


def _dispatch(args) -> int:
    from continual_opd.config import load_recipe

    if getattr(args, "no_progress", False):  # also transformers' own bars (loading weights, GGUF conversion)
        import datasets
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        datasets.disable_progress_bars()

    if args.command == "validate":
        from continual_opd.errors import ConfigError
        from continual_opd.preflight import preflight

        if args.num_processes is None:
            args.num_processes = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if args.num_processes < 1:
            raise ConfigError(f"--num-processes {args.num_processes}: must be >= 1")
        recipe = load_recipe(args.path, args.overrides)
        preflight(recipe, num_processes=args.num_processes, resume=args.resume)  # every check but the weights
        kinds = " → ".join(f"{s.name}({s.kind})" for s in recipe.stages)
        if _speaks():
            procs = f"; {args.num_processes} processes" if args.num_processes > 1 else ""
            print(f"ok: {args.path}: {recipe.name}: {kinds}; output_dir={recipe.output_dir}{procs}")
        return 0
    if args.command == "recipe":
        from continual_opd.pipeline import run_recipe

        recipe = load_recipe(args.path, args.overrides)
        run_dir = run_recipe(recipe, resume=args.resume, progress=not args.no_progress, from_run=args.from_run)
        if _speaks():
            summary = json.loads((run_dir / "summary.json").read_text())
            _print_summary(summary, (recipe.headline.domain_qa, recipe.headline.if_eval))
            print(f"run written to {run_dir}")
        return 0
    if args.command == "eval":
        return _eval(args)
    if args.command == "report":
        from continual_opd.report import write_report

        print(f"report written to {write_report(Path(args.run_dir), domain_key=args.domain_key, if_key=args.if_key)}")
        return 0
    if args.command == "compare":
        from continual_opd.report import write_comparison

        out = Path(args.out)
        _check_out(out)
        written = write_comparison([Path(d) for d in args.run_dirs], out, domain_key=args.domain_key,
                                   if_key=args.if_key)
        print(f"comparison written to {written}")
        if (out / "across_seeds.csv").exists():  # repeats of one recipe with other seeds: say the spread
            import pandas as pd

            print("across seeds:\n" + pd.read_csv(out / "across_seeds.csv").to_string(index=False, float_format="%.3f"))
        return 0
    if args.command == "data":
        return _data(args)
    if args.command == "init":
        from continual_opd.init_recipe import init_recipe

        _, line = init_recipe(Path(args.docs), args.model, Path(args.out), qa_dir=Path(args.qa) if args.qa else None,
                              chat=[Path(c) for c in args.chat or []], gguf_file=args.gguf_file,
                              cache_dir=args.cache_dir)
        print(line)
        return 0
    if args.command == "export":
        from continual_opd.export import export_run

        out = export_run(Path(args.run_dir), Path(args.out), stage=args.stage, merge=args.merge,
                         push_to_hub=args.push_to_hub, progress=not args.no_progress)
        print(f"exported to {out}")
        return 0
    if args.command == "build-demo":
        from continual_opd.demo.build import ensure_demo_model

        print(ensure_demo_model(Path(args.cache_dir) if args.cache_dir else None, progress=not args.no_progress))
        return 0
    if args.command == "serve-teacher":
        from continual_opd.teacher_server import serve

        serve(args.model, host=args.host, port=args.port, dtype=args.dtype, served_name=args.served_model_name)
        return 0
    raise AssertionError(args.command)


def _data(args) -> int:
    if args.data_command == "inspect":
        from continual_opd import models
        from continual_opd.errors import ConfigError
        from continual_opd.config import load_recipe
        from continual_opd.inspect_data import format_inspection, inspect_recipe, write_inspection

        if args.json and Path(args.json).exists():
            raise ConfigError(f"--json {args.json}: exists; choose a new file (nothing was written)")
        recipe = load_recipe(args.path, args.overrides)
        base = models.resolve_base(recipe.model, recipe.cache_dir, progress=False)
        entries = inspect_recipe(recipe, models.load_tokenizer(base, recipe.model))
        print(format_inspection(entries))
        if args.json:
            write_inspection(entries, Path(args.json))
            print(f"numbers written to {args.json}")
        return 0
    return _make_qa(args)


def _make_qa(args) -> int:
    from continual_opd import make_qa as mq
    from continual_opd.errors import ConfigError

    out = Path(args.out)
    _check_out(out)
    if args.wordings < 2:
        raise ConfigError(f"--wordings {args.wordings}: must be >= 2 (one to train on, one held out for the eval)")
    if args.max_facts is not None and args.max_facts < 1:
        raise ConfigError(f"--max-facts {args.max_facts}: must be >= 1 (leave it out to keep every fact)")
    needs = {"--model": ("model", args.model), "--gguf-file": ("model", args.gguf_file),
             "--base-url": ("endpoint", args.base_url), "--endpoint-model": ("endpoint", args.endpoint_model),
             "--send-documents-to-endpoint": ("endpoint", args.send_documents_to_endpoint)}
    for flag, (generator, value) in needs.items():
        if value and args.generator != generator:
            raise ConfigError(f"make-qa {flag} only applies to --generator {generator} (this is --generator "
                              f"{args.generator}); remove it or add --generator {generator}")
    if args.generator == "extract":
        generator = "extract"
    elif args.generator == "model":
        if not args.model:
            raise ConfigError("make-qa --generator model: name the chat model with --model")
        from continual_opd import models
        from continual_opd.config import ModelConfig

        cfg = ModelConfig(name=args.model, gguf_file=args.gguf_file)
        base = models.resolve_base(cfg, None, progress=not args.no_progress)
        generator = mq.LocalBackend(models.load_model(models.ModelRef(base), cfg), models.load_tokenizer(base, cfg),
                                    name=f"model:{args.model}")
    else:
        if not args.base_url or not args.endpoint_model:
            raise ConfigError("make-qa --generator endpoint: give --base-url (e.g. http://127.0.0.1:8000/v1) and "
                              "--endpoint-model (the served model's name)")
        generator = mq.EndpointBackend(args.base_url, args.endpoint_model, api_key_env=args.api_key_env,
                                       allow_remote=args.send_documents_to_endpoint)
    manifest = mq.make_qa(args.docs, out, generator=generator, seed=args.seed, wordings=args.wordings,
                          max_facts=args.max_facts, progress=not args.no_progress)
    c = manifest["counts"]
    print(f"wrote {out}: {c['facts']} facts from {c['documents']} documents; {c['train']} train questions, "
          f"{c['dev']}+{c['dev_unanswerable']} dev and {c['test']}+{c['test_unanswerable']} test (answerable + "
          f"unanswerable), {c['doc_prompts']} OPD doc prompts; rejected: {manifest['rejected'] or 'none'}")
    print(f"next: read a sample of {out / 'test.jsonl'}, then `continual-opd init DOCS --model NAME --qa {out} "
          "--out my-recipe.yaml`")
    return 0


def _eval(args) -> int:
    from continual_opd import models
    from continual_opd.config import ModelConfig
    from continual_opd.evals import load_suite, run_suite
    from continual_opd.io import atomic_write_json
    from continual_opd.evals import seed_everything
    from continual_opd.errors import ConfigError
    from pydantic import ValidationError

    from continual_opd import distributed

    out = Path(args.out) if args.out else None
    if out:
        distributed.on_main(lambda: _check_out(out))
    suites = [load_suite(s, Path.cwd()) for s in args.suite]  # fail on a bad suite before loading a model
    for opt in ("limit", "batch_size", "max_new_tokens"):
        value = getattr(args, opt)
        if value is not None:
            if value < 1:
                raise ConfigError(f"--{opt.replace('_', '-')} {value}: must be >= 1")
            suites = [s.model_copy(update={opt: value}) for s in suites]
    try:
        cfg = ModelConfig(name=args.model, gguf_file=args.gguf_file, dtype=args.dtype, revision=args.revision,
                          chat_template_kwargs=args.chat_template_kwargs, trust_remote_code=args.trust_remote_code,
                          attn_implementation=args.attn_implementation)
    except ValidationError as err:
        raise ConfigError(f"eval: {err.errors()[0]['msg']}") from None
    seed_everything(args.seed)
    progress = not args.no_progress
    t0 = time.perf_counter()
    # several processes (accelerate launch): rank 0 converts/builds first; prompts are split and gathered
    base = models.resolve_base_once(cfg, args.cache_dir, progress=progress)
    tok = models.load_tokenizer(base, cfg)
    model = models.load_model(models.ModelRef(base), cfg)
    log.info("model %s ready in %.1f s (%s)", args.model, time.perf_counter() - t0, next(model.parameters()).dtype)
    results = {}
    engine = args.engine
    if engine == "vllm":  # one engine for every suite
        from continual_opd.engines import make_engine

        engine = make_engine("vllm", model, tok)
    for suite in suites:
        values = run_suite(suite, model, tok, out if distributed.is_main() else None, seed=args.seed,
                           chat_template_kwargs=cfg.chat_template_kwargs, progress=progress, engine=engine)
        results.update({f"{suite.name}/{k}": v for k, v in values.items()})
    if not distributed.is_main():
        return 0
    if out:
        atomic_write_json(out / "results.json", results)
    for k, v in results.items():
        if not k.split("/", 1)[1].startswith("type/"):
            print(f"{k:45s} {v:.4f}")
    return 0


def _speaks() -> bool:
    """Rank 0 of a multi-process run (or the only process) prints results."""
    from continual_opd import distributed

    return distributed.env_rank() == 0


def _lost_peer(e: BaseException) -> bool:
    """A collective failed because a peer process went away (gloo / NCCL wording)."""
    text = f"{type(e).__name__} {e}".lower()
    return any(k in text for k in ("connection closed by peer", "connection reset by peer", "broken pipe",
                                   "distbackenderror", "nccl", "gloo", "timed out"))


def _check_out(out: Path) -> None:
    from continual_opd.rundir import check_output_dir

    check_output_dir(out)
    if out.exists() and any(out.iterdir()):
        raise RunDirError(f"{out}: output directory exists and is not empty; choose a new --out")


def _print_summary(summary: dict, keys: tuple[str, str]) -> None:
    w = max(len(k) for k in keys) + 2
    print(f"{'stage':20s} " + " ".join(f"{k:>{w}s}" for k in keys))
    for stage, vals in summary.items():
        print(f"{stage:20s} " + " ".join(f"{vals.get(k, float('nan')):>{w}.3f}" for k in keys))


if __name__ == "__main__":
    sys.exit(main())
