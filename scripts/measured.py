"""What the committed benchmark rows in docs/ were measured with, where a default has moved since.

Benchmarks that resume a grid pin these, so a rerun adds rows of the same experiment (a schedule or
override naming another value wins, being applied later)."""

# configs/default.yaml's allocation until issue #22 made it accumulating
ADAPTIVE = "prune.allocation=adaptive"

# how compensation read each layer's inputs before issue #32 added the sequential pass
PARALLEL = "prune.calibration=parallel"

# The shapes the default prune.target_shape=search grid lands on at -60% of SmolLM2-135M besides 30x576x2x480
# (LAYERSxHIDDENxKV_GROUPSxNEURONS): each trained as a walk, to check the search's ranking against training
PROBED_60 = ("30x512x3x480", "30x512x2x640", "26x576x2x608", "26x512x2x800")
