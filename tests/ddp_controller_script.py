"""Run by test_controller under ``torchrun --nproc_per_node 2``: the smoke controller on two
CPU processes (gloo), with any further arguments as config overrides; each rank writes its final
weights so the test can compare them."""

from __future__ import annotations

import sys
from pathlib import Path

from safetensors.torch import save_file

from adaptprune.config import load_config
from adaptprune.run.controller import Controller


def main(config_path: str, out: str, corpus: str, *overrides: str) -> None:
    config = load_config(
        config_path,
        [
            f"output.dir={out}",
            f"data.corpus={corpus}",
            "eval.every_stage=false",
            "output.tensorboard=false",
            *overrides,
        ],
    )
    controller = Controller(config)
    controller.run()
    rank = controller.acc.process_index
    state = {k: v.contiguous() for k, v in controller.trainer.export_model().state_dict().items()}
    state.pop("lm_head.weight", None)  # tied to the embedding
    save_file(state, str(Path(out) / f"rank{rank}.safetensors"))
    assert controller.acc.num_processes == 2, controller.acc.num_processes


if __name__ == "__main__":
    main(*sys.argv[1:])
