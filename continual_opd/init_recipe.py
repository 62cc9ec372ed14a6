"""`continual-opd init DOCS_DIR --model NAME --out RECIPE`: a starting recipe for your own documents.

The recipe is written as commented YAML a person edits, not a dump of the schema: your documents, the QA that
`continual-opd data make-qa` generated (or a placeholder to fill in), the official IFEval subset, headline keys that
fit a chat model (`contains`: chat models answer in sentences), and training settings sized from the model's config.
Two forms:

- **CPU form** (models under 1 B parameters): LoRA r=16 and the settings measured on SmolLM2-135M on 2 CPU cores
  (recipes/smollm2-personalize.yaml);
- **GPU form** (1 B and up): the reference experiment's LoRA r=128 and lr 1e-4 (Qwen3-8B), bf16, and an OPD batch
  that fits one 80 GB GPU with HF generate (docs/multi-gpu.md, "Memory plan").

Only the model's config and tokenizer are read (local, cached or the hub): no weights.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from continual_opd.errors import ConfigError, ModelError
from continual_opd.resources import DATA_DIR

GPU_FORM_PARAMS = 1e9  # from this size up, the recipe assumes a GPU


@dataclass
class ModelFacts:
    params: float | None  # estimated from the config (None: the config could not be read)
    context: int | None  # max_position_embeddings
    thinking: bool  # the chat template takes `enable_thinking` (Qwen3 style)
    where: str  # how the facts were found


def estimate_params(cfg) -> float | None:
    """Parameters of a decoder-only transformer from its config (embeddings + attention + MLP per layer). A
    multimodal config (Gemma 3, Mistral 3) is sized by its language model (`get_text_config`)."""
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    h = getattr(cfg, "hidden_size", None)
    n = getattr(cfg, "num_hidden_layers", None)
    v = getattr(cfg, "vocab_size", None)
    if not (h and n and v):
        return None
    heads = getattr(cfg, "num_attention_heads", None) or 1
    head_dim = getattr(cfg, "head_dim", None) or h // heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    inter = getattr(cfg, "intermediate_size", None) or 4 * h
    attn = 2 * h * heads * head_dim + 2 * h * kv * head_dim
    mlp = 3 * h * inter  # gated MLP (gate, up, down); a plain MLP has 2: a 1.5x overestimate of that part at worst
    embed = v * h * (1 if getattr(cfg, "tie_word_embeddings", False) else 2)
    return float(embed + n * (attn + mlp))


def model_facts(name: str, gguf_file: str | None = None, cache_dir: str | None = None) -> ModelFacts:
    """Size, context and template facts of `name`, offline when it is local or cached."""
    from transformers import AutoConfig

    from continual_opd import models
    from continual_opd.config import ModelConfig

    cfg = ModelConfig(name=name, gguf_file=gguf_file)
    try:
        base = models.resolve_base(cfg, cache_dir, progress=False)
        config = AutoConfig.from_pretrained(base, trust_remote_code=False)
        tok = models.load_tokenizer(base, cfg)
    except (OSError, ValueError) as e:  # (a ModelError from resolve_base or load_tokenizer passes through)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ModelError(f"--model {name!r}: cannot read its config ({first}); use a local directory, a hub id "
                         "that is cached (offline) or reachable, a .gguf file, package:NAME or demo") from None
    template = tok.chat_template if isinstance(tok.chat_template, str) else str(tok.chat_template)
    return ModelFacts(params=estimate_params(config), context=getattr(config, "max_position_embeddings", None),
                      thinking="enable_thinking" in template, where=base)


def _q(text: str) -> str:
    """A YAML scalar that reads back as this string: plain when safe, else JSON-quoted (a folder named `Q1, Q2`,
    `#notes` or `2024`)."""
    import json

    import yaml

    plain = bool(re.fullmatch(r"[A-Za-z0-9_./~@+-][A-Za-z0-9_./~@+: -]*", text)) and not text.endswith(" ")
    return text if plain and yaml.safe_load(text) == text else json.dumps(text, ensure_ascii=False)


def _rel(path: Path, start: Path) -> str:
    """`path` relative to the recipe's folder when that is short and portable, else absolute."""
    try:
        rel = os.path.relpath(path.resolve(), start.resolve())
    except ValueError:  # another drive (Windows)
        return str(path.resolve())
    return rel if not rel.startswith("../../../") else str(path.resolve())


