"""Self-generated chat: a model answers a prompt file, and the answers become ordinary chat JSONL for the SFT mix.

Why: the chat share of an SFT mix is there to hold the model's chat behaviour in place. Chat written by another
model (or by people) pulls the student towards that style, which is itself drift; the model's own answers,
sampled at temperature 1, are the "resampled" chat of the on-policy distillation write-up. Maximum likelihood on
a model's own samples has zero expected gradient, so that part of the mix leaves the model where it was.

The file is written once, atomically, into the SFT stage's directory with a `self_chat.meta.json` describing how
it was made; a resumed run whose settings match reuses it. Prompts that also appear in an IF eval suite of the
recipe are refused in preflight (`check_no_eval_overlap`): training on eval prompts would inflate the IF score.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from pathlib import Path

import torch

from continual_opd import distributed
from continual_opd.config import SelfChatConfig
from continual_opd.errors import DataError
from continual_opd.io import atomic_write_json, read_jsonl_lines, write_jsonl

log = logging.getLogger(__name__)

FILE, META = "self_chat.jsonl", "self_chat.meta.json"


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def load_prompts(cfg: SelfChatConfig) -> list[list[dict]]:
    from continual_opd.data import read_prompts

    prompts = [p for f in cfg.prompts for p in read_prompts(f)]
    return prompts[: cfg.num_prompts] if cfg.num_prompts else prompts


def check_no_eval_overlap(prompt_files: list[str], eval_prompts: dict[str, str], field: str) -> int:
    """Raise if a prompt (its last user turn, whitespace- and case-normalized) is also an eval prompt.

    `eval_prompts`: normalized eval prompt text -> the suite it comes from. Returns the number of prompts checked.
    """
    from continual_opd.data import prompts_from_rows

    n = 0
    for f in prompt_files:
        for lineno, row in read_jsonl_lines(f, what="prompts"):
            msgs = prompts_from_rows([row])
            users = [m["content"] for m in (msgs[0] if msgs else []) if m.get("role") == "user"]
            n += 1
            if users and _norm(users[-1]) in eval_prompts:
                raise DataError(f"{f}:{lineno}: {field}: this prompt is also an eval prompt of suite "
                                f"'{eval_prompts[_norm(users[-1])]}'; remove it (training on eval prompts inflates "
                                "the IF score)")
    return n


def if_eval_prompts(suites) -> dict[str, str]:
    """Normalized prompt text -> suite name, for every IFEval-kind suite (all rows of its file, not just a sample)."""
    from continual_opd.evals.ifeval import load_ifeval_rows

    out: dict[str, str] = {}
    for suite in suites:
        if suite.kind == "ifeval" and suite.data is not None:
            for row in load_ifeval_rows(suite.data):
                out.setdefault(_norm(row["prompt"]), suite.name)
    return out


def _meta(cfg: SelfChatConfig, model_ref: dict, seed: int) -> dict:
    digest = hashlib.sha256()
    for f in cfg.prompts:
        digest.update(Path(f).read_bytes())
    return {"settings": cfg.model_dump(mode="json"), "model": model_ref, "seed": seed,
            "prompts_sha256": digest.hexdigest()[:16]}


def ensure_self_chat(cfg: SelfChatConfig, out_dir: Path, model, tokenizer, *, model_ref: dict, seed: int,
                     chat_template_kwargs: dict | None = None, progress: bool = True) -> tuple[Path, dict]:
    """Write (or reuse) `out_dir/self_chat.jsonl`; returns its path and stats (kept, dropped, seconds)."""
    from continual_opd.generation import sample_rollouts

    path, meta_path = Path(out_dir) / FILE, Path(out_dir) / META
    want = _meta(cfg, model_ref, seed)
    if path.is_file() and meta_path.is_file():
        old = json.loads(meta_path.read_text(encoding="utf-8"))
        if {k: old.get(k) for k in want} == want:
            log.info("self-chat: reusing %s (%d answers)", path, old["stats"]["kept"])
            return path, old["stats"]
        log.info("self-chat: %s was made with other settings; generating it again", path)
    prompts = load_prompts(cfg)
    t0 = time.time()
    torch.manual_seed(seed * 1_000_003 + distributed.rank())
    rows: list[tuple[int, dict]] = []
    truncated = 0
    batches = distributed.shard_batches(len(prompts), cfg.batch_size)  # several processes: each answers its share
    bar = None
    if progress and distributed.is_main():
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(map(len, batches)), desc="self-chat", unit="prompt")
    if cfg.engine != "hf":  # continuous batching refills freed slots from all of this rank's prompts
        batches = [[i for b in batches for i in b]]
    try:
        for idx in batches:
            if not idx:
                continue
            batch = [prompts[i] for i in idx]
            ro = sample_rollouts(model, tokenizer, batch, max_new_tokens=cfg.max_new_tokens,
                                 temperature=cfg.temperature, top_p=cfg.top_p,
                                 chat_template_kwargs=chat_template_kwargs, engine=cfg.engine,
                                 max_batch=cfg.batch_size)
            for i, tokens_L, mask_L, cut in zip(idx, ro.tokens_BL, ro.response_mask_BL, ro.truncated_B):
                answer = tokenizer.decode(tokens_L[mask_L], skip_special_tokens=True).strip()
                truncated += int(cut)
                if (cut and not cfg.keep_truncated) or not answer:
                    continue
                rows.append((i, {"messages": [*prompts[i], {"role": "assistant", "content": answer}],
                                 "truncated": bool(cut)}))
            if bar is not None:
                bar.update(len(idx))
    finally:
        if bar is not None:
            bar.close()
    rows = sorted(distributed.gather(rows), key=lambda r: r[0])
    truncated = int(distributed.all_sum(truncated))
    if not rows:
        raise DataError(f"self-chat: none of the {len(prompts)} answers ended within max_new_tokens="
                        f"{cfg.max_new_tokens}; raise data.self_chat.max_new_tokens or set keep_truncated: true")
    stats = {"prompts": len(prompts), "kept": len(rows), "truncated": truncated,
             "dropped": len(prompts) - len(rows), "seconds": round(time.time() - t0, 1)}
    if distributed.is_main():
        write_jsonl(path, [r for _, r in rows])
        atomic_write_json(meta_path, {**want, "stats": stats})  # written last: the pair is complete
    distributed.barrier()
    log.info("self-chat: %d of %d answers kept (%d hit max_new_tokens) in %.0f s -> %s", len(rows), len(prompts),
             truncated, stats["seconds"], path)
    return path, stats
