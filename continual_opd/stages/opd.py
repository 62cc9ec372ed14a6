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

import contextlib
import logging
import math
import random
import time

import torch
from tqdm.auto import tqdm

from continual_opd import checkpoints, distributed, models
from continual_opd.config import OPDStage
from continual_opd.data import build_mixture, build_pools, read_prompts
from continual_opd.errors import ModelError, TrainingError
from continual_opd.generation import Rollouts, render_prompts
from continual_opd.samplers import HFSampler, make_sampler
from continual_opd.evals.runner import EvalCadence
from continual_opd.stages import StageContext, StageResult, chunked, losses
from continual_opd.tracking import timed

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


def divergence(stage: OPDStage, s_logits_BLV, teacher, tokens_BL, mask_BL):
    """The stage's loss from the student's (B, L, V) logits (the unchunked path). `teacher` is the teacher's (B, L)
    log-probs of the sampled tokens for `sampled`, its (B, L, V) logits for the full-vocabulary losses."""
    if stage.loss == "sampled":  # the reference method: only the sampled tokens' log-probs are needed
        s_BL = losses.gather_token_logprobs(s_logits_BLV, tokens_BL)
        q_BL = teacher if teacher.dim() == 2 else losses.gather_token_logprobs(teacher, tokens_BL)
        return losses.sampled_reverse_kl_loss(s_BL, q_BL, mask_BL, gamma=stage.gamma)
    return FULL_VOCAB_LOSSES[stage.loss](stage)(s_logits_BLV, teacher, mask_BL)


FULL_VOCAB_LOSSES = {  # stage -> fn(student logits, teacher logits, mask) -> (loss, stats)
    "full": lambda stage: losses.full_reverse_kl_loss,
    "forward": lambda stage: losses.forward_kl_loss,
    "jsd": lambda stage: (lambda s, t, m: losses.generalized_jsd_loss(s, t, m, beta=stage.beta)),
}


def _teacher_scores(stage: OPDStage, teacher, part: Rollouts, tokens_BL, mask_BL, rows: int, chunk: bool):
    """What the loss needs from the teacher, without a graph: for `sampled` its (B, L) log-probs of the sampled
    tokens (from a served teacher, or chunk by chunk), for the full-vocabulary losses its final hidden states at the
    N response positions (chunked) or its (B, L, V) logits (unchunked)."""
    if hasattr(teacher, "token_logprobs"):  # a served teacher (teacher_client.py): sampled-token log-probs only
        return teacher.token_logprobs(part, mask_BL)
    L = mask_BL.shape[1]
    with torch.no_grad():
        if not chunk:
            t_logits_BLV = response_logits(teacher, part.ids_BT, part.attention_BT, part.positions_BT, L)
            if stage.loss != "sampled":
                return t_logits_BLV
            return losses.gather_token_logprobs(t_logits_BLV, tokens_BL)
        on_BL = mask_BL > 0
        h_NH = chunked.response_hidden(teacher, part.ids_BT, part.attention_BT, part.positions_BT, L)[on_BL]
        if stage.loss != "sampled":
            return h_NH
        q_N = chunked.token_logprobs_nograd(chunked.Head(teacher, frozen=True), h_NH, tokens_BL[on_BL], rows)
        return torch.zeros(mask_BL.shape, dtype=q_N.dtype, device=q_N.device).masked_scatter(on_BL, q_N)


