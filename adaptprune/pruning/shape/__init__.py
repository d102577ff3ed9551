"""Width, depth and target shapes: everything of a pruning step beyond heads, groups and neurons.

``reshape`` (the surgery: hidden channels and whole layers), ``search`` / ``trial`` (the per-step
width/depth search and its hooked candidates), ``dry_run`` (a step sized from a config alone, for
``plan``), ``target`` / ``reach`` (walking to a given final shape) and ``choice`` (searching the final
shape before stage 1).
"""
