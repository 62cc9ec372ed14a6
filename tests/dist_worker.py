"""A worker for tests/test_distributed.py, started under `accelerate launch --multi_gpu --num_processes 2` (on a
machine without GPUs that is torchrun with 2 CPU processes and gloo; accelerate's `--cpu` alone starts one process
unless it is given an MPI hostfile).

    dist_worker.py grad LOSS OUT         one OPD step on this rank's half of fixed rollouts (DDP); rank 0 saves the
                                         updated parameters and the step's stats to OUT
    dist_worker.py eval MODEL_DIR OUT    the demo suites (sharded); rank 0 saves scores and generations to OUT
    dist_worker.py cli [--die-at N] ARGS `continual-opd ARGS` with the tiny demo model; every demo build is logged to
                                         $DEMO_BUILD_LOG; with --die-at N, rank 1 exits hard in OPD step N
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

LENGTHS = (1, 2, 3, 4, 5, 5)  # response lengths of the fixed rollouts (ranks get different token counts)


def grad_setup(loss: str):
    """(student, teacher, rollouts, stage, optimizer): identical on every process (seeded)."""
    from conftest import build_tiny_lm
    from test_opd_step import _fixed_rollouts

    from continual_opd.config import OPDStage

    student, tok = build_tiny_lm(seed=0)
    teacher, _ = build_tiny_lm(seed=1)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(10.0)
    teacher.eval().requires_grad_(False)
    # no clipping (a gradient of the wrong scale would be clipped back to the right norm) and several micro-batches
    stage = OPDStage(name="opd", kind="opd", prompts=["p.jsonl"], loss=loss, max_grad_norm=1e9, micro_batch_size=2,
                     logits_budget_mb=0.12)  # 3 positions a chunk
    optimizer = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=1.0)
    return student, teacher, _fixed_rollouts(tok, LENGTHS), stage, optimizer


def eval_suites():
    from continual_opd.evals import load_suite

    return [load_suite("ifeval").model_copy(update={"limit": 20, "batch_size": 3}),
            load_suite("domain_qa").model_copy(update={"limit": 14, "batch_size": 4})]


def run_eval(model_dir: str, out_dir: Path | None):
    from continual_opd import models
    from continual_opd.config import ModelConfig
    from continual_opd.evals import run_suite

    cfg = ModelConfig(name=model_dir)
    tok = models.load_tokenizer(model_dir, cfg)
    model = models.load_model(models.ModelRef(model_dir), cfg)
    scores = {}
    for suite in eval_suites():
        values = run_suite(suite, model, tok, out_dir, seed=0, progress=False)
        scores.update({f"{suite.name}/{k}": v for k, v in values.items() if k != "eval_time_s"})
    return scores


def main(argv: list[str]) -> int:
    from continual_opd import distributed

    mode = argv[0]
    if mode == "grad":
        from accelerate import Accelerator

        from continual_opd.stages import chunked
        from continual_opd.stages.opd import opd_step

        loss, out = argv[1], Path(argv[2])
        student, teacher, rollouts, stage, optimizer = grad_setup(loss)
        acc = Accelerator(cpu=True)
        wrapped, optimizer = acc.prepare(student, optimizer)
        half = len(rollouts) // acc.num_processes
        mine = rollouts[acc.process_index * half:(acc.process_index + 1) * half]
        row = opd_step(wrapped, teacher, mine, stage, optimizer, accelerator=acc)
        row["num_processes"] = acc.num_processes
        row["chunked"] = chunked.can_chunk(wrapped)
        if acc.is_main_process:
            params = {n: p.detach().clone() for n, p in acc.unwrap_model(wrapped).named_parameters()}
            torch.save(params, out / "params.pt")
            (out / "row.json").write_text(json.dumps(row))
        return 0
    if mode == "eval":
        out = Path(argv[2])
        scores = run_eval(argv[1], out if distributed.is_main() else None)
        if distributed.is_main():
            (out / "scores.json").write_text(json.dumps({**scores, "num_processes": distributed.world_size()}))
        return 0
    if mode == "cli":
        args = argv[1:]
        with open(os.environ["DEMO_BUILD_LOG"] + ".ranks", "a") as f:  # which processes ran
            f.write(f"rank {distributed.rank()} of {distributed.world_size()}\n")
        die_at = None
        if args[0] == "--die-at":
            die_at, args = int(args[1]), args[2:]
        # record which rank writes run-dir files and metric rows (before the pipeline imports the writers)
        import continual_opd.io as cio
        import continual_opd.tracking as tracking

        def record(what: str) -> None:
            with open(os.environ["DEMO_BUILD_LOG"] + ".writes", "a") as f:
                f.write(f"rank {distributed.rank()} {what}\n")

        real_atomic, real_log = cio.atomic_write_text, tracking.MetricsSink.log

        def spy_atomic(path, text):
            record(Path(path).name)
            return real_atomic(path, text)

        def spy_log(self, step, suite, values, **kw):
            if self.write:
                record(f"metrics {suite}")
            return real_log(self, step, suite, values, **kw)

        cio.atomic_write_text, tracking.MetricsSink.log = spy_atomic, spy_log
        import continual_opd.demo.build as build
        import continual_opd.stages.opd as opd

        real_ensure, real_build = build.ensure_demo_model, build._build
        # the tiny demo model (seconds to build) stands in for the real one
        build.ensure_demo_model = lambda cache_dir=None, config=None, **kw: real_ensure(
            cache_dir, config or build.DemoModelConfig.tiny(), **kw)

        def logged_build(*a, **kw):
            with open(os.environ["DEMO_BUILD_LOG"], "a") as f:
                f.write(f"rank {distributed.rank()}\n")
            return real_build(*a, **kw)

        build._build = logged_build
        if die_at is not None:
            real_step, calls = opd.opd_step, {"n": 0}

            def dying_step(*a, **kw):
                calls["n"] += 1
                if calls["n"] == die_at and distributed.rank() == 1:
                    os._exit(3)  # a hard crash: no cleanup, no message from this rank
                return real_step(*a, **kw)

            opd.opd_step = dying_step
        from continual_opd.cli import main as cli_main

        return cli_main(args)
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
