"""Plots and reports for one run (`write_report`) or several runs (`write_comparison`).

Each report is a folder of PNGs plus `report.md` (tables in markdown, images linked) and a self-contained
`report.html` (same content, images embedded as base64). Both are rendered from one list of blocks so
they never disagree. Figures use matplotlib's Agg canvas directly (no pyplot, no display, no global state).
"""

from __future__ import annotations

import base64
import html
import math
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from continual_opd import curves
from continual_opd.curves import DEFAULT_DOMAIN_KEY, DEFAULT_IF_KEY, TRAIN_SUITES
from continual_opd.io import atomic_write_text

KIND_COLORS = {"sft": "#e76f51", "opd": "#2a9d8f", "eval": "#6c757d"}
RUN_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
XLABEL = "global training step (cumulative over all stages)"
DPI = 110


# ------------------------------------------------------------------------------------------- plotting
def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", facecolor="white")
    return path


def _mark_stages(ax, st: pd.DataFrame, label: bool, color: str | None = None) -> None:
    """Shade training stages by kind, draw their boundaries, name them (top axis only when `label`)."""
    for r in st.itertuples():
        c = color or KIND_COLORS.get(r.kind, "#999999")
        if r.end > r.start:
            if color is None:
                ax.axvspan(r.start, r.end, color=c, alpha=0.10, lw=0)
            for x in (r.start, r.end):
                ax.axvline(x, color=c, lw=1.0, ls="-" if color is None else ":", alpha=0.8)
            if label:
                ax.annotate(f"{r.kind.upper()}: {r.stage}", ((r.start + r.end) / 2, 1), xytext=(0, 3),
                            xycoords=ax.get_xaxis_transform(), textcoords="offset points", ha="center",
                            va="bottom", fontsize=10, color=c, fontweight="bold")
    if not label:
        return
    span = max(1, st["end"].max() - st["start"].min())
    last_x = -math.inf
    row = 0
    for r in st[st["end"] == st["start"]].itertuples():  # eval stages: points in time, second label row
        ax.axvline(r.start, color=KIND_COLORS["eval"], lw=1.0, ls="--", alpha=0.7)
        row = 1 - row if (r.start - last_x) / span < 0.15 else 0  # alternate rows when labels would touch
        last_x = r.start
        ax.annotate(f"eval: {r.stage}", (r.start, 1), xytext=(0, 17 + 11 * row), xycoords=ax.get_xaxis_transform(),
                    textcoords="offset points", ha="center", va="bottom", fontsize=8.5, color=KIND_COLORS["eval"])


def _accuracy_axis(ax, values: pd.Series, ylabel: str) -> None:
    if len(values) and values.min() >= 0 and values.max() <= 1:
        ax.set_ylim(-0.02, 1.05)
        ylabel += " (fraction, 0-1)"
    ax.set_ylabel(ylabel)


