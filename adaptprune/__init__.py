"""adaptprune: adaptive, incremental structured pruning of causal LMs into smaller dense models."""

from .arch import register_auto_classes

__version__ = "0.1.0"

register_auto_classes()