def render_recipe(docs: Path, model: str, out: Path, facts: ModelFacts, *, qa_dir: Path | None = None,
                  chat: list[Path] | None = None, gguf_file: str | None = None, name: str | None = None) -> str:
    """The recipe's YAML text (commented). Paths are written relative to the recipe's folder."""
    here = out.parent
    gpu = facts.params is not None and facts.params >= GPU_FORM_PARAMS
    name = name or out.stem
    size = f"{facts.params / 1e9:.2f} B parameters" if facts.params else "size unknown (config not readable)"
    ctx_len = facts.context or 2048
    seq = min(2048 if gpu else 256, ctx_len)
    general_prompts = _q(_rel(DATA_DIR / "chat" / "opd_prompts.jsonl", here))
    chat_prompts = _q(_rel(DATA_DIR / "chat" / "sft_chat.jsonl", here))
    qa = qa_dir is not None
    qa_train = _q(_rel(qa_dir / "train.jsonl", here)) if qa else None
    docs_at = _q(_rel(docs, here))
    # the official IFEval subset; on CPU its answers are capped at 256 tokens (each eval point: minutes, not hours)
    if_suite = "ifeval_official_120" if gpu else "ifeval_official_120_256"
    suites = [if_suite]
    if qa:
        suites += [_q(_rel(qa_dir / "domain_qa_dev.yaml", here)), _q(_rel(qa_dir / "domain_qa_test.yaml", here))]
    lines = [
        f"# {name}: fine-tune {model} on the documents in {_rel(docs, here)}, then recover instruction following",
        "# with on-policy distillation from the pre-SFT model. Written by `continual-opd init`; edit freely.",
        f"# Model: {size}; the {'GPU' if gpu else 'CPU'} form of the template"
        + (" (settings of the reference Qwen3-8B experiment; memory plan in docs/multi-gpu.md)." if gpu else
           " (settings measured on SmolLM2-135M on 2 CPU cores)."),
        "#",
        "# What to change first:",
        "#   1. stages.1.data: add your own chat data (chat: [your.jsonl] of {messages}) or keep the model's own",
        "#      answers (self_chat); keep about 30% of the tokens on chat: that share is what limits forgetting.",
        "#   2. stages.1.steps and lr: check the epochs over your documents with `continual-opd data inspect " +
        f"{out.name}`.",
        "#   3. evals: the domain suites are generated QA: read a sample of them before trusting the numbers.",
        "#",
        f"#   continual-opd validate {out.name}",
        f"#   continual-opd data inspect {out.name}",
        f"#   continual-opd recipe {out.name}",
        f"#   continual-opd export runs/{name} --out exported/{name} --merge",
    ]
    if gpu:
        lines += [
            "# On 8 GPUs (LoRA: data parallel), with the launch configs of the continual-opd repository:",
            f"#   accelerate launch --config_file recipes/accelerate/ddp.yaml -m continual_opd recipe {out.name}",
        ]
    lines += [
        f"name: {_q(name)}",
        "seed: 0",
        f"output_dir: {_q('runs/' + name)}",
        "model:",
        f"  name: {_q(model)}",
    ]
    if gguf_file:
        lines.append(f"  gguf_file: {_q(gguf_file)}")
    if gpu:
        lines.append("  dtype: bfloat16")
    if facts.thinking:
        lines.append("  chat_template_kwargs: {enable_thinking: false}   # score answers, not thinking traces")
    lines += ["evals:", f"  suites: [{', '.join(suites)}]"]
    if gpu:
        lines.append("  # engine: vllm                # with `pip install vllm`: much faster eval answers on a GPU")
    lines += ["headline:"]
    if qa:
        # make-qa names its suites domain_qa_dev and domain_qa_test (the name inside the YAML, whatever the path)
        lines.append("  domain_qa: domain_qa_test/contains   # the test split; tune settings on the dev split, report "
                     "test")
    else:
        lines.append("  domain_qa: domain_qa_test/contains   # placeholder until `data make-qa` writes the suites")
    lines += [f"  if_eval: {if_suite}/prompt_level_strict_acc", "stages:", "  - name: baseline",
              "    kind: eval", "  - name: sft", "    kind: sft", "    finetune: lora"]
    if gpu:
        lines += ["    lora: {r: 128, alpha: 128, target_modules: all-linear}", "    lr: 1.0e-4", "    steps: 1000",
                  "    batch_size: 4                  # x grad_accum 8 = 32 sequences per update",
                  "    grad_accum: 8", f"    max_seq_len: {seq}",
                  "    gradient_checkpointing: true   # activations of 4 x 2048 tokens: ~41 GB without, ~4 GB with",
                  "    warmup_steps: 20",
                  "    lr_scheduler: cosine", "    eval_every: 100", "    save_every: 100", "    save_total_limit: 3"]
    else:
        lines += ["    lora: {r: 16, alpha: 32}", "    lr: 1.0e-3", "    steps: 100", "    batch_size: 16",
                  f"    max_seq_len: {seq}", "    warmup_steps: 5", "    lr_scheduler: cosine",
                  "    eval_every: 0                # evaluate at the stage end only", "    save_every: 50"]
    lines += ["    data:", f"      documents: [{docs_at}]"]
    if qa:
        lines.append(f"      qa: [{qa_train}]")
    else:
        lines.append("      # qa: [qa/train.jsonl]     # after `continual-opd data make-qa DOCS --out qa`")
    if chat:
        lines.append(f"      chat: [{', '.join(_q(_rel(c, here)) for c in chat)}]")
    else:
        lines += ["      self_chat:                 # the base model's own answers to general prompts (no chat data "
                  "needed)", f"        prompts: [{chat_prompts}]", "        model: snapshot:base",
                  f"        num_prompts: {512 if gpu else 256}", f"        max_new_tokens: {512 if gpu else 96}"]
    mix = "{documents: 0.35, qa: 0.35, chat: 0.3}" if qa else "{documents: 0.7, chat: 0.3}"
    # no eval stages after sft and opd: a training stage evaluates its model at its end (and every eval_every)
    lines += [f"      mix: {mix}      # shares of training tokens",
              "  - name: opd", "    kind: opd",
              "    teacher: snapshot:before-sft   # the LoRA student with its adapter off", "    finetune: lora"]
    lines.append("    lora: {r: 128, alpha: 128, target_modules: all-linear}" if gpu else
                 "    lora: {r: 16, alpha: 32}")
    lines += ["    loss: sampled                  # per-token reverse KL of the sampled tokens (the reference method)",
              f"    lr: {'1.0e-4' if gpu else '5.0e-4'}", f"    steps: {150 if gpu else 24}",
              f"    prompts: [{general_prompts}]   # general instructions; add your own chat prompts"]
    if qa:
        doc_prompts = _q(_rel(qa_dir / "doc_prompts.jsonl", here))
        lines += [f"    # doc_prompts: [{doc_prompts}]   # questions about your documents;",
                  "    # doc_prompt_fraction: 0.25    # the pre-SFT teacher does not know the answers: use with replay"]
    if gpu:
        lines += ["    prompts_per_step: 16           # fits one 80 GB GPU with HF generate; 64 with sampler: vllm",
                  "    samples_per_prompt: 4", "    max_new_tokens: 1024", "    # sampler: vllm",
                  "    eval_every: 25", "    save_every: 25", "    save_total_limit: 2"]
    else:
        lines += ["    prompts_per_step: 16", "    samples_per_prompt: 1", "    max_new_tokens: 128",
                  "    eval_every: 12", "    save_every: 8"]
    replay_src = f"documents: [{docs_at}]" + (f", qa: [{qa_train}]" if qa else "")
    replay_mix = "{documents: 0.5, qa: 0.5}" if qa else "{documents: 1.0}"
    lines += ["    replay:                        # SFT examples during OPD: keeps the new facts (BENCHMARKS.md)",
              f"      batch_size: {8 if gpu else 16}", f"      max_seq_len: {seq}",
              f"      data: {{{replay_src}, mix: {replay_mix}}}", ""]
    return "\n".join(lines)


