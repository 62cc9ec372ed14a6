"""`continual-opd data inspect RECIPE`: what each training stage will read, before any training.

Per SFT stage (and per OPD stage's replay): the sources with their files or rows, examples and loss tokens, the
realized token share of the mix against the recipe's weights, how many times the stage goes over each source
(epochs), how many conversations `max_seq_len` cuts, and the chat template rendered on one example of each source,
with the part that carries loss marked. It needs the tokenizer only (no weights), so it runs in seconds.

Epochs under a token-ratio mix are per source: a stage draws `steps x batch_size x grad_accum` examples, each source
in proportion to its weight / mean length, so a small source is seen many times and a large one maybe not at all.
"""

from __future__ import annotations

import json
from pathlib import Path

from continual_opd import data as data_mod
from continual_opd.config import OPDStage, Recipe, SFTDataConfig, SFTStage

LOSS_OPEN, LOSS_CLOSE = "\u27e6", "\u27e7"  # ⟦ ⟧ around the tokens that carry loss in a rendered example


def _n_prompts(files: list[str]) -> int:
    return sum(len(data_mod.read_prompts(f)) for f in files)


def _file_lines(ingested, tokenizer, shown: int = 10) -> list[str]:
    """Every skipped file, the first `shown` files read, and the totals (ingest.summary_lines, with tokens)."""
    from continual_opd.ingest import count_tokens, summary_lines

    lines = summary_lines(count_tokens(ingested, tokenizer))
    files, total = lines[:-1], lines[-1]
    read = [line for line in files if line.startswith("read")]
    skipped = [line for line in files if not line.startswith("read")]
    more = [f"... and {len(read) - shown} more files read"] if len(read) > shown else []
    return [*skipped, *read[:shown], *more, total]


def _render(tokenizer, example: dict) -> str:
    """The example's text as the model sees it, with the loss-carrying tokens between ⟦ ⟧."""
    ids, labels = example["input_ids"], example["labels"]
    first = next((i for i, label in enumerate(labels) if label != -100), len(ids))
    if first == 0:
        return LOSS_OPEN + tokenizer.decode(ids) + LOSS_CLOSE
    return tokenizer.decode(ids[:first]) + LOSS_OPEN + tokenizer.decode(ids[first:]) + LOSS_CLOSE


def inspect_data(data_cfg: SFTDataConfig, tokenizer, max_seq_len: int, n_examples: int, seed: int,
                 chat_template_kwargs: dict | None = None) -> dict:
    """One stage's data: per source counts, truncation, epochs, realized mix and a rendered example."""
    kw = chat_template_kwargs or {}
    sources, pools = {}, {}
    for kind, weight in data_cfg.mix.items():
        if weight <= 0:
            continue
        info: dict = {"weight": weight}
        if not getattr(data_cfg, kind):  # only self-chat: its answers are written when the stage starts
            sc = data_cfg.self_chat
            n = min(_n_prompts(sc.prompts), sc.num_prompts or 10**9)
            info["note"] = (f"self-chat: {n} prompts answered by the model when the stage starts (up to "
                            f"{sc.max_new_tokens} tokens each); not counted here, so the shares below are among "
                            "the other sources")
            sources[kind] = info
            continue
        if kind == "documents":
            from continual_opd.ingest import ingest_documents, skip_breakdown

            ingested = ingest_documents(data_cfg.documents)
            n_read = sum(r.status == "read" for r in ingested.records)
            info["read"] = f"{n_read} files" + (f", {skip_breakdown(ingested.records).split(':')[0]}"
                                                if n_read < len(ingested.records) else "")
            info["files"] = _file_lines(ingested, tokenizer)
            pool = data_mod.tokenize_documents(ingested.texts, tokenizer, max_seq_len)
            info["cut"] = 0  # documents are chunked, never cut
        else:
            rows = data_mod.load_chat(getattr(data_cfg, kind)) if kind == "chat" else data_mod.load_qa(data_cfg.qa)
            info["read"] = f"{len(rows)} rows"
            whole = data_mod.tokenize_chat(rows, tokenizer, 10**9, kw, source=kind)
            info["cut"] = sum(len(e["input_ids"]) > max_seq_len for e in whole)
            info["cut_lost_answer"] = sum(all(label == -100 for label in e["labels"][:max_seq_len]) for e in whole)
            pool = data_mod.tokenize_chat(rows, tokenizer, max_seq_len, kw, source=kind)
        info["examples"] = len(pool)
        info["loss_tokens"] = sum(map(data_mod.n_loss_tokens, pool))
        info["mean_loss_tokens"] = info["loss_tokens"] / max(len(pool), 1)
        info["example"] = _render(tokenizer, pool[0]) if pool else None
        if data_cfg.self_chat is not None and kind == "chat":
            info["note"] = "plus self-chat answers written when the stage starts (not counted here)"
        sources[kind], pools[kind] = info, pool
    if pools:
        mix = data_mod.build_mixture(pools, {k: data_cfg.mix[k] for k in pools}, n_examples, seed)
        drawn = {k: 0 for k in pools}
        for ex in mix.examples:
            drawn[ex["source"]] += 1
        for k in pools:
            sources[k]["realized_share"] = mix.token_share[k]
            sources[k]["drawn"] = drawn[k]
            sources[k]["epochs"] = drawn[k] / max(len(pools[k]), 1)
    return {"examples_drawn": n_examples, "max_seq_len": max_seq_len, "sources": sources}


