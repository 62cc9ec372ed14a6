"""Divergences in bounded memory: logits are made chunk by chunk from the models' final hidden states.

A full-vocabulary loss on (B, L, V) logits keeps about a dozen such tensors alive at its peak (student and teacher
logits, their log-softmaxes, probabilities, the gradient). At Qwen3's 151,936-token vocabulary and 1–8k-token answers
one of them is 0.6–5 GB per rollout. Here the models return their final hidden states (N, H) of the N response
positions instead (the head computes one position only), and the output projection runs over `rows` positions at a
time, so at most one chunk of (rows x V) logits per model is alive. Gradients are the same as the unchunked loss's:

    full-vocabulary losses (`ChunkedFullVocab`)  each chunk's loss and its gradient w.r.t. the chunk's hidden states
        (and the head's trainable parameters) are computed in the forward pass and kept (N x H, plus the head's size);
        backward only scales them. No logits are recomputed.
    sampled-token log-probs (`ChunkedTokenLogprobs`)  the forward gives s_t = log p(x_t) chunk by chunk and keeps
        d s_t / d h_t (N x H); backward scales it by d loss / d s_t (a trainable head recomputes each chunk's logits
        instead). The loss on (B, L) log-probs (discount, ratios, normalization) stays
        `losses.sampled_reverse_kl_loss`, unchanged.

Each chunk's loss is one of losses.py's functions, so the math is written (and tested) once. Written by hand because
TRL's chunked kernel (`trl/kernels/chunked_divergence.py`) and Liger's fused losses take one weight matrix for both
models: they cannot apply a LoRA-wrapped head, a head under `disable_adapter`, or a teacher with its own head, and
they have no sampled-token estimator.
"""

from __future__ import annotations

import contextlib

import torch

from continual_opd.stages import losses

# A chunk's peak RSS in (rows x V) fp32 tensors, measured with the full-vocabulary losses (bench/bench_memory.py:
# 598 MiB over 36 rows at V = 151,936, i.e. 27): student and teacher logits, both log-softmaxes, the probabilities
# and products autograd keeps, the gradient, and the allocator's slack.
CHUNK_COPIES = 28
# The same for the sampled-token log-probs (the logits, the log-sum-exp's temporaries and the softmax of the backward):
# 13 measured (161 MiB over 15 rows, 69 MiB over 3, at V = 151,936). Fewer copies give larger chunks, and small
# chunks are slow (at 3 rows a step took 4.6x as long as at 15).
SAMPLED_COPIES = 14