def init_recipe(docs: Path, model: str, out: Path, *, qa_dir: Path | None = None, chat: list[Path] | None = None,
                gguf_file: str | None = None, cache_dir: str | None = None, force: bool = False) -> tuple[str, str]:
    """Check the inputs, write the recipe, validate it; returns (recipe text, one-line summary)."""
    from continual_opd.config import load_recipe
    from continual_opd.ingest import ingest_documents
    from continual_opd.io import atomic_write_text

    if out.exists() and not force:
        raise ConfigError(f"{out}: exists; choose another --out (nothing was written)")
    if out.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"--out {out}: a recipe is a .yaml file; e.g. --out my-recipe.yaml")
    if not docs.exists():
        raise ConfigError(f"{docs}: documents folder not found; give the folder that holds your documents")
    ingested = ingest_documents([str(docs)])  # one-line error when nothing is readable
    if qa_dir is not None:
        for f in ("train.jsonl", "domain_qa_dev.yaml", "domain_qa_test.yaml"):
            if not (qa_dir / f).is_file():
                raise ConfigError(f"--qa {qa_dir}: no {f}; point it at the --out folder of `continual-opd data "
                                  "make-qa`")
    for c in chat or []:
        if not c.is_file():
            raise ConfigError(f"--chat {c}: file not found; give chat .jsonl files of {{messages}}")
    facts = model_facts(model, gguf_file, cache_dir)
    text = render_recipe(docs, model, out, facts, qa_dir=qa_dir, chat=chat, gguf_file=gguf_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, text)
    try:
        recipe = load_recipe(out)
        from continual_opd.preflight import preflight

        preflight(recipe, num_processes=1)
    except Exception:
        out.unlink()  # a recipe that does not validate is not left behind
        raise
    read = sum(r.status == "read" for r in ingested.records)
    size = f"{facts.params / 1e9:.2f} B" if facts.params else "unknown size"
    form = "GPU" if facts.params and facts.params >= GPU_FORM_PARAMS else "CPU"
    return text, (f"wrote {out}: {read} documents, model {model} ({size}, {form} form), "
                  f"{'generated QA from ' + str(qa_dir) if qa_dir else 'no domain QA yet (run data make-qa)'}")
