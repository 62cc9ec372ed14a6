"""One checkpoint layout for every training stage: `<stage_dir>/checkpoints/checkpoint-<step>/`.

A checkpoint holds HF Trainer's files, whichever stage wrote it, so any of them loads with `from_pretrained` (or
`PeftModel.from_pretrained` for an adapter) for a look at the model at that step:

    model.safetensors | adapter_model.safetensors (+ config)   the weights (full model, or the LoRA adapter)
    optimizer.pt, scheduler.pt, rng_state.pth                  what resume needs to continue exactly
    trainer_state.json                                         {"global_step": N, ...}
    meta.json                                                  stage, kind, step, recipe hash, parent model ref
    COMPLETE                                                   written last: only complete checkpoints resume

SFT's files are written by HF Trainer itself (`mark_complete` adds meta.json and COMPLETE from its on_save
callback); OPD writes the same files with `save_training_state`. Resume = `latest(stage_dir)`. Under FSDP2 OPD's
files stay these (the shards are gathered into them), so an OPD checkpoint resumes at any process count; HF Trainer
writes its FSDP names instead (optimizer.bin, pytorch_model_fsdp.bin, rng_state_<rank>.pth) and resumes them itself.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch

from continual_opd import distributed
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


def prune(stage_dir: Path, keep: int | None) -> list[Path]:
    """Delete the oldest complete checkpoints so at most `keep` remain (`save_total_limit`); returns those deleted.
    The newest complete checkpoint (what --resume continues from) always stays; a half-written one is left alone."""
    if not keep:
        return []
    found = sorted((c for c in (Path(stage_dir) / "checkpoints").glob("checkpoint-*")
                    if c.name.rsplit("-", 1)[1].isdigit() and (c / COMPLETE).is_file()), key=step_of)
    gone = found[:-max(keep, 1)]
    for ckpt in gone:
        (ckpt / COMPLETE).unlink()  # first: a checkpoint deleted half-way is never taken for a complete one
        shutil.rmtree(ckpt)
    return gone


def mark_complete(ckpt: Path, meta: dict) -> None:
    """Write meta.json, then the COMPLETE marker: the last two files of any checkpoint."""
    atomic_write_json(Path(ckpt) / META, meta)
    (Path(ckpt) / COMPLETE).write_text("ok\n")


def read_meta(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / META).read_text())


def _rng_state() -> dict:
    return {"python": random.getstate(), "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def save_training_state(ckpt: Path, model, optimizer, scheduler, step: int, meta: dict, *, write: bool = True) -> None:
    """Weights (or adapter), optimizer, scheduler and RNG state in HF Trainer's file names; then meta + COMPLETE.

    Call it on every rank; only the rank with `write=True` (rank 0) writes. A sharded model (FSDP2) is gathered
    first, a collective that lands the full weights and optimizer state on rank 0, so the files are the ones a single
    process writes (full weights, index-keyed `optimizer.state_dict()`) and resume at any process count."""
    ckpt = Path(ckpt)
    weights = None
    if distributed.is_sharded(model):
        if write and not distributed.is_main():
            raise ValueError("save_training_state: a sharded model is gathered onto rank 0, so only rank 0 can write")
        weights, optim_state = _gather(model, optimizer)
    elif not write:
        return
    else:
        optim_state = optimizer.state_dict()
    if not write:
        return
    ckpt.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(ckpt, **({"state_dict": weights} if weights is not None else {}))
    torch.save(optim_state, ckpt / "optimizer.pt")
    torch.save(scheduler.state_dict(), ckpt / "scheduler.pt")
    torch.save(_rng_state(), ckpt / "rng_state.pth")
    atomic_write_json(ckpt / "trainer_state.json", {"global_step": step})
    mark_complete(ckpt, meta)


def load_training_state(ckpt: Path, model, optimizer, scheduler) -> int:
    """Restore what `save_training_state` wrote into the live model and optimizer; returns the step. Call it on every
    rank. A sharded model must be wrapped already (after `accelerator.prepare`): rank 0 reads the full state and
    each rank receives its shards."""
    ckpt = Path(ckpt)
    if distributed.is_sharded(model):
        _scatter(ckpt, model, optimizer)
    else:
        _load_weights(ckpt, model)
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=False))
    rng = torch.load(ckpt / "rng_state.pth", weights_only=False)
    random.setstate(rng["python"])
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((ckpt / "trainer_state.json").read_text())["global_step"]


def _load_weights(ckpt: Path, model) -> None:
    from safetensors.torch import load_file

    if (ckpt / "adapter_model.safetensors").is_file():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(ckpt / "adapter_model.safetensors"))
        return
    state = _full_weights(ckpt)
    missing, unexpected = model.load_state_dict(state, strict=False)
    problem = _mismatch(ckpt, model, missing, unexpected)
    if problem:
        raise RuntimeError(problem)


def _full_weights(ckpt: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted(ckpt.glob("model*.safetensors")) for k, v in load_file(f).items()}


def _mismatch(ckpt: Path, model, missing, unexpected) -> str | None:
    tied_embeddings = getattr(model.config, "tie_word_embeddings", False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if tied_embeddings else set()
    if set(missing) - tied or unexpected:
        return (f"{ckpt}: weights do not match the model (missing {sorted(set(missing) - tied)[:3]}, "
                f"unexpected {sorted(unexpected)[:3]})")
    return None


# ---------------------------------------------------------------------------------------------- sharded models
# torch.distributed.checkpoint's state-dict functions gather a sharded (DTensor) model and its optimizer into full
# tensors on rank 0 and scatter them back, one tensor at a time (no rank holds two full copies). Their optimizer
# state is keyed by parameter name; the file keeps torch's own format, keyed by the parameter's index in the
# optimizer's groups (what `optimizer.state_dict()` gives in one process), so either kind of run reads it.


def _check_fsdp(model) -> None:
    """The state-dict functions below know FSDP's DTensors, not DeepSpeed's partitioned parameters."""
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        from continual_opd.errors import TrainingError

        raise TrainingError("OPD checkpoints under DeepSpeed ZeRO-3 are not supported (its optimizer state stays "
                            "partitioned inside the engine); use recipes/accelerate/fsdp2.yaml, or save_every: 0")


def _gather(model, optimizer) -> tuple[dict, dict]:
    """(full weights, index-keyed optimizer state) on rank 0; empty dicts on the other ranks."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    _check_fsdp(model)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=opts)
    optim = get_optimizer_state_dict(model, _inner(optimizer), options=opts)
    if not optim:
        return weights, optim
    order = [name for group in optim["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    return weights, {"state": {index[name]: v for name, v in optim["state"].items()},
                     "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in optim["param_groups"]]}


def _scatter(ckpt: Path, model, optimizer) -> None:
    """Rank 0 reads the checkpoint's full state; every rank loads its shards of it (collective)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    _check_fsdp(model)
    weights, optim, problem = {}, {}, None
    if distributed.is_main():
        try:
            weights, problem = _named_weights(ckpt, model)
            saved = torch.load(ckpt / "optimizer.pt", weights_only=False)
            names = {p: n for n, p in model.named_parameters()}
            order = [names[p] for group in _inner(optimizer).param_groups for p in group["params"]]
            if len(order) != sum(len(g["params"]) for g in saved["param_groups"]):
                problem = problem or f"{ckpt}: optimizer.pt holds another set of parameters than the model trains"
            else:  # the file's index k is the k-th parameter of the optimizer's groups, in order
                optim = {"state": {order[k]: v for k, v in saved["state"].items()},
                         "param_groups": [{**g, "params": [order[k] for k in g["params"]]}
                                          for g in saved["param_groups"]]}
        except Exception as e:  # any failure is broadcast below: every rank raises, none waits in the scatter
            problem = f"{ckpt}: cannot read the checkpoint ({type(e).__name__}: {e})"
    problem = distributed.broadcast(problem)
    if problem:
        raise RuntimeError(problem)
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_model_state_dict(model, weights, options=opts)
    set_optimizer_state_dict(model, _inner(optimizer), optim, options=opts)


def _named_weights(ckpt: Path, model) -> tuple[dict, str | None]:
    """The checkpoint's weights under the live model's parameter names, and what does not match (or None)."""
    from safetensors.torch import load_file

    live = model.state_dict()  # names and local shards only: no communication
    if (ckpt / "adapter_model.safetensors").is_file():
        from peft import get_peft_model_state_dict

        # the adapter file's names are the ones get_peft_model_state_dict gives each live tensor: invert that
        saved_name = {id(v): k for k, v in get_peft_model_state_dict(model, state_dict=live).items()}
        to_live = {saved_name[id(v)]: k for k, v in live.items() if id(v) in saved_name}
        saved = load_file(ckpt / "adapter_model.safetensors")
        unknown = sorted(set(saved) - set(to_live))
        missing = sorted(set(to_live) - set(saved))
        problem = f"{ckpt}: adapter does not match the model (missing {missing[:3]}, unexpected {unknown[:3]})" \
            if unknown or missing else None
        return {to_live[k]: v for k, v in saved.items() if k in to_live}, problem
    state = _full_weights(ckpt)
    return state, _mismatch(ckpt, model, set(live) - set(state), set(state) - set(live))


def _inner(optimizer):
    """The torch optimizer inside accelerate's AcceleratedOptimizer (the state-dict functions read its groups)."""
    return getattr(optimizer, "optimizer", optimizer)
