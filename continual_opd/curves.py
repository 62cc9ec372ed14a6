"""Run metrics -> tidy DataFrame -> continual-learning metrics (forgetting, recovery, time to recovery).

Everything below `load_runs` is a pure function of the DataFrame it returns, so the numbers in a report
can be recomputed (and unit-tested) without touching a run directory.

Notation (per run). A *stage end* is the last eval point of a stage for a metric key "suite/metric";
R[i, k] is the value of key k at the end of stage i (eval stages included). Three anchor points:
  base      = the last eval before the first training stage (normally the `eval` stage before SFT;
              falls back to the step-0 eval inside the first SFT stage),
  after SFT = the end of the last SFT stage, or an eval stage that directly follows it,
  after OPD = the end of the last OPD stage, or an eval stage that directly follows it.
Where an anchor spans several stages (training stage + the eval stages right after it, i.e. the same
weights), each key takes its latest measurement.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import pandas as pd
import yaml

from continual_opd.errors import DataError
from continual_opd.tracking import KL_TO_STAGE_START, read_rows

DEFAULT_DOMAIN_KEY = "domain_qa/exact_match"
DEFAULT_IF_KEY = "ifeval/prompt_level_strict_acc"
# Suites that log training statistics (loss, KL of the batch), not evaluations of the model.
TRAIN_SUITES = frozenset({"train", "opd"})
# Everything else the pipeline logs that is not an evaluation: timings and SFT data-mix statistics.
NON_EVAL_SUITES = TRAIN_SUITES | {"time", "data"}
# Metric-name fragments of lower-is-better metrics (forgetting flips its sign for them).
LOWER_IS_BETTER = ("kl", "loss", "perplexity", "ppl")
# Metrics measured against each stage's own starting model: their values at different stage ends do not
# share a reference, so they have no forgetting.
PER_STAGE_REFERENCE = frozenset({KL_TO_STAGE_START})
REQUIRED = ("stage", "step", "suite", "metric", "value", "time")
COLUMNS = ["run", "stage", "stage_index", "kind", "global_step", "step", "suite", "metric", "key",
           "value", "time", "wall", "tokens", "samples"]


# --------------------------------------------------------------------------------------------- loading
def headline_keys(run_dir: str | Path) -> tuple[str, str]:
    """(domain QA key, IF-eval key) from the run's recipe `headline:` section, else the demo suites' keys."""
    h = (read_recipe(run_dir) or {}).get("headline") or {}
    return h.get("domain_qa", DEFAULT_DOMAIN_KEY), h.get("if_eval", DEFAULT_IF_KEY)


def read_recipe(run_dir: str | Path, normalize: bool = False) -> dict | None:
    """The run's `recipe.resolved.yaml` as a dict, or None when absent/unreadable. `normalize`: read through
    today's schema (options added after the run show their defaults), for comparing runs made by other versions."""
    path = Path(run_dir) / "recipe.resolved.yaml"
    if not path.is_file():
        return None
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        warnings.warn(f"{path}: unreadable YAML ({e.__class__.__name__}); ignoring it", stacklevel=2)
        return None
    if not isinstance(recipe, dict):
        return None
    if normalize:
        from continual_opd.config import normalized_recipe

        recipe = normalized_recipe(recipe, str(path))
    return recipe


def _read_metrics(path: Path) -> list[dict]:
    """Parse metrics.jsonl (tracking.read_rows: a truncated last line is skipped with a warning) and check
    that every row has the contract's keys."""
    rows = read_rows(path)
    for i, row in enumerate(rows, 1):
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            raise DataError(f"{path}: row {i}: missing key(s) {missing}; every metrics row needs {list(REQUIRED)}")
    return rows


def _guess_kind(stage: str, recipe_kinds: dict[str, str]) -> str:
    if stage in recipe_kinds:
        return recipe_kinds[stage]
    low = stage.lower()
    return "opd" if "opd" in low or "distill" in low else "sft" if "sft" in low else "eval"


