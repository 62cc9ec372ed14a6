"""Document ingestion: every format converted, the mess of a real docs folder skipped and recorded, the manifest."""

from __future__ import annotations

import json
import logging
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import write_pdf
from continual_opd.errors import DataError
from continual_opd.ingest import count_tokens, ingest_documents, summary_lines, write_manifest

HANDBOOK = "# Handbook\n\nThe Aurora team ships on Fridays.\n"
HTML = """<html><head><style>.x {color: red}</style></head><body>
<nav>Home About Careers</nav>
<h1>Security</h1><h2>Passwords</h2>
<ul><li>Rotate keys yearly</li><li>Never share tokens</li></ul>
<ol><li>Call the Heron desk</li><li>File a ticket</li></ol>
<script>var secretTracker = 1;</script>
</body></html>"""


def _pdf(path: Path) -> Path:
    return write_pdf(path, [["Travel Policy", "- Book flights through Zephyr Travel."],
                            ["Page two names the Quokka expense form."]])


def _docx(path: Path) -> Path:
    import docx

    doc = docx.Document()
    doc.add_heading("Onboarding Guide", level=1)
    doc.add_paragraph("Collect your badge at the Marigold desk.", style="List Bullet")
    doc.add_paragraph("Then meet your buddy.")
    table = doc.add_table(rows=2, cols=2)
    for (r, c), text in {(0, 0): "Office", (0, 1): "City", (1, 0): "HQ", (1, 1): "Bergen"}.items():
        table.cell(r, c).text = text
    doc.save(str(path))
    return path


def _broken_pdf(path: Path) -> Path:
    path.write_bytes(random.Random(0).randbytes(2000))
    return path


@pytest.fixture
def docs(tmp_path) -> Path:
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / ".git").mkdir()
    (d / ".git" / "config").write_text("[core] not a document at all, really\n")
    (d / "a.MD").write_text(HANDBOOK)
    (d / "copy.md").write_text(HANDBOOK.replace(" team", "   team").replace("\n\n", "\n\n\n"))  # same words
    (d / "shout.md").write_text(HANDBOOK.upper())  # case is kept: not a duplicate
    (d / "b.markdown").write_text("Kestrel project notes: every deadline is in March.\n")
    (d / "sub" / "c.rst").write_text("Runbook\n=======\n\nThe Pelican runbook covers restarts.\n")
    (d / "page.HTML").write_text(HTML)
    _pdf(d / "policy.pdf")
    _docx(d / "guide.docx")
    (d / "empty.md").write_text("")
    (d / "latin.txt").write_bytes("Staff caf\u00e9 rules\nCaf\u00e9 opens at eight.\n".encode("latin-1"))
    (d / "report.xlsx").write_bytes(b"PK\x03\x04 not really a spreadsheet")
    _broken_pdf(d / "broken.pdf")
    (d / ".DS_Store").write_bytes(b"\x00\x01")
    (d / "~$guide.docx").write_bytes(b"lock")
    return d


def _by_name(ing) -> dict:
    return {Path(r.path).name: r for r in ing.records}


def test_every_format_is_converted(docs):
    ing = ingest_documents([str(docs)])
    text = {Path(ing.records[i].path).name: t for i, t in zip(ing.text_record, ing.texts)}
    assert text["a.MD"] == HANDBOOK  # text files are kept as written
    assert "Kestrel" in text["b.markdown"] and "Pelican" in text["c.rst"]
    html = text["page.HTML"].splitlines()
    assert "# Security" in html and "## Passwords" in html
    assert "- Rotate keys yearly" in html and "1. Call the Heron desk" in html and "2. File a ticket" in html
    assert "secretTracker" not in text["page.HTML"] and "color" not in text["page.HTML"]
    assert "Careers" not in text["page.HTML"]  # navigation is site chrome
    pdf = text["policy.pdf"]
    assert "Travel Policy" in pdf and "Zephyr" in pdf and "Quokka" in pdf
    assert "\n\n" in pdf.split("Zephyr")[1]  # pages are joined with a blank line
    guide = text["guide.docx"].splitlines()
    assert "# Onboarding Guide" in guide and "- Collect your badge at the Marigold desk." in guide
    assert "Office | City" in guide and "HQ | Bergen" in guide
    assert guide[guide.index("Then meet your buddy.") - 1] == ""  # the list ends before the next paragraph
    assert len(ing.texts) == 7


