"""`continual-opd serve-teacher MODEL`: a teacher on another machine, speaking the part of vLLM's OpenAI-compatible API
that the trainer's client (teacher_client.py) uses.

    GET  /v1/models        the served name and max_model_len
    GET  /health           200, empty
    POST /tokenize         a prompt, or chat messages rendered with the chat template, to token ids (vLLM: at the root)
    POST /v1/completions   token-id prompts scored with `prompt_logprobs`: log p(token j | tokens < j), its rank and the
                           top-k tokens at every position; the completion is the greedy next token only

A small server for one CPU or GPU: transformers weights, stdlib HTTP, one forward at a time (a lock around the
model); the prompts of one request are one right-padded batch. For throughput, serve the teacher with vLLM instead
(`vllm serve MODEL --no-enable-prefix-caching`): the client speaks to both.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

log = logging.getLogger(__name__)

MAX_PROMPT_LOGPROBS = 20  # vLLM's default max_logprobs


class BadRequest(Exception):
    """A request the server refuses: HTTP status, vLLM's error type and a message."""

    def __init__(self, message: str, status: int = 400, kind: str = "BadRequestError"):
        super().__init__(message)
        self.status, self.kind = status, kind


def load_teacher(model: str, dtype: str = "auto"):
    """(model, tokenizer), frozen in eval mode: a local directory, a hub id, `demo` or `package:NAME`."""
    from continual_opd import models
    from continual_opd.config import ModelConfig

    cfg = ModelConfig(name=model, dtype=dtype)
    base = models.resolve_base(cfg, cache_dir=None)
    tokenizer = models.load_tokenizer(base, cfg)
    m = models.load_model(models.ModelRef(base), cfg)
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m, tokenizer


@torch.no_grad()
def forward_logprobs(model, seqs: list[list[int]], pad_id: int = 0):
    """Per sequence of n ids, the fp32 log-probs (n, V) of the next token at each position: one right-padded forward
    (pads come after every real token, so causal attention never sees them and positions count from 0).
    Yields row by row, so only one row's fp32 copy of the logits exists at a time."""
    dev = next(model.parameters()).device
    T = max(len(s) for s in seqs)
    ids_BT = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attn_BT = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids_BT[b, :len(s)], attn_BT[b, :len(s)] = torch.tensor(s, dtype=torch.long), 1
    pos_BT = torch.arange(T).expand(len(seqs), T)
    logits_BTV = model(input_ids=ids_BT.to(dev), attention_mask=attn_BT.to(dev), position_ids=pos_BT.to(dev)).logits
    for b, s in enumerate(seqs):
        yield logits_BTV[b, :len(s)].float().log_softmax(-1)


class TeacherServer(ThreadingHTTPServer):
    """The HTTP server holding the model; `handle_*` turn a parsed JSON body into a JSON reply (or raise BadRequest)."""

    daemon_threads = True

    def __init__(self, address, model, tokenizer, *, name: str, max_model_len: int | None = None):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.max_model_len = int(max_model_len or _max_model_len(model, tokenizer))
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.lock = threading.Lock()  # one forward (and one tokenizer call) at a time
        self._decoded: dict[int, str] = {}
        super().__init__(address, _Handler)

    def handle_models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": int(time.time()),
                                            "owned_by": "continual-opd", "max_model_len": self.max_model_len}]}

    def _check_model(self, body: dict) -> None:
        name = body.get("model")
        if name is not None and name != self.name:
            raise BadRequest(f"The model `{name}` does not exist.", 404, "NotFoundError")

    def handle_tokenize(self, body: dict) -> dict:
        self._check_model(body)
        tok = self.tokenizer
        if "messages" in body:
            messages, kw = body["messages"], body.get("chat_template_kwargs") or {}
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                raise BadRequest("messages: expected a list of {role, content} objects")
            if not isinstance(kw, dict):
                raise BadRequest("chat_template_kwargs: expected an object")
            try:
                text = tok.apply_chat_template(messages, tokenize=False,
                                               add_generation_prompt=bool(body.get("add_generation_prompt", True)),
                                               **kw)
            except Exception as e:  # a template error is the request's fault (e.g. a missing role)
                raise BadRequest(f"cannot render the chat template: {e}") from None
            ids = tok(text, add_special_tokens=bool(body.get("add_special_tokens", False)))["input_ids"]
        elif isinstance(body.get("prompt"), str):
            ids = tok(body["prompt"], add_special_tokens=bool(body.get("add_special_tokens", True)))["input_ids"]
        else:
            raise BadRequest("give `prompt` (a string) or `messages` (a list of chat messages)")
        return {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids}

    def handle_completions(self, body: dict) -> dict:
        """Scores every prompt; `text` is the greedy next token only (max_tokens beyond 1 is not honoured: the client
        asks for 1), finish_reason `length`, `logprobs` null."""
        self._check_model(body)
        seqs = self._prompts(body.get("prompt"))
        k = body.get("prompt_logprobs")
        if k is not None and (not _is_int(k) or not 0 <= k <= MAX_PROMPT_LOGPROBS):
            raise BadRequest(f"prompt_logprobs: expected an integer from 0 to {MAX_PROMPT_LOGPROBS}, got {k!r}")
        max_tokens = body.get("max_tokens", 16)
        if not _is_int(max_tokens) or max_tokens < 1:
            raise BadRequest(f"max_tokens: expected an integer >= 1, got {max_tokens!r}")
        choices = []
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for i, (s, lp_NV) in enumerate(zip(seqs, forward_logprobs(self.model, seqs, pad))):
            nxt = int(lp_NV[-1].argmax())
            choices.append({"index": i, "text": self._decode(nxt), "logprobs": None, "finish_reason": "length",
                            "stop_reason": None,
                            "prompt_logprobs": None if k is None else self._prompt_logprobs(s, lp_NV, k)})
        n_prompt = sum(map(len, seqs))
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.name, "choices": choices,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": len(seqs),
                          "total_tokens": n_prompt + len(seqs)}}

    def _prompts(self, prompt: Any) -> list[list[int]]:
        """vLLM's prompt forms: a string, a list of strings, a list of ids, a list of id lists."""
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt)):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise BadRequest("prompt: expected a string, a list of token ids, or a list of either")
        seqs = []
        for i, p in enumerate(prompt):
            if isinstance(p, str):
                p = self.tokenizer(p)["input_ids"]
            if not isinstance(p, list) or not p or not all(_is_int(t) for t in p):
                raise BadRequest(f"prompt[{i}]: expected a non-empty string or list of token ids")
            bad = [t for t in p if not 0 <= t < self.vocab_size]
            if bad:
                raise BadRequest(f"prompt[{i}]: token id {bad[0]} is out of vocabulary (size {self.vocab_size})")
            if len(p) > self.max_model_len:
                raise BadRequest(f"This model's maximum context length is {self.max_model_len} tokens. However, "
                                 f"prompt[{i}] has {len(p)} tokens.")
            seqs.append(p)
        return seqs

    def _prompt_logprobs(self, seq: list[int], lp_NV: torch.Tensor, k: int) -> list[dict | None]:
        """vLLM's layout: None for the first token, then {token id: {logprob, rank, decoded_token}} holding the
        prompt's own token (rank 1 = argmax) and the top-k."""
        tgt_N = torch.tensor(seq[1:], device=lp_NV.device)
        own_N = lp_NV[:-1].gather(1, tgt_N[:, None])  # (n-1, 1)
        rank_N = (lp_NV[:-1] > own_N).sum(1) + 1
        top_v, top_i = lp_NV[:-1].topk(min(k, lp_NV.shape[1]), dim=1) if k else (None, None)
        out: list[dict | None] = [None]
        for j, (t, lp, r) in enumerate(zip(seq[1:], own_N[:, 0].tolist(), rank_N.tolist())):
            entry = {str(t): self._entry(t, lp, r)}
            if k:
                for rank, (ti, tv) in enumerate(zip(top_i[j].tolist(), top_v[j].tolist()), start=1):
                    entry[str(ti)] = self._entry(ti, tv, rank)
            out.append(entry)
        return out

    def _entry(self, token: int, logprob: float, rank: int) -> dict:
        return {"logprob": logprob if math.isfinite(logprob) else -9999.0, "rank": rank,
                "decoded_token": self._decode(token)}

    def _decode(self, token: int) -> str:
        if token not in self._decoded:
            self._decoded[token] = self.tokenizer.decode([token])
        return self._decoded[token]


