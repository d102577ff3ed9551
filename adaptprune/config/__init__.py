"""The run config: one typed dataclass per YAML section, validated, and the registries its choices name.

``sections`` holds the dataclasses (``RunConfig`` and its sections; the ``train`` section and each trainer's
arguments in ``training``) and ``load_config``; ``schema`` the
field machinery (``option``, YAML <-> dataclass, unknown-key errors); ``registry`` the name -> class
registries the plug-ins fill. Callers import all of it from here.
"""

from .schema import ConfigError, dump_yaml, from_dict, load_into, option, read_yaml, to_dict
from .sections import (
    DataConfig,
    EvalConfig,
    ModelConfig,
    OutputConfig,
    PruneConfig,
    RunConfig,
    ScheduleConfig,
    load_config,
)
from .training import DistillArgs, LoraArgs, OptimArgs, TrainConfig

__all__ = [
    "ConfigError",
    "DataConfig",
    "DistillArgs",
    "EvalConfig",
    "LoraArgs",
    "ModelConfig",
    "OptimArgs",
    "OutputConfig",
    "PruneConfig",
    "RunConfig",
    "ScheduleConfig",
    "TrainConfig",
    "dump_yaml",
    "from_dict",
    "load_config",
    "load_into",
    "option",
    "read_yaml",
    "to_dict",
]
