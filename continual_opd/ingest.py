"""Document ingestion: turn a recipe's `documents` sources (folders, files, `hf:` datasets) into plain texts.

Formats are picked by suffix, case-insensitively: text (.txt .md .markdown .rst .text) is read as is; HTML, PDF and
DOCX are converted to Markdown-ish text (headings `#`, lists `-`/`1.`); .jsonl files hold `{"text"}` rows; `hf:NAME
[:split]` loads a dataset. A folder of real company documents is messy, so a file that cannot be read (corrupt,
not UTF-8, an unknown suffix, near-empty, a duplicate, hidden or junk) is skipped and recorded, never fatal; only a
folder (or a source list) with nothing readable at all is an error. Every file gets a `DocRecord`, which
`summary_lines` prints and `write_manifest` saves (the SFT stage writes it as `documents.json`).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from continual_opd.errors import DataError
from continual_opd.io import atomic_write_json, read_jsonl_lines

log = logging.getLogger(__name__)

FORMATS = {".txt": "text", ".md": "text", ".markdown": "text", ".rst": "text", ".text": "text",
           ".html": "html", ".htm": "html", ".pdf": "pdf", ".docx": "docx", ".jsonl": "jsonl"}
SUPPORTED = " ".join(FORMATS)
MIN_CHARS = 20  # fewer non-whitespace characters than this after conversion: a blank page, not a document
JUNK_NAMES = {"thumbs.db", "desktop.ini"}  # (.DS_Store and friends are hidden files already)
DOCS_FIX = 'pip install "continual-opd[docs]"'
SILENT = ("hidden", "hidden folder", "junk", "Office lock file")  # recorded, not warned about
HTML_DROP = ["script", "style", "nav", "noscript", "template"]  # code and site chrome, not content


@dataclass
class DocRecord:
    path: str  # the file, or the `hf:` source
    format: str  # text | html | pdf | docx | jsonl | hf | unknown
    status: str  # read | skipped
    reason: str | None = None  # why it was skipped
    chars: int = 0  # characters of converted text
    pages: int | None = None  # PDF page count
    sha256: str | None = None  # of the converted text, first 16 hex digits
    tokens: int | None = None  # filled by count_tokens


@dataclass
class Ingested:
    texts: list[str] = field(default_factory=list)
    records: list[DocRecord] = field(default_factory=list)
    text_record: list[int] = field(default_factory=list)  # texts[i] came from records[text_record[i]]


class _Skip(Exception):
    """A file that is unreadable in a way the user can live with: recorded, warned about, skipped."""


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]


def _need(module: str, path: Path):
    # Lazy: the converters are an optional extra; a missing one is the user's to install, so it is fatal.
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"{path}: reading {path.suffix.lower()} files needs the `{module}` package, which is not "
                        f"installed; {DOCS_FIX}") from None


def _tidy(text: str) -> str:
    # Converters leave trailing spaces and runs of blank lines; one blank line is enough to separate blocks.
    text = "\n".join(line.rstrip() for line in text.splitlines())
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def _read_text(path: Path) -> str:
    # io.read_text's checks, as skips: one bad file in a folder of hundreds should not stop the run
    data = path.read_bytes()
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):  # Windows "Unicode" (UTF-16) text
        raise _Skip("not UTF-8 text (UTF-16)")
    if data[:2] == b"\x1f\x8b" or b"\x00" in data[:8192]:
        raise _Skip("binary file, not text")
    try:
        return data.decode("utf-8-sig")  # editors on Windows write a byte-order mark; it is not data
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise _Skip(f"not UTF-8 text (line {line}, byte 0x{data[e.start]:02x})") from None


def _read_html(path: Path) -> str:
    bs4, md = _need("bs4", path), _need("markdownify", path)
    soup = bs4.BeautifulSoup(path.read_bytes(), "html.parser")  # bytes: bs4 honours <meta charset> itself
    for tag in soup(HTML_DROP):
        tag.decompose()
    return _tidy(md.MarkdownConverter(heading_style="ATX", bullets="-").convert_soup(soup))


def _read_pdf(path: Path) -> tuple[str, int]:
    pypdf = _need("pypdf", path)
    quiet = logging.getLogger("pypdf")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # pypdf logs its repairs of a damaged file; our one warning per file says enough
    try:
        reader = pypdf.PdfReader(path)
        pages = [page.extract_text() or "" for page in reader.pages]
    except Exception as e:  # pypdf raises many kinds for damaged or encrypted files
        raise _Skip(f"cannot parse PDF: {_first_line(e)}") from None
    finally:
        quiet.setLevel(level)
    return _tidy("\n\n".join(pages)), len(pages)


def _read_docx(path: Path) -> str:
    docx = _need("docx", path)
    try:
        document = docx.Document(str(path))
        lines = []
        for block in document.iter_inner_content():  # paragraphs and tables in document order
            if hasattr(block, "rows"):
                for row in block.rows:
                    cells = []
                    for cell in row.cells:  # a merged cell is returned once per grid column it spans
                        if not cells or cell._tc is not cells[-1]._tc:
                            cells.append(cell)
                    lines.append(" | ".join(c.text.strip() for c in cells))
                lines.append("")
                continue
            style = block.style.name if block.style is not None else ""
            heading = re.fullmatch(r"Heading (\d)", style)
            prefix = ("#" * int(heading.group(1)) + " " if heading else "# " if style == "Title"
                      else "- " if style.startswith("List Bullet") else "1. " if style.startswith("List Number")
                      else "")  # nesting (List Bullet 2) is dropped: the words matter, not the indent
            item = prefix.startswith(("-", "1."))
            if not item and lines and lines[-1].startswith(("-", "1.")):
                lines.append("")  # end the list, else Markdown reads the paragraph as part of its last item
            lines.append(prefix + block.text)
            if not item:
                lines.append("")  # headings and body paragraphs are blocks; list items stay together
    except Exception as e:  # not a zip, missing parts: python-docx raises several kinds
        raise _Skip(f"cannot parse DOCX: {_first_line(e)}") from None
    return _tidy("\n".join(lines))


def _has_text_rows(path: Path) -> bool:
    """Whether a .jsonl met in a folder holds documents: its first row has `text` (chat or QA rows do not)."""
    try:
        with path.open(encoding="utf-8") as fh:
            first = next((line for line in fh if line.strip()), "")
        row = json.loads(first) if first else {}
    except (OSError, ValueError):
        return True  # let the row-by-row reader name the bad line
    return not isinstance(row, dict) or "text" in row


def _shown(path: Path) -> str:
    """The path as text that JSON and the terminal can carry: a name that is not valid UTF-8 (bytes from another
    system's encoding) keeps its readable part and shows the odd bytes as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _ignored(name: str) -> str | None:
    if name.startswith("~$"):
        return "Office lock file"
    if name.startswith("."):
        return "hidden"
    if name.lower() in JUNK_NAMES or name.endswith("~"):
        return "junk"
    return None


def is_qa_folder(folder: Path) -> bool:
    """A folder written by `continual-opd data make-qa`: questions about the documents, not documents."""
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        m = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and "generator" in m and "domain_qa_test.yaml" in m.get("files", [])


def _walk(folder: Path):
    """The folder's files in a stable order, and the folders it does not enter (recorded once): hidden ones (.git
    is big), `data make-qa` output (eval questions must never become training text) and a symlink to a folder
    already walked (a loop). Symlinked folders are followed."""
    seen = {os.path.realpath(folder)}
    for root, dirs, names in os.walk(folder, followlinks=True):
        dirs.sort()
        keep = []
        for d in dirs:
            path = Path(root, d)
            real = os.path.realpath(path)
            if d.startswith(".") or is_qa_folder(path) or real in seen:
                yield path
            else:
                seen.add(real)
                keep.append(d)
        dirs[:] = keep
        yield from (Path(root, n) for n in sorted(names))


def _category(reason: str) -> str:
    """The kind of skip, without the details: `near-empty (3 chars)` -> `near-empty`."""
    return "duplicate" if reason.startswith("duplicate of") else re.split(r" \(|: |, ", reason, maxsplit=1)[0]


def skip_breakdown(records: list[DocRecord]) -> str:
    """`3 skipped: 2 unsupported suffix (.xlsx), 1 near-empty` for the skipped records."""
    skipped = [r for r in records if r.status == "skipped"]
    counts = Counter("unsupported suffix" if r.reason.startswith("unsupported suffix") else _category(r.reason)
                     for r in skipped)
    suffixes = sorted({r.reason.split()[-1] for r in skipped if r.reason.startswith("unsupported suffix")})
    parts = [f"{n} {k}" + (f" ({', '.join(suffixes)})" if k == "unsupported suffix" else "")
             for k, n in sorted(counts.items(), key=lambda kn: (-kn[1], kn[0]))]
    return f"{len(skipped)} skipped" + (f": {', '.join(parts)}" if parts else "")


def ingest_documents(sources: list[str]) -> Ingested:
    """Read every source into texts, with one `DocRecord` per file (or `hf:` source). See the module docstring."""
    out = Ingested()
    seen: dict[str, str] = {}  # hash of the whitespace-collapsed text -> the first file with that text

    def keep(rec: DocRecord, texts: list[str]) -> None:
        out.text_record.extend([len(out.records)] * len(texts))
        out.texts.extend(texts)
        out.records.append(rec)

    def skip(rec: DocRecord, reason: str) -> None:
        rec.status, rec.reason = "skipped", reason
        out.records.append(rec)
        if reason in SILENT:
            log.debug("%s: skipped (%s)", rec.path, reason)
        else:
            log.warning("%s: skipped document: %s%s", rec.path, reason, _fix(reason))

    def read_file(f: Path, in_folder: bool) -> None:
        kind = FORMATS.get(f.suffix.lower())
        if in_folder and (why := _ignored(f.name)):
            return skip(DocRecord(_shown(f), kind or "unknown", "read"), why + " folder" * f.is_dir())
        if in_folder and f.is_dir():
            why = "make-qa output (questions, not documents)" if is_qa_folder(f) else "symlink loop"
            return skip(DocRecord(_shown(f), "folder", "read"), why)
        if kind is None:
            if not in_folder:  # named on purpose: a wrong file, not clutter in a folder
                raise DataError(f"{f}: unsupported document suffix {f.suffix or '(none)'}; supported: {SUPPORTED} "
                                "(convert the file, or name a folder)")
            return skip(DocRecord(_shown(f), "unknown", "read"), f"unsupported suffix {f.suffix.lower() or '(none)'}")
        if kind == "jsonl" and in_folder and not _has_text_rows(f):
            return skip(DocRecord(_shown(f), kind, "read"), "JSONL rows without `text` (chat or QA data?)")
        if kind == "jsonl":  # structured rows the user prepared: their errors stay fatal, naming file:line
            texts = [_jsonl_text(f"{f}:{ln}", r["text"])
                     for ln, r in read_jsonl_lines(f, required=("text",), what="documents")]
            return keep(DocRecord(_shown(f), kind, "read", chars=sum(map(len, texts)),
                                  sha256=_sha("\n".join(texts))), texts)
        rec = DocRecord(_shown(f), kind, "read")
        try:
            if kind == "pdf":
                text, rec.pages = _read_pdf(f)
            else:
                text = {"text": _read_text, "html": _read_html, "docx": _read_docx}[kind](f)
        except _Skip as e:
            return skip(rec, str(e))
        except OSError as e:
            return skip(rec, f"cannot read: {_first_line(e)}")
        rec.chars, rec.sha256 = len(text), _sha(text)
        # one file = one document, so a blank page or a copy is worth skipping (jsonl and hf rows are kept as is)
        words, norm = text.split(), _sha(" ".join(text.split()))
        if len("".join(words)) < MIN_CHARS:
            scanned = kind == "pdf" and rec.pages
            return skip(rec, f"near-empty ({len(''.join(words))} chars" +
                        (f" from {rec.pages} pages: a scan without a text layer? run OCR on it)" if scanned else ")"))
        if norm in seen:
            return skip(rec, f"duplicate of {seen[norm]}")
        seen[norm] = rec.path
        keep(rec, [text])

    for src in sources:
        if src.startswith("hf:"):
            from continual_opd import data  # late: data imports this module

            texts = [r["text"] for r in data._hf_rows(src)]
            keep(DocRecord(src, "hf", "read", chars=sum(map(len, texts)), sha256=_sha("\n".join(texts))), texts)
            continue
        p = Path(src)
        if not p.exists():
            raise DataError(f"{p}: documents source not found; check the path in the recipe "
                            "(relative to the recipe file)")
        if not p.is_dir():
            read_file(p, in_folder=False)
            continue
        start = len(out.records)
        for f in _walk(p):
            read_file(f, in_folder=True)
        mine = out.records[start:]
        # a duplicate is readable (its text is in the run once): only a folder with nothing usable is an error
        if not any(r.status == "read" or r.reason.startswith("duplicate") for r in mine):
            why = skip_breakdown(mine) if mine else "it is empty"
            raise DataError(f"{p}: no readable document in the folder ({why}); "
                            f"add {SUPPORTED} files or fix the skipped ones (each is named in a warning)")
    if not out.texts:
        raise DataError(f"{', '.join(sources) or 'documents'}: no readable document ({skip_breakdown(out.records)}); "
                        f"add {SUPPORTED} files or fix the skipped ones (each is named in a warning)")
    log.info("documents: %s", _totals_line(out))
    return out


def _jsonl_text(where: str, text) -> str:
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: `text` must be a non-empty string, got {json.dumps(text)[:40]}; "
                        "fix or remove the line")
    return text


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _fix(reason: str) -> str:
    if reason.startswith(("near-empty", "duplicate", "make-qa output", "symlink loop")):
        return ""
    if reason.startswith("JSONL rows without"):
        return "; list chat files under `chat`, QA under `qa`, or give documents rows a `text` field"
    return "; " + ("re-save it as UTF-8" if reason.startswith("not UTF-8") else
                   f"convert it to one of {SUPPORTED}" if reason.startswith(("unsupported", "binary")) else
                   "fix or re-export the file") + " to include it"


