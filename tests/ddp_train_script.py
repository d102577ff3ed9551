"""Run by test_trainers under ``ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2`` (gloo).

Each rank trains the same tiny model on different data (2 micro-batches a step, so no_sync
is exercised), prunes it with a fixed plan, re-prepares and trains on; then it writes its
weights and logged losses to OUT_DIR/rank{r}.* for the test to compare.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accelerate import Accelerator  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from adaptprune.config import TrainConfig  # noqa: E402
from adaptprune.pruning.surgery import apply_plan  # noqa: E402
from tests.conftest import tiny_llama  # noqa: E402
from tests.trainer_utils import constant_lr, half_plan, toy_batches  # noqa: E402
from trainers import FullTrainer  # noqa: E402


def _wrapper_depth(fn) -> int:
    depth = 0
    while hasattr(fn, "__wrapped__"):
        fn, depth = fn.__wrapped__, depth + 1
    return depth


def main(out_dir: Path) -> None:
    accelerator = Accelerator(mixed_precision="bf16")  # CPU autocast: the GPU path's wrappers, on gloo
    rank = accelerator.process_index
    model = tiny_llama(seed=0)
    trainer = FullTrainer(model, accelerator, TrainConfig(grad_accum_steps=2))
    prepared_forward = _wrapper_depth(model.forward)
    batches = toy_batches(seed=100 + rank, batch=2)  # ranks see different data
    losses = []
    on_step = lambda m: losses.append(m["loss"])  # noqa: E731
    result = trainer.run_phase(batches, 2, constant_lr(1e-2), 0, on_step)

    plain = trainer.before_surgery()
    assert "forward" not in plain.__dict__, "accelerate's forward wrapper should be gone"
    records = apply_plan(plain, half_plan(plain))  # the same plan on every rank
    trainer.after_surgery(plain, records)
    trainer.run_phase(batches, 2, constant_lr(1e-2), result.global_step, on_step)

    assert trainer.unwrapped_model() is model
    assert _wrapper_depth(model.forward) == prepared_forward, "autocast wrapper lost or doubled"
    state = {n: p.detach().contiguous() for n, p in model.named_parameters()}
    save_file(state, str(out_dir / f"rank{rank}.safetensors"))
    report = {
        "distributed_type": str(accelerator.distributed_type).split(".")[-1],
        "num_processes": accelerator.num_processes,
        "losses": losses,
        "carried": len(trainer.last_carry.sliced) + len(trainer.last_carry.copied),
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