def chunked_divergence(stage: OPDStage, student, teacher, part: Rollouts, tokens_BL, mask_BL, scored, rows: int):
    """The stage's loss with logits made `rows` positions at a time from the student's hidden states (chunked.py);
    the same value and gradients as `divergence` on full logits."""
    on_BL = mask_BL > 0
    h_NH = chunked.response_hidden(student, part.ids_BT, part.attention_BT, part.positions_BT, mask_BL.shape[1])[on_BL]
    head = chunked.Head(student)
    if stage.loss == "sampled":
        s_N = chunked.token_logprobs(head, h_NH, tokens_BL[on_BL], rows)
        s_BL = torch.zeros(mask_BL.shape, dtype=s_N.dtype, device=s_N.device).masked_scatter(on_BL, s_N)
        return losses.sampled_reverse_kl_loss(s_BL, scored, mask_BL, gamma=stage.gamma)
    return chunked.full_vocab_loss(FULL_VOCAB_LOSSES[stage.loss](stage), head, chunked.Head(teacher, frozen=True),
                                   h_NH, scored, rows)


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
             accelerator=None, chunk: bool | None = None) -> dict[str, float]:
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

    `chunk` (default: whenever the student's head can be called alone, i.e. not sharded) computes the loss from
    hidden states `logits_budget_mb` at a time (chunked.py): same loss and gradients, no (B, L, V) tensor.
    """
    t_step = time.perf_counter()
    world = accelerator.num_processes if accelerator is not None else 1
    mask_BL, tokens_BL = rollouts.response_mask_BL, rollouts.tokens_BL
    L = mask_BL.shape[1]
    n_tok = int(distributed.all_sum(float(mask_BL.sum()))) if world > 1 else int(mask_BL.sum())  # all ranks' tokens
    config = getattr(student, "module", student).config
    mb = stage.micro_batch_size or auto_micro_batch_size(len(rollouts), L, config.vocab_size, stage.logits_budget_mb)
    starts = list(range(0, len(rollouts), mb))
    n_backward = len(starts) + (replay_batch is not None)
    # this rank's share of the step's sums; summed over the ranks below
    sums = {"distill_loss": 0.0, "rollouts": float(len(rollouts)), "truncated": float(rollouts.truncated_B.sum())}
    times: dict[str, float] = {}
    optimizer.zero_grad(set_to_none=True)
    chunk = chunked.can_chunk(student) if chunk is None else chunk
    copies = chunked.SAMPLED_COPIES if stage.loss == "sampled" else chunked.CHUNK_COPIES
    rows = chunked.rows_per_chunk(config.vocab_size, stage.logits_budget_mb, copies)
    for k, i in enumerate(starts):
        part, part_tokens_BL, part_mask_BL = rollouts[i:i + mb], tokens_BL[i:i + mb], mask_BL[i:i + mb]
        share = float(part_mask_BL.sum()) / max(n_tok, 1)  # of all ranks' tokens
        with timed("time_teacher_s", times):
            scored = _teacher_scores(stage, teacher, part, part_tokens_BL, part_mask_BL, rows, chunk)
        with _grad_sync(accelerator, student, last=k == n_backward - 1):  # DDP decides this at forward time
            if chunk:
                loss, stats = chunked_divergence(stage, student, teacher, part, part_tokens_BL, part_mask_BL,
                                                 scored, rows)
            else:
                s_logits_BLV = response_logits(student, part.ids_BT, part.attention_BT, part.positions_BT, L)
                loss, stats = divergence(stage, s_logits_BLV, scored, part_tokens_BL, part_mask_BL)
                del s_logits_BLV
            _backward(accelerator, loss * share * world)
        sums["distill_loss"] += loss.item() * share
        for key, v in stats.items():
            if key != "num_tokens":
                sums[key] = sums.get(key, 0.0) + float(v) * share
        del scored
    if replay_batch is not None:
        r_ids, r_labels, r_attn = replay_batch
        r_loss, _ = losses.lm_loss(student(input_ids=r_ids, attention_mask=r_attn).logits, r_labels)
        _backward(accelerator, stage.replay.weight * r_loss)  # the step's last backward: synced
        sums["replay_loss"] = r_loss.item() / world  # the mean over ranks once summed
    totals = distributed.sum_over_ranks(sums) if world > 1 else sums
    loss = totals["distill_loss"] + stage.replay.weight * totals.get("replay_loss", 0.0)
    if not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss(loss)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    clip = accelerator.clip_grad_norm_ if accelerator is not None else torch.nn.utils.clip_grad_norm_
    grad_norm = clip(params, stage.max_grad_norm)
    lr = optimizer.param_groups[0]["lr"]  # the rate this update uses
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    n = totals["rollouts"]
    return {"loss": loss, "distill_loss": totals["distill_loss"],
            **({"replay_loss": totals["replay_loss"]} if "replay_loss" in totals else {}),
            "teacher_kl": totals.get("reverse_kl", 0.0), "student_entropy": totals.get("student_entropy", 0.0),
            **{k: totals[k] for k in ("forward_kl", "teacher_entropy") if k in totals},
            "response_len": n_tok / n, "truncation_rate": totals["truncated"] / n, "tokens_sampled": n_tok,
            "grad_norm": float(grad_norm), "lr": lr, "micro_batch_size": mb,
            "time_teacher_s": times.get("time_teacher_s", 0.0),
            "time_student_s": time.perf_counter() - t_step - times.get("time_teacher_s", 0.0)}


def _grad_sync(accelerator, model, *, last: bool):
    """Gradients are all-reduced on the step's last backward only (the others accumulate locally)."""
    return contextlib.nullcontext() if accelerator is None or last else accelerator.no_sync(model)


def _backward(accelerator, loss: torch.Tensor) -> None:
    loss.backward() if accelerator is None else accelerator.backward(loss)


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
    model, tok, tmpl_kw = ctx.model, ctx.tokenizer, ctx.chat_template_kwargs
    chat_prompts, doc_prompts = load_prompts(stage)
    replay = _replay_examples(stage, ctx)
    world, rank, writer = distributed.world_size(), distributed.rank(), distributed.is_main()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=stage.learning_rate, weight_decay=stage.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(i, stage))
    accelerator, trained = _accelerator(stage, world), model
    if world > 1:  # DDP, or FSDP2 / ZeRO-3 as the accelerate config says; the scheduler stays ours (steps once)
        trained, optimizer = accelerator.prepare(model, optimizer)
        model = accelerator.unwrap_model(trained)  # generation, evals and checkpoints use the plain module
    start = 0
    if ctx.resume_from is not None:  # every rank, after prepare: a sharded (FSDP2) model takes its shards
        start = checkpoints.load_training_state(ctx.resume_from, model, optimizer, scheduler)
    sampler = make_sampler(stage, model, tok, accelerator, tmpl_kw)
    model.train()
    cadence = EvalCadence(stage, ctx.evaluate, ctx.sink)
    last_good = ctx.resume_from
    bar = tqdm(total=stage.steps, initial=start, desc=f"opd {stage.name}", unit="step",
               disable=not ctx.progress or not writer)
    with _teacher_context(stage, ctx, model) as teacher:
        for step in range(start + 1, stage.steps + 1):
            t0 = time.time()
            rng = random.Random(ctx.seed * 1_000_003 + step)  # prompt choice depends only on (seed, step)
            prompts = pick_prompts(chat_prompts, doc_prompts, stage.prompts_per_step, stage.doc_prompt_fraction, rng)
            if world > 1:  # each rank samples its share; seeded by (seed, step, rank), so a resume samples the same
                prompts = distributed.shard_list(prompts)
                torch.manual_seed((ctx.seed * 1_000_003 + step) * 1_009 + rank)

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
                                    f"{last_good or 'none (stage start)'}; lower {ctx.where}.lr or check the "
                                    "teacher") from None
            except ModelError as e:  # a served teacher that stopped answering
                raise TrainingError(f"stage {stage.name}, step {step}: {e}; last good checkpoint: "
                                    f"{last_good or 'none (stage start)'}; when the teacher answers again, rerun "
                                    "with --resume") from None
            sampler.weights_changed()

            # 6. log
            ctx.sink.add_counts(tokens=row["tokens_sampled"], samples=stage.prompts_per_step * stage.samples_per_prompt)
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
                if writer:
                    checkpoints.prune(ctx.stage_dir, stage.save_total_limit)
                distributed.barrier()
    bar.close()
    return StageResult(model=model, results=cadence.final(model), steps=stage.steps)


