"""Loading models and tokenizers, LoRA wrapping, teacher snapshots and tokenizer compatibility checks.

A model state is always reproducible from disk: `ModelRef(base, adapter)` where `base` is a hub id or a
directory of full weights and `adapter` an optional PEFT adapter directory. Snapshots (`snapshot:base`,
`snapshot:before-sft`, `snapshot:after-sft`) are names for such refs, so a teacher costs no extra copy.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from continual_opd.config import LoraConfig, ModelConfig
from continual_opd.errors import ModelError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelRef:
    base: str  # hub id or directory with full weights
    adapter: str | None = None  # PEFT adapter directory trained on top of `base`

    def to_dict(self) -> dict:
        return asdict(self)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dtype(name: str):
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def resolve_base(cfg: ModelConfig, cache_dir: str | None, progress: bool = True) -> str:
    """The directory (or hub id) that `from_pretrained` loads for this model config.

    `demo` → build (or reuse) the offline demo chat model; a GGUF source → its dequantized copy in the model
    cache (converted on first use); `package:NAME` → that installed package's folder; anything else is a hub
    id or a local path, used as is.
    """
    from continual_opd import gguf
    from continual_opd.demo.build import cache_root

    if cfg.name == "demo":
        from continual_opd.demo.build import ensure_demo_model

        return str(ensure_demo_model(Path(cache_dir) if cache_dir else None, progress=progress))
    if gguf.is_gguf_source(cfg.name, cfg.gguf_file):
        return str(gguf.ensure_gguf_checkpoint(cfg.name, cfg.gguf_file, cache_root(cache_dir), revision=cfg.revision,
                                               trust_remote_code=cfg.trust_remote_code))
    check_source(cfg)
    return str(gguf.package_dir(cfg.name)) if cfg.name.startswith(gguf.PACKAGE_PREFIX) else cfg.name


def resolve_base_once(cfg: ModelConfig, cache_dir: str | None, progress: bool = True) -> str:
    """`resolve_base` in a multi-process run: rank 0 builds the demo model or converts a GGUF file, then the other
    ranks find it in the cache (one process: just `resolve_base`)."""
    from continual_opd import distributed

    base = distributed.on_main(lambda: resolve_base(cfg, cache_dir, progress=progress))
    return base if distributed.is_main() else resolve_base(cfg, cache_dir, progress=False)


def check_source(cfg: ModelConfig) -> None:
    """What `resolve_base` would reject, without building, converting or downloading anything (for preflight)."""
    from continual_opd import gguf

    if cfg.name == "demo":
        return
    if gguf.is_gguf_source(cfg.name, cfg.gguf_file):
        local = cfg.name.lower().endswith(".gguf") or cfg.name.startswith(gguf.PACKAGE_PREFIX) or \
            Path(cfg.name).expanduser().exists() or Path(cfg.gguf_file or "").expanduser().is_absolute()
        if local:  # a hub repo's file is only checked when it is downloaded
            gguf.locate_gguf(cfg.name, cfg.gguf_file)
            gguf.check_gguf_installed()
        return
    if cfg.name.startswith(gguf.PACKAGE_PREFIX):
        gguf.package_dir(cfg.name)
        return
    check_model_ref(cfg.name, "model.name", revision=cfg.revision)


def check_model_ref(name: str, field: str, revision: str | None = None) -> None:
    """A local directory must hold a model (config.json); a hub id must be cached when the hub is offline."""
    path = Path(name).expanduser()
    if path.is_dir():
        found = [path / f for f in ("config.json", "adapter_config.json") if (path / f).is_file()]
        if not found:
            raise ModelError(f"{field} {name!r}: the directory holds no config.json, so it is not a model; point it at "
                             "a model directory (config.json, weights, tokenizer)")
        for f in found:  # a broken config would otherwise surface as "cannot load" after the run has started
            try:
                json.loads(f.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                where = f"{f}:{e.lineno}" if isinstance(e, json.JSONDecodeError) else str(f)
                why = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
                raise ModelError(f"{where}: {field}: invalid JSON ({why}); repair the file or point {field} at "
                                 "another model directory") from None
        return
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"{field} {name!r}: no such directory; check the path "
                         "(or give a hub id such as Qwen/Qwen3-8B)")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
            raise ModelError(f"{field} {name!r}: not in the local hub cache and HF_HUB_OFFLINE is set; "
                             "download it on a connected machine first, or point it at a local directory")


def load_tokenizer(name: str, cfg: ModelConfig):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"model {name!r}: cannot load the tokenizer ({_first_line(e)}); check the hub id or path "
                         "(offline: download it first or point model.name at a local directory)") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        raise ModelError(f"model {name!r}: tokenizer has no chat template; use an instruct/chat model "
                         "or set one in its tokenizer_config.json")
    return tok


def load_model(ref: ModelRef, cfg: ModelConfig, *, trainable_adapter: bool = True):
    """Load full weights (+ adapter) onto the default device. Returns the model (PeftModel if adapter)."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, dtype=_dtype(cfg.dtype))
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(ref.base, **kwargs)
    except (OSError, ValueError, SafetensorError) as e:  # missing, unreadable or corrupt weights
        raise ModelError(f"model {ref.base!r}: cannot load ({_first_line(e)}); check the hub id or path "
                         "(offline: download it first or point model.name at a local directory)") from None
    if ref.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, ref.adapter, is_trainable=trainable_adapter)
    return model.to(device())


