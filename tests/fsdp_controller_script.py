"""Run by test_controller under ``torchrun --nproc_per_node 2``: the smoke controller under accelerate's
FSDP2 on two CPU processes (gloo); the test compares its final model with the DDP run's.

accelerate turns FSDP on only when GPUs are present, so this script switches the state of a CPU
Accelerator to FSDP2 itself: from there on, preparing the model is accelerate's real FSDP2 path
(``fully_shard`` per decoder layer, DTensor parameters, sharded AdamW state), which
``torch.distributed`` runs on CPU with gloo. Its pruning steps run on the host copy with the layers staged
(``pruning.staging``; here the "accelerator" is the CPU too): the script checks that they were.
"""

from __future__ import annotations

import sys

from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from adaptprune.config import load_config
from adaptprune.pruning.staging import LayerStaging
from adaptprune.run.controller import Controller


def fsdp2_accelerator() -> Accelerator:
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
        state_dict_type="FULL_STATE_DICT",
        reshard_after_forward=True,
    )
    accelerator = Accelerator(cpu=True)
    PartialState().distributed_type = DistributedType.FSDP  # AcceleratorState re-reads it from here
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    assert accelerator.is_fsdp2
    return accelerator


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
    staged: list[int] = []
    enter = LayerStaging.enter
    LayerStaging.enter = lambda self, layer: (staged.append(1), enter(self, layer))[1]
    controller = Controller(config, accelerator=fsdp2_accelerator())
    controller.run()
    assert controller.acc.num_processes == 2 and controller.acc.is_fsdp2
    assert controller.pruner.on_host and staged, "the pruning steps did not run their layers staged"


if __name__ == "__main__":
    main(*sys.argv[1:])
