"""Losses for on-policy distillation (OPD): pure functions of tensors, no models, no state.

Shapes are in the names, in the package's notation (continual_opd/__init__.py): B = batch, L = response positions,
V = vocabulary, N = masked positions.
Every function upcasts half precision to fp32 (fp64 stays fp64), returns ``(loss, stats)`` where ``loss`` is a
scalar with a gradient and ``stats`` is a dict of detached 0-dim fp32 tensors (call ``.item()`` when logging), and
treats ``mask_BL`` as binary: positions with mask 0 contribute nothing to the loss, its gradient or the stats, whatever
their values (even inf/nan). A mask with no ones gives loss 0 (still connected to the graph) and zero stats.

Notation: for a sampled response token x_t in context c_t,
    s_t = log p_student(x_t | c_t),   q_t = log p_teacher(x_t | c_t),   m_t = 1 on response tokens.

    sampled_reverse_kl_loss   the reference method: needs only s_t, q_t of the sampled tokens (REINFORCE-style).
    full_reverse_kl_loss      exact KL(p_s || p_t) summed over the vocabulary at each position.
    generalized_jsd_loss      GKD family: beta=0 forward KL(p_t || p_s), beta=1 reverse KL, continuous in between.
    forward_kl_loss           generalized_jsd_loss at beta=0.
    lm_loss                   next-token cross-entropy, e.g. for replaying SFT examples during OPD.
    gather_token_logprobs     logits -> log-probs of given tokens (to build s_t and q_t).

Why not TRL's functions: TRL 1.16 computes the same divergences (`trl/experimental/gkd/gkd_trainer.py`
`GKDTrainer.generalized_jsd_loss`, and `trl/kernels/chunked_divergence.py` behind `DistillationTrainer`), with the
same beta convention (mixture m = (1 - beta) p_s + beta p_t; beta=1 is KL(p_s || p_t)). Their beta=0 and beta=1 are
special-cased KLs while 0 < beta < 1 is the unscaled JSD, which tends to 0 at both ends, so the loss jumps at the
endpoints. GKDTrainer lives in `trl.experimental` (unstable import path, warns on import) and the chunked kernel takes
hidden states + lm_head weights, not logits. So the few lines are written here, and tests/test_losses.py checks them
against both TRL implementations.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

Stats = dict[str, torch.Tensor]
_LOGP_FLOOR = -1e4  # log-prob floor for full-vocabulary divergences, see _masked_logprobs


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32; fp32/fp64 unchanged. Log-softmax and exp of differences need the precision."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _zero_like_stat(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=torch.float32, device=x.device)


def _stat(x: torch.Tensor) -> torch.Tensor:
    return x.detach().float()


def gather_token_logprobs(logits_BLV: torch.Tensor, tokens_BL: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[token] at every position, in fp32: (B, L, V), (B, L) -> (B, L).

    Align before calling: ``logits_BLV[:, t]`` must be the distribution that produced ``tokens_BL[:, t]`` (for a causal
    LM, the logits of position P + t - 1 of the full sequence). Use the sampling temperature for the sampler's
    log-probs. log p(x) = z_x - logsumexp(z), which avoids keeping a full (B, L, V) log-softmax for the backward pass.
    """
    logits_BLV = _upcast(logits_BLV)
    if temperature != 1.0:  # (a division at 1 would only copy the logits)
        logits_BLV = logits_BLV / temperature
    picked_BL = logits_BLV.gather(-1, tokens_BL.unsqueeze(-1)).squeeze(-1)
    return picked_BL - torch.logsumexp(logits_BLV, dim=-1)


# --------------------------------------------------------------------------------------------------------------------
# Sampled-token reverse KL (the reference method)
# --------------------------------------------------------------------------------------------------------------------