def _line(ax, rows: pd.DataFrame, label: str, color: str, smooth: bool = False, **kw) -> None:
    rows = rows.sort_values("global_step", kind="stable")
    if smooth and len(rows) > 20:  # noisy per-step losses: raw faint + centered rolling mean bold
        ax.plot(rows["global_step"], rows["value"], color=color, alpha=0.25, lw=0.8)
        kw = {**kw, "lw": 2, "marker": None}
        rows = rows.assign(value=rows["value"].rolling(max(3, len(rows) // 25), min_periods=1, center=True).mean())
    ax.plot(rows["global_step"], rows["value"], label=label, color=color, **kw)


def _headline(ax, d: pd.DataFrame, domain_key: str, if_key: str, target: dict | None) -> None:
    """Both headline metrics; eval-stage measurements as labelled diamonds; the 90% IF recovery target."""
    if target:
        ax.hlines(target["threshold"], target["start"], target["end"], color="#9c27b0", ls="--", lw=1.2,
                  alpha=0.8, label=f"90% IF recovery target ({target['threshold']:.3f})")
        if "global_step" in target:
            ax.scatter([target["global_step"]], [target["value"]], s=260, marker="*", color="gold",
                       edgecolor="black", zorder=6, label=f"target reached (OPD step {target['steps']})")
    for key, label, c in ((domain_key, "domain QA", "#264653"), (if_key, "IF-eval", "#9c27b0")):
        r = d[d["key"] == key]
        if r.empty:
            ax.plot([], [], label=f"{label}: {key} (not logged)", color=c, ls=":")
            continue
        _line(ax, r, f"{label}: {key}", color=c, marker="o", ms=4, lw=2)
        se = r[r["kind"] == "eval"]
        ax.scatter(se["global_step"], se["value"], s=90, marker="D", color=c, edgecolor="black", zorder=5)
        for x, y in zip(se["global_step"], se["value"]):
            ax.annotate(f"{y:.2f}", (x, y), xytext=(8, 6 if key == domain_key else -12), textcoords="offset points",
                        fontsize=9, color=c, fontweight="bold", annotation_clip=True)
    ax.scatter([], [], s=60, marker="D", color="white", edgecolor="black", label="eval-stage measurement")
    _accuracy_axis(ax, d.loc[d["key"].isin([domain_key, if_key]), "value"], "score")


def plot_run(df: pd.DataFrame, run: str, path: Path, domain_key: str = DEFAULT_DOMAIN_KEY,
             if_key: str = DEFAULT_IF_KEY) -> Path:
    """Headline metrics over global step with stages marked; panels for other evals, training loss and KL
    when logged; a zoom panel on a training stage too short to read on the shared axis (typically OPD)."""
    d = curves._one_run(df, run)
    st, ev = curves.stages(d), curves.eval_rows(d)
    is_kl = d["metric"].str.contains("kl", case=False)
    head = ev[ev["key"].isin([domain_key, if_key])]
    other = ev[~ev["key"].isin([domain_key, if_key]) & ~is_kl.loc[ev.index] & ~ev["metric"].str.contains("/")]
    panels = [("headline", head), ("other evals (per-type breakdowns in the score matrix)", other),
              ("training loss", d[d["suite"].isin(TRAIN_SUITES) & d["metric"].str.contains("loss", case=False)]),
              ("KL", d[is_kl & d["value"].notna()])]
    panels = [(n, p) for n, p in panels if not p.empty or n == "headline"]
    span = max(1, st["end"].max() - st["start"].min())
    short = [r for r in st.itertuples() if 0 < r.end - r.start < 0.2 * span
             and head["global_step"].between(r.start + 1, r.end).sum() >= 2]
    zoom = next((r for r in reversed(short) if r.kind == "opd"), short[0] if short else None)
    a = curves.anchors(d)
    base, sft = (a[k].values.get(if_key, math.nan) if k in a else math.nan for k in ("base", "after SFT"))
    target = None
    if "after OPD" in a and base - sft > 0:
        opd = st[st["stage"] == a["after OPD"].train_stage].iloc[0]
        target = {"threshold": sft + 0.9 * (base - sft), "start": opd["start"], "end": opd["end"],
                  **(curves.time_to_recovery(d, if_key=if_key) or {})}
    heights = [1.6 if n == "headline" else 1 for n, _ in panels] + ([1.3] if zoom else [])
    fig = Figure(figsize=(11, 1.2 + 2.6 * sum(heights)))
    gs = fig.add_gridspec(len(heights), 1, height_ratios=heights, hspace=0.35 + 0.1 * bool(zoom))
    axes = []
    for i in range(len(panels)):
        axes.append(fig.add_subplot(gs[i], sharex=axes[0] if axes else None))
    for ax, (name, rows) in zip(axes, panels):
        _mark_stages(ax, st, label=ax is axes[0])
        keys = list(dict.fromkeys(rows["key"]))
        if name == "headline":
            _headline(ax, d, domain_key, if_key, target)
            ax.set_title(f"{run}: domain QA vs instruction following across stages", pad=42, fontsize=13)
        else:
            for i, key in enumerate(keys[:8]):
                r = rows[rows["key"] == key]
                _line(ax, r, key, RUN_COLORS[i % len(RUN_COLORS)], smooth=name == "training loss",
                      marker="o" if len(r) < 40 else None, ms=3)
            if name.startswith("other evals"):
                _accuracy_axis(ax, rows["value"], "score")
            else:
                ax.set_ylabel("loss (as logged)" if name == "training loss" else "KL (nats, as logged)")
            ax.set_title(name + (f" (first 8 of {len(keys)} metrics)" if len(keys) > 8 else ""), fontsize=11,
                         loc="left")
        ax.tick_params(labelbottom=ax is axes[-1])
    axes[-1].set_xlabel(XLABEL)
    if st["end"].max() == st["start"].min():  # eval-only run: one x position
        axes[-1].set_xlim(st["start"].min() - 1, st["start"].min() + 1)
        axes[-1].set_xticks([st["start"].min()])
    if zoom:
        z = fig.add_subplot(gs[-1])
        axes.append(z)
        _mark_stages(z, st, label=False)
        _headline(z, d, domain_key, if_key, target)
        pad = 0.04 * (zoom.end - zoom.start)
        z.set_xlim(zoom.start - pad, zoom.end + pad)
        z.set_xlabel(f"global training step (zoom on {zoom.kind.upper()} stage '{zoom.stage}', "
                     f"steps {zoom.start}-{zoom.end})")
        z.set_title(f"zoom: {zoom.kind.upper()} stage '{zoom.stage}'", fontsize=11, loc="left")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8.5, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return _save(fig, path)


def plot_overlay(df: pd.DataFrame, path: Path, keys: Iterable[str] | dict[str, str]) -> Path:
    """One panel per key (`{key: title}` or keys), one line per run; stages shaded when the runs share their
    layout (or stop early), else each run's boundaries dotted in its color."""
    titles = dict(keys) if isinstance(keys, dict) else {k: k for k in keys}
    keys, runs = list(titles), list(dict.fromkeys(df["run"].astype(str)))
    fig = Figure(figsize=(11, 1.0 + 3.6 * len(keys)))
    axes = fig.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0]
    sts = {r: curves.stages(df, r)[["stage", "kind", "start", "end"]] for r in runs}
    ref = max(sts.values(), key=len)  # runs that stop early (no OPD) share the longest run's stage layout
    same = all(s.equals(ref.iloc[: len(s)]) for s in sts.values())
    for ax, key in zip(axes, keys):
        if same:
            _mark_stages(ax, ref, label=ax is axes[0])
        for i, run in enumerate(runs):
            c = RUN_COLORS[i % len(RUN_COLORS)]
            if not same:
                _mark_stages(ax, sts[run], label=False, color=c)
            rows = curves.eval_rows(df, run)
            rows = rows[rows["key"] == key]
            if rows.empty:
                ax.plot([], [], color=c, ls=":", label=f"{run} (not logged)")
            else:
                _line(ax, rows, run, color=c, marker="o", ms=4, lw=2)
        _accuracy_axis(ax, df.loc[df["key"] == key, "value"].dropna(), key)
        ax.set_title(titles[key], fontsize=12, loc="left", pad=42 if (same and ax is axes[0]) else 6)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    axes[-1].set_xlabel(XLABEL + ("" if same else "; dotted lines: each run's stage boundaries"))
    return _save(fig, path)


def plot_pareto(df: pd.DataFrame, path: Path, domain_key: str = DEFAULT_DOMAIN_KEY,
                if_key: str = DEFAULT_IF_KEY) -> Path:
    """Domain QA (x) vs IF-eval (y); faint line = every eval point, arrows = base -> after SFT -> after OPD."""
    fig = Figure(figsize=(8.5, 7))
    ax = fig.subplots()
    runs = list(dict.fromkeys(df["run"].astype(str)))
    points: dict[tuple[str, float, float], list[int]] = {}  # (label, x, y) -> indices of runs passing there
    for i, run in enumerate(runs):
        c = RUN_COLORS[i % len(RUN_COLORS)]
        ev = curves.eval_rows(df, run)
        both = ev[ev["key"].isin([domain_key, if_key])].pivot_table(
            index=["stage_index", "step"], columns="key", values="value", aggfunc="last").dropna()
        if len(both.columns) == 2:
            ax.plot(both[domain_key], both[if_key], color=c, alpha=0.3, lw=1, marker=".", ms=5)
        pts = [(lab, a.values[domain_key], a.values[if_key]) for lab, a in curves.anchors(df, run).items()
               if domain_key in a.values and if_key in a.values]
        ax.plot([], [], color=c, lw=2, marker="o", label=run)
        for (_, x0, y0), (_, x1, y1) in zip(pts, pts[1:]):
            ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=dict(
                arrowstyle="-|>", color=c, lw=2, alpha=0.85, mutation_scale=18, shrinkA=4, shrinkB=6))
        for lab, x, y in pts:
            ax.scatter([x], [y], s=70, color=c, edgecolor="black", zorder=5)
            points.setdefault((lab, round(x, 6), round(y, 6)), []).append(i)
    vals = df.loc[df["key"].isin([domain_key, if_key]), "value"].dropna()
    if len(vals) and vals.min() >= 0 and vals.max() <= 1:
        ax.set_xlim(-0.02, 1.05)
        ax.set_ylim(-0.02, 1.05)
    ax.autoscale_view()
    # Label each point once; shift a label to the next free slot when it would cover an earlier one.
    placed: list[tuple[float, float, float, float]] = []
    to_pt = 72 / fig.dpi
    for (lab, x, y), idx in points.items():
        shared = len(idx) > 1
        text = f"{lab} ({'all runs' if len(idx) == len(runs) else len(idx)})" if shared else lab
        w, h = 0.6 * 9.5 * len(text), 12
        px, py = (v * to_pt for v in ax.transData.transform((x, y)))
        for dx, dy in ((7, 5), (7, -16), (-7 - w, 5), (-7 - w, -16), (7, 19), (7, -30), (-7 - w, 19), (-7 - w, -30)):
            box = (px + dx, py + dy, px + dx + w, py + dy + h)
            if not any(b[0] < box[2] and box[0] < b[2] and b[1] < box[3] and box[1] < b[3] for b in placed):
                break
        placed.append(box)
        ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=9.5, fontweight="bold",
                    color="#333333" if shared else RUN_COLORS[idx[0] % len(RUN_COLORS)])
    ax.set_xlabel(f"domain QA: {domain_key}  (higher = better)")
    ax.set_ylabel(f"IF-eval: {if_key}  (higher = better)")
    ax.set_title("Domain knowledge vs instruction following\narrows: base -> after SFT -> after OPD "
                 "(faint: every eval point)", fontsize=12)
    ax.grid(alpha=0.3)
    ax.legend(title="run", fontsize=9, loc="lower left")
    return _save(fig, path)