@contextlib.contextmanager
def _teacher_context(stage: OPDStage, ctx: StageContext, model):
    """The stage's teacher: the adapter-disabled student, a frozen snapshot, or a served teacher (checked first)."""
    if stage.teacher.kind == "served":
        yield _served_teacher(stage, ctx, model)
        return
    with models.teacher_view(model, _teacher(stage, ctx), ctx.start_ref.base, ctx.model_config) as teacher:
        yield teacher


def _teacher(stage: OPDStage, ctx: StageContext) -> models.ModelRef:
    """The teacher's weights; one that is not the student's own base must tokenize and template like the student."""
    ref = ctx.resolve(stage.teacher, "teacher")
    if ref.base != ctx.snapshots["base"].base or ref.adapter:
        teacher_tok = models.load_tokenizer(ref.adapter or ref.base, ctx.model_config)
        models.check_same_tokenization(ctx.tokenizer, teacher_tok, ctx.chat_template_kwargs,
                                       student=ctx.model_config.name, teacher=str(stage.teacher))
    return ref


def _served_teacher(stage: OPDStage, ctx: StageContext, model):
    """A client of the stage's teacher server, after its tokenizer check and self-test (teacher_client.py): probe
    sequences scored twice in different batches must agree, and agree with `teacher.reference` when one is given."""
    from continual_opd.teacher_client import ServedTeacher, local_sequence_logprobs

    cfg = stage.teacher
    client = ServedTeacher(cfg.url, cfg.model, timeout_s=cfg.timeout_s, max_retries=cfg.max_retries,
                           batch_size=cfg.batch_size, concurrency=cfg.concurrency, tokenizer=cfg.tokenizer)
    client.check_tokenizer(ctx.tokenizer, ctx.chat_template_kwargs, student=ctx.model_config.name)
    probes = _probe_sequences(ctx.tokenizer, load_prompts(stage)[0][:4], ctx.chat_template_kwargs)
    if cfg.reference is None:
        result = client.self_test(None, probes, cfg.tolerance)
    else:
        ref = ctx.resolve(cfg.reference, "teacher.reference")
        with models.teacher_view(model, ref, ctx.start_ref.base, ctx.model_config) as local:
            result = client.self_test(lambda seqs: local_sequence_logprobs(local, seqs), probes, cfg.tolerance)
    log.info("stage %s: teacher %s passed its self-test (%s)", stage.name, cfg,
             ", ".join(f"{k} {v:.3g}" for k, v in result.items()))
    return client