def _discounted_returns(reward_BL: torch.Tensor, gamma: float) -> torch.Tensor:
    """A_t = sum_{k>=0} gamma^k r_{t+k}, within each row (reward_BL is already zero where the mask is 0).

    Masked positions carry no reward but still count as a time step; with right-padded responses (the usual case)
    the masked positions all come after the last response token, so this is the discounted reward-to-go of the
    response. Computed as A_t = r_t + gamma * A_{t+1}, a loop over L on (B,) tensors.
    """
    returns_BL = torch.empty_like(reward_BL)
    running_B = torch.zeros_like(reward_BL[:, 0])
    for t in range(reward_BL.shape[1] - 1, -1, -1):
        running_B = reward_BL[:, t] + gamma * running_B
        returns_BL[:, t] = running_B
    return returns_BL


def _normalize(per_token_BL: torch.Tensor, mask_BL: torch.Tensor, normalize: str) -> torch.Tensor:
    """Masked reduction of a (B, L) tensor that is already zero off the mask.

    "token":    sum_{b,t} x / sum_{b,t} m          every response token weighs the same (long responses weigh more).
    "sequence": mean over non-empty rows b of (sum_t x / sum_t m)   every response weighs the same.
    """
    if normalize == "token":
        return per_token_BL.sum() / mask_BL.sum().clamp(min=1)
    if normalize == "sequence":
        tokens_B = mask_BL.sum(dim=1)
        nonempty_B = tokens_B > 0
        per_seq_B = per_token_BL.sum(dim=1) / tokens_B.clamp(min=1)
        return (per_seq_B * nonempty_B).sum() / nonempty_B.sum().clamp(min=1)
    raise ValueError(f"normalize={normalize!r}: expected 'token' or 'sequence'")


_SAMPLED_STATS = (
    "reverse_kl", "student_entropy", "student_logprob", "teacher_logprob",
    "advantage", "ratio_mean", "ratio_max", "num_tokens",
)


def sampled_reverse_kl_loss(
    student_logprobs_BL: torch.Tensor,
    teacher_logprobs_BL: torch.Tensor,
    mask_BL: torch.Tensor,
    *,
    sampler_logprobs_BL: torch.Tensor | None = None,
    gamma: float = 0.0,
    normalize: Literal["token", "sequence"] = "token",
) -> tuple[torch.Tensor, Stats]:
    """Sampled-token reverse KL as a policy-gradient loss (per-token normalization by default).

    Inputs are log-probs of the *sampled* tokens: s_t (student, with gradient), q_t (teacher, no gradient used),
    and optionally s_t^sampler, the log-prob under the policy that sampled them (e.g. vLLM, or the student before
    the last update). Math, with m_t the mask:

        reward      r_t = -(s_t - q_t)                          detached; sum_t (s_t - q_t) estimates KL(p_s || p_t)
        advantage   A_t = r_t                  if gamma == 0    (discount 0, the reference method)
                    A_t = sum_k gamma^k r_{t+k}  if gamma > 0   (reward-to-go within the row; gamma=1 gives the
                                                                 exact score-function gradient of the sequence KL)
        ratio       rho_t = exp(s_t - s_t^sampler)              1 on-policy (sampler defaults to s_t.detach())
        loss        = -sum_t m_t * rho_t * A_t / normalizer     "token": / sum m ; "sequence": mean of row means

    Gradient: d(rho_t A_t)/d theta = rho_t A_t grad s_t, so on-policy the expected gradient is
    E[(s - q) grad s] = grad KL(p_s || p_t) for one token (unbiased; tests check it by Monte Carlo).
    On-policy with gamma=0 the loss value equals the sampled reverse-KL estimate. The ratio is not clipped: keep the
    sampler close to the student (regenerate every step) or clip upstream.

    stats: reverse_kl (mean of s - q over masked tokens, the sampled KL per token), student_entropy (mean of -s, an
    unbiased per-token entropy estimate on-policy), student_logprob, teacher_logprob, advantage (mean A), ratio_mean,
    ratio_max, num_tokens.
    """
    if gamma < 0 or gamma > 1:
        raise ValueError(f"gamma={gamma}: expected 0 <= gamma <= 1")
    on_BL = mask_BL > 0
    # torch.where, not multiplication: a masked position holding -inf/nan must not turn into nan
    s_BL = torch.where(on_BL, _upcast(student_logprobs_BL), 0.0)
    m_BL = on_BL.to(s_BL.dtype)
    q_BL = torch.where(on_BL, _upcast(teacher_logprobs_BL).detach(), 0.0)
    if sampler_logprobs_BL is None:
        sampler_BL = s_BL.detach()
    else:
        sampler_BL = torch.where(on_BL, _upcast(sampler_logprobs_BL).detach(), 0.0)

    reward_BL = -(s_BL.detach() - q_BL)  # reverse KL = log p_student - log p_teacher; reward is its negative
    advantage_BL = reward_BL if gamma == 0 else _discounted_returns(reward_BL, gamma)
    ratio_BL = torch.exp(s_BL - sampler_BL)  # value 1 on-policy, gradient = grad s_t
    per_token_BL = torch.where(on_BL, -ratio_BL * advantage_BL, 0.0)
    loss = _normalize(per_token_BL, m_BL, normalize)

    n = m_BL.sum()
    if n == 0:
        return loss, {k: _zero_like_stat(s_BL) for k in _SAMPLED_STATS}
    with torch.no_grad():
        ratio_on = ratio_BL[on_BL]
        stats = {
            "reverse_kl": _stat((s_BL - q_BL).sum() / n),
            "student_entropy": _stat(-s_BL.sum() / n),
            "student_logprob": _stat(s_BL.sum() / n),
            "teacher_logprob": _stat(q_BL.sum() / n),
            "advantage": _stat(advantage_BL[on_BL].mean()),
            "ratio_mean": _stat(ratio_on.mean()),
            "ratio_max": _stat(ratio_on.max()),
            "num_tokens": _stat(n),
        }
    return loss, stats


