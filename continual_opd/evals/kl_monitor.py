"""KL(student || stage-start snapshot) on fixed general chat prompts: a cheap leading indicator of forgetting.

At stage start the snapshot greedily answers N general prompts; its final hidden states at the response positions
are kept (N x H), with its output projection (a frozen copy when the stage trains the head; the live module when it
cannot change, a LoRA stage whose adapters leave `lm_head` alone). At each eval point the student is scored on the
same sequences and the mean per-token KL(p_student || p_snapshot) over the response positions is computed from both
hidden states, a chunk of positions at a time (stages/chunked.py), so no (B, T, V) tensor is stored or built. No
second model is kept in memory, which is what makes it cheap enough to run at every eval point.
"""

from __future__ import annotations

import copy

import torch

from continual_opd.data import read_prompts
from continual_opd.generation import generate, render_prompts
from continual_opd.stages import chunked, losses

BUDGET_MB = 256  # the chunk's logits working set (chunked.rows_per_chunk)


class KLMonitor:
    def __init__(self, input_ids_BT, attention_mask_BT, response_mask_BT, ref_hidden_NH=None, ref_head=None):
        self.input_ids, self.attention_mask, self.response_mask = input_ids_BT, attention_mask_BT, response_mask_BT
        self.ref_hidden, self.ref_head = ref_hidden_NH, ref_head

    @classmethod
    def from_file(cls, path, tokenizer, model, *, n: int, max_new_tokens: int, chat_template_kwargs=None):
        prompts = read_prompts(path)[:n]
        responses = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=len(prompts),
                             chat_template_kwargs=chat_template_kwargs)
        texts = render_prompts(tokenizer, prompts, chat_template_kwargs)
        prompt_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        resp_ids = [tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for r in responses]
        T = max(len(p) + len(r) for p, r in zip(prompt_ids, resp_ids))
        ids = torch.full((len(texts), T), tokenizer.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        resp = torch.zeros_like(ids, dtype=torch.bool)
        for b, (p, r) in enumerate(zip(prompt_ids, resp_ids)):  # right padding
            ids[b, : len(p) + len(r)] = torch.tensor(p + r)
            attn[b, : len(p) + len(r)] = 1
            resp[b, len(p): len(p) + len(r)] = True
        mon = cls(ids, attn, resp)
        mon.ref_head = _frozen_head(model)
        mon.ref_hidden = mon._hidden(model)
        return mon

    @torch.no_grad()
    def _hidden(self, model) -> torch.Tensor:
        """Final hidden states (N, H) at the positions that predict response tokens (position t predicts t + 1)."""
        was_training = model.training
        model.eval()
        dev = next(model.parameters()).device
        ids, attn = self.input_ids.to(dev), self.attention_mask.to(dev)
        h_BTH = chunked.response_hidden(model, ids, attn, None, ids.shape[1] - 1)  # positions 0 .. T-2
        model.train(was_training)
        return h_BTH[self.response_mask[:, 1:].to(dev)]

    @torch.no_grad()
    def kl(self, model) -> float:
        h_NH = self._hidden(model)
        if h_NH.shape[0] == 0:
            return 0.0
        head = chunked.Head(model, frozen=True)
        rows = chunked.rows_per_chunk(chunked.unwrap(model).config.vocab_size, BUDGET_MB)
        total = 0.0
        for i in range(0, h_NH.shape[0], rows):
            s = head(h_NH[i:i + rows])[None]
            q = self.ref_head(self.ref_hidden[i:i + rows].to(h_NH.device))[None]
            mask = torch.ones(s.shape[:2], dtype=torch.bool, device=s.device)
            total += losses.full_reverse_kl_loss(s, q, mask)[0].item() * s.shape[1]  # reverse KL = sum p_s log p_s/p_q
        return total / h_NH.shape[0]


def _frozen_head(model) -> chunked.Head:
    """The stage-start head: the live module when nothing in it can train during the stage (a PEFT student whose
    head has no trainable parameters), a frozen copy otherwise."""
    from continual_opd import models

    head = chunked.Head(model, frozen=True)
    if not (models.is_peft(model) and not any(p.requires_grad for p in head.module.parameters())):
        head.module = copy.deepcopy(head.module).requires_grad_(False)
    return head
