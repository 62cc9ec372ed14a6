"""report.py: PNGs, report.md and self-contained report.html for one run and for a comparison of runs."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from continual_opd import curves, report

# The fabricated-run helper lives in test_curves.py; load it by path so any pytest import mode works.
_spec = importlib.util.spec_from_file_location("_fabricate", Path(__file__).with_name("test_curves.py"))
_fab = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fab)
make_run = _fab.make_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def no_render(monkeypatch):
    """Build the figures but skip rasterizing them (~1 s each) in tests that only check report content."""
    def save(fig, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(PNG_MAGIC)
        return path
    monkeypatch.setattr(report, "_save", save)


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000, path


def assert_html_self_contained(path: Path, n_images: int) -> None:
    text = path.read_text()
    assert text.count('src="data:image/png;base64,') == n_images
    assert not re.search(r'src="(?!data:)', text)  # no links to files next to it
    assert "<table>" in text


def test_write_report_one_run(tmp_path):
    run = make_run(tmp_path)
    out = report.write_report(run)
    assert out == run / "report"
    for name in ("curves.png", "pareto.png"):
        assert_png(out / name)
    assert_html_self_contained(out / "report.html", 2)
    md = (out / "report.md").read_text()
    assert "|  | domain QA | IF-eval | measured at |" in md
    assert "| after OPD | 0.760 | 0.670 | final@0 |" in md
    assert "| OPD steps to 90% | 30 |" in md and "| OPD samples to 90% | 240 |" in md
    assert "## Score matrix" in md and "| domain_qa/exact_match | 0.100 | 0.790 | 0.800 | 0.770 | 0.760 | 0.040 |" in md
    assert "](curves.png)" in md and "](pareto.png)" in md
    assert "0.943" in md  # domain gain kept = .66 / .70


def test_write_report_eval_only_run(tmp_path):
    only_eval = tmp_path / "only-eval"
    only_eval.mkdir()
    (only_eval / "metrics.jsonl").write_text("".join(json.dumps(
        {"stage": "baseline", "step": 0, "suite": s, "metric": m, "value": v, "time": 1.0}) + "\n" for s, m, v in
        [("domain_qa", "exact_match", 0.1), ("ifeval", "prompt_level_strict_acc", 0.7)]))
    out = report.write_report(only_eval)
    assert_png(out / "curves.png")
    assert "| base | 0.100 | 0.700 | baseline@0 |" in (out / "report.md").read_text()


def test_write_report_to_other_dir_without_opd_and_after_crash(tmp_path, no_render):
    no_opd = report.write_report(make_run(tmp_path, "no-opd", opd=False), tmp_path / "r1")
    md = (no_opd / "report.md").read_text()
    assert "| after SFT |" in md and "| after OPD |" not in md
    assert "| OPD steps to 90% | n/a |" in md

    crashed = make_run(tmp_path, "crashed")
    with (crashed / "metrics.jsonl").open("a") as f:
        f.write('{"stage": "final", "st')
    with pytest.warns(UserWarning, match="half-written"):
        out = report.write_report(crashed)
    assert "half-written last line" in (out / "report.md").read_text()


def test_report_warns_when_headline_metric_missing(tmp_path, no_render):
    run = make_run(tmp_path, suites=("domain_qa",))
    with pytest.warns(UserWarning, match="ifeval/prompt_level_strict_acc was never logged"):
        out = report.write_report(run)
    assert "ifeval/prompt_level_strict_acc was never logged" in (out / "report.md").read_text()


def test_write_comparison_three_runs(tmp_path):
    runs = [make_run(tmp_path, "lr1e-5"),
            make_run(tmp_path, "lr3e-5", lr=3e-5, shift=-0.05, opd_if={20: 0.5, 40: 0.6, 60: 0.66}),
            make_run(tmp_path, "no-opd", opd=False, lr=2e-5)]
    out = report.write_comparison(runs, tmp_path / "cmp")
    pngs = ["pareto.png", "overlay.png", "curves_0.png", "curves_1.png", "curves_2.png"]
    for name in pngs:
        assert_png(out / name)
    assert_html_self_contained(out / "report.html", len(pngs))
    md = (out / "report.md").read_text()
    assert "| run | base: domain QA | base: IF-eval | after SFT: domain QA |" in md
    assert "| no-opd | 0.100 | 0.700 | 0.800 | 0.400 | n/a | n/a |" in md
    assert "## Settings that differ" in md
    assert "| stages.1.lr | 1e-05 | 3e-05 | 2e-05 |" in md
    assert "| stages.3.kind | opd | opd | (absent) |" in md
    assert "not reached" in md  # lr3e-5: OPD evals stop at .66 < .665 (threshold)
    for r in ("lr1e-5", "lr3e-5", "no-opd"):
        assert f"## Run: {r}" in md


def test_comparison_of_runs_with_different_suites_uses_shared_metrics(tmp_path, no_render):
    a = make_run(tmp_path, "a")
    b = make_run(tmp_path, "b", suites=("domain_qa", "ifeval"))  # no kl_monitor
    with pytest.warns(UserWarning, match="b lacks kl_monitor/kl"):
        out = report.write_comparison([a, b], tmp_path / "cmp")
    md = (out / "report.md").read_text()
    assert "b lacks kl_monitor/kl" in md
    matrices = md.split("### Score matrix")[1:]
    assert len(matrices) == 2 and all("kl_monitor/kl" not in m.split("\n\n")[1] for m in matrices)
    assert all("| ifeval/prompt_level_strict_acc |" in m.split("\n\n")[1] for m in matrices)
    assert "No differences in the resolved recipes." in md  # same settings apart from the name


def test_comparison_summarizes_repeats_across_seeds(tmp_path, no_render, capsys):
    runs = [make_run(tmp_path, "s0"), make_run(tmp_path, "s1", seed=1, shift=0.02),
            make_run(tmp_path, "lr3e-5", lr=3e-5)]
    out = report.write_comparison(runs, tmp_path / "cmp")
    md = (out / "report.md").read_text()
    assert "## Across seeds" in md and "### s0: 2 runs, seeds 0, 1 (s0, s1)" in md
    assert "| after SFT: domain QA | 2 | 0.810 | 0.014 | 0.800 | 0.820 |" in md
    csv = (out / "across_seeds.csv").read_text().splitlines()
    assert csv[0] == "experiment,quantity,runs,mean,sd,min,max" and all(r.startswith("s0,") for r in csv[1:])
    assert "lr3e-5:" not in md.split("## Across seeds")[1].split("\n## ")[0]
    from continual_opd.cli import main

    assert main(["compare", *map(str, runs), "--out", str(tmp_path / "cmp-cli")]) == 0
    printed = capsys.readouterr().out
    assert "across seeds:" in printed and "after SFT: domain QA     2 0.810 0.014 0.800 0.820" in printed
    alone = report.write_comparison(runs[:1] + runs[2:], tmp_path / "cmp2")
    assert "Across seeds" not in (alone / "report.md").read_text() and not (alone / "across_seeds.csv").exists()


def test_repeats_made_by_an_older_version_still_group(tmp_path, no_render):
    """A run whose resolved recipe predates an option (here OPD's `sampler`/`vllm`) is read through today's
    schema: it repeats a new run with another seed, and the option is not a 'setting that differs'."""
    import yaml

    from continual_opd.config import load_recipe, recipe_to_yaml

    new = yaml.safe_load(recipe_to_yaml(load_recipe(Path(__file__).parents[1] / "recipes" / "personalize.yaml")))
    opd = next(i for i, st in enumerate(new["stages"]) if st["kind"] == "opd")
    old = yaml.safe_load(yaml.safe_dump(new))
    del old["stages"][opd]["sampler"], old["stages"][opd]["vllm"]
    runs = []
    for name, seed, recipe in (("old", 0, old), ("new", 1, new)):
        run = make_run(tmp_path, name, seed=seed)
        (run / "recipe.resolved.yaml").write_text(yaml.safe_dump({**recipe, "seed": seed, "name": name}))
        runs.append(run)
    md = (report.write_comparison(runs, tmp_path / "cmp") / "report.md").read_text()
    assert "### old: 2 runs, seeds 0, 1 (old, new)" in md
    diff = md.split("## Settings that differ")[1].split("\n## ")[0]
    assert "| seed | 0 | 1 |" in diff and "sampler" not in diff and "vllm" not in diff


def test_load_runs_dirs_in_attrs(tmp_path):
    run = make_run(tmp_path)
    assert curves.load_runs([run]).attrs["run_dirs"] == {"demo": str(run)}
