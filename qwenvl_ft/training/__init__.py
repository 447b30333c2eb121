"""Trainers: `train(cfg)` runs the trainer kind the config names (trainer.kind: sft or dpo)."""

from typing import Dict


def train(cfg) -> Dict:
    if cfg.trainer.kind == "dpo":
        from qwenvl_ft.training.dpo import train as train_kind
    else:
        from qwenvl_ft.training.sft import train as train_kind
    return train_kind(cfg)
