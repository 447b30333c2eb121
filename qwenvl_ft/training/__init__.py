"""Training: `train(cfg)` runs the method trainer.kind names (qwenvl_ft/methods/) through the one run skeleton,
training/run.py."""

from typing import Dict


def train(composed) -> Dict:
    from qwenvl_ft.training.run import train as run

    return run(composed)