# ------------------------------------------------------------------------------------- md/html output
def _fmt(v) -> str:
    """Table cell: ints as ints, scores with 3 decimals, tiny/huge numbers in 3 significant digits."""
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, (bool, str)) or not isinstance(v, (int, float, np.number)):
        return str(v)
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}" if abs(v) >= 10_000 else str(int(v))
    return f"{v:.3f}" if v == 0 or 1e-3 <= abs(v) < 1e4 else f"{v:.3g}"


def _md_table(t: pd.DataFrame) -> str:
    head = [t.index.name or ""] + [str(c) for c in t.columns]
    rows = [[str(i)] + [_fmt(v) for v in r] for i, r in zip(t.index, t.itertuples(index=False))]
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(c) for c in head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows])


def _html_table(t: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in [t.index.name or ""] + list(t.columns))
    body = "".join("<tr><th>" + html.escape(str(i)) + "</th>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r)
                   + "</tr>" for i, r in zip(t.index, t.itertuples(index=False)))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = ("body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}"
       "table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:.3em .7em;"
       "text-align:right}thead th{background:#f1f3f5}tbody th{text-align:left;font-weight:600}"
       "img{max-width:100%;border:1px solid #ddd;margin:.5em 0}.note{background:#fff3cd;padding:.5em 1em}")


