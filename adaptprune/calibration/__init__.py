"""Calibration, the pipeline's first stage: what the model's activations and gradients look like.

``activations`` (channel moments, Σ of the o/down inputs, block influence, the residual stream, one
forward pass over calibration text) and ``gradients`` (Taylor first-order terms). Every later stage —
importance, allocation, pruning — reads these statistics; nothing here imports those stages.
"""
