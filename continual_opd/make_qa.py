"""make-qa: question/answer pairs grounded in documents, for a held-out domain eval and OPD doc prompts.

Design. Documents are split into passages (Markdown heading sections, then paragraphs; each passage keeps its
nearest heading as `section`). A generator turns a passage into candidate (question, answer) pairs:

* `extract` (offline, deterministic, no model): fact-bearing spans are found with patterns (numbers with units,
  codes such as `VPN-220` / `ISO 27001`, dates, times, emails/URLs, #channels, owner phrases such as "led by X",
  capitalized names). The answer is the span; each fact gets several wordings: a wh-question where a simple pattern
  allows ("Who is the finance team led by?", "Every employee gets how many days of paid annual leave?"), a cloze,
  a section-anchored cloze and a fill-in-the-blank. The blank replaces every occurrence of the answer.
* a `ChatBackend` (a local transformers model via `generation.generate`, or any OpenAI-compatible endpoint over
  stdlib `urllib`, which needs `allow_remote=True` because it sends the documents away) is asked for a JSON list
  of {"question", "answer"} items with several phrasings per fact; replies are parsed leniently.

Every pair is checked (failures counted by reason in the manifest): the answer occurs in its passage, the answer
is not in the question, the question is non-empty and ends with "?" or is a cloze, no duplicate question. Pairs
are grouped by fact (fact id = passage id + normalized answer). One wording of each fact is held out (the
wh-question when there is one: a paraphrase the model never trained on, as in data_samples/domain_qa) and goes to
`dev` or `test` (a seeded hash of the fact id), the others go to `train`; a final check drops any eval question
whose text is also in train. A few unanswerable questions (an entity swapped for a made-up name that occurs in no
document, or an attribute the documents never mention) test abstention. Normalization is SQuAD's, as in the eval.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import random
import re
import string
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

from continual_opd.errors import ContinualOPDError, DataError, RunDirError
from continual_opd.io import atomic_write_json, atomic_write_text, read_text, write_jsonl

ABSTAIN_ANSWERS = ["I don't know", "The documents do not say", "not in the documents"]
INSTRUCTION = ("Answer the question about the company in a few words. If the company documents do not contain "
               "the answer, say \"I don't know\".")
DOC_SUFFIXES = (".md", ".txt")


log = logging.getLogger(__name__)

class EndpointError(ContinualOPDError):
    """A chat endpoint cannot be used (refused connection, HTTP error, a reply that is not a chat completion)."""


def normalize(text: str) -> str:
    """SQuAD normalization (lowercase, no punctuation, no a/an/the, single spaces), as the domain_qa eval uses."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def _has(haystack: str, needle: str) -> bool:
    """The normalized needle occurs in the normalized haystack as whole words."""
    n = normalize(needle)
    return bool(n) and f" {n} " in f" {normalize(haystack)} "


# ------------------------------------------------------------------------------------------------ passages


@dataclass(frozen=True)
class Passage:
    id: str  # "<source>#p<n>"
    source: str
    title: str  # the document's first heading, else its file stem
    section: str  # nearest heading above the paragraph
    text: str


