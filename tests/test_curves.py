"""curves.py: loading metrics.jsonl and continual-learning metrics, checked against hand-computed answers.

`make_run` fabricates a realistic run directory (eval -> sft -> eval -> opd -> eval, evals inside the
training stages, per-step losses); test_report.py reuses it.
"""

from __future__ import annotations

import json
import math
import random
import zlib
from pathlib import Path

import pandas as pd
import pytest
import yaml

from continual_opd import curves
from continual_opd.errors import DataError

DOM, IF = curves.DEFAULT_DOMAIN_KEY, curves.DEFAULT_IF_KEY

# Known answers for the default fabricated run (see make_run):
#   base (baseline eval):  domain .10  IF .70
#   sft end (step 100):    domain .79  IF .41      after-sft eval: domain .80  IF .40
#   opd IF at steps 10..60: .55 .64 .68 .69 .69 .69 ; opd end domain .77   final eval: domain .76  IF .67
OPD_IF = {10: 0.55, 20: 0.64, 30: 0.68, 40: 0.69, 50: 0.69, 60: 0.69}


def make_run(root: Path, name: str = "demo", *, recipe_name: str | None = None, opd: bool = True, lr: float = 1e-5,
             suites: tuple[str, ...] = ("domain_qa", "ifeval", "kl_monitor"), shift: float = 0.0,
             opd_if: dict[int, float] | None = None, write_recipe: bool = True, seed: int = 0) -> Path:
    """Write <root>/<name>/{metrics.jsonl, recipe.resolved.yaml, summary.json} like a recipe run would.

    SFT: 100 steps x 16 samples, 1 s/step, evals every 20 steps; OPD: 60 steps x 8 samples, 2 s/step,
    evals every 10 steps; eval stages take 5 s. `shift` moves the post-SFT curves (another "setting").
    """
    rng = random.Random(zlib.crc32(f"{name}{lr}".encode()))
    opd_if = OPD_IF if opd_if is None else opd_if
    run = root / name
    run.mkdir(parents=True)
    rows, state = [], {"wall": 0.0, "samples": 0, "tokens": 0, "g0": 0}

    def log(stage, idx, kind, step, suite, metric, value):
        if suite.split("/")[0] in suites or suite in curves.NON_EVAL_SUITES:
            rows.append({"stage": stage, "stage_index": idx, "kind": kind, "step": step,
                         "global_step": state["g0"] + step, "suite": suite, "metric": metric, "value": value,
                         "time": 1.7e9 + state["wall"], "wall": state["wall"], "tokens": state["tokens"],
                         "samples": state["samples"]})

    def evals(stage, idx, kind, step, dom, ifv, kl):
        log(stage, idx, kind, step, "domain_qa", "exact_match", dom)
        log(stage, idx, kind, step, "domain_qa", "f1", min(1.0, dom + 0.05))
        log(stage, idx, kind, step, "ifeval", "prompt_level_strict_acc", ifv)
        log(stage, idx, kind, step, "ifeval", "inst_level_strict_acc", min(1.0, ifv + 0.08))
        log(stage, idx, kind, step, "kl_monitor", "kl", kl)
        log(stage, idx, kind, step, "time", "eval_s", 5.0)  # timings are logged too; they are not evals

    state["wall"] += 5  # eval rows are logged when the eval finishes
    evals("baseline", 0, "eval", 0, 0.10, 0.70, 0.0)
    log("sft", 1, "sft", 0, "data", "token_share/documents", 0.7)
    for s in range(1, 101):  # SFT: domain rises, IF drops
        state["wall"] += 1.0
        state["samples"] += 16
        state["tokens"] += 16 * 200
        if s % 5 == 0:
            log("sft", 1, "sft", s, "train", "loss", 2.5 * math.exp(-s / 40) + 0.4 + 0.1 * rng.random())
        if s % 20 == 0:
            f = s / 100
            evals("sft", 1, "sft", s, round(0.10 + 0.69 * f + shift * f, 4), round(0.70 - 0.29 * f + shift * f, 4),
                  0.3 * f)
    state["g0"] = 100
    state["wall"] += 5
    evals("after-sft", 2, "eval", 0, 0.80 + shift, 0.40 + shift, 0.3)
    stages = [{"name": "baseline", "kind": "eval"}, {"name": "sft", "kind": "sft", "steps": 100, "lr": lr},
              {"name": "after-sft", "kind": "eval"}]
    if opd:
        for s in range(1, 61):
            state["wall"] += 2.0
            state["samples"] += 8
            state["tokens"] += 8 * 64
            if s % 2 == 0:
                log("opd", 3, "opd", s, "opd", "loss", 0.5 * math.exp(-s / 20) + 0.05 * rng.random())
                log("opd", 3, "opd", s, "opd", "teacher_kl", 0.6 * math.exp(-s / 25))
            if s in opd_if:
                log("opd", 3, "opd", s, "time", "train_s", 2.0 * s - 0.5)
                evals("opd", 3, "opd", s, round(0.80 - s / 60 * 0.03 + shift, 4), opd_if[s], 0.3 * (1 - s / 70))
        state["g0"] = 160
        state["wall"] += 5
        evals("final", 4, "eval", 0, 0.76 + shift, 0.67, 0.05)
        stages += [{"name": "opd", "kind": "opd", "steps": 60, "lr": lr / 10, "teacher": "snapshot:base"},
                   {"name": "final", "kind": "eval"}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if write_recipe:
        recipe = {"name": recipe_name or name, "model": "demo", "seed": seed, "output_dir": f"runs/{name}",
                  "stages": stages}
        (run / "recipe.resolved.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return run


def frame(points: list[tuple[str, str, int, str, float]]) -> pd.DataFrame:
    """Hand-made frame from (stage, kind, step, key, value) rows, through load_runs' own column filling."""
    rows = [{"stage": st, "kind": k, "step": step, "suite": key.split("/")[0], "metric": key.split("/")[1],
             "value": v, "time": float(i)} for i, (st, k, step, key, v) in enumerate(points)]
    return pd.DataFrame(rows)


@pytest.fixture
def hand(tmp_path):
    def load(points):
        d = tmp_path / f"r{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        frame(points).to_json(d / "metrics.jsonl", orient="records", lines=True)
        return curves.load_runs(d)
    return load


@pytest.fixture
def demo(tmp_path):
    return curves.load_runs(make_run(tmp_path))


# ---------------------------------------------------------------------------------------------- loading
def test_load_runs_tidy_frame_and_names(tmp_path):
    a = make_run(tmp_path, "a", recipe_name="same")
    b = make_run(tmp_path, "b", recipe_name="same")
    c = make_run(tmp_path, "c-dir", write_recipe=False)
    df = curves.load_runs([a, b, c])
    assert list(df.columns) == curves.COLUMNS
    assert list(df["run"].cat.categories) == ["same [a]", "same [b]", "c-dir"]
    assert set(df["kind"]) == {"eval", "sft", "opd"}
    assert (df["key"] == df["suite"] + "/" + df["metric"]).all()


def test_half_written_last_line_warns_and_loads(tmp_path):
    run = make_run(tmp_path)
    n = len((run / "metrics.jsonl").read_text().splitlines())
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"stage": "final", "step": 0, "suite": "ifev')
    with pytest.warns(UserWarning, match=rf"metrics.jsonl:{n + 1}: half-written"):
        df = curves.load_runs(run)
    assert len(df) == n


def test_corrupt_middle_line_is_an_error(tmp_path):
    run = make_run(tmp_path)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[2] = "{oops"
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"metrics.jsonl:3: invalid JSON"):
        curves.load_runs(run)


@pytest.mark.parametrize("content", [None, "", "\n\n"])
def test_run_without_rows_is_a_one_line_error(tmp_path, content):
    (tmp_path / "run").mkdir()
    if content is not None:
        (tmp_path / "run" / "metrics.jsonl").write_text(content)
    with pytest.raises(DataError, match="run") as e:
        curves.load_runs(tmp_path / "run")
    assert "\n" not in str(e.value) and ("no metrics.jsonl" in str(e.value) or "no metric rows" in str(e.value))


def test_missing_optional_fields_are_rebuilt(hand):
    df = hand([("base", "eval", 0, IF, 0.7), ("sft", "sft", 5, IF, 0.5), ("sft", "sft", 10, IF, 0.4),
               ("opd", "opd", 4, IF, 0.6), ("end", "eval", 0, IF, 0.65)])
    assert list(df["stage_index"]) == [0, 1, 1, 2, 3]
    assert list(df["global_step"]) == [0, 5, 10, 14, 14]
    assert list(df["wall"]) == [0, 1, 2, 3, 4]


# ------------------------------------------------------------------------------------ metrics, demo run
def test_score_matrix_and_forgetting(demo):
    r = curves.score_matrix(demo)
    assert list(r.index) == ["baseline", "sft", "after-sft", "opd", "final"]
    assert r[IF].tolist() == pytest.approx([0.70, 0.41, 0.40, 0.69, 0.67])
    assert r[DOM].tolist() == pytest.approx([0.10, 0.79, 0.80, 0.77, 0.76])
    f = curves.forgetting(demo)
    assert f[IF] == pytest.approx(0.70 - 0.67)
    assert f[DOM] == pytest.approx(0.80 - 0.76)
    assert not {"train/loss", "opd/teacher_kl", "time/eval_s", "data/token_share/documents"} & set(r.columns)
    assert f["kl_monitor/kl"] == pytest.approx(0.05 - 0.0)  # lower is better: final - best (min) earlier


def test_no_forgetting_for_kl_to_each_stage_start(demo):
    kl = demo[demo["key"] == "kl_monitor/kl"].assign(metric="kl_to_stage_start", key="kl_monitor/kl_to_stage_start")
    f = curves.forgetting(pd.concat([demo, kl], ignore_index=True))
    assert math.isnan(f["kl_monitor/kl_to_stage_start"]) and f["kl_monitor/kl"] == pytest.approx(0.05)


def test_recovery_and_domain_gain_kept(demo):
    assert curves.recovery_fraction(demo) == pytest.approx((0.67 - 0.40) / (0.70 - 0.40))
    assert curves.domain_gain_kept(demo) == pytest.approx((0.76 - 0.10) / (0.80 - 0.10))


def test_time_to_90_percent_recovery(demo):
    t = curves.time_to_recovery(demo)  # threshold .40 + .9 * .30 = .67; first OPD eval >= .67 is step 30 (.68)
    assert t["threshold"] == pytest.approx(0.67)
    assert (t["steps"], t["global_step"], t["value"]) == (30, 130, 0.68)
    assert t["samples"] == 30 * 8 and t["tokens"] == 30 * 8 * 64
    assert t["wall_s"] == pytest.approx(30 * 2.0) and t["train_s"] == 59.5
    assert curves.time_to_recovery(demo, fraction=0.99) is None  # .40 + .99 * .30 = .697 never reached


def test_blog_table(demo):
    t = curves.blog_table(demo)
    assert list(t.index) == ["base", "after SFT", "after OPD"]
    assert t["domain QA"].tolist() == pytest.approx([0.10, 0.80, 0.76])
    assert t["IF-eval"].tolist() == pytest.approx([0.70, 0.40, 0.67])
    assert t["measured at"].tolist() == ["baseline@0", "after-sft@0", "final@0"]


def test_cl_metrics_one_row_per_run(tmp_path):
    df = curves.load_runs([make_run(tmp_path, "x"), make_run(tmp_path, "y", opd=False)])
    m = curves.cl_metrics(df)
    assert list(m.index) == ["x", "y"]
    assert m.loc["x", "OPD steps to 90%"] == 30 and m.loc["x", "OPD samples to 90%"] == 240
    assert math.isnan(m.loc["y", "IF recovery"]) and pd.isna(m.loc["y", "OPD steps to 90%"])


# ----------------------------------------------------------------------------------- shapes of runs
def test_run_without_opd(tmp_path):
    df = curves.load_runs(make_run(tmp_path, opd=False))
    assert list(curves.blog_table(df).index) == ["base", "after SFT"]
    assert math.isnan(curves.recovery_fraction(df))
    assert curves.time_to_recovery(df) is None
    assert curves.domain_gain_kept(df) == pytest.approx(1.0)  # final = after-sft eval


def test_eval_only_run(hand):
    df = hand([("baseline", "eval", 0, DOM, 0.1), ("baseline", "eval", 0, IF, 0.7)])
    assert list(curves.blog_table(df).index) == ["base"]
    assert math.isnan(curves.recovery_fraction(df)) and math.isnan(curves.domain_gain_kept(df))
    assert curves.forgetting(df).isna().all()
    assert curves.cl_metrics(df).shape[0] == 1


def test_sft_that_lost_nothing_has_no_recovery(hand):
    df = hand([("b", "eval", 0, IF, 0.5), ("s", "sft", 10, IF, 0.6), ("o", "opd", 10, IF, 0.6)])
    assert math.isnan(curves.recovery_fraction(df))
    assert curves.time_to_recovery(df) is None


def test_base_falls_back_to_step0_eval_inside_sft_and_sft_end_without_eval_stage(hand):
    df = hand([("sft", "sft", 0, IF, 0.8), ("sft", "sft", 0, DOM, 0.2), ("sft", "sft", 50, IF, 0.4),
               ("sft", "sft", 50, DOM, 0.9), ("opd", "opd", 25, IF, 0.7), ("opd", "opd", 50, IF, 0.8),
               ("opd", "opd", 50, DOM, 0.85)])
    t = curves.blog_table(df)
    assert t.loc["base", "IF-eval"] == 0.8 and t.loc["after SFT", "IF-eval"] == 0.4
    assert t.loc["after OPD", "domain QA"] == 0.85 and t.loc["after OPD", "measured at"] == "opd@50"
    assert curves.recovery_fraction(df) == pytest.approx(1.0)
    assert curves.time_to_recovery(df)["steps"] == 50  # threshold .4 + .9 * .4 = .76: step 25 (.7) is short


# ------------------------------------------------------------------------------ settings that differ
def test_flatten_and_settings_diff_lists_exactly_the_differing_keys():
    base = {"name": "a", "model": "demo", "seed": 0,
            "stages": [{"name": "b", "kind": "eval"}, {"name": "s", "kind": "sft", "lr": 1e-5, "lora": {"r": 8}}],
            "suites": ["ifeval", "domain_qa"], "tags": {}}
    assert curves.flatten(base)["stages.1.lora.r"] == 8 and curves.flatten(base)["tags"] == {}
    other = json.loads(json.dumps(base))
    other.update(name="b", seed=1, suites=["ifeval"])
    other["stages"][1]["lr"] = 2e-5
    other["stages"][1]["lora"]["alpha"] = 16
    third = json.loads(json.dumps(base)) | {"name": "c"}
    diff = curves.settings_diff({"a": base, "b": other, "c": third, "none": None})
    assert list(diff.columns) == ["seed", "stages.1.lora.alpha", "stages.1.lr", "suites.1"]
    assert list(diff.index) == ["a", "b", "c"]
    assert diff.loc["b"].tolist() == ["1", "16", "2e-05", "(absent)"]
    assert diff.loc["c", "stages.1.lora.alpha"] == "(absent)"
    assert curves.settings_diff({"a": base, "c": third}).columns.tolist() == []
    assert "name" in curves.settings_diff({"a": base, "b": other}, ignore=()).columns


def _set_recipe(run: Path, **changes) -> None:
    recipe = yaml.safe_load((run / "recipe.resolved.yaml").read_text())
    for dotted, value in changes.items():
        *path, last = dotted.split("__")
        node = recipe
        for p in path:
            node = node[int(p)] if isinstance(node, list) else node[p]
        node[last] = value
    (run / "recipe.resolved.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))


def test_seed_groups_ignore_seed_and_bookkeeping_only(tmp_path):
    s0, s1 = make_run(tmp_path, "s0"), make_run(tmp_path, "s1", shift=0.02, seed=1)
    _set_recipe(s1, stages__1__eval_every=50, stages__3__save_every=8)  # how often it evaluates: same experiment
    other_lr = make_run(tmp_path, "lr", lr=3e-5, seed=1)
    other_steps = make_run(tmp_path, "steps", seed=2)
    _set_recipe(other_steps, stages__3__steps=30)
    recipes = {r.name: curves.read_recipe(r) for r in (s0, other_lr, s1, other_steps)}
    assert curves.seed_groups(recipes) == {"s0": ["s0", "s1"], "lr": ["lr"], "steps": ["steps"]}
    recipes["norecipe"] = None
    assert curves.seed_groups(recipes)["norecipe"] == ["norecipe"]


def test_runs_with_the_same_seed_are_not_an_across_seeds_group(tmp_path):
    """A rerun with the same seed measures nondeterminism, not seed variance: it is not grouped with its twin."""
    a, b = make_run(tmp_path, "a"), make_run(tmp_path, "b", shift=0.02)
    c = make_run(tmp_path, "c", seed=1)
    recipes = {r.name: curves.read_recipe(r) for r in (a, b, c)}
    assert curves.seed_groups(recipes) == {"a": ["a", "c"], "b": ["b"]}


def test_across_seeds_mean_sd_min_max(tmp_path):
    runs = [make_run(tmp_path, "s0"), make_run(tmp_path, "s1", shift=0.02, seed=1),
            make_run(tmp_path, "s2", shift=0.05, seed=2), make_run(tmp_path, "alone", lr=3e-5)]
    df = curves.load_runs(runs)
    groups = curves.seed_groups({r.name: curves.read_recipe(r) for r in runs})
    t = curves.across_seeds(df, groups, DOM, IF)
    assert set(t.index.get_level_values(0)) == {"s0"}  # a group of one has no spread
    sft_dom = t.loc[("s0", "after SFT: domain QA")]
    # after SFT (the after-sft eval stage): domain .80 + shift for shifts 0, .02, .05
    assert sft_dom["runs"] == 3
    assert sft_dom["mean"] == pytest.approx((0.80 + 0.82 + 0.85) / 3)
    assert sft_dom["sd"] == pytest.approx(pd.Series([0.80, 0.82, 0.85]).std(ddof=1))
    assert (sft_dom["min"], sft_dom["max"]) == (pytest.approx(0.80), pytest.approx(0.85))
    base_if = t.loc[("s0", "base: IF-eval")]
    assert base_if["mean"] == pytest.approx(0.70) and base_if["sd"] == pytest.approx(0.0)
    # IF recovery per run: (.67 - (.40 + shift)) / (.70 - (.40 + shift))
    rec = [(0.67 - (0.40 + d)) / (0.70 - (0.40 + d)) for d in (0.0, 0.02, 0.05)]
    assert t.loc[("s0", "IF recovery"), "mean"] == pytest.approx(sum(rec) / 3)
    assert curves.across_seeds(df, {"s0": ["s0"], "alone": ["alone"]}, DOM, IF).empty