class _Handler(BaseHTTPRequestHandler):
    server: TeacherServer
    server_version = "continual-opd-teacher"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/v1/models":
            self._reply(200, self.server.handle_models())
        elif path == "/health":
            self._reply(200, None)
        else:
            self._reply(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        route = {"/tokenize": self.server.handle_tokenize, "/v1/completions": self.server.handle_completions}.get(path)
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if route is None:
            self._reply(404, {"detail": "Not Found"})
            return
        try:
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as e:
                raise BadRequest(f"the body is not JSON ({e})") from None
            if not isinstance(body, dict):
                raise BadRequest("the body must be a JSON object")
            with self.server.lock:
                reply = route(body)
        except BadRequest as e:
            self._reply(e.status, {"error": {"message": str(e), "type": e.kind, "param": None, "code": e.status}})
            return
        except Exception as e:  # a bug or the device (e.g. out of memory): the client retries 5xx
            log.exception("%s failed", path)
            self._reply(500, {"error": {"message": f"{type(e).__name__}: {e}", "type": "InternalServerError",
                                        "param": None, "code": 500}})
            return
        self._reply(200, reply)

    def _reply(self, status: int, body: dict | None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        if body is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:  # requests at debug level, not on stderr
        log.debug("%s %s", self.address_string(), format % args)


def make_server(model, tokenizer, *, name: str, host: str = "127.0.0.1", port: int = 0,
                max_model_len: int | None = None) -> TeacherServer:
    """A bound, not yet serving server (`serve_forever()` runs it); port 0 takes any free port (see
    `server.server_address`). `max_model_len` defaults to the model's max_position_embeddings."""
    return TeacherServer((host, port), model, tokenizer, name=name, max_model_len=max_model_len)


def serve(model_name: str, host: str = "127.0.0.1", port: int = 8000, dtype: str = "auto",
          served_name: str | None = None) -> None:
    """Load the model and serve it until Ctrl-C."""
    from continual_opd.errors import ConfigError

    model, tokenizer = load_teacher(model_name, dtype)
    name = served_name or model_name
    try:
        server = make_server(model, tokenizer, name=name, host=host, port=port)
    except OSError as e:
        raise ConfigError(f"serve-teacher: cannot listen on {host}:{port} ({e.strerror or e}); choose another --port "
                          "(or --host)") from None
    h, p = server.server_address[:2]
    log.info("serving %s on http://%s:%d/v1", name, h, p)
    # Ctrl-C and `kill` stop it cleanly, also when started from a shell that ignores SIGINT in background jobs
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("stopped")
    finally:
        server.server_close()


def _max_model_len(model, tokenizer) -> int:
    n = getattr(model.config, "max_position_embeddings", None)
    if isinstance(n, int) and n > 0:
        return n
    n = getattr(tokenizer, "model_max_length", None)
    return n if isinstance(n, int) and 0 < n < 10**7 else 2048


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
