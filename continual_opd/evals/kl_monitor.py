"""KL(student || stage-start snapshot) on fixed general chat prompts: a cheap leading indicator of forgetting.

At stage start the snapshot greedily answers N general prompts; its full next-token log-probs on those
sequences are kept on the CPU (fp16). At each eval point the student is scored on the same sequences and
the mean per-token KL(p_student || p_snapshot) over the response positions is reported. No second model is
kept in memory, which is what makes it cheap enough to run at every eval point.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from continual_opd.data import read_prompts
from continual_opd.generation import generate, render_prompts


class KLMonitor:
    def __init__(self, input_ids_BT, attention_mask_BT, response_mask_BT, ref_logprobs_BTV):
        self.input_ids, self.attention_mask, self.response_mask = input_ids_BT, attention_mask_BT, response_mask_BT
        self.ref_logprobs = ref_logprobs_BTV  # fp16 on CPU

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
        mon = cls(ids, attn, resp, None)
        mon.ref_logprobs = mon._logprobs(model).half()
        return mon

    @torch.no_grad()
    def _logprobs(self, model) -> torch.Tensor:
        was_training = model.training
        model.eval()
        dev = next(model.parameters()).device
        logits = model(input_ids=self.input_ids.to(dev), attention_mask=self.attention_mask.to(dev)).logits
        model.train(was_training)
        # position t predicts token t+1: keep the predictions of response tokens
        return F.log_softmax(logits[:, :-1].float(), dim=-1).cpu()

    def kl(self, model) -> float:
        s = self._logprobs(model)  # [B, T-1, V]
        q = self.ref_logprobs.float()
        mask = self.response_mask[:, 1:]
        kl_BT = (s.exp() * (s - q)).sum(-1)  # reverse KL = sum_v p_s (log p_s - log p_q)
        return float((kl_BT * mask).sum() / mask.sum().clamp(min=1))