def rows_per_chunk(vocab_size: int, budget_mb: float, copies: int = CHUNK_COPIES) -> int:
    """Response positions per chunk such that `copies` (rows x vocab) fp32 tensors fit in `budget_mb` MiB (>= 1).

    E.g. the 256 MiB default gives 48 rows at SmolLM2's 49,152 tokens and 15 at Qwen3's 151,936 for the
    full-vocabulary losses, 97 and 31 for the sampled-token log-probs (`copies=SAMPLED_COPIES`)."""
    return max(1, int(budget_mb * 2**20 // (copies * vocab_size * 4)))


def unwrap(model):
    """The module that owns `get_decoder` / `get_output_embeddings` (DDP's `.module`, the teacher's PEFT model)."""
    model = getattr(model, "module", model)
    return getattr(model, "peft_model", model)


def can_chunk(model) -> bool:
    """Chunking needs the decoder's output and a head that can be called alone; a sharded head (FSDP, ZeRO-3) is
    gathered only inside the model's own forward, so sharded students use the unchunked losses."""
    from continual_opd import distributed

    m = unwrap(model)
    return (not distributed.is_sharded(m) and callable(getattr(m, "get_decoder", None))
            and m.get_output_embeddings() is not None)


class Head:
    """The output projection of `model` as a function of hidden states: (N, H) -> (N, V), including a final logit
    soft-cap (Gemma). For the adapter-disabled teacher the head runs with the adapters disabled too (a LoRA on
    `lm_head` is the student's, not the teacher's)."""

    def __init__(self, model, *, frozen: bool = False):
        self.module = unwrap(model).get_output_embeddings()
        self.cap = getattr(unwrap(model).config, "final_logit_softcapping", None)
        self.frozen = frozen
        self.disable = (lambda: unwrap(model).disable_adapter()) if hasattr(model, "peft_model") else None

    @property
    def params(self) -> list[torch.Tensor]:
        return [] if self.frozen else [p for p in self.module.parameters() if p.requires_grad]

    def __call__(self, h_NH: torch.Tensor) -> torch.Tensor:
        with self.disable() if self.disable else contextlib.nullcontext():
            z = self.module(h_NH)
        return torch.tanh(z / self.cap) * self.cap if self.cap else z


def response_hidden(model, ids_BT, attn_BT, pos_BT, L: int) -> torch.Tensor:
    """Final hidden states (after the last norm) at the positions that predict the L response tokens:
    (B, L, H), the inputs `response_logits` would give to the head. The head itself runs on one position only."""
    captured = {}

    def keep(_module, _args, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    handle = unwrap(model).get_decoder().register_forward_hook(keep)
    try:
        model(input_ids=ids_BT, attention_mask=attn_BT, position_ids=pos_BT, logits_to_keep=1)
    finally:
        handle.remove()
    return captured["h"][:, -(L + 1):-1]


def _loss_dtype(h: torch.Tensor) -> torch.dtype:
    return torch.float32 if h.dtype in (torch.float16, torch.bfloat16) else h.dtype  # as losses._upcast


def _chunks(n: int, rows: int):
    return [slice(i, min(i + rows, n)) for i in range(0, n, rows)]


@torch.no_grad()
def token_logprobs_nograd(head: Head, h_NH: torch.Tensor, tokens_N: torch.Tensor, rows: int) -> torch.Tensor:
    """log p(tokens) from hidden states, chunk by chunk, without a graph (the teacher's q_t): (N, H) -> (N,)."""
    out = torch.empty(h_NH.shape[0], dtype=_loss_dtype(h_NH), device=h_NH.device)
    for c in _chunks(h_NH.shape[0], rows):
        out[c] = losses.gather_token_logprobs(head(h_NH[c])[None], tokens_N[c][None])[0]
    return out


class ChunkedTokenLogprobs(torch.autograd.Function):
    """s_N = log softmax(head(h_NH))[tokens_N], differentiable w.r.t. h_NH and the head's trainable parameters.

    s_t depends on h_t alone, so when the head has nothing to train (a LoRA student whose adapters leave lm_head
    alone) the forward keeps each position's gradient d s_t / d h_t (N x H) and the backward only scales it: no
    logits are recomputed. A trainable head (full fine-tuning, a LoRA on lm_head) needs sum_t g_t d s_t / d W, which
    depends on the upstream g_t, so then the backward recomputes each chunk's logits once."""

    @staticmethod
    def forward(ctx, head: Head, rows: int, h_NH: torch.Tensor, tokens_N: torch.Tensor, *params):
        ctx.head, ctx.rows = head, rows
        if params:
            ctx.save_for_backward(h_NH, tokens_N)
            ctx.jacobian = False
            return token_logprobs_nograd(head, h_NH.detach(), tokens_N, rows)
        s_N = torch.empty(h_NH.shape[0], dtype=_loss_dtype(h_NH), device=h_NH.device)
        ds_dh_NH = torch.empty_like(h_NH)
        for c in _chunks(h_NH.shape[0], rows):
            with torch.enable_grad():
                h_c = h_NH[c].detach().requires_grad_(True)
                s_c = losses.gather_token_logprobs(head(h_c)[None], tokens_N[c][None])[0]
                (ds_dh_NH[c],) = torch.autograd.grad(s_c.sum(), [h_c])  # row t of the sum's gradient: d s_t / d h_t
            s_N[c] = s_c.detach()
        ctx.save_for_backward(ds_dh_NH)
        ctx.jacobian = True
        return s_N

    @staticmethod
    def backward(ctx, grad_N):
        if ctx.jacobian:
            (ds_dh_NH,) = ctx.saved_tensors
            return (None, None, ds_dh_NH * grad_N[:, None].to(ds_dh_NH.dtype), None)
        h_NH, tokens_N = ctx.saved_tensors
        params = ctx.head.params
        grad_h = torch.zeros_like(h_NH)
        grad_p = [torch.zeros_like(p) for p in params]
        for c in _chunks(h_NH.shape[0], ctx.rows):
            with torch.enable_grad():
                h_c = h_NH[c].detach().requires_grad_(True)
                s_c = losses.gather_token_logprobs(ctx.head(h_c)[None], tokens_N[c][None])[0]
                grads = torch.autograd.grad(s_c, [h_c, *params], grad_outputs=grad_N[c].to(s_c.dtype))
            grad_h[c] = grads[0]
            for acc, g in zip(grad_p, grads[1:]):
                acc += g
        return (None, None, grad_h, None, *grad_p)


class ChunkedFullVocab(torch.autograd.Function):
    """mean over N positions of `loss_fn(student logits, teacher logits)`, chunk by chunk; the loss's stats come back
    through `stats_out` (per-token means, like the unchunked loss's)."""

    @staticmethod
    def forward(ctx, loss_fn, head: Head, teacher_head: Head, rows: int, stats_out: dict,
                h_NH: torch.Tensor, h_teacher_NH: torch.Tensor, *params):
        n = h_NH.shape[0]
        grad_h = torch.zeros_like(h_NH)
        grad_p = [torch.zeros_like(p) for p in params]
        total = torch.zeros((), dtype=_loss_dtype(h_NH), device=h_NH.device)
        for c in _chunks(n, rows):
            with torch.no_grad():
                t_logits = teacher_head(h_teacher_NH[c])[None]
            with torch.enable_grad():
                h_c = h_NH[c].detach().requires_grad_(True)
                s_logits = head(h_c)[None]
                mask = torch.ones(s_logits.shape[:2], dtype=torch.bool, device=h_NH.device)
                loss_c, stats = loss_fn(s_logits, t_logits, mask)
                weight = (c.stop - c.start) / n  # the chunk's share of the mean over positions
                grads = torch.autograd.grad(loss_c * weight, [h_c, *params])
            del s_logits, t_logits
            total += loss_c.detach() * weight
            grad_h[c] = grads[0]
            for acc, g in zip(grad_p, grads[1:]):
                acc += g
            for key, v in stats.items():
                stats_out[key] = stats_out.get(key, 0.0) + (v if key == "num_tokens" else v * weight)
        ctx.save_for_backward(grad_h, *grad_p)
        return total

    @staticmethod
    def backward(ctx, grad):
        grad_h, *grad_p = ctx.saved_tensors
        return (None, None, None, None, None, grad_h * grad, None, *(g * grad for g in grad_p))


def full_vocab_loss(loss_fn, head: Head, teacher_head: Head, h_NH, h_teacher_NH, rows: int):
    """(loss, stats) of a full-vocabulary divergence over N positions given both models' hidden states."""
    stats: dict = {}
    if h_NH.shape[0] == 0:  # no response token: loss 0, still connected to the graph
        return h_NH.sum() * 0.0, {"reverse_kl": torch.zeros(()), "num_tokens": torch.zeros(())}
    loss = ChunkedFullVocab.apply(loss_fn, head, teacher_head, rows, stats, h_NH, h_teacher_NH.detach(), *head.params)
    return loss, {k: torch.as_tensor(v).detach().float() for k, v in stats.items()}


def token_logprobs(head: Head, h_NH: torch.Tensor, tokens_N: torch.Tensor, rows: int) -> torch.Tensor:
    """Differentiable log p(tokens) over N positions (the student's s_t): (N, H), (N,) -> (N,)."""
    return ChunkedTokenLogprobs.apply(head, rows, h_NH, tokens_N, *head.params)
