"""The README's main job, end to end: build the demo model (cached), run recipes/personalize.yaml, check the
shape of the result (SFT learns the facts and forgets instruction following; OPD wins IF back and keeps
most of the facts), and that the run dir and report follow the contract. Takes several minutes on 2 cores."""

import json
from pathlib import Path

import pytest

from continual_opd.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_personalize_recipe_reproduces_the_forgetting_and_recovery_shape(tmp_path, capsys):
    out = tmp_path / "personalize"
    assert main(["recipe", str(REPO / "recipes" / "personalize.yaml"), f"output_dir={out}", "--no-progress"]) == 0
    s = json.loads((out / "summary.json").read_text())
    IF, QA = "ifeval/prompt_level_strict_acc", "domain_qa/exact_match"
    base, sft, opd = s["baseline"], s["after-sft"], s["final"]
    assert base[IF] >= 0.90 and base[QA] <= 0.05  # the demo chat model follows instructions, knows no facts
    assert sft[QA] - base[QA] >= 0.4  # SFT teaches the facts ...
    assert base[IF] - sft[IF] >= 0.3  # ... and visibly damages instruction following
    assert opd[IF] - sft[IF] >= 0.5 * (base[IF] - sft[IF])  # OPD wins back at least half of the loss
    assert opd[QA] - base[QA] >= 0.8 * (sft[QA] - base[QA])  # and keeps >= 80% of the domain gain
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for stage in ("sft", "opd"):
        points = {r["step"] for r in rows if r["stage"] == stage and r["suite"] == "ifeval"}
        assert len(points) >= 4, (stage, points)
    report = out / "report"
    assert (report / "report.md").exists() and (report / "report.html").exists()
    assert list(report.glob("*.png"))
