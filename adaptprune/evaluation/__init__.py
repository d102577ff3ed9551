"""Evaluation: held-out perplexity, zero-shot lm-eval tasks run offline, and generation speed.

Submodules are imported on demand (``adaptprune.evaluation.tasks`` pulls in lm-eval, which is
slow to import).
"""