def split_passages(source: str, text: str) -> list[Passage]:
    """Markdown heading sections, then blank-line paragraphs; heading lines themselves are not passages."""
    title, section, out, para = Path(source).stem, None, [], []

    def flush():
        body = "\n".join(para).strip()
        if body:
            out.append(Passage(f"{source}#p{len(out)}", source, title, section or title, body))
        para.clear()

    for line in text.splitlines():
        head = re.match(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if head:
            flush()
            section = head.group(1).strip()
            if not out and title == Path(source).stem and line.lstrip().startswith("# "):
                title = section
        elif not line.strip():
            flush()
        else:
            para.append(line)
    flush()
    return out


def sentences(passage: str) -> list[str]:
    """List items one per line, prose split after . ! ? before a capital/digit; Markdown emphasis removed."""
    out = []
    for line in re.split(r"\n(?=\s*(?:[-*+]|\d+[.)])\s)", passage):
        line = re.sub(r"^\s*(?:[-*+]|\d+[.)])\s+", "", line)
        line = re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r"\1 (\2)", " ".join(line.split()))
        line = re.sub(r"(\*\*|__|`)", "", line)
        out += [s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z0-9#\"'(])", line) if s.strip()]
    return [s for s in out if 3 <= len(s.split()) and len(s) <= 400]


# ------------------------------------------------------------------------------------------------ extractor

_MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
_DAYS = "Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday"
_UNITS = (r"%|percent|euros?|EUR|dollars?|USD|pounds?|GBP|CHF|working days|business days|days?|weeks?|months?"
          r"|years?|hours?|minutes?|seconds?|km|kilomet(?:er|re)s?|miles?|met(?:er|re)s?|kg|kilograms?|[KMGT]B")
_NAME = r"[A-Z][\w'’-]+(?:\s+[A-Z][\w'’-]+)*"
_EMAIL = r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"
_FUNCTION = set("the a an our your their its this these that every each all any no new in on at for if when by of "
                "to from with and or but after before during".split())
_PRONOUN = r"(?:It|Its|They|Their|This|These|He|His|She|Her)\b"
_AUX = r"is|are|was|were|has been|have been|has|have|had|must|can|will|should|may|might|could|would"
_ROLE = r"\b(CEO|CFO|CTO|COO|founder|head|director|manager|lead|owner|chair|responsible|contact)\b"
# (kind, pattern, priority): a longer/higher-priority span wins where spans overlap; group "x" is the answer.
_PATTERNS = [
    ("email", _EMAIL, 9), ("url", r"(?:https?://|www\.)[^\s)>\]]+[^\s)>\].,;:!?]", 9),
    ("date", rf"\b\d{{1,2}}(?:st|nd|rd|th)? (?:of )?(?:{_MONTHS})(?:,? \d{{4}})?\b", 8),
    ("date", rf"\b(?:{_MONTHS}) \d{{1,2}}(?:st|nd|rd|th)?(?:, \d{{4}})?\b|\b(?:{_MONTHS}) \d{{4}}\b", 8),
    ("date", r"\b\d{4}-\d{2}-\d{2}\b", 8),
    ("code", r"\b[A-Z][A-Z0-9]{1,9}-\d[A-Z0-9-]*\b|\b(?:ISO|IEC|SOC|RFC|NIST|PCI DSS)[ -]?\d+(?:[-:]\d+)*\b", 7),
    ("channel", r"(?<![\w#])#[A-Za-z][\w-]*", 7), ("time", r"\b\d{1,2}:\d{2}(?:\s?[ap]\.?m\.?)?", 7),
    ("owner", rf"\b(?:owned|led|run|managed|maintained|approved|headed|started|founded|coordinated|handled|chaired|"
              rf"supervised) by (?:(?P<x>{_EMAIL}|{_NAME})|the (?P<y>[a-z][\w -]*? team)\b)", 6),
    ("owner", rf"(?P<x>{_NAME}) (?:is|are) (?:responsible|accountable) for\b", 6),
    ("owner", rf"\b[Cc]ontact (?P<x>{_EMAIL}|{_NAME})|\breports? to (?P<y>{_NAME})", 6),
    ("owner", rf"(?P<x>{_NAME}) (?:is|has been|was|will be) (?:our|the) (?:CEO|CFO|CTO|COO|founder|head|director|"
              r"manager|lead|owner|chair)\b", 6),
    ("quantity", rf"[€$£]\s?\d[\d,]*(?:\.\d+)?|\b\d[\d,]*(?:\.\d+)?\s?(?:{_UNITS})(?![\w])", 5),
    ("month", rf"\b(?:{_MONTHS})\b", 4), ("weekday", rf"\b(?:{_DAYS})\b", 4), ("year", r"\b(?:19|20)\d{2}\b", 3),
    ("number", r"\b\d[\d,]*(?:\.\d+)?\b", 2), ("name", _NAME, 1),
]
_PATTERNS = [(k, re.compile(p), pr) for k, p, pr in _PATTERNS]


def find_spans(sentence: str) -> list[tuple[int, int, str]]:
    """Non-overlapping (start, end, kind) fact spans of one sentence, left to right."""
    cands = []
    for kind, rx, prio in _PATTERNS:
        for m in rx.finditer(sentence):
            g = next((n for n in ("x", "y") if n in rx.groupindex and m.group(n)), None)
            s, e = m.span(g) if g else m.span()
            words = sentence[s:e].split()
            if kind in ("owner", "name"):  # drop leading function words ("The Canopy Hub" -> "Canopy Hub")
                while words and words[0].lower() in _FUNCTION:
                    s += len(words.pop(0)) + 1
                    s += len(sentence[s:]) - len(sentence[s:].lstrip())
                if not words or (len(words) == 1 and (words[0].isupper() or s == 0)):
                    continue  # a sentence's first word, or an acronym (IT, CEO), is no name
            if kind == "month" and sentence[s:e] == "May" and not re.search(r"\b(in|of|until|by|since)\s$",
                                                                              sentence[:s]):
                continue
            cands.append((prio, e - s, s, e, kind))
    taken: list[tuple[int, int, str]] = []
    for _, _, s, e, kind in sorted(cands, key=lambda c: (-c[0], -c[1], c[2])):
        if all(e <= ts or s >= te for ts, te, _ in taken):
            taken.append((s, e, kind))
    return sorted(taken)


def cloze(sentence: str, answer: str) -> str:
    """The sentence with every occurrence of the answer (case-insensitive, whole words) blanked as ___."""
    pat = re.escape(answer)
    pat = (r"\b" if answer[:1].isalnum() else "") + pat + (r"\b" if answer[-1:].isalnum() else "")
    return re.sub(pat, "___", sentence, flags=re.I)


def _lc(subject: str) -> str:
    first, _, rest = subject.partition(" ")
    return (first.lower() if first.lower() in _FUNCTION else first) + (" " + rest if rest else "")


def _wh_phrase(kind: str, answer: str, after: str) -> str | None:
    if kind == "quantity":
        unit = re.sub(r"^[\d,.\s]+", "", answer)
        return ("what percentage" if unit in ("%", "percent") else "how much" if answer[:1] in "€$£"
                else f"how many {unit if unit.endswith('s') else unit + 's'}")
    if kind == "number":
        return "how many" if re.match(r"\s+[a-z]+", after) else "what number"  # "employs how many people"
    return {"email": "which email address", "url": "which web address", "date": "what date", "month": "which month",
            "weekday": "which day", "year": "which year", "time": "what time", "code": "which code",
            "channel": "which channel", "owner": "whom"}.get(kind)


def wh_question(sentence: str, s: int, e: int, kind: str) -> str | None:
    """A wh-question whose answer is sentence[s:e], where a simple pattern allows one (else None)."""
    body, answer = sentence.rstrip(".!"), sentence[s:e]
    before, after = body[:s].rstrip(), body[e:]
    if not before:  # the span is the subject: "Tomas Brevik has been our CEO" -> "Who has been our CEO?"
        wh = ("Who" if kind == "owner" or (kind == "name" and re.search(_ROLE, after)) else
              "What" if kind == "name" else (_wh_phrase(kind, answer, after) or "").capitalize())
        return f"{wh}{after}?" if wh and after.strip() else None
    m = re.match(rf"^(?P<subj>.+?) (?P<aux>{_AUX}) (?P<mid>.*)$", before)
    if m and kind in ("owner", "name") and before.endswith(" by"):  # "Who is the finance team led by?"
        return f"Who {m['aux']} {_lc(m['subj'])} {m['mid']}{after}?"
    if m and kind == "name" and re.fullmatch(r"(?:located |based )?(?:in|at)", m["mid"]) and not after.strip():
        return f"Where {m['aux']} {_lc(m['subj'])}?"
    prep = re.search(r"\s(on|in)$", before)
    if m and prep and kind in ("date", "month", "year", "weekday") and prep.start() >= m.end("aux"):
        rest = body[m.end("aux"):prep.start()] + after
        return f"When {m['aux']} {_lc(m['subj'])}{rest}?"
    wh = _wh_phrase(kind, answer, after)
    return f"{before[:1].upper()}{before[1:]} {wh}{after}?" if wh else None


def extract_pairs(passage: Passage) -> list[dict]:
    """Deterministic candidate pairs of one passage: for each fact span, the wh-question (if any), a cloze, a
    section-anchored cloze and a fill-in-the-blank, in that order of preference. A sentence that starts with a
    pronoun ("Its product code is FL-204.") is asked together with the sentence before it."""
    pairs, sents = [], sentences(passage.text)
    for i, sent in enumerate(sents):
        ctx = sents[i - 1] + " " if i and re.match(_PRONOUN, sent) else ""
        for s, e, kind in find_spans(sent):
            answer, blank = sent[s:e], cloze(ctx + sent, sent[s:e])
            wh = wh_question(sent, s, e, kind)
            anchor = (f'the "{passage.section}" section' if not _has(passage.section, answer)
                      else f'the "{passage.title}" document')
            wordings = [("wh", ctx + wh if wh else None),
                        ("cloze", f'In the company documents, what completes this: "{blank}"?'),
                        ("section", f'According to {anchor}, what fills the blank in "{blank}"?'),
                        ("fill", f'Fill in the blank using the {passage.title} document: "{blank}"')]
            pairs += [dict(question=q, answer=answer, wording=w, kind=kind, sentence=ctx + sent)
                      for w, q in wordings if q]
    return pairs


# ------------------------------------------------------------------------------------------------ chat models


class ChatBackend(Protocol):
    name: str

    def complete(self, conversations: list[list[dict]]) -> list[str]: ...


class LocalBackend:
    """A transformers model in memory, greedy, through `continual_opd.generation.generate`."""

    def __init__(self, model, tokenizer, *, max_new_tokens: int = 768, batch_size: int = 4, name: str = "local"):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def complete(self, conversations: list[list[dict]]) -> list[str]:
        from continual_opd.generation import generate

        return generate(self.model, self.tokenizer, conversations, max_new_tokens=self.max_new_tokens,
                        batch_size=self.batch_size, engine="hf")


class EndpointBackend:
    """Any OpenAI-compatible server: POST {base_url}/chat/completions, temperature 0, one request per passage."""

    def __init__(self, base_url: str, model: str, *, allow_remote: bool = False, api_key_env: str = "OPENAI_API_KEY",
                 max_tokens: int = 1024, timeout_s: float = 120.0, concurrency: int = 8):
        self.concurrency = concurrency
        self.url = base_url.rstrip("/") + "/chat/completions"
        if not allow_remote:
            raise EndpointError(f"{self.url}: sending the documents to an endpoint needs allow_remote=True "
                                "(CLI: --send-documents-to-endpoint); nothing was sent")
        self.model, self.name, self.max_tokens, self.timeout_s = model, f"endpoint:{model}@{base_url}", max_tokens, \
            timeout_s
        self.api_key = os.environ.get(api_key_env or "", "")
        host = urllib.parse.urlparse(self.url).hostname or ""
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        # a local server is reached directly even when an http(s)_proxy is set for the outside world
        self._opener = urllib.request.build_opener(*([urllib.request.ProxyHandler({})] if loopback else []))

    def complete(self, conversations: list[list[dict]]) -> list[str]:
        # a few requests in flight: servers such as vLLM batch concurrent requests; order is kept
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self._one, conversations))

    def _one(self, messages: list[dict]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0, "max_tokens": self.max_tokens})
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=body.encode(), headers=headers, method="POST")
        try:
            with self._opener.open(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = " ".join(e.read()[:200].decode("utf-8", "replace").split())
            raise EndpointError(f"{self.url}: HTTP {e.code} {e.reason} ({detail}); check the model name, the API "
                                "key and the base URL") from None
        except (urllib.error.URLError, OSError) as e:
            reason = " ".join(str(getattr(e, "reason", e)).split())
            raise EndpointError(f"{self.url}: cannot connect ({reason}); is the server running, and is the base URL "
                                "right?") from None
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
            if not isinstance(content, str):
                raise TypeError
        except (ValueError, KeyError, IndexError, TypeError):
            head = " ".join(raw[:80].decode("utf-8", "replace").split())
            raise EndpointError(f"{self.url}: the reply is not an OpenAI chat completion ({head!r}); point the base "
                                "URL at an OpenAI-compatible API (often ending in /v1)") from None
        return content


def chat_prompt(passage: Passage, wordings: int) -> list[dict]:
    return [{"role": "user", "content": (
        f'Here is a passage from the company document "{passage.title}" (section "{passage.section}"):\n\n'
        f'"""\n{passage.text}\n"""\n\n'
        "Find the facts in the passage (names, numbers with units, dates, codes, owners, places). For each fact "
        f"write {wordings} differently worded questions whose answer is that fact. Copy each answer exactly from the "
        "passage and keep it short (a few words). Never put the answer in the question.\n"
        'Reply with only a JSON list: [{"question": "...", "answer": "..."}, ...]')}]


def parse_pairs(reply: str) -> tuple[list[dict], int] | None:
    """Lenient JSON: inside code fences or not, text around it ignored. (items, malformed items), None if no list."""
    fenced = re.findall(r"```(?:json)?\s*(.*?)```", reply, flags=re.S)
    decoder, data = json.JSONDecoder(), None
    for text in fenced + [reply]:
        for i, ch in enumerate(text):
            if ch in "[{":
                try:
                    data = decoder.raw_decode(text[i:])[0]
                    break
                except ValueError:
                    continue
        if data is not None:
            break
    if isinstance(data, dict):
        data = next((v for v in data.values() if isinstance(v, list)), [data])
    if not isinstance(data, list):
        return None
    items, bad = [], 0
    for it in data:
        qs = it.get("questions", [it.get("question")]) if isinstance(it, dict) else None
        ans = it.get("answer") if isinstance(it, dict) else None
        ans = str(ans) if isinstance(ans, (int, float)) and not isinstance(ans, bool) else ans
        if not isinstance(qs, list) or not isinstance(ans, str) or not all(isinstance(q, str) for q in qs):
            bad += 1
            continue
        items += [dict(question=q.strip(), answer=ans.strip(), wording="chat", kind="chat") for q in qs]
    return items, bad


# ------------------------------------------------------------------------------------------------ checks, split


def _unit(seed: int, key: str) -> float:
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:12], 16) / 16**12


