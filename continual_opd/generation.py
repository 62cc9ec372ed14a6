"""Batched chat generation for evals and sampling: chat template → left-padded batches → model.generate.

One function every suite uses, so that "what the model answered" means the same thing everywhere:
the prompt is rendered with the tokenizer's chat template (generation prompt added), decoding is
greedy unless asked otherwise, generation stops at EOS, and only the new tokens are decoded.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from continual_opd import distributed

from continual_opd.errors import ModelError

if TYPE_CHECKING:
    from continual_opd.engines import Engine

Message = dict[str, str]
Prompt = str | Sequence[Message]


def _as_messages(prompt: Prompt) -> list[Message]:
    """A plain string is one user turn; a message list is used as is."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


def render_prompts(tokenizer, prompts: Sequence[Prompt],
                   chat_template_kwargs: dict[str, Any] | None = None) -> list[str]:
    """Render prompts to text with the chat template and the assistant generation prompt appended.

    `chat_template_kwargs` go to the template (e.g. {"enable_thinking": False} for Qwen3).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__} has no chat template; "
            "use an instruction-tuned (chat) model or set tokenizer.chat_template"
        )
    kwargs = dict(chat_template_kwargs or {})
    return [
        tokenizer.apply_chat_template(_as_messages(p), add_generation_prompt=True, tokenize=False, **kwargs)
        for p in prompts
    ]


def _device(model) -> torch.device:
    return getattr(model, "device", None) or next(model.parameters()).device


@contextlib.contextmanager
def generation_mode(model, tokenizer) -> Iterator[None]:
    """Eval mode + left padding for the duration; both restored after, even on error.

    Left padding keeps every prompt's last token at the same position, which decoder-only
    generate needs so that new tokens follow the prompt directly (right padding would put
    pad tokens between prompt and answer).
    """
    was_training = model.training
    old_side, old_pad = tokenizer.padding_side, tokenizer.pad_token
    model.eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # pad with EOS; attention_mask hides it anyway
        if tokenizer.eos_token is None:
            raise ModelError("tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield
    finally:
        tokenizer.padding_side = old_side
        if old_pad is None:
            tokenizer.pad_token = None
        model.train(was_training)


def stop_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends an answer: the model's generation_config may list several (e.g. Qwen's
    <|im_end|> and <|endoftext|>); keep them all, plus the tokenizer's eos (the chat template's end-of-turn).
    Evals and OPD rollouts both stop on exactly these."""
    eos = tokenizer.eos_token_id
    model_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos_ids = [e for e in ([model_eos] if isinstance(model_eos, int) else list(model_eos or []))]
    if eos is not None and eos not in eos_ids:
        eos_ids.append(eos)
    return eos_ids


def generation_config(model, tokenizer, *, max_new_tokens, do_sample, temperature=1.0, top_p=1.0,
                      num_return_sequences=1):
    from transformers import GenerationConfig

    sampling = dict(temperature=temperature, top_p=top_p, top_k=0) if do_sample else {}
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=stop_token_ids(model, tokenizer) or None,
        num_return_sequences=num_return_sequences,
        use_cache=True,
        **sampling,
    )


def generate(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int,
    batch_size: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
    progress: str | bool | None = None,
    engine: "str | Engine" = "hf",
) -> list[str]:
    """Generate one completion per prompt; returns decoded new text in the prompts' order.

    `engine` (engines.py): `hf` generates `batch_size` prompts at a time; `continuous` keeps up to `batch_size`
    answers in flight and refills a slot as soon as an answer ends; `vllm` (or an `Engine` instance) takes them all.
    Prompts are sorted by token length (longest first) so each batch pads little and an out-of-memory error, if any,
    shows up first rather than last. Greedy by default; with `do_sample`, `seed` makes the draw reproducible (same
    seed, same engine and batch size). `progress`: a description string (or True) shows a tqdm bar with ETA.
    """
    from continual_opd.engines import SamplingParams, make_engine

    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1 (got {max_new_tokens}, {batch_size})")
    if not prompts:
        return []
    texts = render_prompts(tokenizer, prompts, chat_template_kwargs)
    # The template already inserts any BOS it wants; add_special_tokens=False avoids a double BOS.
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    order = sorted(range(len(texts)), key=lambda i: (-len(ids[i]), i))  # stable: ties keep input order
    if seed is not None:
        torch.manual_seed(seed)
    params = SamplingParams(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p)

    # Under several processes each rank generates whole batches of the one-process batching (distributed.py), so
    # the gathered answers are the ones a single process would give.
    batches = distributed.shard_batches(len(texts), batch_size, order)
    synced = distributed.is_sharded(model)  # FSDP / ZeRO-3: every rank must run every forward pass together
    bar = None
    if progress and distributed.is_main():
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(map(len, batches)), desc=progress if isinstance(progress, str) else "generate",
                   unit="prompt")
    mine: list[tuple[int, str]] = []
    try:
        with generation_mode(model, tokenizer), torch.no_grad():
            if engine == "continuous" and synced:  # ranks of a sharded model must run every forward together
                engine = "hf"
            eng = make_engine(engine, model, tokenizer, max_batch=batch_size) if isinstance(engine, str) else engine
            # hf takes one batch per call (a filler batch keeps synced ranks in step); the others take a rank's all
            calls = batches if eng.per_batch else [[i for b in batches for i in b]]
            for idx in calls:
                if not idx and not (synced and eng.per_batch):
                    continue
                done = eng.generate([ids[i] for i in idx or order[:1]], params,
                                    progress=bar.update if bar is not None and idx else None)
                # a filler batch adds none
                mine.extend(zip(idx, tokenizer.batch_decode([c.token_ids for c in done], skip_special_tokens=True)))
    finally:
        if bar is not None:
            bar.close()
    outputs: list[str | None] = [None] * len(texts)
    for i, text in distributed.gather(mine):
        outputs[i] = text
    return outputs  # type: ignore[return-value]


