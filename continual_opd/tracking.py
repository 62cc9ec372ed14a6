"""The one metrics sink: every eval and train metric is one JSON row in `<run>/metrics.jsonl`.

Row contract (plots, reports and later stages rely on it):
    stage, stage_index, kind, step (within the stage), global_step (train steps across stages),
    suite, metric, value, time (unix s), wall (s since run start, continued across --resume),
    tokens, samples (cumulative training tokens / samples across the run).
TensorBoard / W&B mirrors are optional and get the same rows as `suite/metric` scalars at global_step.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Iterable

from continual_opd.io import atomic_write_text

# Suite "kl_monitor" logs this metric: KL(student || the model at the start of the current stage). Its
# reference changes at every stage, so curves gives it no cross-stage forgetting.
KL_TO_STAGE_START = "kl_to_stage_start"


class MetricsSink:
    """`write=False` (every rank but 0 of a multi-process run) keeps the counters and writes nothing."""

    def __init__(self, run_dir: Path, report_to: Iterable[str] = (), run_name: str = "run", write: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.write = write
        self.stage = ""
        self.stage_index = -1
        self.kind = ""
        self.global_offset = 0  # global_step at the start of the current stage
        self.tokens = 0
        self.samples = 0
        self._wall_offset = 0.0
        self._t0 = time.time()
        self._mirrors = []
        self._f = None
        if not write:
            return
        last = self.last_row()
        if last is not None:  # resuming: continue the wall clock and the counters
            self._wall_offset = float(last.get("wall", 0.0))
            self.tokens = int(last.get("tokens", 0) or 0)
            self.samples = int(last.get("samples", 0) or 0)
        for target in report_to:
            self._mirrors.append(_make_mirror(target, Path(run_dir), run_name))
        self._f = self.path.open("a", encoding="utf-8")

    # ------------------------------------------------------------------ state
    def set_stage(self, name: str, index: int, kind: str, global_offset: int) -> None:
        self.stage, self.stage_index, self.kind, self.global_offset = name, index, kind, global_offset

    def add_counts(self, *, tokens: int = 0, samples: int = 0) -> None:
        """Training tokens and samples seen since the last call; every row carries the run's running totals."""
        self.tokens += int(tokens)
        self.samples += int(samples)

    @property
    def wall(self) -> float:
        return self._wall_offset + (time.time() - self._t0)

    # ------------------------------------------------------------------ writing
    def log(self, step: int, suite: str, values: dict[str, float], **extra) -> None:
        if not self.write:
            return
        now = time.time()
        for metric, value in values.items():
            if value is None:
                continue
            value = float(value)
            row = {
                "stage": self.stage, "stage_index": self.stage_index, "kind": self.kind,
                "step": int(step), "global_step": int(self.global_offset + step),
                "suite": suite, "metric": metric, "value": value if math.isfinite(value) else None,
                "time": round(now, 3), "wall": round(self.wall, 3),
                "tokens": self.tokens, "samples": self.samples, **extra,
            }
            self._f.write(json.dumps(row) + "\n")
            for m in self._mirrors:
                m(f"{suite}/{metric}", value, self.global_offset + step)
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
        for m in self._mirrors:
            getattr(m, "close", lambda: None)()

    # ------------------------------------------------------------------ reading / resume
    def rows(self) -> list[dict]:
        return read_rows(self.path)

    def last_row(self) -> dict | None:
        rows = read_rows(self.path)
        return rows[-1] if rows else None

    def truncate_after(self, stage_index: int, step: int) -> int:
        """Drop rows logged after a checkpoint (stage_index, step): resume re-logs them identically."""
        if not self.write:
            return 0
        self._f.close()
        rows = read_rows(self.path)
        keep = [r for r in rows
                if r["stage_index"] < stage_index or (r["stage_index"] == stage_index and r["step"] <= step)]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))
        self._f = self.path.open("a", encoding="utf-8")
        if keep:
            self.tokens, self.samples = int(keep[-1].get("tokens", 0)), int(keep[-1].get("samples", 0))
        return len(rows) - len(keep)


@contextlib.contextmanager
def timed(name: str, stats: dict[str, float]):
    """Add the wall time of the block to `stats[name]` (seconds; summed when the block runs several times)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        stats[name] = stats.get(name, 0.0) + time.perf_counter() - t0


def read_rows(path: Path) -> list[dict]:
    """Read metrics rows. A half-written *last* line (a crash mid-write) is skipped with a warning; a bad line
    anywhere else is a one-line DataError naming file:line (the file was edited or corrupted)."""
    import warnings

    from continual_opd.errors import DataError

    path = Path(path)
    if not path.exists():
        return []
    numbered = [(i, ln) for i, ln in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if ln.strip()]
    rows = []
    for pos, (lineno, line) in enumerate(numbered):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if pos == len(numbered) - 1:
                warnings.warn(f"{path}:{lineno}: half-written last line skipped (the run probably crashed "
                              f"while logging); the {len(rows)} earlier rows are used", stacklevel=3)
                break
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg}); fix or delete the line") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
        rows.append(row)
    return rows


def _make_mirror(target: str, run_dir: Path, run_name: str):
    if target == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter  # works offline; needs the `tensorboard` package

        writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

        def tb(key, value, step):
            writer.add_scalar(key, value, step)

        tb.close = writer.close  # type: ignore[attr-defined]
        return tb
    if target == "wandb":
        import wandb  # optional dependency: pip install wandb (WANDB_MODE=offline works without a network)

        wrun = wandb.init(project="continual-opd", name=run_name, dir=str(run_dir))

        def wb(key, value, step):
            wrun.log({key: value}, step=step)

        wb.close = wrun.finish  # type: ignore[attr-defined]
        return wb
    raise ValueError(f"unknown report_to target {target!r}")