def inspect_recipe(recipe: Recipe, tokenizer) -> list[dict]:
    """`inspect_data` for every SFT stage and every OPD stage with replay, plus the OPD stages' prompt counts."""
    kw = recipe.model.chat_template_kwargs
    out = []
    for i, stage in enumerate(recipe.stages):
        entry = {"stage": f"stages.{i}", "name": stage.name, "kind": stage.kind}
        if isinstance(stage, SFTStage):
            n = stage.steps * stage.batch_size * stage.grad_accum
            entry.update(inspect_data(stage.data, tokenizer, stage.max_seq_len, n, recipe.seed, kw))
        elif isinstance(stage, OPDStage):
            entry["prompts"] = _n_prompts(stage.prompts)
            entry["doc_prompts"] = _n_prompts(stage.doc_prompts)
            entry["prompts_drawn"] = stage.steps * stage.prompts_per_step
            if stage.replay.batch_size > 0:
                entry["replay"] = inspect_data(stage.replay.data, tokenizer, stage.replay.max_seq_len,
                                               stage.steps * stage.replay.batch_size, recipe.seed, kw)
        else:
            continue
        out.append(entry)
    return out


def _table(d: dict, indent: str = "  ") -> list[str]:
    lines = [f"{indent}{'source':10s} {'read':22s} {'examples':>8s} {'loss tok':>9s} {'mean':>6s} {'weight':>6s} "
             f"{'realized':>8s} {'epochs':>7s} {'cut':>5s}"]
    for kind, s in d["sources"].items():
        if "examples" not in s:
            lines.append(f"{indent}{kind:10s} {s['note']}")
            continue
        lines.append(f"{indent}{kind:10s} {s['read']:22s} {s['examples']:8d} {s['loss_tokens']:9d} "
                     f"{s['mean_loss_tokens']:6.1f} {s['weight']:6.2f} {s.get('realized_share', 0):8.3f} "
                     f"{s.get('epochs', 0):7.2f} {s['cut']:5d}")
        if s.get("cut_lost_answer"):
            lines.append(f"{indent}  ! {s['cut_lost_answer']} {kind} examples lose their whole answer at "
                         f"max_seq_len={d['max_seq_len']} and are dropped; raise max_seq_len")
        if s.get("note"):
            lines.append(f"{indent}  ({s['note']})")
    if d["sources"].get("documents", {}).get("files"):
        lines.append(f"{indent}documents, file by file:")
        lines.extend(f"{indent}  {line}" for line in d["sources"]["documents"]["files"])
    for kind, s in d["sources"].items():
        if s.get("example"):
            text = s["example"] if len(s["example"]) <= 600 else s["example"][:600] + " [...]"
            lines.append(f"{indent}one {kind} example as the model sees it ({LOSS_OPEN} {LOSS_CLOSE}: trained on):")
            lines.extend(f"{indent}  | {line}" for line in text.splitlines() or [""])
    return lines


def format_inspection(entries: list[dict]) -> str:
    lines = []
    for e in entries:
        if e["kind"] == "sft":
            lines.append(f"{e['stage']} {e['name']} (sft): {e['examples_drawn']} examples drawn, "
                         f"max_seq_len {e['max_seq_len']}")
            lines.extend(_table(e))
        else:
            lines.append(f"{e['stage']} {e['name']} (opd): {e['prompts']} chat prompts, {e['doc_prompts']} doc "
                         f"prompts, {e['prompts_drawn']} drawn over the stage")
            if "replay" in e:
                lines.append(f"  replay: {e['replay']['examples_drawn']} examples drawn, max_seq_len "
                             f"{e['replay']['max_seq_len']}")
                lines.extend(_table(e["replay"], indent="    "))
    if not lines:
        lines.append("no training stage reads data in this recipe")
    return "\n".join(lines)


def write_inspection(entries: list[dict], path: Path) -> None:
    from continual_opd.io import atomic_write_text

    atomic_write_text(path, json.dumps(entries, indent=2, ensure_ascii=False) + "\n")
