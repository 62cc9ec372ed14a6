"""The run directory: planning it (checks, nothing written), starting, forking and resuming it, and its state.

    <run>/recipe.resolved.yaml   the recipe with every default and override, as the run used it
    <run>/run_state.json         `RunState`: the completed stages, how to load each one's model, the global step
    <run>/summary.json           each completed stage's last eval point
    <run>/metrics.jsonl          the one metrics sink (tracking.py)
    <run>/forked_from.json       with --from-run: the run whose leading stages this one reuses
    <run>/stages/NN-name/        each stage's checkpoints, eval answers and final model

Rank 0 is the only writer (distributed.py); `plan_run` checks and reads only, so a problem found there (or when the
model loads) leaves no directory behind; `start_run` writes.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from continual_opd.errors import ConfigError, RunDirError
from continual_opd.io import atomic_write_json, atomic_write_text
from continual_opd.models import ModelRef
from continual_opd.tracking import read_rows

log = logging.getLogger(__name__)

STATE_FILE = "run_state.json"
RESOLVED = "recipe.resolved.yaml"
SUMMARY = "summary.json"
# Recipe keys that do not change what a stage computes: runs that differ only in these can share stages.
FORK_FREE_KEYS = ("name", "output_dir", "stages", "report", "report_to", "headline")


@dataclass
class CompletedStage:
    index: int
    name: str
    ref: ModelRef  # the model the stage ended with
    global_step: int  # training steps across stages when it ended
    snapshots: dict[str, ModelRef]  # before-<name> and after-<name>

    def to_dict(self) -> dict:
        return {"index": self.index, "name": self.name, "ref": self.ref.to_dict(), "global_step": self.global_step,
                "snapshots": {k: v.to_dict() for k, v in self.snapshots.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> CompletedStage:
        return cls(index=d["index"], name=d["name"], ref=ModelRef(**d["ref"]), global_step=d.get("global_step", 0),
                   snapshots={k: ModelRef(**v) for k, v in d.get("snapshots", {}).items()})


@dataclass
class RunState:
    """What `--resume` and `--from-run` need: which stages are done and where their models are."""

    completed: list[CompletedStage] = field(default_factory=list)
    global_step: int = 0

    @classmethod
    def load(cls, path: Path) -> RunState:
        d = json.loads(Path(path).read_text())
        return cls([CompletedStage.from_dict(c) for c in d["completed"]], d.get("global_step", 0))

    def save(self, path: Path) -> None:
        atomic_write_json(path, {"completed": [c.to_dict() for c in self.completed], "global_step": self.global_step})

    def models(self, base: ModelRef) -> tuple[dict[str, ModelRef], ModelRef]:
        """(every snapshot so far by name, the model the next stage starts from)."""
        snapshots, current = {"base": base}, base
        for done in self.completed:
            snapshots.update(done.snapshots)
            current = done.ref
        return snapshots, current


@dataclass
class RunPlan:
    """A checked run directory, not yet written: `start_run` makes it."""

    path: Path
    resolved: str  # recipe.resolved.yaml's text
    state: RunState
    resume: bool
    fork_from: Path | None = None


# ---------------------------------------------------------------------------------------------- checks


def check_output_dir(path: Path) -> None:
    """An output directory that is a file, lies under a file, or sits in a folder we cannot write to is an
    error now, not after hours of training."""
    path = Path(path).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{path}: output_dir is a file; pick a directory path for output_dir=...")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise RunDirError(f"{path}: output_dir lies under the file {parent}; pick a directory path for output_dir=...")
    if not os.access(parent, os.W_OK | os.X_OK) or str(parent).startswith(("/proc", "/sys")):
        raise RunDirError(f"{path}: cannot create the run directory ({parent} is not writable); "
                          "pick another output_dir=...")


def _listing(path: Path, n: int = 3) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return f"{len(names)} entr{'y' if len(names) == 1 else 'ies'}: {', '.join(names[:n])}{more}"


def check_run_dir(path: Path, *, resume: bool) -> None:
    """The output directory can start a new run (`resume=False`) or be continued (`resume=True`); the error says
    what the directory holds and which of the two it allows."""
    path = Path(path).expanduser().resolve()
    check_output_dir(path)
    is_run = (path / RESOLVED).is_file()
    empty = not path.exists() or not any(path.iterdir())
    if resume and not is_run:
        what = "does not exist" if not path.exists() else "is empty" if empty else \
            f"holds {_listing(path)} but no {RESOLVED}, so it is not a continual-opd run"
        raise RunDirError(f"{path}: nothing to resume: output_dir {what}; run without --resume to start a run there"
                          + ("" if empty else ", or pick a new output_dir=..."))
    if not resume and is_run:
        raise RunDirError(f"{path}: output_dir holds a run ({RESOLVED} and {_listing(path)}); continue it with "
                          "--resume, or pick a new output_dir=... (nothing was changed)")
    if not resume and not empty:
        raise RunDirError(f"{path}: output_dir is not empty ({_listing(path)}) and holds no run; pick a new "
                          "output_dir=... or move those files away (nothing was changed)")


def normalized(resolved: Path) -> dict:
    """A run's recipe.resolved.yaml read through today's schema: options added since (with their defaults) do not
    make an old run look different. A file the schema no longer accepts is compared as written."""
    from continual_opd.config import normalized_recipe

    return normalized_recipe(yaml.safe_load(resolved.read_text(encoding="utf-8")), str(resolved))


def shared_stages(source: str | None, resolved: str, from_run: Path) -> int:
    """How many completed leading stages of `from_run` a recipe (its resolved YAML) can reuse; an error if none."""
    src = from_run.expanduser().resolve()
    if not (src / RESOLVED).is_file() or not (src / STATE_FILE).is_file():
        raise RunDirError(f"{src}: --from-run needs a run directory ({RESOLVED} and {STATE_FILE}); check the path")
    old, new = normalized(src / RESOLVED), yaml.safe_load(resolved)
    for key in new:
        if key not in FORK_FREE_KEYS and old.get(key) != new.get(key):
            raise ConfigError(f"{source}: {key}: differs from {src}/{RESOLVED}, so no stage of that run can be "
                              "reused; use the same value or drop --from-run")
    done = RunState.load(src / STATE_FILE).completed
    n = 0
    while n < min(len(done), len(new["stages"]), len(old["stages"])) and old["stages"][n] == new["stages"][n]:
        n += 1
    if n == 0:
        why = "its first stage differs from this recipe's" if done else "it has no completed stage"
        raise ConfigError(f"{src}: --from-run: nothing to reuse ({why}); run without --from-run")
    return n


# ---------------------------------------------------------------------------------------------- plan and start


def plan_run(output_dir: str, source: str | None, resolved: str, *, resume: bool,
             from_run: str | Path | None) -> RunPlan:
    """Check the run directory and work out the run's state (resumed, forked or fresh) without writing anything."""
    path = Path(output_dir).expanduser().resolve()
    if from_run is not None and resume:
        raise ConfigError("--from-run starts a new run; it cannot be combined with --resume")
    check_run_dir(path, resume=resume)
    if resume:
        if normalized(path / RESOLVED) != yaml.safe_load(resolved):
            raise RunDirError(f"{path}: the recipe differs from the run's {RESOLVED}; resume with the same recipe "
                              "and overrides, or start a new output_dir")
        state = RunState.load(path / STATE_FILE) if (path / STATE_FILE).exists() else RunState()
        return RunPlan(path, resolved, state, resume=True)
    if from_run is None:
        return RunPlan(path, resolved, RunState(), resume=False)
    src = Path(from_run).expanduser().resolve()
    n = shared_stages(source, resolved, src)
    completed = RunState.load(src / STATE_FILE).completed[:n]
    # (runs made before stages recorded their global step: the reused stages' last metric row has it)
    step = completed[-1].global_step or max([int(r.get("global_step", 0)) for r in read_rows(src / "metrics.jsonl")
                                              if r.get("stage_index", -1) < n] or [0])
    return RunPlan(path, resolved, RunState(completed, step), resume=False, fork_from=src)