def _load_one(run_dir: Path, name: str, recipe: dict | None) -> pd.DataFrame:
    if run_dir.is_file() and run_dir.name == "metrics.jsonl":
        run_dir = run_dir.parent
    path = run_dir / "metrics.jsonl"
    if run_dir.is_file():
        raise DataError(f"{run_dir}: is a file, not a run directory; pass the directory a recipe run wrote "
                        "(runs/<name>)"
                        f"{', e.g. ' + str(run_dir.parent) if (run_dir.parent / 'metrics.jsonl').is_file() else ''}")
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: run directory not found; pass the directory a recipe run wrote (runs/<name>)")
    if not path.is_file():
        raise DataError(f"{run_dir}: no metrics.jsonl here; pass a run directory written by `continual-opd recipe` "
                        f"(or wait until its first eval has been logged)")
    rows = _read_metrics(path)
    if not rows:
        raise DataError(f"{path}: no metric rows; the run logged nothing yet - rerun it or pass another run directory")
    df = pd.DataFrame(rows)
    for col in ("stage_index", "kind", "global_step", "wall", "tokens", "samples"):
        if col not in df:
            df[col] = None
    df["stage"] = df["stage"].astype(str)
    # Missing optional fields are rebuilt from what is there (older or hand-written metrics files).
    order = list(dict.fromkeys(df["stage"]))
    df["stage_index"] = (pd.to_numeric(df["stage_index"], errors="coerce")
                         .fillna(df["stage"].map({s: i for i, s in enumerate(order)})).astype(int))
    kinds = {s.get("name"): s.get("kind") for s in (recipe or {}).get("stages", []) or [] if isinstance(s, dict)}
    df["kind"] = [k if isinstance(k, str) else _guess_kind(s, kinds) for k, s in zip(df["kind"], df["stage"])]
    df["step"] = df["step"].astype(int)
    df["global_step"] = pd.to_numeric(df["global_step"], errors="coerce")
    if df["global_step"].isna().any():
        offset, offsets = 0, {}
        for _, g in df.groupby("stage_index", sort=True):
            offsets[g["stage_index"].iat[0]] = offset
            offset += int(g["step"].max()) if g["kind"].iat[0] != "eval" else 0
        df["global_step"] = df["global_step"].fillna(df["stage_index"].map(offsets) + df["step"])
    df["global_step"] = df["global_step"].astype(int)
    df["time"] = df["time"].astype(float)
    df["wall"] = pd.to_numeric(df["wall"], errors="coerce").fillna(df["time"] - df["time"].min())
    for col in ("value", "tokens", "samples"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    df["run"] = name
    df["key"] = df["suite"].astype(str) + "/" + df["metric"].astype(str)
    df = df.sort_values(["stage_index", "step", "time"], kind="stable")
    return df[COLUMNS].reset_index(drop=True)


def run_names(run_dirs: Iterable[str | Path]) -> list[str]:
    """Display names: recipe name (recipe.resolved.yaml) or dir name; duplicates get the dir name appended."""
    dirs = [Path(d) for d in run_dirs]
    names = [str((read_recipe(d) or {}).get("name") or d.resolve().name) for d in dirs]
    out = []
    for name, d in zip(names, dirs):
        if names.count(name) > 1:
            name = f"{name} [{d.resolve().name}]" if d.resolve().name != name else name
        base, n = name, 2
        while name in out:
            name, n = f"{base}-{n}", n + 1
        out.append(name)
    return out


def load_runs(run_dirs: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """Read `<run>/metrics.jsonl` of each run into one tidy frame with columns `COLUMNS`.

    `df.attrs["run_dirs"]` maps run name -> directory. `run` is an ordered categorical (input order).
    """
    dirs = [Path(run_dirs)] if isinstance(run_dirs, (str, Path)) else [Path(d) for d in run_dirs]
    if not dirs:
        raise DataError("no run directories given; pass at least one runs/<name> directory")
    names = run_names(dirs)
    df = pd.concat([_load_one(d, n, read_recipe(d)) for d, n in zip(dirs, names)], ignore_index=True)
    df["run"] = pd.Categorical(df["run"], categories=names, ordered=True)
    df.attrs["run_dirs"] = {n: str(d) for n, d in zip(names, dirs)}
    return df


# ------------------------------------------------------------------------------------- stage structure
def _one_run(df: pd.DataFrame, run: str | None) -> pd.DataFrame:
    runs = [str(r) for r in pd.unique(df["run"])]
    if run is None:
        if len(runs) != 1:
            raise ValueError(f"frame holds {len(runs)} runs {runs}; pass run=<name>")
        return df
    if run not in runs:
        raise ValueError(f"run {run!r} not in frame; runs are {runs}")
    return df[df["run"] == run] if len(runs) > 1 else df


def is_timing(metric: str) -> bool:
    """Durations logged next to scores (`eval_time_s`, `train_s`): not a property of the model."""
    return metric.endswith("_s") or metric.endswith("time") or metric.startswith("time_")


def eval_rows(df: pd.DataFrame, run: str | None = None) -> pd.DataFrame:
    """Rows that evaluate the model: every suite except NON_EVAL_SUITES (training statistics, timings, data),
    without the timing metrics that suites log next to their scores (e.g. ifeval/eval_time_s)."""
    d = _one_run(df, run)
    return d[~d["suite"].isin(NON_EVAL_SUITES) & d["value"].notna() & ~d["metric"].map(is_timing).astype(bool)]


def stages(df: pd.DataFrame, run: str | None = None) -> pd.DataFrame:
    """One row per stage in order: stage, stage_index, kind, start/end global step (start = end - steps)."""
    d = _one_run(df, run)
    g = d.groupby("stage_index", sort=True)
    out = pd.DataFrame({"stage": g["stage"].first(), "kind": g["kind"].first(),
                        "end": g["global_step"].max(), "steps": g["step"].max()})
    out["start"] = out["end"] - out["steps"].where(out["kind"] != "eval", 0)
    return out.reset_index()[["stage", "stage_index", "kind", "start", "end"]]


def stage_ends(df: pd.DataFrame, run: str | None = None) -> pd.DataFrame:
    """Long form of the score matrix: the last eval point of every (stage, key)."""
    e = eval_rows(df, run)
    last = e.groupby(["stage_index", "key"], sort=True).tail(1)
    return last.sort_values(["stage_index", "key"])[["stage", "stage_index", "kind", "key", "step",
                                                     "global_step", "value"]].reset_index(drop=True)


def score_matrix(df: pd.DataFrame, run: str | None = None) -> pd.DataFrame:
    """R[stage end, key]: value of the last eval point of each stage (rows in stage order; stages without
    evals are left out)."""
    ends = stage_ends(df, run)
    r = ends.pivot(index="stage_index", columns="key", values="value")
    r.index = ends.drop_duplicates("stage_index").set_index("stage_index").loc[r.index, "stage"]
    r.index.name, r.columns.name = "stage", None
    return r


def higher_is_better(key: str) -> bool:
    """Accuracies are higher-is-better; losses, KLs and perplexities are lower-is-better."""
    metric = key.rsplit("/", 1)[-1].lower()
    return not any(w in metric for w in LOWER_IS_BETTER)


def forgetting(df: pd.DataFrame, run: str | None = None) -> pd.Series:
    """f_k = max_{i < T_k} R[i, k] - R[T_k, k], T_k = last stage end that measured k.

    Positive: the run ends below the best earlier stage end (forgot); negative: it ends above every earlier
    one. NaN when k was measured at a single stage end. For lower-is-better keys (see `higher_is_better`,
    e.g. kl_monitor/kl) the sign is flipped, f_k = R[T_k, k] - min_{i < T_k} R[i, k], so positive always
    means "ended worse than its best earlier stage end". NaN for `PER_STAGE_REFERENCE` metrics.
    """
    r = score_matrix(df, run)
    out = {}
    for key in r.columns:
        col = r[key].dropna()
        if len(col) < 2 or key.rsplit("/", 1)[-1] in PER_STAGE_REFERENCE:
            out[key] = math.nan
        elif higher_is_better(key):
            out[key] = float(col.iloc[:-1].max() - col.iloc[-1])
        else:
            out[key] = float(col.iloc[-1] - col.iloc[:-1].min())
    return pd.Series(out, name="forgetting", dtype=float)


@dataclass
class Anchor:
    """A point of the base -> SFT -> OPD path: values per key and where each was measured."""
    label: str
    train_stage: str | None  # the training stage whose end this is (None for base)
    values: dict[str, float] = field(default_factory=dict)
    where: dict[str, str] = field(default_factory=dict)  # key -> "stage@step"


def _latest(ends: pd.DataFrame, stage_indices: list[int], label: str, train_stage: str | None) -> Anchor | None:
    sel = ends[ends["stage_index"].isin(stage_indices)].sort_values("stage_index", kind="stable")
    if sel.empty:
        return None
    last = sel.groupby("key").tail(1)
    return Anchor(label, train_stage, dict(zip(last["key"], last["value"].astype(float))),
                  {k: f"{s}@{st}" for k, s, st in zip(last["key"], last["stage"], last["step"])})


def anchors(df: pd.DataFrame, run: str | None = None) -> dict[str, Anchor]:
    """{"base", "after SFT", "after OPD"} -> Anchor, for the points this run has (see module docstring)."""
    d = _one_run(df, run)
    st, ends = stages(d), stage_ends(d)
    kinds = dict(zip(st["stage_index"], st["kind"]))
    idx = list(st["stage_index"])
    train = [i for i in idx if kinds[i] in ("sft", "opd")]
    sft = [i for i in idx if kinds[i] == "sft"]
    opd = [i for i in idx if kinds[i] == "opd"]
    out: dict[str, Anchor] = {}
    first = sft[0] if sft else (train[0] if train else None)
    base = _latest(ends, [i for i in idx if first is None or i < first], "base", None)
    if base is None and first is not None:  # no eval before training: use the step-0 eval inside it
        e0 = eval_rows(d)
        e0 = e0[(e0["stage_index"] == first) & (e0["step"] == 0)]
        base = _latest(e0.groupby("key").tail(1), [first], "base", None)
    if base is not None:
        out["base"] = base

    def block(i: int) -> list[int]:  # the training stage i + the eval stages right after it
        j, blk = idx.index(i) + 1, [i]
        while j < len(idx) and kinds[idx[j]] == "eval":
            blk.append(idx[j])
            j += 1
        return blk

    names = dict(zip(st["stage_index"], st["stage"]))
    sft_pick = [i for i in sft if not opd or i < opd[-1]] or sft
    for label, pick in (("after SFT", sft_pick), ("after OPD", opd)):
        if pick:
            a = _latest(ends, block(pick[-1]), label, names[pick[-1]])
            if a is not None:
                out[label] = a
    return out


# -------------------------------------------------------------------------------- continual metrics
def _get(a: dict[str, Anchor], label: str, key: str) -> float:
    return a[label].values.get(key, math.nan) if label in a else math.nan


def recovery_fraction(df: pd.DataFrame, run: str | None = None, if_key: str = DEFAULT_IF_KEY) -> float:
    """(R_after_opd - R_after_sft) / (R_base - R_after_sft) on the IF metric.

    1 = OPD won back everything SFT lost, 0 = nothing, >1 = above base. NaN when SFT lost nothing
    (R_base <= R_after_sft) or a point is missing.
    """
    a = anchors(df, run)
    base, sft, opd = (_get(a, k, if_key) for k in ("base", "after SFT", "after OPD"))
    lost = base - sft
    return float((opd - sft) / lost) if lost > 0 else math.nan


def time_to_recovery(df: pd.DataFrame, run: str | None = None, if_key: str = DEFAULT_IF_KEY,
                     fraction: float = 0.9) -> dict | None:
    """First eval point inside the OPD stage with IF >= R_after_sft + fraction * (R_base - R_after_sft).

    Returns {"steps", "samples", "tokens", "wall_s", "train_s", "global_step", "value", "threshold"}: OPD
    steps; OPD training samples/tokens; wall_s = seconds from the previous stage's last logged row (so stage
    setup and in-stage evals count); train_s = training seconds only (the pipeline's `time/train_s`).
    Counters not logged are None. Returns None if never reached, if SFT lost nothing, or without OPD stage.
    """
    d = _one_run(df, run)
    a = anchors(d)
    base, sft = _get(a, "base", if_key), _get(a, "after SFT", if_key)
    if "after OPD" not in a or not base - sft > 0:
        return None
    threshold = sft + fraction * (base - sft)
    opd = d[d["stage"] == a["after OPD"].train_stage]
    ev = opd[opd["key"] == if_key].sort_values("step", kind="stable")
    hit = ev[ev["value"] >= threshold - 1e-12]
    if hit.empty:
        return None
    row = hit.iloc[0]
    earlier = d[d["stage_index"] < row["stage_index"]]
    upto = opd[opd["step"] <= row["step"]]

    def spent(col: str, start_default: float | None) -> float | None:
        now = upto[col].max()
        start = earlier[col].max() if earlier[col].notna().any() else start_default
        return None if pd.isna(now) or start is None else float(now - start)

    train_s = upto.loc[upto["key"] == "time/train_s", "value"].max()
    return {"steps": int(row["step"]), "samples": spent("samples", 0.0), "tokens": spent("tokens", 0.0),
            "wall_s": spent("wall", float(opd["wall"].min())), "train_s": None if pd.isna(train_s) else float(train_s),
            "global_step": int(row["global_step"]),
            "value": float(row["value"]), "threshold": float(threshold)}


def domain_gain_kept(df: pd.DataFrame, run: str | None = None, domain_key: str = DEFAULT_DOMAIN_KEY) -> float:
    """(R_final - R_base) / (R_after_sft - R_base) on the domain metric; R_final = last stage end.

    1 = OPD kept all of SFT's domain gain. NaN when SFT gained nothing or a point is missing.
    """
    a = anchors(df, run)
    base, sft = _get(a, "base", domain_key), _get(a, "after SFT", domain_key)
    col = score_matrix(df, run).get(domain_key, pd.Series(dtype=float)).dropna()
    final = float(col.iloc[-1]) if len(col) else math.nan
    gain = sft - base
    return float((final - base) / gain) if gain > 0 else math.nan


def blog_table(df: pd.DataFrame, run: str | None = None, domain_key: str = DEFAULT_DOMAIN_KEY,
               if_key: str = DEFAULT_IF_KEY) -> pd.DataFrame:
    """Rows base / after SFT / after OPD (those the run has); columns domain QA, IF-eval, measured at."""
    a = anchors(df, run)
    rows = {}
    for label, anc in a.items():
        where = dict.fromkeys(anc.where[k] for k in (domain_key, if_key) if k in anc.where)
        rows[label] = {"domain QA": anc.values.get(domain_key, math.nan),
                       "IF-eval": anc.values.get(if_key, math.nan), "measured at": ", ".join(where)}
    return pd.DataFrame.from_dict(rows, orient="index", columns=["domain QA", "IF-eval", "measured at"])


def cl_metrics(df: pd.DataFrame, domain_key: str = DEFAULT_DOMAIN_KEY, if_key: str = DEFAULT_IF_KEY,
               fraction: float = 0.9) -> pd.DataFrame:
    """One row per run: recovery fraction, OPD steps/samples/seconds to `fraction` recovery, domain gain
    kept, and forgetting of both headline metrics."""
    pct = int(round(fraction * 100))
    rows = {}
    for run in dict.fromkeys(df["run"].astype(str)):
        t = time_to_recovery(df, run, if_key, fraction) or {}
        f = forgetting(df, run)
        rows[run] = {"IF recovery": recovery_fraction(df, run, if_key),
                     f"OPD steps to {pct}%": t.get("steps"), f"OPD samples to {pct}%": t.get("samples"),
                     f"OPD seconds to {pct}%": t.get("wall_s"),
                     "domain gain kept": domain_gain_kept(df, run, domain_key),
                     "IF forgetting": f.get(if_key, math.nan), "domain forgetting": f.get(domain_key, math.nan)}
    out = pd.DataFrame.from_dict(rows, orient="index")
    for col in (f"OPD steps to {pct}%", f"OPD samples to {pct}%"):  # counts: integers, <NA> = not reached
        out[col] = pd.to_numeric(out[col]).round().astype("Int64")
    out.index.name = "run"
    return out


# ----------------------------------------------------------------------------- settings that differ
def flatten(obj, prefix: str = "") -> dict[str, object]:
    """Nested dicts/lists -> {"stages.1.lr": 1e-4, ...}; empty containers are kept as leaves."""
    if isinstance(obj, dict) and obj:
        return {k: v for key, val in obj.items() for k, v in flatten(val, f"{prefix}{key}.").items()}
    if isinstance(obj, list) and obj:
        return {k: v for i, val in enumerate(obj) for k, v in flatten(val, f"{prefix}{i}.").items()}
    return {prefix[:-1]: obj}


def settings_diff(recipes: dict[str, dict | None], ignore: Iterable[str] = ("name", "output_dir")) -> pd.DataFrame:
    """Table run x dotted key of the resolved-recipe settings whose values differ between runs.

    A key present in some runs only counts as differing ("(absent)" where missing). Runs without a recipe
    are left out. `ignore`: keys not worth listing (the run name is the row label; the report lists run dirs).
    """
    flat = {run: flatten(r) for run, r in recipes.items() if isinstance(r, dict)}
    keys = sorted({k for f in flat.values() for k in f} - set(ignore))
    absent = object()
    diff = [k for k in keys if len({json.dumps(f.get(k, absent), default=repr, sort_keys=True)
                                    for f in flat.values()}) > 1]
    show = lambda v: v if isinstance(v, str) else json.dumps(v, default=str, ensure_ascii=False)  # noqa: E731
    return pd.DataFrame({k: [show(f[k]) if k in f else "(absent)" for f in flat.values()] for k in diff},
                        index=pd.Index(list(flat), name="run"), dtype=object)


# ------------------------------------------------------------------------------------- across seeds
# Settings that do not change what is trained or measured at the anchors: where a run writes, what it is
# called, how often it evaluates/saves on the way. Runs whose recipes differ only in these and `seed` are
# repeats of one experiment.
REPEAT_FREE_KEYS = ("seed", "name", "output_dir", "cache_dir", "report", "report_to")
REPEAT_FREE_SUFFIXES = (".eval_every", ".save_every")


def _repeat_free(key: str) -> bool:
    return key in REPEAT_FREE_KEYS or key.endswith(REPEAT_FREE_SUFFIXES) or key.startswith("headline.")


def seed_groups(recipes: dict[str, dict | None]) -> dict[str, list[str]]:
    """Runs grouped by resolved recipe, ignoring `seed` and the REPEAT_FREE settings, in first-seen order.

    Returns {label: [run, ...]}; the label is the group's first run. The runs of a group have distinct seeds: a run
    that repeats a seed already in its group (a rerun, not another seed) starts a group of its own, and so does a run
    without a recipe.
    """
    groups: dict[str, list[str]] = {}
    by_settings: dict[str, str] = {}
    seeds: dict[str, set] = {}
    for run, recipe in recipes.items():
        if not isinstance(recipe, dict):
            groups[run] = [run]
            continue
        sig = json.dumps({k: v for k, v in flatten(recipe).items() if not _repeat_free(k)},
                         default=repr, sort_keys=True)
        label = by_settings.setdefault(sig, run)
        if recipe.get("seed") in seeds.setdefault(label, set()):
            label = run
        seeds.setdefault(label, set()).add(recipe.get("seed"))
        groups.setdefault(label, []).append(run)
    return groups


def across_seeds(df: pd.DataFrame, groups: dict[str, list[str]], domain_key: str = DEFAULT_DOMAIN_KEY,
                 if_key: str = DEFAULT_IF_KEY) -> pd.DataFrame:
    """Mean, sample standard deviation, min and max over the runs of each group of 2 or more.

    Rows (group, quantity): the headline metrics at base / after SFT / after OPD, IF recovery and domain gain
    kept. Columns: runs (n measured), mean, sd, min, max. Empty when no group repeats.
    """
    rows = {}
    for label, runs in groups.items():
        if len(runs) < 2:
            continue
        values: dict[str, list[float]] = {}
        for run in runs:
            bt = blog_table(df, run, domain_key, if_key)
            for anchor in bt.index:
                for col in ("domain QA", "IF-eval"):
                    values.setdefault(f"{anchor}: {col}", []).append(float(bt.at[anchor, col]))
            values.setdefault("IF recovery", []).append(recovery_fraction(df, run, if_key))
            values.setdefault("domain gain kept", []).append(domain_gain_kept(df, run, domain_key))
        for quantity, v in values.items():
            s = pd.Series(v, dtype=float).dropna()
            rows[(label, quantity)] = {"runs": len(s), "mean": s.mean() if len(s) else math.nan,
                                       "sd": s.std(ddof=1) if len(s) > 1 else math.nan,
                                       "min": s.min() if len(s) else math.nan, "max": s.max() if len(s) else math.nan}
    out = pd.DataFrame.from_dict(rows, orient="index", columns=["runs", "mean", "sd", "min", "max"])
    if len(out):
        out.index = pd.MultiIndex.from_tuples(out.index, names=["experiment", "quantity"])
        out["runs"] = out["runs"].astype(int)
    return out
