"""One checkpoint layout for every training stage: `<stage_dir>/checkpoints/checkpoint-<step>/`.

A checkpoint holds HF Trainer's files, whichever stage wrote it, so any of them loads with `from_pretrained` (or
`PeftModel.from_pretrained` for an adapter) for a look at the model at that step:

    model.safetensors | adapter_model.safetensors (+ config)   the weights (full model, or the LoRA adapter)
    optimizer.pt, scheduler.pt, rng_state.pth                  what resume needs to continue exactly
    trainer_state.json                                         {"global_step": N, ...}
    meta.json                                                  stage, kind, step, recipe hash, parent model ref
    COMPLETE                                                   written last: only complete checkpoints resume

SFT's files are written by HF Trainer itself (`mark_complete` adds meta.json and COMPLETE from its on_save
callback); OPD writes the same files with `save_training_state`. Resume = `latest(stage_dir)`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from continual_opd.io import atomic_write_json

COMPLETE = "COMPLETE"
META = "meta.json"


def path(stage_dir: Path, step: int) -> Path:
    return Path(stage_dir) / "checkpoints" / f"checkpoint-{step}"


def step_of(ckpt: Path) -> int:
    return int(Path(ckpt).name.rsplit("-", 1)[1])


def latest(stage_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step (a checkpoint written half-way is ignored)."""
    found = [c for c in (Path(stage_dir) / "checkpoints").glob("checkpoint-*")
             if c.name.rsplit("-", 1)[1].isdigit() and (c / COMPLETE).is_file()]
    return max(found, key=step_of) if found else None


def mark_complete(ckpt: Path, meta: dict) -> None:
    """Write meta.json, then the COMPLETE marker: the last two files of any checkpoint."""
    atomic_write_json(Path(ckpt) / META, meta)
    (Path(ckpt) / COMPLETE).write_text("ok\n")


def read_meta(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / META).read_text())


def _rng_state() -> dict:
    return {"python": random.getstate(), "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def save_training_state(ckpt: Path, model, optimizer, scheduler, step: int, meta: dict) -> None:
    """Weights (or adapter), optimizer, scheduler and RNG state in HF Trainer's file names; then meta + COMPLETE."""
    ckpt = Path(ckpt)
    ckpt.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(ckpt)
    torch.save(optimizer.state_dict(), ckpt / "optimizer.pt")
    torch.save(scheduler.state_dict(), ckpt / "scheduler.pt")
    torch.save(_rng_state(), ckpt / "rng_state.pth")
    atomic_write_json(ckpt / "trainer_state.json", {"global_step": step})
    mark_complete(ckpt, meta)


def load_training_state(ckpt: Path, model, optimizer, scheduler) -> int:
    """Restore what `save_training_state` wrote into the live model and optimizer; returns the step."""
    from safetensors.torch import load_file

    ckpt = Path(ckpt)
    if (ckpt / "adapter_model.safetensors").is_file():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(ckpt / "adapter_model.safetensors"))
    else:
        files = sorted(ckpt.glob("model*.safetensors"))
        state = {k: v for f in files for k, v in load_file(f).items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = {k for k in missing if k.endswith("lm_head.weight")} if getattr(model.config, "tie_word_embeddings", False) else set()
        if set(missing) - tied or unexpected:
            raise RuntimeError(f"{ckpt}: weights do not match the model (missing {sorted(missing)[:3]}, "
                               f"unexpected {sorted(unexpected)[:3]})")
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=False))
    rng = torch.load(ckpt / "rng_state.pth", weights_only=False)
    random.setstate(rng["python"])
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((ckpt / "trainer_state.json").read_text())["global_step"]
