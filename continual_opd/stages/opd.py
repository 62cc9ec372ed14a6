"""On-policy distillation (OPD) stage: the student samples, a frozen snapshot teacher scores every token.

One step, top to bottom (`run_opd` schedules; `opd_step` is the update, also called by tests and bench/):
    sample     the student answers `prompts_per_step` prompts × `samples_per_prompt` (KV-cached generate,
               `generation.sample_rollouts`, stopping on the same end tokens as evals)
    teacher    the frozen teacher scores the same tokens (for a LoRA student whose teacher is its own base:
               the same model with adapters disabled, so only one model is in memory)
    student    the student scores them with gradients, in micro-batches that bound the logits' memory
    loss       per-token divergence on response tokens (estimator chosen in the recipe, see losses.py)
               + `replay.weight` × LM loss on replayed SFT examples (keeps the new knowledge)
    step       AdamW, grad-norm clipping, LR schedule
    log        teacher KL, entropy (the loss's own stats), lengths, truncation, tokens, time generate/teacher/student
    eval/save  suites every `eval_every` steps, checkpoints every `save_every` steps (resume restores RNG)

Why a hand-written loop and not TRL's DistillationTrainer: TRL 1.16's trainer needs a separate teacher model
object (no adapter-disabled teacher), offers full-vocabulary divergences only (not the sampled-token reverse
KL estimator that works with any teacher served elsewhere), and has no place for a replay loss or the per-step
generate/teacher/student timings. The estimators themselves are pure functions in losses.py.
"""

from __future__ import annotations

import logging
import math
import random
import time

import torch
from tqdm.auto import tqdm

from continual_opd import checkpoints, distributed, models
from continual_opd.config import OPDStage
from continual_opd.data import build_mixture, build_pools, read_prompts
from continual_opd.errors import ConfigError, TrainingError
from continual_opd.generation import Rollouts
from continual_opd.samplers import HFSampler, make_sampler
from continual_opd.stages import EvalCadence, StageContext, StageResult, losses

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- data


def load_prompts(stage: OPDStage) -> tuple[list, list]:
    chat = [p for f in stage.prompts for p in read_prompts(f)]
    docs = [p for f in stage.doc_prompts for p in read_prompts(f)]
    return chat, docs


def pick_prompts(chat: list, docs: list, n: int, doc_fraction: float, rng: random.Random) -> list:
    n_doc = round(n * doc_fraction) if docs else 0
    return rng.sample(chat, min(n - n_doc, len(chat))) + (rng.sample(docs, min(n_doc, len(docs))) if n_doc else [])


def sample(model, tokenizer, prompts: list, stage: OPDStage, chat_template_kwargs: dict) -> Rollouts:
    """The stage's rollouts: `samples_per_prompt` answers per prompt at the stage's temperature and top-p."""
    return HFSampler(model, tokenizer, stage, chat_template_kwargs).sample(prompts)


