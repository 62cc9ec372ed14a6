"""The trainer's side of a served teacher: per-token log-probs from a vLLM server (or `continual-opd serve-teacher`).

OPD needs log q(token) of every sampled token under the teacher. A served teacher gets the sequences as token ids in
`/v1/completions` requests with `prompt_logprobs: 0` (vLLM returns, at each prompt position, the log-prob of the
token that is there) and `max_tokens: 1`; a few requests are in flight at once, results come back in input order.
Before training, `check_tokenizer` makes sure both sides mean the same thing by each id and `self_test` that the
server's numbers are stable (prefix caching and batching must not move them) and, given a local copy, right.
"""

from __future__ import annotations

import ipaddress
import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

from continual_opd.errors import ModelError

_BACKOFF_S = 0.5  # first retry's wait; doubles after each retry
_START = "start it (continual-opd serve-teacher MODEL --port N) or fix teacher.url"


class TeacherServerError(ModelError):
    """The teacher server cannot be reached, rejects a request, or answers something unusable."""

    def __init__(self, message: str, status: int | None = None, detail: str = ""):
        super().__init__(message)
        self.status, self.detail = status, detail


class ServedTeacher:
    """A teacher behind an OpenAI-compatible server. `url` is the API base (`http://HOST:PORT/v1`); `/tokenize` is
    at the server root (`url` without `/v1`). `tokenizer` (a hub id or path) stands in for a server without
    `/tokenize` in `check_tokenizer`."""

    def __init__(self, url: str, model: str, *, timeout_s: float = 120.0, max_retries: int = 3, batch_size: int = 8,
                 concurrency: int = 4, tokenizer: str | None = None):
        if batch_size < 1 or concurrency < 1 or max_retries < 0:
            raise ValueError(f"batch_size and concurrency must be >= 1 and max_retries >= 0 "
                             f"(got {batch_size}, {concurrency}, {max_retries})")
        self.url = url.rstrip("/")
        self.root = self.url.removesuffix("/v1")
        self.model, self.tokenizer = model, tokenizer
        self.timeout_s, self.max_retries = timeout_s, max_retries
        self.batch_size, self.concurrency = batch_size, concurrency
        host = urllib.parse.urlparse(self.url).hostname or ""
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        # a local server is reached directly even when an http(s)_proxy is set for the outside world
        self._opener = urllib.request.build_opener(*([urllib.request.ProxyHandler({})] if loopback else []))

    # ------------------------------------------------------------------------------------------ scoring

    def sequence_logprobs(self, seqs: list[list[int]]) -> list[list[float]]:
        """Per sequence, log p(token j | tokens < j) for j = 1 .. len-1; `batch_size` sequences per request,
        `concurrency` requests in flight, results in input order."""
        todo = [i for i, s in enumerate(seqs) if len(s) > 1]  # one token has nothing to score
        batches = [todo[i:i + self.batch_size] for i in range(0, len(todo), self.batch_size)]
        out: list[list[float]] = [[] for _ in seqs]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            for idx, lps in zip(batches, pool.map(lambda idx: self._score([seqs[i] for i in idx], idx), batches)):
                for i, lp in zip(idx, lps):
                    out[i] = lp
        return out

    def token_logprobs(self, part, mask_BL: torch.Tensor) -> torch.Tensor:
        """q_BL (float32, on mask_BL's device) for `Rollouts`: row b's real tokens are its attended ones, the last
        n_b = mask_BL[b].sum() of them its response; q_BL[b, :n_b] holds their log-probs, 0 elsewhere."""
        B, L = mask_BL.shape
        ns = [int(n) for n in mask_BL.sum(1).tolist()]
        seqs = [part.ids_BT[b][part.attention_BT[b] == 1].tolist() for b in range(B)]
        for b, (s, n) in enumerate(zip(seqs, ns)):
            if n > len(s) - 1:
                raise ValueError(f"row {b}: {n} response tokens but only {len(s)} attended tokens")
        q_BL = torch.zeros((B, L), dtype=torch.float32)
        for b, (lp, n) in enumerate(zip(self.sequence_logprobs(seqs), ns)):
            if n:
                q_BL[b, :n] = torch.tensor(lp[-n:], dtype=torch.float32)
        return q_BL.to(mask_BL.device)

    def _score(self, seqs: list[list[int]], rows: list[int] | None = None) -> list[list[float]]:
        """One /v1/completions request; `rows` (the sequences' input positions) only name them in errors."""
        url = f"{self.url}/completions"
        reply = self._call(url, {"model": self.model, "prompt": seqs, "max_tokens": 1, "prompt_logprobs": 0,
                                 "temperature": 0})
        try:
            choices = sorted(reply["choices"], key=lambda c: c["index"])
            pls = [c["prompt_logprobs"] for c in choices]
            if len(pls) != len(seqs) or any(not isinstance(p, list) or len(p) != len(s) for p, s in zip(pls, seqs)):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise TeacherServerError(f"teacher server {url}: the reply has no prompt_logprobs for each sequence "
                                     f"({json.dumps(reply)[:120]}); serve the teacher with vLLM or continual-opd "
                                     "serve-teacher (both return prompt_logprobs)") from None
        out = []
        for i, (s, pl) in enumerate(zip(seqs, pls)):
            row = rows[i] if rows else i
            lps = []
            for j in range(1, len(s)):
                entry = pl[j].get(str(s[j])) if isinstance(pl[j], dict) else None
                if not isinstance(entry, dict) or not isinstance(entry.get("logprob"), (int, float)):
                    raise TeacherServerError(
                        f"teacher server {url}: sequence {row}, position {j}: the reply holds no log-prob for token "
                        f"{s[j]} (it has {sorted(pl[j])[:5] if isinstance(pl[j], dict) else pl[j]!r}); the server "
                        "must score the prompt as given (token ids, no added BOS) with the student's tokenizer")
                lps.append(float(entry["logprob"]))
            out.append(lps)
        return out

    # ------------------------------------------------------------------------------------------ checks

    def check_tokenizer(self, student_tokenizer, chat_template_kwargs: dict, *, student: str) -> None:
        """The teacher must give the same ids as the student to plain text and to rendered chat messages (the server's
        `/tokenize`; without one, the declared `tokenizer`)."""
        from continual_opd import models

        kw = dict(chat_template_kwargs or {})
        probes: list[tuple[str, dict, list[int]]] = []
        for text in _TEXT_PROBES:
            want = student_tokenizer(text, add_special_tokens=False)["input_ids"]
            probes.append((f"text {text[:30]!r}", {"prompt": text, "add_special_tokens": False}, want))
        for i, messages in enumerate(models.PROBE_MESSAGES):
            rendered = student_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kw)
            want = student_tokenizer(rendered, add_special_tokens=False)["input_ids"]
            body = {"messages": messages, "add_generation_prompt": True, "add_special_tokens": False,
                    **({"chat_template_kwargs": kw} if kw else {})}
            probes.append((f"chat messages #{i}", body, want))
        url = f"{self.root}/tokenize"
        for what, body, want in probes:
            try:
                got = self._call(url, {"model": self.model, **body}).get("tokens")
            except TeacherServerError as e:
                if e.status in (404, 405) and "does not exist" not in e.detail:
                    return self._check_declared_tokenizer(student_tokenizer, kw, student)
                raise
            if got != want:
                k = next((k for k, (a, b) in enumerate(zip(got or [], want)) if a != b), min(len(got or []), len(want)))
                raise ModelError(  # not a TeacherServerError: the server answered, and it is the wrong teacher
                    f"teacher server {self.url}: its tokenizer differs from student {student!r} on probe {what}: "
                    f"first difference at token {k} (teacher {_at(got, k)}, student {_at(want, k)}; "
                    f"{len(got or [])} vs {len(want)} tokens); serve a teacher with the student's tokenizer and chat "
                    "template")

    def _check_declared_tokenizer(self, student_tokenizer, kw: dict, student: str) -> None:
        from continual_opd import models
        from continual_opd.config import ModelConfig

        if not self.tokenizer:
            raise TeacherServerError(f"teacher server {self.url}: has no /tokenize endpoint, so its tokenizer cannot "
                                     "be compared with the student's; declare teacher.tokenizer (the served model's "
                                     "hub id or path)", status=404)
        tok = models.load_tokenizer(self.tokenizer, ModelConfig(name=self.tokenizer))
        models.check_same_tokenization(student_tokenizer, tok, kw, student=student,
                                       teacher=f"{self.tokenizer} (served at {self.url})")

    def self_test(self, reference_logprobs: Callable[[list[list[int]]], list[list[float]]] | None,
                  probes: list[list[int]], tolerance: float) -> dict:
        """Score `probes` twice, the second time as one request in reverse order plus a duplicate of the first probe
        and a copy of its first half followed by other tokens (prefix caching and batching must not move log-probs),
        and, given `reference_logprobs` (a local copy of the teacher), compare with it. Raises TeacherServerError
        beyond `tolerance`."""
        if not probes or any(len(p) < 2 for p in probes):
            raise ValueError("self_test: give at least one probe, each of at least 2 tokens")
        first = self.sequence_logprobs(probes)
        half = max(1, len(probes[0]) // 2)
        shared = probes[0][:half] + probes[-1][::-1]
        again = self._score(list(reversed(probes)) + [probes[0], shared])
        pairs = list(zip(first, reversed(again[:len(probes)]))) + [(first[0], again[-2]),
                                                                   (first[0][:half - 1], again[-1][:half - 1])]
        hint = "disable prefix caching (vllm serve --no-enable-prefix-caching), serve the same weights and dtype, " \
               "or raise teacher.tolerance"
        bad = [v for lp in first + again for v in lp if not math.isfinite(v) or v > 1e-6]
        if bad:
            raise TeacherServerError(f"teacher server {self.url}: self-test: log-prob {bad[0]} is not finite or is "
                                     f"above 0; {hint}")
        repeat = _max_diff(pairs)
        if repeat > tolerance:
            raise TeacherServerError(f"teacher server {self.url}: self-test: scoring the same tokens again (reordered, "
                                     f"batched, behind a shared prefix) moved log-probs by up to {repeat:.3g} "
                                     f"(tolerance {tolerance:g}); {hint}")
        reference = None
        if reference_logprobs is not None:
            reference = _max_diff(list(zip(first, reference_logprobs(probes))))
            if reference > tolerance:
                raise TeacherServerError(f"teacher server {self.url}: self-test: log-probs differ from the local "
                                         f"teacher's by up to {reference:.3g} (tolerance {tolerance:g}); {hint}")
        return {"max_abs_diff_reference": reference, "max_abs_diff_repeat": repeat, "tokens": sum(map(len, first))}

    # ------------------------------------------------------------------------------------------ HTTP

    def _call(self, url: str, body: dict | None = None) -> dict:
        """GET (body None) or POST JSON; connection errors, timeouts and 5xx are retried after 0.5 s, 1 s, 2 s ...;
        a 4xx is not."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                     method="GET" if body is None else "POST")
        failure = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(_BACKOFF_S * 2 ** (attempt - 1))
            try:
                with self._opener.open(req, timeout=self.timeout_s) as resp:
                    raw = resp.read()
                break
            except urllib.error.HTTPError as e:
                detail = _detail(e.read())
                if e.code < 500:
                    raise TeacherServerError(f"teacher server {url}: HTTP {e.code} ({detail}); {_fix(e.code, detail)}",
                                             status=e.code, detail=detail) from None
                failure = f"HTTP {e.code} {detail}"
            except (urllib.error.URLError, OSError) as e:  # refused, unreachable, timed out, reset
                failure = " ".join(str(getattr(e, "reason", e) or type(e).__name__).split())
        else:
            n = self.max_retries
            raise TeacherServerError(f"teacher server {url}: no answer within {self.timeout_s:g} s after {n} "
                                     f"{'retry' if n == 1 else 'retries'} ({failure[:200]}); {_START}")
        try:
            out = json.loads(raw)
            if not isinstance(out, dict):
                raise ValueError
        except (ValueError, UnicodeDecodeError):
            raise TeacherServerError(f"teacher server {url}: the reply is not a JSON object "
                                     f"({raw[:80].decode('utf-8', 'replace')!r}); point teacher.url at the "
                                     "OpenAI-compatible API of a vLLM server (often ending in /v1)") from None
        return out


@torch.no_grad()
def local_sequence_logprobs(model, seqs: list[list[int]], batch_size: int = 8) -> list[list[float]]:
    """`ServedTeacher.sequence_logprobs` from a causal LM in this process (fp32 log-softmax, right-padded batches):
    the reference for `self_test`."""
    from continual_opd.teacher_server import forward_logprobs

    out: list[list[float]] = [[] for _ in seqs]
    todo = [i for i, s in enumerate(seqs) if len(s) > 1]
    for k in range(0, len(todo), batch_size):
        idx = todo[k:k + batch_size]
        for i, lp_NV in zip(idx, forward_logprobs(model, [seqs[i] for i in idx])):
            tgt_N = torch.tensor(seqs[i][1:], device=lp_NV.device)
            out[i] = lp_NV[:-1].gather(1, tgt_N[:, None])[:, 0].tolist()
    return out


# plain text with accents, a dash, non-Latin script, an emoji, digits and whitespace runs
_TEXT_PROBES = ["Café naïve — Zürich, 東京 and Москва 🙂: 12 + 30 = 42.\n\tdone  ", "Hello world! It's 3.14159."]


def _at(ids: list[int] | None, k: int) -> str:
    return str(ids[k]) if ids is not None and k < len(ids) else "end"


def _max_diff(pairs) -> float:
    d = 0.0
    for a, b in pairs:
        if len(a) != len(b):
            return math.inf
        d = max([d] + [abs(x - y) for x, y in zip(a, b)])
    return d


def _detail(raw: bytes) -> str:
    """The message of a vLLM / FastAPI error body ({"error": {"message"}}, {"message"} or {"detail"}), else its text."""
    try:
        body = json.loads(raw)
        err = body.get("error", body)
        msg = (err.get("message") or body.get("detail")) if isinstance(err, dict) else err
        if msg:
            return " ".join(str(msg).split())[:300]
    except (ValueError, AttributeError, UnicodeDecodeError):
        pass
    return " ".join(raw[:300].decode("utf-8", "replace").split())


def _fix(status: int, detail: str) -> str:
    if "does not exist" in detail:
        return "set teacher.model to the served model's name (GET /v1/models lists it; vllm serve --served-model-name)"
    if status in (404, 405):
        return "point teacher.url at the OpenAI-compatible API of a vLLM server (often ending in /v1)"
    if status in (401, 403):
        return "the server wants credentials; serve the teacher without an API key on a private network"
    return "the server rejected the request: check that it is vLLM-compatible and that the sequences fit its " \
           "max_model_len (vllm serve --max-model-len)"