def _render(blocks: list[tuple], out: Path, title: str) -> Path:
    """Write report.md (images linked) and report.html (images embedded) from the same blocks."""
    md, body = [], []
    for kind, *a in blocks:
        if kind in ("h1", "h2", "h3"):
            md.append("#" * int(kind[1]) + " " + a[0])
            body.append(f"<{kind}>{html.escape(a[0])}</{kind}>")
        elif kind == "p":
            md.append(a[0])
            body.append(f"<p>{html.escape(a[0])}</p>")
        elif kind == "note":
            md.append("> **Note:** " + a[0])
            body.append(f'<p class="note"><b>Note:</b> {html.escape(a[0])}</p>')
        elif kind == "list":
            md.append("\n".join(f"- {x}" for x in a[0]))
            body.append("<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in a[0]) + "</ul>")
        elif kind == "table":
            md.append(_md_table(a[0]) if len(a[0]) else "_(empty)_")
            body.append(_html_table(a[0]) if len(a[0]) else "<p><i>(empty)</i></p>")
        elif kind == "img":
            rel = a[0].relative_to(out).as_posix()
            md.append(f"![{a[1]}]({rel})")
            data = base64.b64encode(a[0].read_bytes()).decode("ascii")
            body.append(f'<figure><img alt="{html.escape(a[1])}" src="data:image/png;base64,{data}"></figure>')
    atomic_write_text(out / "report.md", "\n\n".join(md) + "\n")
    atomic_write_text(out / "report.html", f'<!doctype html><html><head><meta charset="utf-8"><title>'
                      f'{html.escape(title)}</title><style>{CSS}</style></head><body>\n' + "\n".join(body)
                      + "\n</body></html>\n")
    return out


DEFINITIONS = [
    "R[stage, metric]: value at the last eval point of each stage (eval stages included).",
    "forgetting = max over earlier stage ends - final stage end; positive = ended below its best "
    "(for lower-is-better metrics such as KL: final - min earlier).",
    "IF recovery = (after OPD - after SFT) / (base - after SFT) on IF-eval; 1 = all of SFT's loss won back; "
    "n/a when SFT lost nothing.",
    "OPD steps/samples/seconds to 90%: first eval point inside the OPD stage with IF-eval >= after SFT + "
    "0.9 x (base - after SFT); 'not reached' = no OPD eval point got there (the eval after OPD may still).",
    "domain gain kept = (final - base) / (after SFT - base) on domain QA; 1 = OPD kept all of SFT's gain.",
]


def _across_seeds_blocks(df: pd.DataFrame, recipes: dict[str, dict | None], out: Path, domain_key: str,
                         if_key: str) -> list[tuple]:
    """Report blocks (and out/across_seeds.csv) for runs that repeat one recipe with other seeds; [] if none."""
    groups = curves.seed_groups(recipes)
    table = curves.across_seeds(df, groups, domain_key, if_key)
    if not len(table):
        return []
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "across_seeds.csv")
    blocks: list[tuple] = [("h2", "Across seeds"),
                           ("p", "Runs whose resolved recipes differ only in seed (and in where and how often they "
                                 "write and evaluate) are one experiment; sd is the sample standard deviation. "
                                 "Also in across_seeds.csv.")]
    for label in dict.fromkeys(table.index.get_level_values(0)):
        members = groups[label]
        blocks += [("h3", f"{label}: {len(members)} runs, seeds "
                          + ", ".join(str((recipes[r] or {}).get("seed", "?")) for r in members)
                          + f" ({', '.join(members)})"),
                   ("table", table.loc[label])]
    return blocks