def start_run(plan: RunPlan) -> Path:
    """Write a fresh (or forked) run directory; a resumed one is left as it is."""
    if plan.resume:
        return plan.path
    try:
        plan.path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"{plan.path}: cannot create the run directory ({e.strerror}); "
                          "pick another output_dir=...") from None
    if plan.fork_from is not None:
        _copy_fork(plan.fork_from, plan.path, plan.state)
    atomic_write_text(plan.path / RESOLVED, plan.resolved)
    # From here on the directory is a run: if anything fails before a stage completes, `--resume` restarts it
    # from the first stage not completed (the state says which).
    plan.state.save(plan.path / STATE_FILE)
    return plan.path


def _copy_fork(src: Path, run_dir: Path, state: RunState) -> None:
    """The reused stages' metric rows and summary; their models stay in `src` (the new run's refs point there)."""
    names = [c.name for c in state.completed]
    rows = [r for r in read_rows(src / "metrics.jsonl") if r.get("stage_index", -1) < len(names)]
    summary = json.loads((src / SUMMARY).read_text()) if (src / SUMMARY).exists() else {}
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_json(run_dir / SUMMARY, {k: v for k, v in summary.items() if k in names})
    atomic_write_json(run_dir / "forked_from.json", {"run": str(src), "stages": names})
    log.info("reusing %d stage(s) of %s: %s", len(names), src, ", ".join(names))


# ---------------------------------------------------------------------------------------------- during the run


class RunDir:
    """A started run directory: stage folders, and the state and summary written after each stage."""

    def __init__(self, path: Path, state: RunState, *, write: bool):
        self.path, self.state, self.write = path, state, write
        self.summary: dict = json.loads((path / SUMMARY).read_text()) if (path / SUMMARY).exists() else {}

    def stage_dir(self, index: int, name: str) -> Path:
        d = self.path / "stages" / f"{index:02d}-{name}"
        if self.write:
            d.mkdir(parents=True, exist_ok=True)
        return d

    def complete_stage(self, done: CompletedStage, results: dict[str, float]) -> None:
        self.summary[done.name] = {k: v for k, v in results.items() if not k.startswith("time/")}
        self.state.completed.append(done)
        self.state.global_step = done.global_step
        if self.write:  # the summary first: a state that names a stage always has its summary
            atomic_write_json(self.path / SUMMARY, self.summary)
            self.state.save(self.path / STATE_FILE)