def load_frozen(ref: ModelRef, cfg: ModelConfig):
    model = load_model(ref, cfg, trainable_adapter=False)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


def prepare_for_stage(model, finetune: str, lora: LoraConfig):
    """Full FT of a LoRA model merges the adapter first; LoRA on a LoRA model keeps training that adapter
    (so `snapshot:base` stays reachable with adapters disabled); LoRA on a plain model adds one."""
    if finetune == "full":
        if is_peft(model):
            model = model.merge_and_unload()
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if is_peft(model):
        return model
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    linear = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    if lora.target_modules != "all-linear":
        missing = [t for t in lora.target_modules if t not in linear]
        if missing:
            raise ModelError(f"lora.target_modules: {missing} not found in {type(model).__name__}; "
                             f"available linear modules: {', '.join(linear)} (or use all-linear)")
    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    for m in lora.modules_to_save or []:
        if m not in names:
            raise ModelError(f"lora.modules_to_save: {m!r} not found in {type(model).__name__}; "
                             "e.g. embed_tokens, lm_head")
    peft_cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type="CAUSAL_LM",
                              target_modules=lora.target_modules, modules_to_save=lora.modules_to_save)
    return get_peft_model(model, peft_cfg)


def save_model(model, tokenizer, out_dir: Path, base_ref: str, *, write: bool = True) -> ModelRef:
    """Save the current model; a PeftModel saves only its adapter (on top of `base_ref`). `write=False` (ranks other
    than 0) only computes the ref that rank 0's save gives."""
    from continual_opd import distributed

    state_dict = None
    if distributed.is_sharded(model):  # FSDP / ZeRO-3: gathering the full weights is a collective on every rank
        from accelerate import Accelerator

        state_dict = Accelerator().get_state_dict(model)
    if write:
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir, **({"state_dict": state_dict} if state_dict is not None else {}))
        tokenizer.save_pretrained(out_dir)
    return ModelRef(base=base_ref, adapter=str(out_dir)) if is_peft(model) else ModelRef(base=str(out_dir))


@contextlib.contextmanager
def teacher_view(student, teacher_ref: ModelRef, student_base: str, cfg: ModelConfig):
    """Yield a frozen teacher. When the teacher is the student's own base and the student is LoRA, this is
    the same model with adapters disabled (one model in memory); otherwise the snapshot is loaded."""
    if is_peft(student) and teacher_ref.adapter is None and teacher_ref.base == student_base:
        yield _AdapterDisabled(student)
        return
    teacher = load_frozen(teacher_ref, cfg)
    try:
        yield teacher
    finally:
        del teacher


class _AdapterDisabled(torch.nn.Module):
    """Calls the PEFT student with its adapters disabled: the pre-LoRA base model, frozen by no_grad."""

    def __init__(self, peft_model):
        super().__init__()
        self.peft_model = peft_model
        self.config = peft_model.config

    def forward(self, *args, **kwargs):
        with self.peft_model.disable_adapter(), torch.no_grad():
            return self.peft_model(*args, **kwargs)


PROBE_MESSAGES = [
    [{"role": "user", "content": "Write the word 'Hello' in quotes, then list 2 bullets: café, naïve — ok?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sum 12 + 30."},
     {"role": "assistant", "content": "42"}, {"role": "user", "content": "Now in JSON."}],
]


def check_same_tokenization(student_tok, teacher_tok, chat_template_kwargs: dict, *, student: str,
                            teacher: str) -> None:
    """Distillation compares per-token log-probs, so both sides must see the same token ids."""
    if student_tok.get_vocab() != teacher_tok.get_vocab():
        raise ModelError(f"teacher {teacher!r} and student {student!r} have different vocabularies "
                         f"({len(teacher_tok)} vs {len(student_tok)} tokens); "
                         "use a teacher with the student's tokenizer")
    for messages in PROBE_MESSAGES:
        kw = dict(add_generation_prompt=True, tokenize=False, **chat_template_kwargs)
        s, t = student_tok.apply_chat_template(messages, **kw), teacher_tok.apply_chat_template(messages, **kw)
        if s != t:
            raise ModelError(f"teacher {teacher!r} and student {student!r} render the chat template differently "
                             f"(student: {s[:60]!r}..., teacher: {t[:60]!r}...); give both the same chat template")
        if (student_tok(s, add_special_tokens=False)["input_ids"]
                != teacher_tok(t, add_special_tokens=False)["input_ids"]):
            raise ModelError(f"teacher {teacher!r} and student {student!r} tokenize the same text differently; "
                             "use a teacher with the student's tokenizer")


def _first_line(e: Exception) -> str:
    s = str(e).strip().splitlines()
    return s[0][:200] if s else type(e).__name__