def _cl_table(df: pd.DataFrame, domain_key: str, if_key: str) -> pd.DataFrame:
    """cl_metrics with its empty time-to-90% cells spelled out: "not reached" vs "n/a" (no OPD / undefined)."""
    m = curves.cl_metrics(df, domain_key, if_key).astype(object)
    for col in [c for c in m.columns if c.startswith("OPD ")]:
        for run in m.index:
            if pd.isna(m.at[run, col]):
                reachable = "after OPD" in curves.anchors(df, run) and not pd.isna(m.at[run, "IF recovery"])
                m.at[run, col] = "not reached" if reachable else "n/a"
    return m


def _load(run_dirs: list[Path]) -> tuple[pd.DataFrame, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = curves.load_runs(run_dirs)
    for w in caught:  # pass them on, and keep them for the report's notes
        warnings.warn(w.message, w.category, stacklevel=3)
    return df, [str(w.message) for w in caught]


def _check_headline(df: pd.DataFrame, keys: tuple[str, str], notes: list[str]) -> None:
    for k in keys:
        if k not in set(df["key"]):
            notes.append(f"headline metric {k} was never logged; pick a logged suite/metric key instead")
            warnings.warn(notes[-1], stacklevel=3)


def _stage_list(df: pd.DataFrame, run: str) -> str:
    return " -> ".join(f"{r.stage} ({r.kind}{f', {r.end - r.start} steps' if r.end > r.start else ''})"
                       for r in curves.stages(df, run).itertuples())


def write_report(run_dir: str | Path, out_dir: str | Path | None = None, *, domain_key: str | None = None,
                 if_key: str | None = None) -> Path:
    """Write `<run>/report/` (or `out_dir`): curves.png, pareto.png, report.md, report.html. Returns the folder.
    Headline keys default to the run recipe's `headline:` section."""
    run_dir = Path(run_dir)
    d_key, i_key = curves.headline_keys(run_dir)
    domain_key, if_key = domain_key or d_key, if_key or i_key
    out = Path(out_dir) if out_dir else run_dir / "report"
    df, notes = _load([run_dir])
    run = str(df["run"].iat[0])
    _check_headline(df, (domain_key, if_key), notes)
    cl = _cl_table(df, domain_key, if_key).T
    cl.columns, cl.index.name = ["value"], "metric"
    r_m = curves.score_matrix(df, run).T.rename_axis("metric")
    r_m["forgetting"] = curves.forgetting(df)
    blocks: list[tuple] = [
        ("h1", f"Run report: {run}"),
        ("p", f"Run directory: {run_dir}. Stages: {_stage_list(df, run)}."),
        ("p", f"Headline metrics: domain QA = {domain_key}, IF-eval = {if_key}."),
        *[("note", n) for n in notes],
        ("h2", "Base -> after SFT -> after OPD"), ("table", curves.blog_table(df, run, domain_key, if_key)),
        ("img", plot_run(df, run, out / "curves.png", domain_key, if_key), "metrics over training steps"),
        ("img", plot_pareto(df, out / "pareto.png", domain_key, if_key), "domain QA vs IF-eval"),
        ("h2", "Continual-learning metrics"), ("table", cl), ("list", DEFINITIONS),
        ("h2", "Score matrix R (columns: stage ends in order, then forgetting)"), ("table", r_m),
    ]
    return _render(blocks, out, f"Run report: {run}")


def write_comparison(run_dirs: Iterable[str | Path], out_dir: str | Path, *, domain_key: str | None = None,
                     if_key: str | None = None) -> Path:
    """Compare runs side by side in `out_dir` (overlay + pareto + per-run PNGs, report.md/html). Returns out_dir.
    Headline keys default to the first run recipe's `headline:` section."""
    dirs, out = [Path(d) for d in run_dirs], Path(out_dir)
    d_key, i_key = curves.headline_keys(dirs[0])
    domain_key, if_key = domain_key or d_key, if_key or i_key
    df, notes = _load(dirs)
    runs = list(df["run"].cat.categories)
    evk = {r: set(curves.eval_rows(df, r)["key"]) for r in runs}
    shared = set.intersection(*evk.values())
    missing = [f"{r} lacks {', '.join(sorted(set.union(*evk.values()) - k))}" for r, k in evk.items()
               if set.union(*evk.values()) - k]
    if missing:
        notes.append("runs measured different eval metrics; tables compare the shared ones only: " + "; ".join(missing))
        warnings.warn(notes[-1], stacklevel=2)
    _check_headline(df, (domain_key, if_key), notes)
    blog = pd.concat({r: curves.blog_table(df, r, domain_key, if_key).drop(columns="measured at").stack()
                      for r in runs}, axis=1, sort=False).T
    blog.columns = [f"{p}: {m}" for p, m in blog.columns]
    blog.index.name = "run"
    recipes = {r: curves.read_recipe(d, normalize=True) for r, d in zip(runs, dirs)}
    diff = curves.settings_diff(recipes).T.rename_axis("setting")
    seeds = _across_seeds_blocks(df, recipes, out, domain_key, if_key)
    fg = pd.DataFrame({r: curves.forgetting(df, r) for r in runs}).loc[sorted(shared)].rename_axis("metric")
    blocks: list[tuple] = [
        ("h1", f"Comparison of {len(runs)} runs"),
        ("list", [f"{r}: {d} - {_stage_list(df, r)}" for r, d in zip(runs, dirs)]),
        ("p", f"Headline metrics: domain QA = {domain_key}, IF-eval = {if_key}."),
        *[("note", n) for n in notes],
        ("h2", "Base -> after SFT -> after OPD"), ("table", blog), *seeds,
        ("img", plot_pareto(df, out / "pareto.png", domain_key, if_key), "domain QA vs IF-eval per run"),
        ("img", plot_overlay(df, out / "overlay.png", {domain_key: f"domain QA: {domain_key}",
                                                            if_key: f"IF-eval: {if_key}"}),
         "headline metrics, all runs"),
        ("h2", "Continual-learning metrics"), ("table", _cl_table(df, domain_key, if_key)),
        ("list", DEFINITIONS), ("h2", "Forgetting per metric (metrics shared by all runs)"), ("table", fg),
        ("h2", "Settings that differ"),
        ("p", "From each run's recipe.resolved.yaml, flattened to dotted keys (stages.1.lr = field lr of the "
              "second stage); only keys whose values differ are listed."
              + "".join(f" {r} has no recipe.resolved.yaml." for r, v in recipes.items() if v is None)),
        ("table", diff) if len(diff) else ("p", "No differences in the resolved recipes."),
    ]
    for i, r in enumerate(runs):
        r_m = curves.score_matrix(df, r).T.rename_axis("metric")
        blocks += [("h2", f"Run: {r}"), ("img", plot_run(df, r, out / f"curves_{i}.png", domain_key, if_key), r),
                   ("h3", "Score matrix (metrics shared by all runs)"), ("table", r_m[r_m.index.isin(shared)])]
    return _render(blocks, out, f"Comparison: {', '.join(runs)}")
