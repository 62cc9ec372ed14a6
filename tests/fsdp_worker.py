"""A worker for tests/test_fsdp2.py, started by `accelerate launch --config_file recipes/accelerate/fsdp2.yaml
--num_processes 2` on CPU (torchrun, gloo).

accelerate 1.16 turns its FSDP plugin on only for accelerator devices: `AcceleratorState` switches the distributed
type to FSDP when it is MULTI_GPU (or another MULTI_<accelerator>), so on CPU (MULTI_CPU) the plugin is dropped and
`prepare` wraps the model in DDP. `force_fsdp_on_cpu` lifts that one check; everything after it is accelerate's own
FSDP2 path (`fully_shard`, no_sync, backward, clip_grad_norm_) on a CPU device mesh, as on GPUs.

    fsdp_worker.py step OUT           the OPD step of tests/dist_worker.py's grad mode for each estimator (SGD);
                                      then for full weights and for a LoRA adapter, the checkpoint round: one AdamW
                                      step, save (gathered) to OUT/fsdp2-KIND/checkpoint-1; and from
                                      OUT/one-KIND/checkpoint-1 (written by one process): load, one step, save
    fsdp_worker.py cli [--die-in-sft N] ARGS
                                      dist_worker.py's cli mode (the pipeline; --die-at N: rank 1 exits in OPD step
                                      N) under FSDP2; --die-in-sft N: rank 1 exits at the end of SFT step N; whether
                                      each stage's model is sharded goes to $DEMO_BUILD_LOG.sharded
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

LOSSES = ("sampled", "full")


def force_fsdp_on_cpu() -> None:
    """Let accelerate's FSDP plugin (from the launch config) take effect on a CPU process group."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    real_init = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        real_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init


def record_sharding(die_in_sft: int | None) -> None:
    """Log to $DEMO_BUILD_LOG.sharded, once per stage and rank, whether the model trained is sharded (the run really
    is FSDP2); with `die_in_sft` N, rank 1 exits hard at the end of SFT step N, before that step's checkpoint."""
    import os

    import continual_opd.stages.opd as opd
    import continual_opd.stages.sft as sft
    from continual_opd import distributed

    seen = set()

    def record(stage: str, model) -> None:
        if stage not in seen:
            seen.add(stage)
            with open(os.environ["DEMO_BUILD_LOG"] + ".sharded", "a") as f:
                f.write(f"{stage} rank {distributed.rank()} sharded={distributed.is_sharded(model)}\n")

    real_step, real_end = opd.opd_step, sft.StageCallback.on_step_end

    def step(student, *args, **kwargs):
        record("opd", student)
        return real_step(student, *args, **kwargs)

    def on_step_end(self, args, state, control, model=None, **kw):
        record("sft", model)
        if state.global_step == die_in_sft and distributed.rank() == 1:
            os._exit(3)
        return real_end(self, args, state, control, model=model, **kw)

    opd.opd_step, sft.StageCallback.on_step_end = step, on_step_end


def ckpt_setup(kind: str):
    """(student, teacher, rollouts, stage, optimizer, scheduler) for the checkpoint round: AdamW with weight decay
    and a warmup schedule, so optimizer.pt and scheduler.pt hold real state; `kind` "full" trains every weight,
    "lora" a LoRA adapter (saved as adapter_model.safetensors). Identical on every process."""
    from dist_worker import grad_setup

    from continual_opd import models
    from continual_opd.config import LoraConfig
    from continual_opd.stages.opd import lr_factor

    student, teacher, rollouts, stage, _ = grad_setup("full")
    student = models.prepare_for_stage(student, kind, LoraConfig(r=4))
    stage = stage.model_copy(update={"max_grad_norm": 1.0, "warmup_steps": 3, "steps": 10})
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(i, stage))
    return student, teacher, rollouts, stage, optimizer, scheduler


def main(argv: list[str]) -> int:
    force_fsdp_on_cpu()
    mode = argv[0]
    if mode == "step":
        from accelerate import Accelerator

        from continual_opd import checkpoints, distributed
        from continual_opd.stages.opd import opd_step
        from dist_worker import grad_setup

        out = Path(argv[1])

        def prepared(student, optimizer):
            # a new Accelerator per model: with two models prepared, accelerate's FSDP clip_grad_norm_ compares
            # parameter lists with `==` and fails on the second ("Boolean value of Tensor ... is ambiguous")
            acc = Accelerator(cpu=True)
            wrapped, optimizer = acc.prepare(student, optimizer)
            assert distributed.is_sharded(wrapped), f"not sharded: {type(wrapped).__name__}"
            return acc, wrapped, optimizer

        def half(rollouts, acc):
            n = len(rollouts) // acc.num_processes
            return rollouts[acc.process_index * n:(acc.process_index + 1) * n]

        for loss in LOSSES:
            student, teacher, rollouts, stage, optimizer = grad_setup(loss)
            acc, wrapped, optimizer = prepared(student, optimizer)
            row = opd_step(wrapped, teacher, half(rollouts, acc), stage, optimizer, accelerator=acc)
            weights = acc.get_state_dict(wrapped)  # gathered (collective); full tensors on rank 0
            if acc.is_main_process:
                torch.save(weights, out / f"params-{loss}.pt")
                (out / f"row-{loss}.json").write_text(json.dumps({**row, "num_processes": acc.num_processes}))

        write = distributed.is_main()
        for kind in ("full", "lora"):
            student, teacher, rollouts, stage, optimizer, scheduler = ckpt_setup(kind)
            acc, wrapped, optimizer = prepared(student, optimizer)
            opd_step(wrapped, teacher, half(rollouts, acc), stage, optimizer, scheduler=scheduler, accelerator=acc)
            checkpoints.save_training_state(out / f"fsdp2-{kind}/checkpoint-1", wrapped, optimizer, scheduler, 1,
                                            {"step": 1}, write=write)

            student, teacher, rollouts, stage, optimizer, scheduler = ckpt_setup(kind)
            acc, wrapped, optimizer = prepared(student, optimizer)
            step = checkpoints.load_training_state(out / f"one-{kind}/checkpoint-1", wrapped, optimizer, scheduler)
            opd_step(wrapped, teacher, half(rollouts, acc), stage, optimizer, scheduler=scheduler, accelerator=acc)
            checkpoints.save_training_state(out / f"fsdp2-{kind}/checkpoint-{step + 1}", wrapped, optimizer, scheduler,
                                            step + 1, {"step": step + 1}, write=write)
        return 0
    if mode == "cli":
        from dist_worker import main as dist_main

        args = argv[1:]
        die_in_sft = None
        if args[0] == "--die-in-sft":
            die_in_sft, args = int(args[1]), args[2:]
        record_sharding(die_in_sft)
        return dist_main(["cli", *args])
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
