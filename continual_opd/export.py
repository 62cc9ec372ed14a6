"""`export`: turn a finished run's model into a folder a team can serve, share or push to the hub.

    <out>/                            full fine-tune, or LoRA with merge=True: a plain transformers model
        config.json, model*.safetensors, generation_config.json, tokenizer files
    <out>/                            LoRA without merge: a PEFT adapter
        adapter_config.json, adapter_model.safetensors, generation_config.json, tokenizer files
        base/                         the base model, when it is a local folder (not a hub id):
                                      adapter_config.json names it "base" (a path relative to <out>)
    <out>/chat_template_kwargs.json   the run's model.chat_template_kwargs (e.g. {"enable_thinking": false})
    <out>/README.md                   model card: scores, recipe, data hashes, how to load
    <out>/continual_opd_export.json   what was exported from where (run, stage, ref, data hashes, versions)

The export is written into a temporary sibling folder and renamed into place, so a failure leaves nothing behind;
an existing non-empty `out` is never touched.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from continual_opd.errors import ConfigError, ContinualOPDError, RunDirError
from continual_opd.gguf import PACKAGE_PREFIX, file_sha256
from continual_opd.models import ModelRef
from continual_opd.rundir import RESOLVED, STATE_FILE, SUMMARY, CompletedStage, RunState

log = logging.getLogger(__name__)

EXPORT_FILE = "continual_opd_export.json"
KWARGS_FILE = "chat_template_kwargs.json"
BASE_DIR = "base"  # the copied base model of an unmerged LoRA export
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


class PushToHubError(ContinualOPDError):
    """The export was written, but pushing it to the hub failed (offline, no connection, no permission)."""

    exit_code = 1


def export_run(run_dir: Path, out: Path, *, stage: str | None = None, merge: bool = False,
               push_to_hub: str | None = None, progress: bool = True) -> Path:
    """Export the model of a run's last completed stage (or of completed stage `stage`) to the new folder `out`.

    A full fine-tune is saved as a plain transformers model. A LoRA model is merged into its base (`merge=True`) or
    saved as its adapter; a local base is then copied into `out/base`. With `push_to_hub` (a repo id) the folder is
    uploaded after it is written; a failed upload raises `PushToHubError` and keeps the folder. Returns `out`.
    """
    run_dir, out = Path(run_dir).expanduser().resolve(), Path(out).expanduser().resolve()
    state = _load_state(run_dir)
    done = _pick_stage(state, stage, run_dir)
    _check_out(out)
    resolved = (run_dir / RESOLVED).read_text(encoding="utf-8") if (run_dir / RESOLVED).is_file() else ""
    recipe = yaml.safe_load(resolved) if resolved else {}
    recipe = recipe if isinstance(recipe, dict) else {}
    model_cfg = recipe.get("model") or {}
    ref = ModelRef(_locate(done.ref.base, run_dir), done.ref.adapter and _locate(done.ref.adapter, run_dir))
    for p in (ref.base, ref.adapter):
        if p and _looks_local(p) and not Path(p).exists():
            raise RunDirError(f"{run_dir}: the model of stage {done.name!r} is missing ({p}); "
                              "export a stage whose model is still on disk (--stage NAME)")
    fmt = "full" if not ref.adapter else "merged" if merge else "adapter"
    if progress:
        log.info("exporting stage %s of %s (%s) to %s", done.name, run_dir, fmt, out)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        load_kw = {"trust_remote_code": bool(model_cfg.get("trust_remote_code", False))}
        revision = model_cfg.get("revision")
        base_in_card = _write_model(ref, fmt, tmp, load_kw, revision)
        kwargs = dict(model_cfg.get("chat_template_kwargs") or {})
        (tmp / KWARGS_FILE).write_text(json.dumps(kwargs, indent=2) + "\n", encoding="utf-8")
        sources = data_sources(recipe, upto=done.index)
        info = {"run_dir": str(run_dir), "run_name": recipe.get("name", run_dir.name), "stage": done.name,
                "stage_index": done.index, "global_step": done.global_step, "ref": done.ref.to_dict(),
                "merge": fmt == "merged", "format": fmt,
                "base_model_name_or_path": base_in_card if fmt == "adapter" else None,
                "chat_template_kwargs": kwargs, "sources": sources, "versions": _versions(),
                "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        gguf_source = Path(ref.base) / "source.json"
        if gguf_source.is_file():  # a GGUF model converted into the cache: where it came from
            info["base_source"] = json.loads(gguf_source.read_text(encoding="utf-8"))
        (tmp / EXPORT_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        summary = json.loads((run_dir / SUMMARY).read_text()) if (run_dir / SUMMARY).is_file() else {}
        card = model_card(info, recipe, resolved, summary, _report_tables(run_dir), base_in_card,
                          origin=_hub_id(str(model_cfg.get("name", ""))), repo=push_to_hub)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        for p in [tmp, *tmp.rglob("*")]:  # mkdtemp makes 0700; an export is meant to be shared
            p.chmod(0o755 if p.is_dir() else 0o644)
        try:
            os.replace(tmp, out)  # an empty `out` is replaced, a non-empty one refuses
        except OSError as e:
            raise RunDirError(f"{out}: cannot write the export there ({e.strerror}); "
                              "pick a new --out folder (nothing was written)") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        log.info("exported %s", out)
    if push_to_hub:
        push(out, push_to_hub)
    return out


# ---------------------------------------------------------------------------------------------- which model


def _load_state(run_dir: Path) -> RunState:
    if not (run_dir / STATE_FILE).is_file():
        what = "does not exist" if not run_dir.exists() else f"has no {STATE_FILE}, so it is not a continual-opd run"
        raise RunDirError(f"{run_dir}: nothing to export: the run directory {what}; point export at a run directory")
    try:
        state = RunState.load(run_dir / STATE_FILE)
    except (ValueError, KeyError, TypeError) as e:
        raise RunDirError(f"{run_dir}/{STATE_FILE}: unreadable ({type(e).__name__}: {e}); "
                          "export another run") from None
    if not state.completed:
        raise RunDirError(f"{run_dir}: nothing to export: no stage has completed yet; finish the run "
                          "(continual-opd recipe ... --resume) first")
    return state


def _pick_stage(state: RunState, stage: str | None, run_dir: Path) -> CompletedStage:
    if stage is None:
        return state.completed[-1]
    for done in state.completed:
        if done.name == stage:
            return done
    raise ConfigError(f"{run_dir}: --stage {stage!r}: no completed stage of that name; completed stages: "
                      f"{', '.join(c.name for c in state.completed)}")


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{out}: --out is a file; pick a new folder for the export")
    if out.is_dir() and any(out.iterdir()):
        n = len(list(out.iterdir()))
        raise RunDirError(f"{out}: --out is not empty ({n} entr{'y' if n == 1 else 'ies'}); pick a new folder "
                          "(an export never overwrites anything)")


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


def _locate(path: str, run_dir: Path) -> str:
    """A ref inside a run directory that was moved since: the same stage folder under `run_dir`."""
    if Path(path).exists() or "/stages/" not in path:
        return path
    moved = run_dir / path[path.rindex("/stages/") + 1:]
    return str(moved) if moved.exists() else path


def _hub_id(name: str) -> str | None:
    """`name` when it is a hub repo id (org/name), not a local path, package, GGUF file or the demo model."""
    if not name or name == "demo" or name.startswith(PACKAGE_PREFIX) or name.lower().endswith(".gguf"):
        return None
    return None if _looks_local(name) or name.count("/") != 1 else name


# ---------------------------------------------------------------------------------------------- the weights


def _write_model(ref: ModelRef, fmt: str, dest: Path, load_kw: dict, revision: str | None) -> str | None:
    """Write the model into `dest`; return what the card names as the base (a hub id, "base", or None)."""
    from transformers import AutoTokenizer

    base_is_hub = not Path(ref.base).expanduser().is_dir()
    hub_rev = {"revision": revision} if base_is_hub and revision else {}
    base_kw = {**load_kw, **hub_rev}
    tok = AutoTokenizer.from_pretrained(ref.adapter or ref.base, **(load_kw if ref.adapter else base_kw))
    if fmt == "full":
        _load_base(ref.base, base_kw).save_pretrained(dest)
        tok.save_pretrained(dest)
        return None
    if fmt == "merged":
        from peft import PeftModel

        merged = PeftModel.from_pretrained(_load_base(ref.base, base_kw), ref.adapter).merge_and_unload()
        merged.save_pretrained(dest)
        tok.save_pretrained(dest)
        return None
    # the adapter as trained, named on the base that loads it
    adapter = Path(ref.adapter)
    for name in ADAPTER_FILES[1:]:
        if (adapter / name).is_file():
            shutil.copy2(adapter / name, dest / name)
    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    if base_is_hub:
        config["base_model_name_or_path"] = ref.base
        if revision:
            config["revision"] = revision
        named = ref.base
    else:
        base_tok = AutoTokenizer.from_pretrained(ref.base, **load_kw)
        _load_base(ref.base, load_kw).save_pretrained(dest / BASE_DIR)
        base_tok.save_pretrained(dest / BASE_DIR)
        config["base_model_name_or_path"] = BASE_DIR
        config.pop("revision", None)
        named = BASE_DIR
    (dest / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tok.save_pretrained(dest)
    with contextlib.suppress(OSError, ValueError):  # a base without generation_config.json: transformers' defaults
        from transformers import GenerationConfig

        GenerationConfig.from_pretrained(ref.base, **hub_rev).save_pretrained(dest)
    return named


def _load_base(name: str, kw: dict):
    from transformers import AutoModelForCausalLM

    # dtype="auto": the dtype the weights were saved in (a float32 checkpoint stays float32)
    return AutoModelForCausalLM.from_pretrained(name, dtype="auto", **kw)


# ---------------------------------------------------------------------------------------------- provenance


def data_sources(recipe: dict, upto: int | None = None) -> list[dict]:
    """Every training data source the recipe's stages list, in order: {stage, field, source, used, files}, where
    files is [{path, sha256, bytes}] (a directory: each file inside; `hf:` sources and missing paths: [] and a
    note). `used`: the stage is at or before stage index `upto` (the exported model saw that data)."""
    rows: list[dict] = []
    for i, s in enumerate(recipe.get("stages") or []):
        if not isinstance(s, dict):
            continue
        fields: list[tuple[str, list]] = []
        data = s.get("data") or {}
        if s.get("kind") == "sft":
            fields += [(f"data.{k}", data.get(k) or []) for k in ("documents", "chat", "qa")]
            fields += [("data.self_chat.prompts", (data.get("self_chat") or {}).get("prompts") or [])]
        elif s.get("kind") == "opd":
            fields += [("prompts", s.get("prompts") or []), ("doc_prompts", s.get("doc_prompts") or [])]
            replay = (s.get("replay") or {}).get("data") or {}
            fields += [(f"replay.data.{k}", replay.get(k) or []) for k in ("documents", "chat", "qa")]
        for field, sources in fields:
            for src in sources:
                rows.append({"stage": s.get("name", str(i)), "field": field, "source": src,
                             "used": upto is None or i <= upto, **_hash_source(str(src))})
    return rows


def _hash_source(src: str) -> dict:
    if src.startswith("hf:"):
        return {"files": [], "note": "hub dataset (not hashed)"}
    p = Path(src)
    if p.is_file():
        return {"files": [_file_entry(p, p.name)]}
    if p.is_dir():
        return {"files": [_file_entry(f, str(f.relative_to(p))) for f in sorted(p.rglob("*")) if f.is_file()]}
    return {"files": [], "note": "missing at export time"}


def _file_entry(path: Path, name: str) -> dict:
    return {"path": name, "sha256": file_sha256(path), "bytes": path.stat().st_size}


def _versions() -> dict:
    import continual_opd

    out = {"continual_opd": continual_opd.__version__}
    for pkg in ("torch", "transformers", "peft"):
        with contextlib.suppress(Exception):
            out[pkg] = __import__(pkg).__version__
    return out


def _report_tables(run_dir: Path) -> list[tuple[str, list[list[str]]]]:
    """The CSV tables of `<run>/report/` (e.g. intervals or across-seed statistics), as (file name, rows)."""
    tables = []
    for path in sorted((run_dir / "report").glob("*.csv")):
        with contextlib.suppress(OSError, csv.Error, UnicodeDecodeError):
            with open(path, newline="", encoding="utf-8") as f:
                rows = [r for r in csv.reader(f) if r]
            if rows:
                tables.append((path.name, rows))
    return tables


# ---------------------------------------------------------------------------------------------- the card


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, (int, float)):
        return f"{v:.3f}"
    try:
        return f"{float(v):.3f}"
    except (TypeError, ValueError):
        return str(v)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *[line(r) for r in rows]])


def summary_table(summary: dict, headline: tuple[str, ...], exported: str) -> str:
    """Every stage's last eval point (summary.json) without timings, headline metrics first, values to 3 decimals."""
    from continual_opd.curves import is_timing

    keys = list(dict.fromkeys(k for row in summary.values() for k in row
                              if not k.startswith("time/") and not is_timing(k.rsplit("/", 1)[-1])))
    cols = [k for k in headline if k in keys] + sorted(k for k in keys if k not in headline)
    rows = [[f"**{name}** (exported)" if name == exported else name, *[_fmt(vals.get(c)) for c in cols]]
            for name, vals in summary.items()]
    return _md_table(["stage", *cols], rows)


