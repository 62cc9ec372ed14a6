"""Generation engines: what turns prompt token ids into answer token ids, for evals, OPD rollouts and self-chat.

    engine = make_engine("continuous", model, tokenizer, max_batch=64)
    done = engine.generate([[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=256))   # one Completion per prompt

Three engines, one contract (tests/test_engines.py runs the same tests on each): answers come back in the order of
the prompts; each answer ends with its first stop token (kept) or at `max_new_tokens`; greedy unless `do_sample`;
with `do_sample`, `temperature` and `top_p` are applied by transformers' logits warpers and `seed` makes the draw
reproducible; `Completion.logprobs` are the log-probabilities of the chosen tokens under the distribution sampled
from.

- `hf`: transformers' `generate` on left-padded batches of `batch_size` prompts. A batch runs until its longest
  answer ends, so short answers wait for long ones; its DynamicCache grows by concatenation every step.
- `continuous`: continuous batching (`ContinuousEngine`): up to `max_batch` answers are decoded together, a finished
  answer leaves the batch at once and a waiting prompt takes its place; the KV cache is preallocated.
- `vllm`: vLLM through TRL's `VLLMGeneration` (GPU), imported only when asked for.

Why `continuous` is our own scheduler and not transformers' `generate_batch` (which has continuous batching and a
paged cache): on 2 CPU cores, SmolLM2-135M fp32, 64 official IFEval prompts at <= 256 new tokens, `generate_batch`
with 64 requests per batch gave the same text as `generate` but ran at 39 generated tokens/s, against 50 for
`generate` at batch 16 and a floor of 155 (one decode pass at batch 64): its paged attention gathers every
request's pages each step. Ours is a slot table over a preallocated cache in HF's own cache classes (a `Cache` of
`DynamicLayer`s that write in place), so the model's ordinary attention and masking run unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch

from continual_opd.errors import ConfigError, ModelError
from continual_opd.generation import _device

log = logging.getLogger(__name__)

ENGINES = ("hf", "continuous", "vllm")


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    logprobs: bool = False  # also return each chosen token's log-probability (costs a [rows, V] softmax a step)


@dataclass
class Completion:
    token_ids: list[int]  # the answer, up to and including its first stop token
    logprobs: list[float] | None = None  # log p of each chosen token under the (temperature/top-p) sampled distribution
    stopped: bool = field(default=False)  # ended on a stop token (False: hit max_new_tokens)


Progress = Callable[[int], None]  # called with the number of answers just finished


class Engine(Protocol):
    name: str
    per_batch: bool  # True: the caller hands it one batch at a time (hf); False: all of a rank's prompts at once

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 progress: Progress | None = None) -> list[Completion]: ...


def _warpers(params: SamplingParams):
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    procs = LogitsProcessorList()
    if params.do_sample and params.temperature != 1.0:
        procs.append(TemperatureLogitsWarper(params.temperature))
    if params.do_sample and params.top_p < 1.0:
        procs.append(TopPLogitsWarper(params.top_p))
    return procs


def _trim(ids: Sequence[int], stop: set[int]) -> tuple[list[int], bool]:
    out = []
    for t in ids:
        out.append(int(t))
        if t in stop:
            return out, True
    return out, False


class HFEngine:
    """transformers' `generate` on one left-padded batch per call (today's path; sharded models run synced)."""

    name, per_batch = "hf", True

    def __init__(self, model, tokenizer, stop_ids: Sequence[int]):
        self.model, self.tokenizer, self.stop_ids = model, tokenizer, list(stop_ids)

    def generate(self, prompts, params: SamplingParams, progress: Progress | None = None) -> list[Completion]:
        from continual_opd import distributed
        from continual_opd.generation import generation_config

        if not prompts:
            return []
        tok = self.tokenizer
        cfg = generation_config(self.model, tok, max_new_tokens=params.max_new_tokens, do_sample=params.do_sample,
                                temperature=params.temperature, top_p=params.top_p)
        cfg.eos_token_id = self.stop_ids or None
        cfg.output_scores, cfg.return_dict_in_generate = params.logprobs, True
        enc = tok.pad({"input_ids": [list(p) for p in prompts]}, padding=True, padding_side="left",
                      return_tensors="pt")
        enc = {k: v.to(_device(self.model)) for k, v in enc.items()}
        if params.seed is not None:
            torch.manual_seed(params.seed)
        synced = {"synced_gpus": True} if distributed.is_sharded(self.model) else {}
        out = self.model.generate(**enc, generation_config=cfg, **synced)
        new_BL = out.sequences[:, enc["input_ids"].shape[1]:]
        logp_BL = None
        if params.logprobs:  # scores are the processed (temperature / top-p) logits each token was drawn from
            logp_BL = torch.stack(out.scores, 1).float().log_softmax(-1).gather(-1, new_BL[..., None])[..., 0].tolist()
        stop = set(self.stop_ids)
        done = []
        for k, ids in enumerate(new_BL.tolist()):
            ids, stopped = _trim(ids, stop)
            done.append(Completion(ids, logp_BL[k][:len(ids)] if logp_BL is not None else None, stopped))
        if progress:
            progress(len(done))
        return done


class _Slots:
    """Shared state of the slot cache: live rows fill slots [0, n) of `max_rows`; columns [0, t) are written."""

    def __init__(self, capacity: int, max_rows: int):
        self.capacity, self.max_rows, self.t = capacity, max_rows, 0


def _slot_layer_class():
    from transformers.cache_utils import DynamicLayer

    class SlotLayer(DynamicLayer):
        """A DynamicLayer whose keys/values live in a preallocated [max_rows, H, capacity, D] buffer, written in place
        at column `t` (instead of torch.cat'ing the whole cache every step). `keys`/`values` are views of the live part.
        """

        def __init__(self, slots: _Slots):
            super().__init__()
            self.slots = slots

        def lazy_initialization(self, key_states, value_states):
            s = self.slots
            B, H, _, D = key_states.shape
            self.kbuf = key_states.new_zeros((s.max_rows, H, s.capacity, D))
            self.vbuf = value_states.new_zeros((s.max_rows, value_states.shape[1], s.capacity, value_states.shape[3]))
            self.device, self.is_initialized = key_states.device, True
            self.keys, self.values = self.kbuf[:0, :, :0], self.vbuf[:0, :, :0]

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n, t, q = key_states.shape[0], self.slots.t, key_states.shape[-2]
            self.kbuf[:n, :, t:t + q] = key_states
            self.vbuf[:n, :, t:t + q] = value_states
            self.keys, self.values = self.kbuf[:n, :, :t + q], self.vbuf[:n, :, :t + q]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.slots.t

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.slots.t + query_length, 0

        def place(self, rows: slice, cols: slice, keys, values):
            """Copy a prefilled (left-padded) block of keys/values into slot rows `rows` at columns `cols`."""
            if not self.is_initialized:
                self.lazy_initialization(keys, values)
            self.kbuf[rows, :, cols] = keys
            self.vbuf[rows, :, cols] = values

        def move_row(self, src: int, dst: int):
            self.kbuf[dst] = self.kbuf[src]
            self.vbuf[dst] = self.vbuf[src]

        def shift(self, rows: int, src: slice, dst: slice):
            self.kbuf[:rows, :, dst] = self.kbuf[:rows, :, src].clone()
            self.vbuf[:rows, :, dst] = self.vbuf[:rows, :, src].clone()

    return SlotLayer


@dataclass
class _Row:
    index: int  # position in the caller's prompt list
    start: int  # first cache column of its prompt (left padding before it is masked)
    pos: int  # position id of the pending token (= real tokens cached)
    pending: int  # last chosen token, not yet in the cache
    ids: list[int]
    logprobs: list[float]


class ContinuousEngine:
    """Continuous batching on HF's cache classes: up to `max_batch` answers decode together; an answer that ends
    leaves the batch at once (its slot is refilled from the waiting prompts, in the order given).

    The cache is one preallocated block of `max_batch` rows x `capacity` columns per layer. All live rows write the
    same column each step; a row's own tokens are right-aligned, the columns before its prompt are masked. New prompts
    are prefilled together in a batch of their own and copied in so that they end at the current column. When the
    columns run out, every row shifts left past the oldest live row's start (columns no live row reads).
    """

    name, per_batch = "continuous", False

    def __init__(self, model, tokenizer, stop_ids: Sequence[int], max_batch: int = 64, headroom: int | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 (got {max_batch})")
        cfg = getattr(model, "config", None)
        types = set(getattr(cfg, "layer_types", None) or [])
        if types - {"full_attention"} or getattr(cfg, "is_encoder_decoder", False):
            raise ModelError(f"engine 'continuous' needs a decoder with full attention in every layer; this model has "
                             f"{sorted(types) or 'an encoder-decoder'}: use engine 'hf'")
        self.model, self.tokenizer, self.stop_ids, self.max_batch = model, tokenizer, list(stop_ids), max_batch
        # cache columns beyond the longest prompt + max_new_tokens: each compaction frees at least this many (more
        # memory, fewer compactions). None: half that span, at least 64.
        self.headroom = headroom
        # of the last call (benchmarks, tests): model forward passes, and cache moves (right shifts, left compactions)
        self.forwards = self.shifts = self.compactions = 0

    def generate(self, prompts, params: SamplingParams, progress: Progress | None = None) -> list[Completion]:
        from continual_opd import distributed
        from transformers.cache_utils import Cache

        if not prompts:
            return []
        if distributed.is_sharded(self.model):
            raise ModelError("engine 'continuous' cannot run a sharded (FSDP / ZeRO-3) model, whose ranks must run "
                             "every forward pass together; use engine 'hf' under FSDP")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        longest = max(len(p) for p in prompts)
        span = longest + params.max_new_tokens
        headroom = self.headroom if self.headroom is not None else max(64, span // 2)
        slots = _Slots(capacity=span + max(1, headroom), max_rows=min(self.max_batch, len(prompts)))
        layer_cls = _slot_layer_class()
        cache = Cache(layers=[layer_cls(slots) for _ in range(self.model.config.num_hidden_layers)])
        mask = torch.zeros((slots.max_rows, slots.capacity), dtype=torch.long, device=_device(self.model))
        gen = None
        if params.do_sample:
            gen = torch.Generator(device=_device(self.model))
            gen.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item()))
        state = _Run(self, params, slots, cache, mask, _warpers(params), gen, progress)
        return state.run(list(prompts))


class _Run:
    """One `ContinuousEngine.generate` call: the slot table, the waiting queue, the finished answers."""

    def __init__(self, engine: ContinuousEngine, params, slots: _Slots, cache, mask, warpers, gen, progress):
        self.e, self.params, self.slots, self.cache, self.mask = engine, params, slots, cache, mask
        self.warpers, self.gen, self.progress = warpers, gen, progress
        self.stop = set(engine.stop_ids)
        self.live: list[_Row] = []
        self.device = mask.device
        engine.forwards = engine.shifts = engine.compactions = 0

    @torch.no_grad()
    def run(self, prompts: list[Sequence[int]]) -> list[Completion]:
        waiting = list(range(len(prompts)))[::-1]  # pop() takes the next prompt in the caller's order
        done: dict[int, Completion] = {}
        R = self.slots.max_rows
        while waiting or self.live:
            free = R - len(self.live)
            # admit in groups (one prefill pass each) once an eighth of the slots are free, or the queue fits
            if waiting and free and (free >= max(1, R // 8) or len(waiting) <= free or not self.live):
                group = [waiting.pop() for _ in range(min(free, len(waiting)))]
                self._admit(group, prompts, done)
            if self.live:
                self._decode(done)
        return [done[i] for i in range(len(prompts))]

    def _choose(self, logits_BV: torch.Tensor) -> tuple[list[int], list[float]]:
        scores = logits_BV.float()
        if len(self.warpers):  # temperature and top-p read only the scores, not the ids so far
            scores = self.warpers(scores.new_zeros((scores.shape[0], 1), dtype=torch.long), scores)
        if self.params.do_sample:
            tok = torch.multinomial(scores.softmax(-1), 1, generator=self.gen)[:, 0]
        else:
            tok = scores.argmax(-1)
        if not self.params.logprobs:
            return tok.tolist(), [0.0] * len(tok)
        return tok.tolist(), scores.log_softmax(-1).gather(-1, tok[:, None])[:, 0].tolist()

    def _finish(self, row: _Row, stopped: bool, done: dict) -> None:
        done[row.index] = Completion(row.ids, row.logprobs if self.params.logprobs else None, stopped)

    def _append(self, row: _Row, tok: int, lp: float, done: dict) -> bool:
        """Record a chosen token; True if the row is finished."""
        row.ids.append(tok)
        row.logprobs.append(lp)
        row.pending = tok
        if tok in self.stop or len(row.ids) >= self.params.max_new_tokens:
            self._finish(row, tok in self.stop, done)
            return True
        return False

    def _admit(self, group: list[int], prompts, done: dict) -> None:
        from transformers import DynamicCache

        s, model = self.slots, self.e.model
        P = max(len(prompts[i]) for i in group)
        if P > s.t:  # the newcomers' prompts must end at column t: shift the live rows right to make room
            d = P - s.t
            if self.live:
                self.e.shifts += 1
                for layer in self.cache.layers:
                    layer.shift(len(self.live), slice(0, s.t), slice(d, s.t + d))
                self.mask[:len(self.live), d:s.t + d] = self.mask[:len(self.live), :s.t].clone()
                self.mask[:len(self.live), :d] = 0
                for r in self.live:
                    r.start += d
            s.t = P
        pad = self.e.tokenizer.pad_token_id if self.e.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(group), P), pad, dtype=torch.long)
        att = torch.zeros((len(group), P), dtype=torch.long)
        for k, i in enumerate(group):
            p = list(prompts[i])
            ids[k, P - len(p):] = torch.tensor(p)
            att[k, P - len(p):] = 1
        ids, att = ids.to(self.device), att.to(self.device)
        pos = (att.cumsum(1) - 1).clamp(min=0)
        pre = DynamicCache()
        out = model(input_ids=ids, attention_mask=att, position_ids=pos, cache=pre, use_cache=True,
                    logits_to_keep=1)
        self.e.forwards += 1
        n0 = len(self.live)
        rows = slice(n0, n0 + len(group))
        cols = slice(s.t - P, s.t)
        for layer, (k, v) in zip(self.cache.layers, ((lyr.keys, lyr.values) for lyr in pre.layers)):
            layer.place(rows, cols, k, v)
        self.mask[rows] = 0
        self.mask[rows, cols] = att
        toks, lps = self._choose(out.logits[:, -1])
        finished = []
        for k, i in enumerate(group):
            row = _Row(i, s.t - len(prompts[i]), len(prompts[i]), toks[k], [], [])
            self.live.append(row)
            if self._append(row, toks[k], lps[k], done):
                finished.append(row)
        self._drop(finished)

    def _decode(self, done: dict) -> None:
        s, n = self.slots, len(self.live)
        if s.t + 1 > s.capacity:
            self._compact()
        self.mask[:n, s.t] = 1
        ids = torch.tensor([[r.pending] for r in self.live], device=self.device)
        pos = torch.tensor([[r.pos] for r in self.live], device=self.device)
        out = self.e.model(input_ids=ids, attention_mask=self.mask[:n, :s.t + 1], position_ids=pos,
                           cache=self.cache, use_cache=True)
        self.e.forwards += 1
        s.t += 1
        toks, lps = self._choose(out.logits[:, -1])
        finished = []
        for r, tok, lp in zip(self.live, toks, lps):
            r.pos += 1
            if self._append(r, tok, lp, done):
                finished.append(r)
        self._drop(finished)

    def _drop(self, finished: list[_Row]) -> None:
        """Free the slots of finished rows: the last live row moves into each freed slot (one row's copy)."""
        if not finished:
            return
        if self.progress:
            self.progress(len(finished))
        for row in finished:
            k = self.live.index(row)
            last = len(self.live) - 1
            if k != last:
                for layer in self.cache.layers:
                    if layer.is_initialized:
                        layer.move_row(last, k)
                self.mask[k] = self.mask[last]
                self.live[k] = self.live[last]
            self.live.pop()
        if not self.live:
            self.slots.t = 0

    def _compact(self) -> None:
        """Shift every live row left past the oldest live row's first column (columns no live row reads)."""
        s, n = self.slots, len(self.live)
        self.e.compactions += 1
        d = min(r.start for r in self.live)
        if d == 0:  # cannot happen: capacity leaves room for the longest prompt plus max_new_tokens
            raise RuntimeError("continuous engine: KV cache full")
        for layer in self.cache.layers:
            layer.shift(n, slice(d, s.t), slice(0, s.t - d))
        self.mask[:n, :s.t - d] = self.mask[:n, d:s.t].clone()
        self.mask[:n, s.t - d:] = 0
        for r in self.live:
            r.start -= d
        s.t -= d


class VLLMEngine:
    """vLLM for evals and rollouts, through TRL's `VLLMGeneration` (colocated with the model in memory; its weights
    are pushed into the engine before a call when they may have changed). `llm` replaces it in tests (a fake)."""

    name, per_batch = "vllm", False

    def __init__(self, model, tokenizer, stop_ids: Sequence[int], llm=None, **vllm_kwargs):
        self.model, self.tokenizer, self.stop_ids = model, tokenizer, list(stop_ids)
        self.llm = llm if llm is not None else trl_vllm(model, tokenizer, stop_ids, **vllm_kwargs)
        self.stale = not getattr(self.llm, "enable_sleep_mode", False)

    def weights_changed(self) -> None:
        self.stale = not getattr(self.llm, "enable_sleep_mode", False)

    def generate(self, prompts, params: SamplingParams, progress: Progress | None = None) -> list[Completion]:
        if not prompts:
            return []
        if self.stale:
            self.llm.sync_weights()
            self.stale = False
        llm = self.llm
        saved = (llm.temperature, llm.top_p, llm.max_completion_length, dict(llm.generation_kwargs or {}))
        # VLLMGeneration reads its sampling settings from these attributes on every call
        llm.temperature = params.temperature if params.do_sample else 0.0
        llm.top_p = params.top_p if params.do_sample else 1.0
        llm.max_completion_length = params.max_new_tokens
        llm.generation_kwargs = {**saved[3], "stop_token_ids": list(self.stop_ids),
                                 **({"seed": params.seed} if params.seed is not None else {})}
        try:
            _, completion_ids, logprobs, _ = llm.generate([list(p) for p in prompts], None, 1)
        finally:
            llm.temperature, llm.top_p, llm.max_completion_length, llm.generation_kwargs = saved
        stop = set(self.stop_ids)
        done = []
        for k, ids in enumerate(completion_ids):
            ids, stopped = _trim(ids, stop)
            lp = [float(x[0]) for x in logprobs[k][:len(ids)]] if logprobs is not None else None
            done.append(Completion(ids, lp, stopped))
        if progress:
            progress(len(done))
        return done


def trl_vllm(model, tokenizer, stop_ids, *, accelerator=None, gpu_memory_utilization: float = 0.3,
             max_model_len: int | None = None, enable_sleep_mode: bool = True, tensor_parallel_size: int = 1,
             temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 256):
    """TRL's colocated vLLM engine for `model` (GPU only; vLLM imported here, never at module import)."""
    from trl.import_utils import is_vllm_available

    if not is_vllm_available():
        raise ConfigError("engine vllm needs the vllm package on a CUDA machine (pip install vllm); "
                          "use engine hf or continuous on this machine")
    from trl.generation.vllm_generation import VLLMGeneration

    if accelerator is None:
        from accelerate import Accelerator

        accelerator = Accelerator()
    return VLLMGeneration(model, accelerator, tokenizer, mode="colocate", gpu_memory_utilization=gpu_memory_utilization,
                          max_model_length=max_model_len, enable_sleep_mode=enable_sleep_mode,
                          tensor_parallel_size=tensor_parallel_size, temperature=temperature, top_p=top_p,
                          max_completion_length=max_new_tokens, logprobs=0,
                          generation_kwargs={"stop_token_ids": list(stop_ids)})


def make_engine(name: str, model, tokenizer, *, max_batch: int = 64, llm=None, **vllm_kwargs) -> Engine:
    """An engine by name. `max_batch`: answers decoded together by `continuous` (hf batches are the caller's)."""
    from continual_opd.generation import stop_token_ids

    stop = stop_token_ids(model, tokenizer)
    if name == "hf":
        return HFEngine(model, tokenizer, stop)
    if name == "continuous":
        return ContinuousEngine(model, tokenizer, stop, max_batch=max_batch)
    if name == "vllm":
        return VLLMEngine(model, tokenizer, stop, llm=llm, **vllm_kwargs)
    raise ConfigError(f"unknown generation engine '{name}'; use one of {', '.join(ENGINES)}")