def _totals(ing: Ingested) -> dict:
    read = [r for r in ing.records if r.status == "read"]
    tokens = [r.tokens for r in read]
    return {"files": len(ing.records), "read": len(read), "skipped": len(ing.records) - len(read),
            "documents": len(ing.texts), "chars": sum(r.chars for r in read),
            "tokens": sum(tokens) if read and None not in tokens else None,
            "skipped_reasons": dict(Counter(_category(r.reason) for r in ing.records if r.status == "skipped"))}


def _totals_line(ing: Ingested) -> str:
    t = _totals(ing)
    tokens = f", {t['tokens']:,} tokens" if t["tokens"] is not None else ""
    return (f"{t['read']} read ({t['documents']} documents, {t['chars']:,} chars{tokens}), "
            f"{skip_breakdown(ing.records)}")


def count_tokens(ingested: Ingested, tokenizer) -> Ingested:
    """Fill `tokens` on the read records (a jsonl or hf record sums its rows), no special tokens added."""
    ids = tokenizer(ingested.texts, add_special_tokens=False)["input_ids"] if ingested.texts else []
    for rec in ingested.records:
        rec.tokens = 0 if rec.status == "read" else None
    for i, row in zip(ingested.text_record, ids):
        ingested.records[i].tokens += len(row)
    return ingested


def summary_lines(ingested: Ingested) -> list[str]:
    """One line per file (status, format, chars/tokens, path, reason), then a totals line."""
    lines = []
    for r in ingested.records:
        size = f"{r.chars:>9,} ch" + (f" {r.tokens:>8,} tok" if r.tokens is not None else "")
        lines.append(f"{r.status:<7} {r.format:<7} {size}  {r.path}" + (f"  ({r.reason})" if r.reason else ""))
    return [*lines, f"total: {_totals_line(ingested)}"]


def write_manifest(ingested: Ingested, path: str | Path) -> None:
    """`{"files": [record, ...], "totals": {...}}` as JSON, written atomically."""
    atomic_write_json(path, {"files": [asdict(r) for r in ingested.records], "totals": _totals(ingested)})