def test_records_say_what_was_skipped_and_why(docs, caplog):
    with caplog.at_level(logging.INFO, logger="continual_opd.ingest"):
        ing = ingest_documents([str(docs)])
    recs = _by_name(ing)
    read = {n for n, r in recs.items() if r.status == "read"}
    assert read == {"a.MD", "shout.md", "b.markdown", "c.rst", "page.HTML", "policy.pdf", "guide.docx"}
    skipped = {n: r.reason for n, r in recs.items() if r.status == "skipped"}
    assert skipped == {".git": "hidden folder", ".DS_Store": "hidden", "~$guide.docx": "Office lock file",
                       "copy.md": f"duplicate of {docs / 'a.MD'}", "empty.md": "near-empty (0 chars)",
                       "report.xlsx": "unsupported suffix .xlsx", "latin.txt": "not UTF-8 text (line 1, byte 0xe9)",
                       "broken.pdf": skipped["broken.pdf"]}
    assert skipped["broken.pdf"].startswith("cannot parse PDF: ")
    assert recs["policy.pdf"].pages == 2 and recs["a.MD"].pages is None
    assert recs["page.HTML"].format == "html" and recs["c.rst"].format == "text"
    assert all(len(r.sha256) == 16 for n, r in recs.items() if n in read)
    assert recs["copy.md"].sha256 != recs["a.MD"].sha256  # the text differs; only its normalized form matches
    # one warning per skipped file, naming it (hidden and junk files are recorded but not warned about)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name.endswith("ingest")]
    assert sorted(m.split(": skipped")[0] for m in warned) == sorted(
        str(docs / n) for n in ("copy.md", "empty.md", "report.xlsx", "broken.pdf", "latin.txt"))
    assert any(m.endswith("re-save it as UTF-8 to include it") for m in warned)
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and r.name.endswith("ingest")]
    assert len(info) == 1 and info[0].startswith("documents: 7 read")
    assert info[0].endswith("8 skipped: 1 Office lock file, 1 cannot parse PDF, 1 duplicate, 1 hidden, "
                            "1 hidden folder, 1 near-empty, 1 not UTF-8 text, 1 unsupported suffix (.xlsx)")


def test_manifest_round_trips_with_token_counts(docs, tmp_path, tiny_lm):
    _, tok = tiny_lm
    ing = count_tokens(ingest_documents([str(docs)]), tok)
    for i, text in zip(ing.text_record, ing.texts):
        assert ing.records[i].tokens == len(tok(text, add_special_tokens=False)["input_ids"]) > 0
    assert all(r.tokens is None for r in ing.records if r.status == "skipped")
    write_manifest(ing, tmp_path / "out" / "documents.json")
    m = json.loads((tmp_path / "out" / "documents.json").read_text())
    assert [f["path"] for f in m["files"]] == [r.path for r in ing.records]
    assert m["files"][0].keys() == {"path", "format", "status", "reason", "chars", "pages", "sha256", "tokens"}
    assert m["totals"]["read"] == 7 and m["totals"]["skipped"] == 8 and m["totals"]["files"] == 15
    assert m["totals"]["tokens"] == sum(r.tokens for r in ing.records if r.status == "read")
    assert m["totals"]["chars"] == sum(map(len, ing.texts))
    lines = summary_lines(ing)
    assert len(lines) == len(ing.records) + 1 and lines[-1].startswith("total: 7 read")
    assert any("report.xlsx" in ln and "unsupported suffix .xlsx" in ln and ln.startswith("skipped") for ln in lines)


def test_jsonl_rows_and_the_wrapper(tmp_path):
    from continual_opd.data import load_documents

    (tmp_path / "rows.jsonl").write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    ing = ingest_documents([str(tmp_path / "rows.jsonl")])
    assert ing.texts == ["one", "two"] and ing.text_record == [0, 0] and ing.records[0].chars == 6
    assert load_documents([str(tmp_path / "rows.jsonl")]) == ["one", "two"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"text": ""}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: `text` must be a non-empty string"):
        ingest_documents([str(tmp_path / "bad.jsonl")])


def test_a_folder_of_only_pdfs(tmp_path):
    _pdf(tmp_path / "one.PDF")
    ing = ingest_documents([str(tmp_path)])
    assert len(ing.texts) == 1 and "Zephyr" in ing.texts[0] and ing.records[0].format == "pdf"


def test_a_folder_with_nothing_readable_is_one_error(tmp_path):
    d = tmp_path / "junk"
    d.mkdir()
    (d / "a.xlsx").write_bytes(b"x")
    (d / "b.xlsx").write_bytes(b"y")
    (d / "blank.md").write_text("  \n")
    _broken_pdf(d / "c.pdf")
    with pytest.raises(DataError) as e:
        ingest_documents([str(d)])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{d}: no readable document")
    assert "4 skipped: 2 unsupported suffix (.xlsx), 1 cannot parse PDF, 1 near-empty" in msg
    assert "add .txt" in msg  # the fix
    with pytest.raises(DataError, match=r"blank.md: no readable document \(1 skipped: 1 near-empty\)"):
        ingest_documents([str(d / "blank.md")])


