"""Run by test_trainers under ``torchrun --nproc_per_node 2`` (gloo): surgery under accelerate's FSDP2 with
AdamW's moments kept sharded, and a sharded distillation teacher.

Each rank distils the same tiny model from a copy of itself (teacher sharded like the student), takes the
full optimizer state for reference (``gather_optimizer_state``), then prunes with a fixed plan while
``LiveBytes`` counts every tensor made from ``before_surgery`` to the end of ``after_surgery``. It writes
that peak, the model's sizes, the first loss and whether the re-sharded moments equal the reference sliced
the DDP way (``reshape_state`` on full tensors) to OUT_DIR/rank{r}.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from adaptprune.arch import get_adapter  # noqa: E402
from adaptprune.pruning.surgery import apply_plan  # noqa: E402
from tests.conftest import tiny_llama  # noqa: E402
from tests.fsdp_controller_script import fsdp2_accelerator  # noqa: E402
from tests.memory_helpers import LiveBytes  # noqa: E402
from tests.trainer_utils import constant_lr, half_plan, toy_batches, train_cfg  # noqa: E402
from trainers import DistillTrainer  # noqa: E402
from trainers.distill import kd_loss  # noqa: E402
from trainers.optim_state_shape import reshape_state  # noqa: E402
from trainers.sharding import gather_optimizer_state  # noqa: E402


def _equal_states(got: dict, want: dict) -> bool:
    return got.keys() == want.keys() and all(
        got[n].keys() == want[n].keys() and all(torch.equal(got[n][k], want[n][k]) for k in want[n]) for n in want
    )


def main(out_dir: Path) -> None:
    accelerator = fsdp2_accelerator()
    rank = accelerator.process_index
    model, teacher = tiny_llama(seed=0), tiny_llama(seed=1)
    first = next(toy_batches(seed=100 + rank, batch=2))
    with torch.no_grad():  # this rank's share of the first loss, from the unsharded models
        first_loss = kd_loss(model(input_ids=first).logits, teacher(input_ids=first).logits, 1.0).item()
    params_before = sum(p.numel() for p in model.parameters())
    trainer = DistillTrainer(model, accelerator, train_cfg(loss_chunk_tokens=8), teacher=teacher)
    teacher_local = sum(p.to_local().numel() for p in trainer.teacher.parameters() if isinstance(p, DTensor))
    batches = toy_batches(seed=100 + rank, batch=2)
    losses: list[float] = []
    result = trainer.run_phase(batches, 2, constant_lr(1e-2), 0, lambda m: losses.append(m["loss"]))
    full_before = gather_optimizer_state(trainer.unwrapped_model(), trainer.optimizer)
    held = trainer.optimizer.optimizer.state.values()
    moment_shards = sum(v.to_local().nbytes for state in held for v in state.values() if isinstance(v, DTensor))

    mode = LiveBytes()
    with mode:
        plain = trainer.before_surgery()
        records = apply_plan(plain, half_plan(plain))  # the same plan on every rank
        trainer.after_surgery(plain, records)
    want, _ = reshape_state(full_before, records, get_adapter(plain).layers_path)
    moments_equal = _equal_states(gather_optimizer_state(trainer.unwrapped_model(), trainer.optimizer), want)
    trainer.run_phase(batches, 2, constant_lr(1e-2), result.global_step, lambda m: losses.append(m["loss"]))
    report = {
        "params_before": params_before,
        "params_after": sum(p.numel() for p in trainer.unwrapped_model().parameters()),
        "largest_layer": max(sum(p.numel() for p in layer.parameters()) for layer in tiny_llama().model.layers),
        "moment_shard_bytes": moment_shards,
        "first_loss_unsharded": first_loss,
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "teacher_local": teacher_local,
        "surgery_peak_bytes": mode.peak,
        "moments_equal": moments_equal,
        "sliced": len(trainer.last_carry.sliced),
        "copied": len(trainer.last_carry.copied),
        "losses": losses,
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