@dataclass
class Rollouts:
    """Sampled answers, ready to be scored: B = prompts x samples, T = prompt + response, L = response positions.

    Prompts are left-padded, so every response starts at column T - L. `response_mask_BL` is True on the answer's
    tokens up to and including its first stop token (the model learns to stop); positions after it are padding.
    """

    ids_BT: torch.Tensor
    attention_BT: torch.Tensor  # 1 on real prompt tokens and on response tokens up to the stop token
    positions_BT: torch.Tensor  # position ids counted from each row's first real token
    response_mask_BL: torch.Tensor
    truncated_B: torch.Tensor  # no stop token within max_new_tokens

    @property
    def tokens_BL(self) -> torch.Tensor:
        return self.ids_BT[:, -self.response_mask_BL.shape[1]:]

    def __len__(self) -> int:
        return self.ids_BT.shape[0]

    def __getitem__(self, sl: slice) -> "Rollouts":
        return Rollouts(self.ids_BT[sl], self.attention_BT[sl], self.positions_BT[sl], self.response_mask_BL[sl],
                        self.truncated_B[sl])


def rollouts_from_ids(prompt_ids_BP: torch.Tensor, prompt_attention_BP: torch.Tensor, response_BL: torch.Tensor,
                      stop_ids: Sequence[int]) -> Rollouts:
    """Build masks and positions for responses that follow left-padded prompts (prompt rows already repeated)."""
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=response_BL.device)
    is_stop_BL = torch.isin(response_BL, stop)
    # response = tokens up to and including the first stop token; later positions are padding
    after_stop_BL = (is_stop_BL.cumsum(1) - is_stop_BL.long()) > 0
    response_mask_BL = ~after_stop_BL
    attention_BT = torch.cat([prompt_attention_BP, response_mask_BL.long()], 1)
    positions_BT = (attention_BT.cumsum(1) - 1).clamp(min=0)
    return Rollouts(torch.cat([prompt_ids_BP, response_BL], 1), attention_BT, positions_BT, response_mask_BL,
                    ~is_stop_BL.any(1))


def rollouts_from_lists(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int, stop_ids,
                        device) -> Rollouts:
    """Lists of token ids (one prompt row per answer) -> left-padded prompts + right-padded responses, masked like
    `generate`'s rollouts (the engines other than hf return lists)."""
    P = max(len(p) for p in prompt_ids)
    L = max(1, max(len(c) for c in completion_ids))
    B = len(prompt_ids)
    prompt_BP = torch.full((B, P), pad_id, dtype=torch.long)
    attn_BP = torch.zeros((B, P), dtype=torch.long)
    # Padding after an answer's end token is masked by rollouts_from_ids; a pad after an answer that hit the cap
    # must not read as an end token, so cap-length answers are padded with their own last token.
    resp_BL = torch.full((B, L), pad_id, dtype=torch.long)
    for b, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        prompt_BP[b, P - len(p):], attn_BP[b, P - len(p):] = torch.tensor(p), 1
        if c:
            resp_BL[b, :len(c)] = torch.tensor(list(c))
            if not any(t in stop_ids for t in c):
                resp_BL[b, len(c):] = c[-1]
    return rollouts_from_ids(prompt_BP.to(device), attn_BP.to(device), resp_BL.to(device), stop_ids)


@torch.no_grad()
def sample_rollouts(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int,
    samples_per_prompt: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    chat_template_kwargs: dict[str, Any] | None = None,
    engine: str = "hf",
    max_batch: int = 64,
) -> Rollouts:
    """Sample `samples_per_prompt` answers per prompt (rows grouped by prompt), stopping on the same stop ids as
    evals (`stop_token_ids`). `engine` hf: the model's KV-cached `generate` on all prompts at once; continuous: up to
    `max_batch` answers in flight (engines.py)."""
    if engine == "continuous" and distributed.is_sharded(model):  # ranks of a sharded model run forwards together
        engine = "hf"
    if engine != "hf":
        from continual_opd.engines import SamplingParams, make_engine

        texts = render_prompts(tokenizer, prompts, chat_template_kwargs)
        ids = [p for p in tokenizer(texts, add_special_tokens=False)["input_ids"] for _ in range(samples_per_prompt)]
        with generation_mode(model, tokenizer):
            eng = make_engine(engine, model, tokenizer, max_batch=max_batch)
            done = eng.generate(ids, SamplingParams(max_new_tokens=max_new_tokens, do_sample=True,
                                                    temperature=temperature, top_p=top_p))
        return rollouts_from_lists(ids, [c.token_ids for c in done], tokenizer.pad_token_id,
                                   stop_token_ids(model, tokenizer), device=_device(model))
    texts = render_prompts(tokenizer, prompts, chat_template_kwargs)
    gen_config = generation_config(model, tokenizer, max_new_tokens=max_new_tokens, do_sample=True,
                                   temperature=temperature, top_p=top_p, num_return_sequences=samples_per_prompt)
    device = _device(model)
    with generation_mode(model, tokenizer):  # left padding + eval mode, restored after (even on error)
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        out_BT = model.generate(**enc, generation_config=gen_config,
                                **({"synced_gpus": True} if distributed.is_sharded(model) else {}))
    P = enc["input_ids"].shape[1]
    return rollouts_from_ids(out_BT[:, :P], enc["attention_mask"].repeat_interleave(samples_per_prompt, 0),
                             out_BT[:, P:], gen_config.eos_token_id or [])
