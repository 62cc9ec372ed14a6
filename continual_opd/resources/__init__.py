"""Where the files that ship with the toolkit are: the built-in eval suites and the demo world's data.

In a source checkout (and an editable install) they are the repository's top-level `eval_suites/` and
`data_samples/`; a wheel carries the same two folders inside the package (`continual_opd/eval_suites/`,
`continual_opd/data_samples/`, mapped in pyproject.toml). Suites refer to data as `../data_samples/...`, which
resolves the same way in both layouts.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parents[1]


def shipped_dir(name: str) -> Path:
    """`eval_suites` or `data_samples`: inside the installed package if it is there, else the checkout's."""
    inside = _PACKAGE / name
    return inside if inside.is_dir() else _PACKAGE.parent / name


SUITES_DIR = shipped_dir("eval_suites")
DATA_DIR = shipped_dir("data_samples")