def _probe_sequences(tokenizer, prompts: list, chat_template_kwargs: dict) -> list[list[int]]:
    """Token ids of a few of the stage's prompts, each with a fixed answer, and of the tokenizer probes."""
    answer = "Sure. Here is a short answer, in two sentences: 42 is the number. Done."
    texts = [t + answer for t in render_prompts(tokenizer, prompts, chat_template_kwargs)]
    texts += [tokenizer.apply_chat_template(m, tokenize=False, **chat_template_kwargs) for m in models.PROBE_MESSAGES]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def _replay_examples(stage: OPDStage, ctx: StageContext) -> list | None:
    """SFT examples for the whole stage, `replay.batch_size` per step in order (None: no replay)."""
    if stage.replay.batch_size == 0:
        return None
    pools = build_pools(stage.replay.data, ctx.tokenizer, stage.replay.max_seq_len, ctx.chat_template_kwargs)
    return build_mixture(pools, stage.replay.data.mix, stage.steps * stage.replay.batch_size, seed=ctx.seed).examples


def _accelerator(stage: OPDStage, world: int):
    """accelerate's Accelerator for a multi-process run or the vLLM sampler; None otherwise."""
    if world == 1 and stage.sampler != "vllm":
        return None
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, is_initialized

    # SFT's Trainer may have set up accelerate already (e.g. bf16): join that state rather than contradict it
    mp = AcceleratorState().mixed_precision if is_initialized() else None
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mp)
