"""Training data: documents, chat and QA sources, tokenization with loss masks, and token-ratio mixing.

Every example becomes `{"input_ids", "labels"}` (labels = -100 where no loss): documents are plain
language modelling on chunks of `max_seq_len` tokens (no chat template); chat and QA rows are rendered with
the chat template and only the final assistant turn carries loss. The mix is set **by tokens**: sources are
sampled so that their expected share of training tokens equals the recipe's weights; the realized shares
are returned so the stage can log them.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from continual_opd.errors import DataError
from continual_opd.ingest import count_tokens, ingest_documents, write_manifest
from continual_opd.io import read_jsonl_lines

log = logging.getLogger(__name__)


def _expand(sources: list[str], suffixes: tuple[str, ...], field: str) -> list[Path | str]:
    out: list[Path | str] = []
    for src in sources:
        if src.startswith("hf:"):
            out.append(src)
            continue
        p = Path(src)
        if not p.exists():
            raise DataError(f"{p}: {field} source not found; check the path in the recipe "
                            "(relative to the recipe file)")
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in suffixes)
            if not files:
                raise DataError(f"{p}: {field} directory has no {'/'.join(suffixes)} files; "
                                "add some or remove the source")
            out.extend(files)
        else:
            out.append(p)
    return out


def _hf_rows(src: str) -> list[dict]:
    # hf:NAME[:split] — for users online (or with a local datasets cache); tests use local files.
    from datasets import load_dataset

    name, _, split = src.removeprefix("hf:").partition(":")
    try:
        return list(load_dataset(name, split=split or "train"))
    except Exception as e:  # offline, unknown dataset or split: the source is the user's to fix
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise DataError(f"{src}: cannot load the dataset ({type(e).__name__}: {first}); check the name and split, or "
                        "download it first and point the recipe at local .jsonl files") from None


def load_documents(sources: list[str]) -> list[str]:
    """The documents' texts (see `continual_opd.ingest` for formats, and what is skipped and why)."""
    return ingest_documents(sources).texts


def check_messages(messages, where: str, final_assistant: bool = True) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: `messages` must be a non-empty list of {{role, content}} turns")
    for m in messages:
        if (not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant")
                or not isinstance(m.get("content"), str)):
            raise DataError(f"{where}: each turn needs role (system/user/assistant) and string content, "
                            f"got {json.dumps(m)[:80]}")
    if final_assistant and messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: chat row has no final assistant turn to learn from; "
                        "end each conversation with an assistant message")
    return messages


def _rows_with_lines(path: Path, required: tuple[str, ...], what: str):
    """Yield (file:line, row) so later checks can name the line."""
    return [(f"{path}:{ln}", r) for ln, r in read_jsonl_lines(path, required=required, what=what)]


def load_chat(sources: list[str]) -> list[list[dict]]:
    convs = []
    for f in _expand(sources, (".jsonl",), "chat"):
        if isinstance(f, str):
            convs.extend(check_messages(r["messages"], f) for r in _hf_rows(f))
            continue
        for where, row in _rows_with_lines(f, ("messages",), "chat rows"):
            convs.append(check_messages(row["messages"], where))
    return convs


def load_qa(sources: list[str]) -> list[list[dict]]:
    convs = []
    for f in _expand(sources, (".jsonl",), "qa"):
        rows = ([(f, r) for r in _hf_rows(f)] if isinstance(f, str)
                else _rows_with_lines(f, ("question", "answer"), "QA rows"))
        for where, r in rows:
            convs.append([{"role": "user", "content": qa_text(r["question"], "question", where)},
                          {"role": "assistant", "content": qa_answer(r["answer"], where)}])
    return convs


def qa_text(value, field: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: `{field}` must be a non-empty string, got {json.dumps(value)[:40]}; "
                        "fix or remove the line")
    return value


def qa_answer(answer, where: str) -> str:
    """The answer to train on: a non-empty string, or the first of a non-empty list of them (others are aliases)."""
    if isinstance(answer, list):
        if not answer or not all(isinstance(a, str) and a.strip() for a in answer):
            raise DataError(f"{where}: `answer` must be a non-empty string or a non-empty list of them, got "
                            f"{json.dumps(answer)[:40]}; fix or remove the line")
        return answer[0]
    return qa_text(answer, "answer", where)


PROMPT_KEYS = ("prompt", "messages", "question")


def read_prompts(path: str | Path) -> list[list[dict]]:
    """A prompt file (IFEval rows, chat rows or QA rows) as message lists; a row that is none of these is an error
    naming its line (rather than a row silently dropped)."""
    rows = []
    for where, r in _rows_with_lines(Path(path), (), "prompts"):
        if not any(k in r for k in PROMPT_KEYS):
            raise DataError(f"{where}: a prompt row needs one of `prompt`, `messages` or `question` (got keys "
                            f"{sorted(r)[:5]}); convert the file to one of those schemas")
        if "messages" in r:
            check_messages(r["messages"][:-1] if r["messages"] and r["messages"][-1].get("role") == "assistant"
                           else r["messages"], where, final_assistant=False)
        elif not isinstance(r.get("prompt", r.get("question")), str) or not r.get("prompt", r.get("question")).strip():
            raise DataError(f"{where}: the prompt must be a non-empty string; fix or remove the line")
        rows.append(r)
    return prompts_from_rows(rows)


def prompts_from_rows(rows: list[dict]) -> list[list[dict]]:
    """IFEval rows ({"prompt"}), chat rows ({"messages"}: the turns before the last assistant) or QA rows."""
    out = []
    for r in rows:
        if "messages" in r:
            msgs = r["messages"]
            if msgs and msgs[-1].get("role") == "assistant":
                msgs = msgs[:-1]
            out.append(msgs)
        elif "prompt" in r:
            out.append([{"role": "user", "content": r["prompt"]}])
        elif "question" in r:
            out.append([{"role": "user", "content": r["question"]}])
    return out


