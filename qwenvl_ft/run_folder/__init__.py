"""The run folder as one unit: its files (files.py: atomic writes, summary.json, space and permission checks) and
its lock (lock.py: one writer per folder). Below the training layer: training, evaluation and every command write
through it."""
