"""Published pruning methods re-implemented as baselines (SliceGPT, ...), compared at equal parameter count."""