def check_pair(pair: dict, passage: Passage) -> str | None:
    """The reason a pair is rejected, or None."""
    q, a = pair["question"].strip(), pair["answer"].strip()
    if not q or not (q.endswith("?") or "___" in q):
        return "bad_question"
    if not normalize(a):
        return "empty_answer"
    if not _has(passage.text, a):
        return "answer_not_in_passage"
    if _has(q, a):
        return "answer_in_question"
    return None


def _fabricated_names(rng: random.Random, corpus: str, n: int) -> list[str]:
    syl = ["zor", "vel", "quin", "tam", "bri", "kes", "lun", "dra", "mor", "pex", "sil", "var", "oth", "rin", "gal"]
    out: list[str] = []
    while len(out) < n:
        name = "".join(rng.sample(syl, 3)).capitalize()
        if name.lower() not in corpus and name not in out:
            out.append(name)
    return out


_ATTRIBUTES = ["the name of the company mascot", "the Wi-Fi password for guests", "the code of the bike shed lock",
               "the name of the canteen chef", "the company's official anthem", "the floor of the rooftop garden"]


def unanswerable(questions: list[dict], corpus: str, n: int, seed: int) -> list[dict]:
    """n questions the documents cannot answer: about half are real wh-questions with their name swapped for a
    made-up one that occurs in no document, the rest ask for an attribute the documents never mention."""
    rng, corpus_l = random.Random(seed), corpus.lower()
    attrs = [f"What is {a}?" for a in _ATTRIBUTES if not any(_has(corpus, w) for w in re.findall(r"[a-z]{5,}", a)
                                                           if w not in ("company", "official"))]
    names, out = iter(_fabricated_names(rng, corpus_l, n)), []
    for p in sorted(questions, key=lambda p: _unit(seed, p["question"])):
        spans = [(s, e) for s, e, k in find_spans(p["question"]) if k == "name"]
        if len(out) < n - min(n // 2, len(attrs)) and p["wording"] == "wh" and spans and ". " not in p["question"]:
            new = next(names)
            out.append(dict(question=p["question"][:spans[0][0]] + new + p["question"][spans[0][1]:], entity=new))
    out += [dict(question=q, entity=q[8:-1]) for q in attrs[: n - len(out)]]
    return [dict(r, answer=list(ABSTAIN_ANSWERS), answerable=False) for r in out]


def read_documents(sources: Sequence[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """(path, text) of each readable document and the paths skipped: through `continual_opd.ingest` when present,
    else .md/.txt files (directories searched recursively)."""
    try:
        from continual_opd.ingest import ingest_documents
    except ImportError:
        ingest_documents = None
    if ingest_documents is not None:
        ing = ingest_documents(list(sources))
        paths = [str(ing.records[j].path) for j in ing.text_record]  # texts[i] came from records[text_record[i]]
        n = Counter(paths)
        seen: Counter = Counter()
        docs = []
        for path, text in zip(paths, ing.texts):  # a .jsonl file gives several texts: path[0], path[1], ...
            docs.append((path if n[path] == 1 else f"{path}[{seen[path]}]", text))
            seen[path] += 1
        return docs, [str(r.path) for r in ing.records if r.status != "read"]
    files = [f for s in sources for f in (sorted(Path(s).rglob("*")) if Path(s).is_dir() else [Path(s)])]
    docs = [(str(f), read_text(f, "document")) for f in files if f.suffix in DOC_SUFFIXES]
    return docs, [str(f) for f in files if f.is_file() and f.suffix not in DOC_SUFFIXES]


def _suite_yaml(name: str, data: str, n_docs: int, generator: str) -> str:
    return (f"# Held-out questions about {n_docs} document(s), written by make-qa (generator {generator}); rows with\n"
            "# \"answerable\": false count as correct when the model abstains (abstain_acc).\n"
            f"name: {name}\nkind: domain_qa\ndata: {data}\nmax_new_tokens: 64\nbatch_size: 32\nlimit: null\n"
            f"instruction: {json.dumps(INSTRUCTION)}\n")


def generate_pairs(passages: list[Passage], generator: str | ChatBackend, wordings: int, progress: bool,
                   rejected: Counter) -> list[list[dict]]:
    """Candidate pairs per passage: the extractor's, or a chat model's (8 passages per `complete` call)."""
    if generator == "extract":
        return [extract_pairs(p) for p in passages]
    raw: list[list[dict]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(passages), desc="make-qa", unit="passage")
    for i in range(0, len(passages), 8):
        for reply in generator.complete([chat_prompt(p, wordings) for p in passages[i:i + 8]]):
            parsed = parse_pairs(reply)
            rejected["unparseable_reply"] += parsed is None
            rejected["malformed_item"] += parsed[1] if parsed else 0
            raw.append(parsed[0] if parsed else [])
        if bar is not None:
            bar.update(len(passages[i:i + 8]))
    if bar is not None:
        bar.close()
    return raw


def group_facts(passages: list[Passage], raw: list[list[dict]], rejected: Counter) -> list[dict]:
    """Checked pairs grouped by fact (passage id + normalized answer), in document order; rejections counted."""
    facts: dict[str, dict] = {}
    seen: set[str] = set()
    for passage, pairs in zip(passages, raw):
        for pair in pairs:
            reason = check_pair(pair, passage) or ("duplicate_question" if normalize(pair["question"]) in seen
                                                   else None)
            if reason:
                rejected[reason] += 1
                continue
            seen.add(normalize(pair["question"]))
            m = re.search(re.escape(pair["answer"].strip()), passage.text, flags=re.I)
            answer = m.group(0) if m else pair["answer"].strip()  # the passage's own spelling
            fid = f"{passage.id}:{normalize(answer).replace(' ', '_')}"
            sent = pair.get("sentence") or next((s for s in sentences(passage.text) if _has(s, answer)), passage.text)
            fact = facts.setdefault(fid, dict(fact_id=fid, source=passage.source, section=passage.section,
                                              answer=answer, kind=pair["kind"], sentence=sent, passage=passage.text,
                                              wordings=[]))
            fact["wordings"].append(dict(pair, answer=fact["answer"]))
    return list(facts.values())


def split_facts(facts: list[dict], *, seed: int, wordings: int, dev_fraction: float,
                rejected: Counter) -> tuple[list[dict], dict[str, list[dict]], list[dict]]:
    """(train rows, {"dev", "test"} rows, doc prompts). Each fact (with >= 2 wordings) holds one wording out (its
    wh-question if it has one, else a seeded pick) for dev or test (seeded hash of the fact id); the rest train.
    Sets each fact's "split" (dev, test, or train_only). Eval rows whose text is also a train question are dropped."""
    order = ["wh", "cloze", "section", "fill", "chat"]
    train: list[dict] = []
    evals: dict[str, list[dict]] = {"dev": [], "test": []}
    doc_prompts = []
    for fact in facts:
        ws = sorted(fact["wordings"], key=lambda w: order.index(w["wording"]))[:wordings]  # stable for chat
        # by the fact's content, not its id (which names the file relative to the others): adding a document leaves
        # every other fact in its split, so dev and test never trade facts between runs
        key = f"{normalize(fact['sentence'])}|{normalize(fact['answer'])}"
        fact["split"] = "dev" if _unit(seed, key) < dev_fraction else "test"
        held = None
        if len(ws) < 2:
            fact["split"] = "train_only"
            rejected["fact_with_one_wording_train_only"] += 1
        else:
            held = ws[0] if ws[0]["wording"] == "wh" else min(ws, key=lambda w: _unit(seed, w["question"]))
        rows = [dict(fact_id=fact["fact_id"], question=w["question"], answer=fact["answer"], wording=w["wording"])
                for w in ws]
        train += [r for r, w in zip(rows, ws) if w is not held]
        if held is not None:
            evals[fact["split"]].append(dict(rows[ws.index(held)], answerable=True))
        first = next((w for w in ws if w is not held and w["question"].endswith("?")), None)
        doc_prompts += [{"question": first["question"]}] if first is not None else []
    train_q = {normalize(r["question"]) for r in train}
    for split in evals:
        kept = [r for r in evals[split] if normalize(r["question"]) not in train_q]
        rejected["eval_question_in_train"] += len(evals[split]) - len(kept)
        evals[split] = kept
    return train, evals, doc_prompts


def make_qa(docs: Sequence[tuple[str, str]] | Sequence[str], out_dir: Path, *, generator: str | ChatBackend = "extract",
            seed: int = 0, wordings: int = 3, dev_fraction: float = 0.5, max_facts: int | None = None,
            unanswerable_fraction: float = 0.1, progress: bool = True) -> dict:
    """Write train/dev/test QA, doc prompts, facts, two suite YAMLs and manifest.json to a new `out_dir`;
    returns the manifest. `docs`: (path, text) pairs, or paths/directories to read."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise RunDirError(f"{out_dir}: exists and is not an empty directory; choose a new output directory")
    if wordings < 2:
        raise ValueError(f"wordings must be >= 2 (one to train on, one held out), got {wordings}")
    skipped: list[str] = []
    if docs and all(isinstance(d, str) for d in docs):
        docs, skipped = read_documents(docs)  # type: ignore[arg-type]
    # ids name files relative to the documents' common folder, so the seeded split does not depend on the cwd
    root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p, _ in docs]) if docs else ""
    passages = [p for path, text in docs for p in split_passages(os.path.relpath(os.path.abspath(path), root), text)]
    rejected: Counter = Counter()
    gen_name = "extract" if generator == "extract" else generator.name
    facts = group_facts(passages, generate_pairs(passages, generator, wordings, progress, rejected), rejected)
    facts = facts[:max_facts] if max_facts else facts
    train, evals, doc_prompts = split_facts(facts, seed=seed, wordings=wordings, dev_fraction=dev_fraction,
                                            rejected=rejected)
    if not evals["dev"] and not evals["test"]:
        raise DataError(f"no question could be held out from {len(docs)} document(s) ({len(facts)} facts; rejected: "
                        f"{dict(rejected) or 'none'}); add documents with concrete facts, or use another generator")
    for split, rows in evals.items():
        if not rows:
            log.warning("make-qa: the %s split has no answerable question (%d facts in all): its suite scores "
                        "abstention only; add documents for a %s score", split, len(facts), split)
    seen = {normalize(w["question"]) for f in facts for w in f["wordings"]}
    corpus = "\n".join(text for _, text in docs)
    n_eval = len(evals["dev"]) + len(evals["test"])
    n_un = max(3, round(unanswerable_fraction * n_eval)) if n_eval and unanswerable_fraction > 0 else 0
    candidates = [w for f in facts for w in f["wordings"]]
    for i, r in enumerate(unanswerable(candidates, corpus, n_un, seed)):
        if normalize(r["question"]) not in seen:
            evals["dev" if i % 2 == 0 else "test"].append(dict(fact_id=f"unanswerable-{i}", **r))
    for split, rows in [("train", train), *evals.items()]:
        for i, r in enumerate(rows):
            r["id"] = f"qa-{split}-{i:04d}"
    for name, rows in [("train.jsonl", train), ("dev.jsonl", evals["dev"]), ("test.jsonl", evals["test"]),
                       ("doc_prompts.jsonl", doc_prompts),
                       ("facts.jsonl", [{k: v for k, v in f.items() if k != "wordings"} for f in facts])]:
        write_jsonl(out_dir / name, rows)
    for split in ("dev", "test"):
        atomic_write_text(out_dir / f"domain_qa_{split}.yaml",
                          _suite_yaml(f"domain_qa_{split}", f"{split}.jsonl", len(docs), gen_name))
    count = lambda rows, a: sum(r.get("answerable", True) is a for r in rows)  # noqa: E731
    manifest = {
        "generator": gen_name, "seed": seed, "wordings": wordings, "dev_fraction": dev_fraction,
        "counts": {"documents": len(docs), "passages": len(passages), "facts": len(facts),
                   "facts_dev": sum(f["split"] == "dev" for f in facts),
                   "facts_test": sum(f["split"] == "test" for f in facts), "train": len(train),
                   "dev": count(evals["dev"], True), "test": count(evals["test"], True),
                   "dev_unanswerable": count(evals["dev"], False), "test_unanswerable": count(evals["test"], False),
                   "doc_prompts": len(doc_prompts)},
        "rejected": {k: v for k, v in sorted(rejected.items()) if v},
        "documents": [{"path": p, "sha256": hashlib.sha256(t.encode()).hexdigest()} for p, t in docs],
        "skipped_documents": skipped,
        "files": ["train.jsonl", "dev.jsonl", "test.jsonl", "doc_prompts.jsonl", "facts.jsonl",
                  "domain_qa_dev.yaml", "domain_qa_test.yaml"],
    }
    atomic_write_json(out_dir / "manifest.json", manifest)
    return manifest
