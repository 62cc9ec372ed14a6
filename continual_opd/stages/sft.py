"""SFT / mid-training stage: TRL's SFTTrainer on a token-ratio mixture of documents, chat and QA.

Top to bottom: build the mixture (pre-tokenized `input_ids` + `labels`, so TRL uses our loss masks as is)
→ SFTTrainer (full fine-tuning or the LoRA adapter prepared by the pipeline) → a callback that runs the
recipe's eval suites every `eval_every` steps on the live model, mirrors train loss into metrics.jsonl,
and marks finished checkpoints → resume through HF Trainer's `resume_from_checkpoint`.
"""

from __future__ import annotations

import logging

import torch
from datasets import Dataset
from transformers import TrainerCallback

from transformers.trainer_callback import PrinterCallback, ProgressCallback

from continual_opd import checkpoints, distributed, models
from continual_opd.config import SFTStage
from continual_opd.data import build_mixture, build_pools
from continual_opd.evals.runner import EvalCadence
from continual_opd.stages import StageContext, StageResult

log = logging.getLogger(__name__)


class StageCallback(TrainerCallback):
    """Evals on the stage's cadence, metrics mirroring, and checkpoint completion (meta.json + COMPLETE)."""

    def __init__(self, stage: SFTStage, ctx: StageContext, samples_per_step: int):
        self.stage, self.ctx, self.samples_per_step = stage, ctx, samples_per_step
        self.cadence = EvalCadence(stage, ctx.evaluate, ctx.sink)
        self._step = self._tokens = 0

    def on_train_begin(self, args, state, control, **kw):
        # where the Trainer starts counting: a resumed Trainer restores its step and tokens seen from the checkpoint
        self._step, self._tokens = state.global_step, int(getattr(state, "num_input_tokens_seen", 0) or 0)

    def on_step_end(self, args, state, control, model=None, **kw):
        step, tokens = state.global_step, int(getattr(state, "num_input_tokens_seen", 0) or 0)
        self.ctx.sink.add_counts(tokens=tokens - self._tokens, samples=(step - self._step) * self.samples_per_step)
        self._step, self._tokens = step, tokens
        if self.cadence.due(step):
            self.cadence.evaluate(model, step)

    def on_log(self, args, state, control, logs=None, **kw):
        keep = {k: v for k, v in (logs or {}).items() if k in ("loss", "learning_rate", "grad_norm") and v is not None}
        if keep:
            self.ctx.sink.log(state.global_step, "train", keep)

    def on_save(self, args, state, control, **kw):
        # The Trainer has finished writing checkpoint-N when on_save fires: add meta.json and mark it complete.
        ckpt = checkpoints.path(self.ctx.stage_dir, state.global_step)
        if state.is_world_process_zero and ckpt.exists():  # the Trainer saves on rank 0 only
            checkpoints.mark_complete(ckpt, {**self.ctx.checkpoint_meta, "step": state.global_step})
            checkpoints.prune(self.ctx.stage_dir, self.stage.save_total_limit)


class QuietProgress(ProgressCallback):
    """The Trainer's progress bar without its log dicts: those numbers go to metrics.jsonl (and TensorBoard)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


# Our schedule names (shared with OPD) → transformers' schedulers, which all start with linear warmup.
HF_SCHEDULERS = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def _self_chat(cfg, ctx: StageContext):
    """The stage's self-generated chat file: answered by the live model when it is the snapshot named (the stage's
    start; a fresh LoRA adapter does not change outputs), else by that snapshot loaded for the purpose."""
    from continual_opd.self_chat import ensure_self_chat

    ref = ctx.resolve(cfg.model, "data.self_chat.model")
    gen_model = ctx.model if ref == ctx.start_ref else models.load_model(ref, ctx.model_config, trainable_adapter=False)
    path, stats = ensure_self_chat(cfg, ctx.stage_dir, gen_model, ctx.tokenizer, model_ref=ref.to_dict(),
                                   seed=ctx.seed, chat_template_kwargs=ctx.chat_template_kwargs, progress=ctx.progress)
    if ctx.resume_from is None:
        ctx.sink.log(0, "data", {f"self_chat/{k}": v for k, v in stats.items()})
    del gen_model
    return path


def run_sft(stage: SFTStage, ctx: StageContext) -> StageResult:
    from trl import SFTConfig, SFTTrainer

    tok = ctx.tokenizer
    samples_per_step = stage.batch_size * stage.grad_accum
    data = stage.data
    if data.self_chat is not None:
        path = _self_chat(data.self_chat, ctx)
        data = data.model_copy(update={"chat": [*data.chat, str(path)]})
    # what the stage read (and skipped) goes next to its checkpoints; every rank reads, the main one writes
    manifest = ctx.stage_dir / "documents.json" if distributed.is_main() else None
    pools = build_pools(data, tok, stage.max_seq_len, ctx.chat_template_kwargs, manifest_path=manifest)
    mix = build_mixture(pools, stage.data.mix, stage.steps * samples_per_step, seed=ctx.seed)
    log.info("SFT mixture: %s examples available; realized token share %s (target %s)", mix.source_sizes,
             {k: round(v, 3) for k, v in mix.token_share.items()}, stage.data.mix)
    if ctx.resume_from is None:
        ctx.sink.log(0, "data", {f"token_share/{k}": v for k, v in mix.token_share.items()}
                     | {f"examples/{k}": n for k, n in mix.source_sizes.items()})
    train = Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in mix.examples])

    # The recipe's batch is the global one: with N processes each rank takes batch_size / N examples a step, so the
    # stage sees the same data and the same number of examples per update at any process count (preflight checks
    # that batch_size splits).
    world = distributed.world_size()
    args = SFTConfig(
        output_dir=str(ctx.stage_dir / "checkpoints"),
        max_steps=stage.steps,
        per_device_train_batch_size=stage.batch_size // world,
        gradient_accumulation_steps=stage.grad_accum,
        learning_rate=stage.learning_rate,
        lr_scheduler_type=HF_SCHEDULERS[stage.lr_scheduler],
        warmup_steps=stage.warmup_steps,
        weight_decay=stage.weight_decay,
        max_grad_norm=stage.max_grad_norm,
        max_length=stage.max_seq_len,
        activation_checkpointing=stage.gradient_checkpointing,
        logging_steps=1,
        save_strategy="steps" if stage.save_every else "no",
        save_steps=stage.save_every or 1,
        save_only_model=False,
        report_to=[],
        seed=ctx.seed,
        data_seed=ctx.seed,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=not ctx.progress,
        bf16=next(ctx.model.parameters()).dtype == torch.bfloat16,
    )
    callback = StageCallback(stage, ctx, samples_per_step)
    trainer = SFTTrainer(model=ctx.model, args=args, train_dataset=train, processing_class=tok, callbacks=[callback])
    # HF Trainer echoes every log dict to the console (PrinterCallback with the bar off, ProgressCallback.on_log with
    # it on); those numbers are in metrics.jsonl already, so keep the bar and drop the echo.
    trainer.remove_callback(PrinterCallback)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(QuietProgress())
    trainer.train(resume_from_checkpoint=str(ctx.resume_from) if ctx.resume_from else None)
    return StageResult(model=trainer.model, results=callback.cadence.final(trainer.model), steps=stage.steps)
