"""What the committed benchmark rows in docs/ were measured with, where a default has moved since.

Benchmarks that resume a grid pin these, so a rerun adds rows of the same experiment (a schedule or
override naming another value wins, being applied later)."""

# configs/default.yaml's allocation until issue #22 made it accumulating
ADAPTIVE = "prune.allocation=adaptive"
