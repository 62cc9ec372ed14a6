"""Evals during a run: the recipe's suites on the live model (`Evaluator`), when a training stage runs them
(`EvalCadence`), and the KL monitor that rides along in training stages.

`run_suite` (evals/__init__.py) scores one suite on one model; this module decides which suites, when, where their
answers go (`<stage dir>/evals/step-NNNNNN/`) and logs every value to the metrics sink.
"""

from __future__ import annotations

import time
from pathlib import Path

from continual_opd import distributed
from continual_opd.config import Recipe
from continual_opd.tracking import KL_TO_STAGE_START, MetricsSink


class Evaluator:
    """Runs a stage's suites (and, in training stages, the KL monitor) on a model and logs them to the sink."""

    def __init__(self, recipe: Recipe, tokenizer, sink: MetricsSink, progress: bool = True):
        from continual_opd.evals import load_suite

        self.recipe, self.tokenizer, self.sink, self.progress = recipe, tokenizer, sink, progress
        self.kl_monitor = None
        self._vllm = None  # (model, VLLMEngine): one vLLM engine per model object, built on first use
        base = Path(recipe.source).parent if recipe.source else None
        self.suites = {ref: load_suite(ref, base)
                       for stage in recipe.stages for ref in (stage.suites or recipe.evals.suites)}

    def start_training_stage(self, model) -> None:
        """The KL monitor's reference is the model as the training stage starts."""
        self.kl_monitor = make_kl_monitor(self.recipe, self.tokenizer, model)

    def end_training_stage(self) -> None:
        self.kl_monitor = None

    def engine(self, model):
        """The recipe's `evals.engine` by name, or (vllm) an engine that holds the model's weights across eval
        points and is told they changed before each one."""
        name = self.recipe.evals.engine
        if name != "vllm":
            return name
        from continual_opd.engines import make_engine

        if self._vllm is None or self._vllm[0] is not model:
            self._vllm = (model, make_engine("vllm", model, self.tokenizer))
        else:
            self._vllm[1].weights_changed()
        return self._vllm[1]

    def __call__(self, model, stage, stage_dir: Path, step: int) -> dict[str, float]:
        from continual_opd.evals import run_suite

        results: dict[str, float] = {}
        t0 = time.time()
        # every rank generates its share of the answers (generation.generate gathers them); rank 0 writes them
        out_dir = stage_dir / "evals" / f"step-{step:06d}" if distributed.is_main() else None
        engine = self.engine(model)
        for ref in stage.suites or self.recipe.evals.suites:
            suite = self.suites[ref]
            values = run_suite(suite, model, self.tokenizer, out_dir, seed=self.recipe.seed,
                               chat_template_kwargs=self.recipe.model.chat_template_kwargs, progress=self.progress,
                               engine=engine)
            self.sink.log(step, suite.name, values)
            results.update({f"{suite.name}/{k}": v for k, v in values.items()})
        if self.kl_monitor is not None:
            kl = self.kl_monitor.kl(model)
            self.sink.log(step, "kl_monitor", {KL_TO_STAGE_START: kl})
            results[f"kl_monitor/{KL_TO_STAGE_START}"] = kl
        self.sink.log(step, "time", {"eval_s": time.time() - t0})
        return results


class EvalCadence:
    """When a training stage evaluates, and the time split it logs; shared by SFT and OPD.

    Evals run every `eval_every` steps and at the last step; each eval point also logs `train_s` (wall time in
    the stage so far, minus evals) and `eval_total_s`. A stage resumed from its last step has nothing left to
    train: `final` then evaluates once, so every stage ends with results.
    """

    def __init__(self, stage, evaluate, sink: MetricsSink):
        self.stage, self._evaluate, self.sink = stage, evaluate, sink
        self.eval_s = 0.0
        self.results: dict[str, float] = {}
        self._t_start = time.time()

    def due(self, step: int) -> bool:
        return step == self.stage.steps or bool(self.stage.eval_every and step % self.stage.eval_every == 0)

    def evaluate(self, model, step: int) -> dict[str, float]:
        t0 = time.time()
        self.results = self._evaluate(model, step)
        self.eval_s += time.time() - t0
        self.sink.log(step, "time", {"train_s": time.time() - self._t_start - self.eval_s,
                                     "eval_total_s": self.eval_s})
        return self.results

    def final(self, model) -> dict[str, float]:
        """The stage's last eval point (run now if this process has none: a stage resumed at its very end)."""
        if not self.results:
            self.results = self._evaluate(model, self.stage.steps)
        return self.results


def make_kl_monitor(recipe: Recipe, tokenizer, model):
    if not recipe.evals.kl_prompts:
        return None
    from continual_opd.evals.kl_monitor import KLMonitor

    return KLMonitor.from_file(recipe.evals.kl_prompts, tokenizer, model, n=recipe.evals.kl_num_prompts,
                               max_new_tokens=recipe.evals.kl_max_new_tokens,
                               chat_template_kwargs=recipe.model.chat_template_kwargs)