def auto_micro_batch_size(n_rollouts: int, L: int, vocab_size: int, budget_mb: float) -> int:
    """Rollouts per forward/backward such that one (micro-batch, L + 1, V) float32 logits tensor stays within
    `budget_mb` MiB (at least 1 rollout). The full-vocabulary losses hold many such tensors at once (student and
    teacher logits, log-softmaxes, probabilities, gradients): about 25x at peak, measured (BENCHMARKS.md).

    E.g. Qwen3 (V = 151,936) with 1024-token answers: one rollout is 594 MiB, so the 256 MiB default gives 1;
    SmolLM2 (V = 49,152) with 128-token answers: 24 MiB a rollout, 10 per micro-batch."""
    per_rollout_mb = (L + 1) * vocab_size * 4 / 2**20
    return max(1, min(n_rollouts, int(budget_mb // per_rollout_mb)))


def response_logits(model, ids_BT, attn_BT, pos_BT, L: int) -> torch.Tensor:
    """Logits that predict the L response tokens: positions P-1 .. P+L-2 of the full sequence."""
    logits = model(input_ids=ids_BT, attention_mask=attn_BT, position_ids=pos_BT, logits_to_keep=L + 1).logits
    return logits[:, :-1]


def divergence(stage: OPDStage, s_logits_BLV, t_logits_BLV, tokens_BL, mask_BL):
    if stage.loss == "sampled":  # the reference method: only the sampled tokens' log-probs are needed
        s_BL = losses.gather_token_logprobs(s_logits_BLV, tokens_BL)
        q_BL = losses.gather_token_logprobs(t_logits_BLV, tokens_BL)
        return losses.sampled_reverse_kl_loss(s_BL, q_BL, mask_BL, gamma=stage.gamma)
    if stage.loss == "full":
        return losses.full_reverse_kl_loss(s_logits_BLV, t_logits_BLV, mask_BL)
    if stage.loss == "forward":
        return losses.forward_kl_loss(s_logits_BLV, t_logits_BLV, mask_BL)
    return losses.generalized_jsd_loss(s_logits_BLV, t_logits_BLV, mask_BL, beta=stage.beta)


def pad_batch(examples: list[dict], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    attn = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n], labels[i, :n], attn[i, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
    return ids.to(device), labels.to(device), attn.to(device)


class NonFiniteLoss(Exception):
    """The step's loss is nan/inf; raised before the optimizer step, so the parameters are untouched."""

    def __init__(self, value: float):
        super().__init__(f"loss is {value}")
        self.value = value


def opd_step(student, teacher, rollouts: Rollouts, stage: OPDStage, optimizer, *, scheduler=None,
             replay_batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
             accelerator=None) -> dict[str, float]:
    """One OPD update on given rollouts: teacher scores → student scores → divergence (+ replay LM loss) →
    backward → clip → optimizer (and scheduler) step. Returns the step's stats (one number each).

    Rollouts are processed in micro-batches of `stage.micro_batch_size` (default: as many as fit
    `stage.logits_budget_mb`). Each micro-batch's loss is a mean over its response tokens, so it is weighted by its
    share of the step's tokens: the gradient equals the one of the whole batch at once. The monitors are the loss's
    own per-token means, weighted the same way: `teacher_kl` is the reverse KL per token (exact for the
    full-vocabulary losses, the sampled-token estimate for `sampled`), `student_entropy` likewise.

    With `accelerator` (a multi-process run) `student` is the wrapped model (DDP / FSDP / ZeRO-3) and `rollouts` this
    rank's share. Token shares are taken over all ranks' tokens and scaled by the world size (DDP averages the
    ranks' gradients), so N ranks × B/N rollouts give the gradient and the stats of one process with all B.
    Gradients are synchronized once, on the step's last backward.
    """
    import contextlib

    params = [p for group in optimizer.param_groups for p in group["params"]]
    world = accelerator.num_processes if accelerator is not None else 1
    mask_BL, tokens_BL = rollouts.response_mask_BL, rollouts.tokens_BL
    L = mask_BL.shape[1]
    n_tok_local = int(mask_BL.sum())
    n_tok = int(distributed.all_sum(n_tok_local)) if world > 1 else n_tok_local
    config = getattr(student, "module", student).config
    mb = stage.micro_batch_size or auto_micro_batch_size(len(rollouts), L, config.vocab_size, stage.logits_budget_mb)
    starts = list(range(0, len(rollouts), mb))
    n_backward = len(starts) + (replay_batch is not None)

    def sync(k: int):  # the k-th forward/backward of this step (0-based): only the last one syncs gradients
        last = accelerator is None or k == n_backward - 1
        return contextlib.nullcontext() if last else accelerator.no_sync(student)

    def backward(x) -> None:
        x.backward() if accelerator is None else accelerator.backward(x)

    optimizer.zero_grad(set_to_none=True)
    distill_loss, agg, t_teacher, t0 = 0.0, {}, 0.0, time.perf_counter()
    for k, i in enumerate(starts):
        part_r = rollouts[i:i + mb]
        tt = time.perf_counter()
        with torch.no_grad():
            t_logits_BLV = response_logits(teacher, part_r.ids_BT, part_r.attention_BT, part_r.positions_BT, L)
        t_teacher += time.perf_counter() - tt
        share = float(mask_BL[i:i + mb].sum()) / max(n_tok, 1)  # of all ranks' tokens
        with sync(k):  # DDP decides at forward time whether this backward all-reduces
            s_logits_BLV = response_logits(student, part_r.ids_BT, part_r.attention_BT, part_r.positions_BT, L)
            part, stats = divergence(stage, s_logits_BLV, t_logits_BLV, tokens_BL[i:i + mb], mask_BL[i:i + mb])
            backward(part * share * world)
        distill_loss += part.item() * share
        for key, v in stats.items():
            if key != "num_tokens":
                agg[key] = agg.get(key, 0.0) + float(v) * share
        del s_logits_BLV, t_logits_BLV
    replay_loss = None
    if replay_batch is not None:
        r_ids, r_labels, r_attn = replay_batch
        r_loss, _ = losses.lm_loss(student(input_ids=r_ids, attention_mask=r_attn).logits, r_labels)
        backward(stage.replay.weight * r_loss)  # the step's last backward: synced
        replay_loss = r_loss.item()
    keys = sorted(agg)
    if world > 1:  # every rank's share of the sums, added up (one all-reduce)
        totals = distributed.all_sum_list([distill_loss, *(agg[key] for key in keys), len(rollouts),
                                           float(rollouts.truncated_B.sum()), (replay_loss or 0.0) / world])
        distill_loss, agg = totals[0], dict(zip(keys, totals[1:1 + len(keys)]))
        n_rollouts, n_truncated, replay_loss = totals[1 + len(keys)], totals[2 + len(keys)], \
            (totals[3 + len(keys)] if replay_batch is not None else None)
    else:
        n_rollouts, n_truncated = len(rollouts), float(rollouts.truncated_B.sum())
    loss = distill_loss
    row: dict[str, float] = {}
    if replay_loss is not None:
        loss += stage.replay.weight * replay_loss
        row["replay_loss"] = replay_loss
    if not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss(loss)
    if accelerator is not None:
        grad_norm = accelerator.clip_grad_norm_(params, stage.max_grad_norm)
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, stage.max_grad_norm)
    lr = optimizer.param_groups[0]["lr"]  # the rate this update uses
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    row.update({"loss": loss, "distill_loss": distill_loss, "teacher_kl": agg.get("reverse_kl", 0.0),
                "student_entropy": agg.get("student_entropy", 0.0),
                **{k: agg[k] for k in ("forward_kl", "teacher_entropy") if k in agg},
                "response_len": n_tok / n_rollouts, "truncation_rate": n_truncated / n_rollouts,
                "tokens_sampled": n_tok, "grad_norm": float(grad_norm), "lr": lr, "micro_batch_size": mb,
                "time_teacher_s": t_teacher, "time_student_s": time.perf_counter() - t0 - t_teacher})
    return row


def lr_factor(i: int, stage: OPDStage) -> float:
    """LR multiplier for the update at 0-based index i: linear warmup over `warmup_steps` ((i + 1) / warmup), then
    constant, or a linear/cosine decay from 1 after warmup to 0 at index `steps`."""
    if i < stage.warmup_steps:
        return (i + 1) / stage.warmup_steps
    if stage.lr_scheduler == "constant":
        return 1.0
    frac = (i - stage.warmup_steps) / max(stage.steps - stage.warmup_steps, 1)
    return max(0.0, 1 - frac) if stage.lr_scheduler == "linear" else 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


# ---------------------------------------------------------------------------------------------- the stage


def run_opd(stage: OPDStage, ctx: StageContext) -> StageResult:
    recipe, model, tok = ctx.recipe, ctx.model, ctx.tokenizer
    tmpl_kw = recipe.model.chat_template_kwargs
    teacher_ref = ctx.resolve_teacher(stage.teacher)
    if teacher_ref.base != ctx.snapshots["base"].base or teacher_ref.adapter:
        teacher_tok = models.load_tokenizer(teacher_ref.adapter or teacher_ref.base, recipe.model)
        models.check_same_tokenization(tok, teacher_tok, tmpl_kw, student=recipe.model.name, teacher=stage.teacher)
    chat_prompts, doc_prompts = load_prompts(stage)
    world, rank, writer = distributed.world_size(), distributed.rank(), distributed.is_main()
    for field, n in (("prompts_per_step", stage.prompts_per_step), ("replay.batch_size", stage.replay.batch_size)):
        if n % world:  # the recipe's numbers are per update, over all processes
            raise ConfigError(f"{recipe.source}: stages.{ctx.stage_index}.{field}: {n} does not split over {world} "
                              f"processes; use a multiple of {world}")
    replay = None
    if stage.replay.batch_size > 0:
        pools = build_pools(stage.replay.data, tok, stage.replay.max_seq_len, tmpl_kw)
        replay = build_mixture(pools, stage.replay.data.mix, stage.steps * stage.replay.batch_size, seed=recipe.seed).examples

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=stage.learning_rate, weight_decay=stage.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(i, stage))
    accelerator, trained = None, model
    if world > 1 or stage.sampler == "vllm":
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, is_initialized

        # SFT's Trainer may have set up accelerate already (e.g. bf16): join that state rather than contradict it
        mp = AcceleratorState().mixed_precision if is_initialized() else None
        accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mp)
    if world > 1:  # DDP, or FSDP2 / ZeRO-3 as the accelerate config says; the scheduler stays ours (steps once)
        trained, optimizer = accelerator.prepare(model, optimizer)
        model = accelerator.unwrap_model(trained)  # generation, evals and checkpoints use the plain module
    start = 0
    if ctx.resume_from is not None:  # every rank, after prepare: a sharded (FSDP2) model takes its shards of the state
        start = checkpoints.load_training_state(ctx.resume_from, model, optimizer, scheduler)
    sampler = make_sampler(stage, model, tok, accelerator, tmpl_kw)
    model.train()
    cadence = EvalCadence(stage, ctx)
    last_good = ctx.resume_from
    n_samples = stage.prompts_per_step * stage.samples_per_prompt
    bar = tqdm(total=stage.steps, initial=start, desc=f"opd {stage.name}", unit="step",
               disable=not ctx.progress or not writer)
    with models.teacher_view(model, teacher_ref, ctx.start_ref.base, recipe.model) as teacher:
        for step in range(start + 1, stage.steps + 1):
            t0 = time.time()
            rng = random.Random(recipe.seed * 1_000_003 + step)  # prompt choice depends only on (seed, step)
            prompts = pick_prompts(chat_prompts, doc_prompts, stage.prompts_per_step, stage.doc_prompt_fraction, rng)
            if world > 1:  # each rank samples its share; seeded by (seed, step, rank), so a resume samples the same
                prompts = distributed.shard_list(prompts)
                torch.manual_seed((recipe.seed * 1_000_003 + step) * 1_009 + rank)

            # 1. sample from the student (the same stop tokens as evals)
            rollouts = sampler.sample(prompts)
            t_generate = time.time() - t0

            # 2-5. teacher scores → student scores → divergence (+ replay) → backward → step
            replay_batch = None
            if replay is not None:
                batch = replay[(step - 1) * stage.replay.batch_size: step * stage.replay.batch_size]
                replay_batch = pad_batch(distributed.shard_list(batch), tok.pad_token_id, model.device)
            try:
                row = opd_step(trained, teacher, rollouts, stage, optimizer, scheduler=scheduler,
                               replay_batch=replay_batch, accelerator=accelerator if world > 1 else None)
            except NonFiniteLoss as e:
                raise TrainingError(f"stage {stage.name}: loss is {e.value} at step {step}; last good checkpoint: "
                                    f"{last_good or 'none (stage start)'}; lower stages.{ctx.stage_index}.lr or check the teacher") from None
            sampler.weights_changed()

            # 6. log
            ctx.sink.tokens += row["tokens_sampled"]
            ctx.sink.samples += n_samples
            ctx.sink.log(step, "opd", {**row, "time_generate_s": t_generate})
            bar.update(1)
            bar.set_postfix(kl=f"{row['teacher_kl']:.3f}", len=f"{row['response_len']:.1f}")

            # 7. eval and checkpoint (evals are sharded over the ranks; rank 0 alone writes)
            if cadence.due(step):
                cadence.evaluate(model, step)
                model.train()
            if stage.save_every and step % stage.save_every == 0:
                last_good = checkpoints.path(ctx.stage_dir, step)
                # every rank: a sharded model is gathered (a collective) before rank 0 writes
                checkpoints.save_training_state(last_good, model, optimizer, scheduler, step,
                                                {**ctx.checkpoint_meta, "step": step}, write=writer)
                distributed.barrier()
    bar.close()
    return cadence.final(model)