# ---------------------------------------------------------------------------------------------- tokenization


def tokenize_documents(texts: list[str], tokenizer, max_seq_len: int) -> list[dict]:
    """Concatenate documents (EOS between them) and cut into `max_seq_len` chunks; loss on every token."""
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    chunks = [ids[i: i + max_seq_len] for i in range(0, len(ids), max_seq_len)]
    return [{"input_ids": c, "labels": list(c)} for c in chunks if len(c) > 1]


def tokenize_chat(convs: list[list[dict]], tokenizer, max_seq_len: int, chat_template_kwargs: dict | None = None,
                  source: str = "chat") -> list[dict]:
    """Render with the chat template; labels only on the final assistant turn (prompt tokens get -100).

    Conversations longer than `max_seq_len` tokens are cut there, with one warning per source giving the count
    (those with no answer token left are dropped)."""
    kw = chat_template_kwargs or {}
    out = []
    cut = dropped = 0
    for messages in convs:
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False, **kw)
        full = tokenizer.apply_chat_template(messages, tokenize=False, **kw)
        if not full.startswith(prompt):
            raise DataError("the chat template renders the prompt differently inside the full conversation; "
                            "cannot locate the assistant turn (use a template where the prompt is a prefix)")
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
        ids = (p_ids + c_ids)[:max_seq_len]
        labels = ([-100] * len(p_ids) + c_ids)[:max_seq_len]
        cut += len(p_ids) + len(c_ids) > max_seq_len
        if any(label != -100 for label in labels):
            out.append({"input_ids": ids, "labels": labels})
        else:
            dropped += 1
    if cut:
        log.warning("%s: %d of %d conversations are longer than max_seq_len=%d tokens and were cut (%d of them lost "
                    "their whole answer and were dropped); raise max_seq_len to keep them", source, cut, len(convs),
                    max_seq_len, dropped)
    return out


@dataclass
class Mixture:
    examples: list[dict]
    token_share: dict[str, float]  # realized share of loss tokens per source
    source_sizes: dict[str, int]  # distinct examples available per source


def n_loss_tokens(ex: dict) -> int:
    return sum(1 for label in ex["labels"] if label != -100)


def build_mixture(pools: dict[str, list[dict]], weights: dict[str, float], n_examples: int, seed: int) -> Mixture:
    """Sample `n_examples` so each source's expected share of loss tokens equals its weight.

    Picking source k with probability ∝ w_k / mean_len_k makes E[tokens from k] ∝ w_k. Within a source,
    examples are drawn as shuffled epochs (each seen once before any repeats).
    """
    active = {k: w for k, w in weights.items() if w > 0}
    for k in active:
        if not pools.get(k):
            raise DataError(f"mix.{k} > 0 but source `{k}` produced no examples; add data or set mix.{k}: 0")
    rng = random.Random(seed)
    mean_len = {k: sum(map(n_loss_tokens, pools[k])) / len(pools[k]) for k in active}
    keys = sorted(active)
    probs = [active[k] / mean_len[k] for k in keys]
    order = {k: [] for k in keys}
    examples, tokens = [], {k: 0 for k in keys}
    for _ in range(n_examples):
        k = rng.choices(keys, weights=probs)[0]
        if not order[k]:
            order[k] = list(range(len(pools[k])))
            rng.shuffle(order[k])
        ex = pools[k][order[k].pop()]
        examples.append({**ex, "source": k})
        tokens[k] += n_loss_tokens(ex)
    total = sum(tokens.values()) or 1
    return Mixture(examples, {k: tokens[k] / total for k in keys}, {k: len(pools[k]) for k in keys})


def build_pools(data_cfg, tokenizer, max_seq_len: int, chat_template_kwargs: dict | None = None,
                manifest_path: str | Path | None = None) -> dict[str, list[dict]]:
    """Load and tokenize every source named in an `SFTDataConfig` that has a positive weight. With `manifest_path`
    (and documents in the mix), what was read and skipped is written there, with token counts (`ingest`)."""
    pools: dict[str, list[dict]] = {}
    w = data_cfg.mix
    if w.get("documents", 0) > 0:
        docs = ingest_documents(data_cfg.documents)
        if manifest_path is not None:
            write_manifest(count_tokens(docs, tokenizer), manifest_path)
        pools["documents"] = tokenize_documents(docs.texts, tokenizer, max_seq_len)
    if w.get("chat", 0) > 0:
        pools["chat"] = tokenize_chat(load_chat(data_cfg.chat), tokenizer, max_seq_len, chat_template_kwargs,
                                      source=f"chat {', '.join(data_cfg.chat)}")
    if w.get("qa", 0) > 0:
        pools["qa"] = tokenize_chat(load_qa(data_cfg.qa), tokenizer, max_seq_len, chat_template_kwargs,
                                    source=f"qa {', '.join(data_cfg.qa)}")
    return pools


def check_sources(data_cfg, where: str = "") -> None:
    """Load every source once (no tokenizer needed) so bad data fails before any model work starts. `where` (e.g.
    `recipe.yaml: stages.1.data`) names the recipe field in errors about `hf:` sources, which have no file to name."""
    w = data_cfg.mix
    # self-chat answers do not exist yet (their prompts are checked by preflight), so chat may list no file
    for kind, load in (("documents", load_documents), ("chat", load_chat), ("qa", load_qa)):
        if w.get(kind, 0) > 0 and getattr(data_cfg, kind):
            try:
                load(getattr(data_cfg, kind))
            except DataError as e:
                if where and str(e).startswith("hf:"):
                    raise DataError(f"{where}.{kind}: {e}") from None
                raise