def _load_snippet(fmt: str, repo: str | None, base: str | None, kwargs: dict) -> str:
    where = f"path = {repo!r}" if repo else 'path = "."  # this folder'
    if fmt == "adapter":
        load = ["from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", ""]
        if base == BASE_DIR:  # (subfolder="base" would not do: transformers sees the adapter in `path` first)
            load = ["import os", "", *load]
            if repo:
                load = ["from huggingface_hub import snapshot_download", *load]
                where = f"path = snapshot_download({repo!r})"
            base_load = f'AutoModelForCausalLM.from_pretrained(os.path.join(path, "{BASE_DIR}"))'
        else:
            base_load = f"AutoModelForCausalLM.from_pretrained({base!r})"
        load += [where, f"model = PeftModel.from_pretrained({base_load}, path)"]
    else:
        load = ["from transformers import AutoModelForCausalLM, AutoTokenizer", "", where,
                "model = AutoModelForCausalLM.from_pretrained(path)"]
    return "\n".join([*load, "tok = AutoTokenizer.from_pretrained(path)",
                      f"kwargs = {kwargs!r}  # chat_template_kwargs.json: the settings the run used",
                      'messages = [{"role": "user", "content": "Hello!"}]',
                      "inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
                      "return_dict=True, **kwargs)",
                      "answer = model.generate(**inputs, max_new_tokens=256)",
                      "print(tok.decode(answer[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))"])


