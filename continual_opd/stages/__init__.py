"""Training stages. Each runner is `run(stage_cfg, ctx) -> (final_eval_results, steps_done)` and trains
`ctx.model` in place (it may replace it, e.g. when TRL wraps it)."""


def _sft(stage, ctx):
    from continual_opd.stages.sft import run_sft

    return run_sft(stage, ctx)


def _opd(stage, ctx):
    from continual_opd.stages.opd import run_opd

    return run_opd(stage, ctx)


STAGE_RUNNERS = {"sft": _sft, "opd": _opd}
