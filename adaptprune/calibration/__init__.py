"""Calibration, the pipeline's first stage: what the model's activations and gradients look like.

``text`` (which calibration windows each pruning step reads), ``activations`` (channel moments, Σ of
the o/down inputs, block influence, the residual stream: one forward pass over calibration text),
``gradients`` (Taylor first-order terms) and ``layerwise`` (the stream entering each decoder layer,
cached, for a pass that runs one layer at a time). Every later stage — importance, allocation,
pruning — reads these; nothing here imports those stages.
"""
