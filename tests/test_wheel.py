"""A non-editable install works: the wheel carries the built-in suites, the demo data and punkt_tab."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import build_tiny_lm

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_install_validates_and_evaluates(tmp_path):
    wheel_dir, site = tmp_path / "wheel", tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheel_dir), str(REPO)],
                           capture_output=True, text=True, cwd=tmp_path)
    if build.returncode != 0 and "No matching distribution" in build.stderr:
        pytest.skip("no package index for the build backend (pip wheel needs setuptools from the index)")
    assert build.returncode == 0, build.stderr[-2000:]
    [wheel] = wheel_dir.glob("continual_opd-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    model, tok = build_tiny_lm()
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    env = {**os.environ, "PYTHONPATH": str(site), "NLTK_DATA": str(tmp_path / "no-nltk-here")}

    def cli(*args):  # run from tmp_path, so the checkout is not on sys.path
        return subprocess.run([sys.executable, "-m", "continual_opd.cli", *args], capture_output=True, text=True,
                              cwd=tmp_path, env=env)

    where = subprocess.run([sys.executable, "-c",
                            "import continual_opd.resources as r; print(r.SUITES_DIR, r.DATA_DIR)"],
                           capture_output=True, text=True, cwd=tmp_path, env=env, check=True).stdout.split()
    assert where == [str(site / "continual_opd" / "eval_suites"), str(site / "continual_opd" / "data_samples")]
    ok = cli("validate", str(REPO / "recipes" / "personalize.yaml"))
    assert ok.returncode == 0 and ok.stdout.startswith("ok: "), ok.stderr[-2000:]
    out = tmp_path / "eval"
    ev = cli("eval", "--model", str(tmp_path / "tiny"), "--suite", "ifeval", "--suite", "ifeval_official_120",
             "--suite", "domain_qa", "--limit", "3", "--batch-size", "3", "--out", str(out), "--no-progress")
    assert ev.returncode == 0, ev.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert {"ifeval/prompt_level_strict_acc", "ifeval_official_120/inst_level_strict_acc",
            "domain_qa/exact_match"} <= set(results)
    assert "punkt_tab" not in ev.stderr
    punkt = subprocess.run([sys.executable, "-c",
                            "import nltk; from continual_opd.evals.ifeval import punkt_available; "
                            "print(punkt_available(), nltk.data.find('tokenizers/punkt_tab'))"],
                           capture_output=True, text=True, cwd=tmp_path, env=env, check=True).stdout.split()
    assert punkt[0] == "True" and punkt[1].startswith(str(site))  # NLTK finds the wheel's punkt_tab