# --------------------------------------------------------------------------------------------------------------------
# Full-vocabulary divergences
# --------------------------------------------------------------------------------------------------------------------


def _masked_logprobs(
    student_logits_BLV: torch.Tensor, teacher_logits_BLV: torch.Tensor, mask_BL: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep only masked positions (so padding/prompt logits can hold anything), upcast,
    log-softmax(z / temperature): (N, V).

    The teacher is detached: gradients flow to the student only.
    """
    if student_logits_BLV.shape != teacher_logits_BLV.shape:
        raise ValueError(
            f"student logits {tuple(student_logits_BLV.shape)} and teacher logits {tuple(teacher_logits_BLV.shape)} "
            "differ: full-vocabulary losses need the same (B, L, V); use sampled_reverse_kl_loss otherwise"
        )
    on_BL = mask_BL > 0
    V = student_logits_BLV.shape[-1]
    if bool(on_BL.all()):  # every position counts (e.g. a chunk of response positions): a view, not a copy
        s_NV, t_NV = student_logits_BLV.reshape(-1, V), teacher_logits_BLV.detach().reshape(-1, V)
    else:
        s_NV, t_NV = student_logits_BLV[on_BL], teacher_logits_BLV[on_BL].detach()
    scale = (lambda z: z) if temperature == 1.0 else (lambda z: z / temperature)
    logp_s_NV = F.log_softmax(scale(_upcast(s_NV)), dim=-1)
    logp_t_NV = F.log_softmax(scale(_upcast(t_NV)), dim=-1)
    # A -inf logit (a banned token) gives log p = -inf, and -inf - (-inf) = nan in the divergences and their
    # gradients. exp(-1e4) is 0 in any float type, so the floor changes no probability and keeps everything finite.
    return logp_s_NV.clamp(min=_LOGP_FLOOR), logp_t_NV.clamp(min=_LOGP_FLOOR)


def _kl_N(logp_a_NV: torch.Tensor, logp_b_NV: torch.Tensor) -> torch.Tensor:
    """KL(a || b) = sum_v a(v) (log a(v) - log b(v)) per row; a term with a(v) = 0 is 0.

    The where() sits inside the product so that a -inf logit (a(v) = 0) gives a 0 term *and* a 0 gradient
    (0 * (-inf) would be nan in the backward pass otherwise).
    """
    p_a_NV = logp_a_NV.exp()
    return (p_a_NV * torch.where(p_a_NV > 0, logp_a_NV - logp_b_NV, 0.0)).sum(-1)


def _entropy_N(logp_NV: torch.Tensor) -> torch.Tensor:
    """H(p) = -sum_v p(v) log p(v) per row (0 log 0 = 0)."""
    p_NV = logp_NV.exp()
    return -(p_NV * torch.where(p_NV > 0, logp_NV, 0.0)).sum(-1)


def _full_vocab_stats(logp_s_NV: torch.Tensor, logp_t_NV: torch.Tensor) -> Stats:
    """Per-token means (detached): both KLs and both entropies, whatever loss is being optimized."""
    n = logp_s_NV.shape[0]
    if n == 0:
        zero = _zero_like_stat(logp_s_NV)
        return {k: zero for k in ("reverse_kl", "forward_kl", "student_entropy", "teacher_entropy", "num_tokens")}
    with torch.no_grad():
        return {
            "reverse_kl": _stat(_kl_N(logp_s_NV, logp_t_NV).mean()),
            "forward_kl": _stat(_kl_N(logp_t_NV, logp_s_NV).mean()),
            "student_entropy": _stat(_entropy_N(logp_s_NV).mean()),
            "teacher_entropy": _stat(_entropy_N(logp_t_NV).mean()),
            "num_tokens": torch.tensor(float(n), device=logp_s_NV.device),
        }


def _mean_N(per_token_N: torch.Tensor) -> torch.Tensor:
    """Mean over masked positions; 0 (with a gradient path) when there are none."""
    return per_token_N.sum() / max(per_token_N.shape[0], 1)


def full_reverse_kl_loss(
    student_logits_BLV: torch.Tensor,
    teacher_logits_BLV: torch.Tensor,
    mask_BL: torch.Tensor,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, Stats]:
    """Exact reverse KL, mean over masked positions of sum_v p_s(v) (log p_s(v) - log p_t(v)).

    p = softmax(logits / temperature). Same value as TRL's beta=1 (tests check it against TRL). Gradient w.r.t. the
    student logits z at one position: p_s * (log p_s - log p_t - KL) / temperature; zero when p_s = p_t.
    stats: reverse_kl, forward_kl, student_entropy, teacher_entropy, num_tokens (per-token means, detached).
    """
    logp_s_NV, logp_t_NV = _masked_logprobs(student_logits_BLV, teacher_logits_BLV, mask_BL, temperature)
    loss = _mean_N(_kl_N(logp_s_NV, logp_t_NV))
    return loss, _full_vocab_stats(logp_s_NV, logp_t_NV)


def generalized_jsd_loss(
    student_logits_BLV: torch.Tensor,
    teacher_logits_BLV: torch.Tensor,
    mask_BL: torch.Tensor,
    beta: float,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, Stats]:
    """GKD's generalized JSD, rescaled so that it is continuous in beta on [0, 1]; mean over masked positions.

    With TRL's convention, mixture m = (1 - beta) p_s + beta p_t and

        JSD_beta = beta KL(p_t || m) + (1 - beta) KL(p_s || m)          (TRL/GKD loss for 0 < beta < 1)

    JSD_beta -> 0 at both ends (beta KL(p_t||p_s) + O(beta^2) near 0, (1-beta) KL(p_s||p_t) + O((1-beta)^2) near 1),
    which is why TRL's loss jumps at beta = 0 and 1. This loss is

        beta = 0:       KL(p_t || p_s)                  forward KL (mode covering)
        0 < beta < 1:   JSD_beta / (beta (1 - beta))    -> forward KL as beta -> 0, reverse KL as beta -> 1
        beta = 1:       KL(p_s || p_t)                  reverse KL (mode seeking), = full_reverse_kl_loss

    Note the scale: at beta = 0.5 the loss is 4x the standard JSD (so is its gradient); stats["jsd"] is the unscaled
    JSD_beta (TRL's value). Near the endpoints JSD_beta is a small difference of logs: in fp32 keep
    1e-3 <= beta <= 1 - 1e-3 or use the endpoint itself. stats: loss, jsd, plus those of full_reverse_kl_loss.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta}: expected 0 <= beta <= 1 (0 = forward KL, 1 = reverse KL)")
    logp_s_NV, logp_t_NV = _masked_logprobs(student_logits_BLV, teacher_logits_BLV, mask_BL, temperature)
    if beta == 0.0:
        jsd_N = per_token_N = _kl_N(logp_t_NV, logp_s_NV)
    elif beta == 1.0:
        jsd_N = per_token_N = _kl_N(logp_s_NV, logp_t_NV)
    else:
        # log m = logsumexp(log p_s + log(1 - beta), log p_t + log beta), stable for any logits
        logm_NV = torch.logaddexp(logp_s_NV + math.log1p(-beta), logp_t_NV + math.log(beta))
        jsd_N = beta * _kl_N(logp_t_NV, logm_NV) + (1 - beta) * _kl_N(logp_s_NV, logm_NV)
        per_token_N = jsd_N / (beta * (1 - beta))
    loss = _mean_N(per_token_N)
    stats = _full_vocab_stats(logp_s_NV, logp_t_NV)
    stats["loss"] = _stat(loss)
    stats["jsd"] = _stat(_mean_N(jsd_N))
    return loss, stats


def forward_kl_loss(
    student_logits_BLV: torch.Tensor,
    teacher_logits_BLV: torch.Tensor,
    mask_BL: torch.Tensor,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, Stats]:
    """Forward KL(p_t || p_s) = sum_v p_t(v) (log p_t(v) - log p_s(v)), mean over masked positions (beta = 0).

    On the student's own samples this is "supervised" distillation of the teacher's full distribution at states the
    student visits; its gradient w.r.t. the student logits is (p_s - p_t) / temperature.
    """
    return generalized_jsd_loss(student_logits_BLV, teacher_logits_BLV, mask_BL, beta=0.0, temperature=temperature)


# --------------------------------------------------------------------------------------------------------------------
# Language-model loss (replay)
# --------------------------------------------------------------------------------------------------------------------


def lm_loss(logits_BLV: torch.Tensor, labels_BL: torch.Tensor, ignore_index: int = -100) -> tuple[torch.Tensor, Stats]:
    """Next-token cross-entropy with the Hugging Face convention: labels are the input ids, unshifted.

    logits_BLV[:, t] predicts labels_BL[:, t + 1]; positions whose label is ``ignore_index`` (prompt, padding) are
    skipped. Mean over predicted tokens, in fp32: equals ``model(input_ids, labels=labels).loss``.
    stats: lm_loss, student_entropy, token_accuracy, num_tokens.
    """
    on_BL = labels_BL[:, 1:] != ignore_index  # shift: position t predicts label t + 1
    logits_NV = _upcast(logits_BLV[:, :-1][on_BL])
    targets_N = labels_BL[:, 1:][on_BL]
    n = targets_N.numel()
    if n == 0:
        zero = _zero_like_stat(logits_BLV)
        return logits_NV.sum() * 0.0, {k: zero for k in ("lm_loss", "student_entropy", "token_accuracy", "num_tokens")}
    loss = F.cross_entropy(logits_NV, targets_N, reduction="mean")
    with torch.no_grad():
        logp_NV = F.log_softmax(logits_NV, dim=-1)
        stats = {
            "lm_loss": _stat(loss),
            "student_entropy": _stat(_entropy_N(logp_NV).mean()),
            "token_accuracy": _stat((logits_NV.argmax(-1) == targets_N).float().mean()),
            "num_tokens": torch.tensor(float(n), device=logits_NV.device),
        }
    return loss, stats