def test_an_empty_document_next_to_good_ones_is_skipped(tmp_path):
    (tmp_path / "empty.md").write_text("")
    (tmp_path / "good.txt").write_text("The Osprey office opens at nine.\n")
    assert ingest_documents([str(tmp_path / "empty.md"), str(tmp_path / "good.txt")]).texts == [
        "The Osprey office opens at nine.\n"]


def test_a_named_file_of_unsupported_suffix_is_an_error(tmp_path):
    (tmp_path / "budget.xlsx").write_bytes(b"x")
    with pytest.raises(DataError) as e:
        ingest_documents([str(tmp_path / "budget.xlsx")])
    assert str(e.value).startswith(f"{tmp_path / 'budget.xlsx'}: unsupported document suffix .xlsx; supported: .txt")
    assert ".pdf" in str(e.value) and "\n" not in str(e.value)


def test_a_missing_converter_names_the_extra(tmp_path, monkeypatch):
    _pdf(tmp_path / "policy.pdf")
    monkeypatch.setitem(sys.modules, "pypdf", None)  # `import pypdf` now raises ImportError
    with pytest.raises(DataError) as e:
        ingest_documents([str(tmp_path)])
    assert str(e.value).startswith(f"{tmp_path / 'policy.pdf'}: ")
    assert 'pip install "continual-opd[docs]"' in str(e.value) and "\n" not in str(e.value)


def test_build_pools_writes_the_manifest(docs, tmp_path, tiny_lm):
    from continual_opd.data import build_pools

    _, tok = tiny_lm
    cfg = SimpleNamespace(documents=[str(docs)], chat=[], qa=[], mix={"documents": 1.0})
    pools = build_pools(cfg, tok, 64, manifest_path=tmp_path / "stage" / "documents.json")
    assert pools["documents"]
    files = json.loads((tmp_path / "stage" / "documents.json").read_text())["files"]
    assert {f["status"] for f in files} == {"read", "skipped"} and all(
        f["tokens"] for f in files if f["status"] == "read")
    build_pools(cfg, tok, 64)  # no path: nothing written (the other ranks)
    assert [p.name for p in (tmp_path / "stage").iterdir()] == ["documents.json"]


def test_a_real_folders_odd_corners(tmp_path, caplog):
    """Symlinked folders are read (a loop once), make-qa output and chat JSONL in the folder are skipped with a reason,
    a UTF-16 file says to re-save it, a name that is not UTF-8 is recorded and its manifest is written."""
    import os

    from continual_opd.make_qa import make_qa

    docs, elsewhere = tmp_path / "docs", tmp_path / "elsewhere"
    docs.mkdir()
    elsewhere.mkdir()
    (elsewhere / "linked.md").write_text("# Linked\n\nThe linked handbook page is here.\n")
    os.symlink(elsewhere, docs / "shared")
    os.symlink(docs, docs / "loop")
    (docs / "main.md").write_text(HANDBOOK)
    (docs / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    (docs / "notes.txt").write_bytes("Windows notes about the Aurora team.".encode("utf-16"))
    (docs / os.fsdecode(b"caf\xe9.md")).write_text("# Cafe\n\nThe cafe opens at eight every weekday.\n")
    make_qa([("x/a.md", "# A\n\nThe Heron desk is run by Ada Berg.\n\nThe badge code is BX-7.\n")], docs / "qa")
    with caplog.at_level(logging.WARNING, logger="continual_opd.ingest"):
        ing = ingest_documents([str(docs)])
    recs = {Path(r.path).name: r for r in ing.records}
    assert recs["linked.md"].status == "read" and "The linked handbook page" in "".join(ing.texts)
    assert recs["loop"].reason == "symlink loop"
    assert recs["qa"].reason.startswith("make-qa output") and not any("Heron" in t for t in ing.texts)
    assert recs["chat.jsonl"].reason.startswith("JSONL rows without `text`")
    assert recs["notes.txt"].reason == "not UTF-8 text (UTF-16)"
    assert any("notes.txt" in m and "re-save it as UTF-8" in m for m in caplog.messages)
    assert recs["caf\\xe9.md"].status == "read"
    write_manifest(ing, tmp_path / "documents.json")
    assert "caf\\\\xe9.md" in (tmp_path / "documents.json").read_text()
