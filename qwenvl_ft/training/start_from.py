"""model.start_from: train the run a config starts from, when it has no final/ yet (the GRPO demo starts from a
short SFT run of the demo recipe; any method can start from any full-model run)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Dict, Optional

from omegaconf import DictConfig

from qwenvl_ft.config.schema import TrainConfig
from qwenvl_ft.errors import ConfigError

log = logging.getLogger("qwenvl_ft")


def train_start_model(cfg: TrainConfig, train: Callable[[DictConfig], Dict]) -> Optional[Dict]:
    """Trains `model.start_from` with `train` (the run skeleton's own) unless its final/ exists; ConfigError when
    what it leaves is not a full model (an adapter cannot be a base to load). Returns that run's metrics when a
    signal stopped it (the same command resumes it), else None."""
    start = cfg.model.start_from
    if start is None:
        return None
    output_dir = Path(start.output_dir).expanduser()
    final = output_dir / "final"
    if not final.is_dir():
        from qwenvl_ft.config.compose import compose_run

        overrides = [f"recipe={start.recipe}", *start.overrides]
        log.info("model.start_from: training %s first (%s) in %s", start.recipe, " ".join(overrides[1:]) or
                 "no overrides", output_dir)
        metrics = train(compose_run(overrides, str(output_dir)))
        if metrics.get("interrupted"):
            return metrics
    if not (final / "config.json").is_file():
        raise ConfigError(f"model.start_from: {final} holds no full model (config.json); the run it starts from must "
                          f"train the whole model (adapter=full) or be merged first (qwenvl-ft merge)")
    log.info("model.start_from: starting from %s", final)
    return None