def model_card(info: dict, recipe: dict, resolved: str, summary: dict, report_tables: list, base: str | None, *,
               origin: str | None, repo: str | None) -> str:
    """README.md of an export: front matter, scores, how to load, chat settings, data hashes, the recipe."""
    fmt, kwargs = info["format"], info["chat_template_kwargs"]
    base_model = base if fmt == "adapter" and base != BASE_DIR else origin
    front = {"library_name": "peft" if fmt == "adapter" else "transformers", "tags": ["continual-opd"]}
    if base_model:
        front["base_model"] = base_model
    what = {"full": "the full fine-tuned weights", "merged": "the LoRA adapter merged into its base (plain weights)",
            "adapter": "the LoRA adapter (PEFT)"}[fmt]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {info['run_name']}: stage {info['stage']}", "",
             f"Exported by continual-opd {info['versions'].get('continual_opd', '?')} from the run "
             f"`{info['run_dir']}`: the model after stage **{info['stage']}** (stage {info['stage_index']}, "
             f"global step {info['global_step']}), as {what}."]
    if fmt == "adapter":
        lines += ["", f"The base model is in the `{BASE_DIR}/` folder of this export: load it from there and the "
                      "adapter on top, as below. (`base_model_name_or_path` is the relative path "
                      f"`{BASE_DIR}`, so `peft.AutoPeftModelForCausalLM.from_pretrained(\".\")` works from inside "
                      "this folder only.)" if base == BASE_DIR else f"The base model is the hub model `{base}`."]
    h = recipe.get("headline") or {}
    from continual_opd.config import HeadlineConfig

    headline = (h.get("domain_qa", HeadlineConfig().domain_qa), h.get("if_eval", HeadlineConfig().if_eval))
    lines += ["", "## Scores", "", "Each stage's last evaluation (`summary.json`); headline metrics first: domain QA = "
              f"`{headline[0]}`, IF-eval = `{headline[1]}`.", ""]
    lines += [summary_table(summary, headline, info["stage"]) if summary else "(the run has no summary.json)"]
    for name, rows in report_tables:
        lines += ["", f"From the run report (`report/{name}`):", "",
                  _md_table(rows[0], [[_fmt(c) if i else c for i, c in enumerate(r)] for r in rows[1:]])]
    lines += ["", "## How to load", "", "```python", _load_snippet(fmt, repo, base, kwargs), "```", ""]
    lines += ["## Chat template settings", "",
              f"The run rendered every prompt with `chat_template_kwargs = {json.dumps(kwargs)}` (also in "
              f"`{KWARGS_FILE}`); pass them on: `tok.apply_chat_template(messages, add_generation_prompt=True, "
              "**kwargs)`." if kwargs else
              f"The run used no extra chat template settings (`{KWARGS_FILE}` is empty): "
              "`tok.apply_chat_template(messages, add_generation_prompt=True)`.", ""]
    lines += ["## Data", "", "The training data every stage of the recipe lists; \"used\": the stage ran at or "
              "before the exported one. Directories are listed file by file.", ""]
    rows = []
    for s in info["sources"]:
        files = s["files"] or [{"path": "", "sha256": s.get("note", ""), "bytes": None}]
        for f in files:
            rows.append([s["stage"], s["field"], s["source"], f["path"], f["sha256"],
                         "" if f["bytes"] is None else str(f["bytes"]), "yes" if s["used"] else "no"])
    lines += [_md_table(["stage", "field", "source", "file", "sha256", "bytes", "used"], rows) if rows
              else "(the recipe lists no training data)", ""]
    lines += ["## Recipe", "", f"The run's `{RESOLVED}` (every default and override, as the run used it):", "",
              "```yaml", resolved.rstrip(), "```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- the hub


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def push(out: Path, repo: str) -> None:
    """Upload the export folder to the hub repo `repo` (created if missing)."""
    later = f"the export is in {out}; push it later with `hf upload {repo} {out}`"
    if _offline():
        raise PushToHubError(f"cannot push to {repo}: HF_HUB_OFFLINE is set; {later}")
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo, repo_type="model", exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=str(out), repo_type="model",
                          commit_message="continual-opd export")
    except Exception as e:  # connection, authentication, permission: the user's to fix, the export stays
        lines = str(e).strip().splitlines()
        why = f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__
        raise PushToHubError(f"cannot push to {repo} ({why}); {later}") from None
