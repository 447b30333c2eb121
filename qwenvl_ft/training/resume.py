"""Surviving interruptions: which checkpoint to resume from, and stopping cleanly on SIGTERM or Ctrl-C.

transformers 5.23 writes `checkpoint-N/` in place (weights, optimizer, scheduler, RNG state, then
trainer_state.json) and its own `get_last_checkpoint` takes the highest N whatever the folder holds, so a run killed
mid-save leaves a folder that looks like the newest checkpoint and cannot be loaded. `CheckpointCompleteMarker`
writes a marker file from `on_save`, which the Trainer calls only after the whole checkpoint is on disk; resuming
considers only folders with the marker. Half-written folders newer than the one resumed from are deleted: the
Trainer would overwrite them in place, and its checkpoint rotation (by mtime) could keep a broken folder in
preference to a good one.

Resuming itself is the Trainer's `resume_from_checkpoint`: model (or adapter), optimizer, scheduler, scaler, RNG
states, and the position in the data (it skips the batches already seen in the current epoch); full-model weights
go through `ReloadConvertedWeights`, as the Trainer's own loading misses every key of a Qwen2-VL checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from transformers import TrainerCallback

from qwenvl_ft.config.run_files import checkpoint_problem, read_json, read_yaml
from qwenvl_ft.config.trainer import TrainerConfig
from qwenvl_ft.errors import ConfigError
from qwenvl_ft.run_folder.files import write_atomically

log = logging.getLogger("qwenvl_ft")

COMPLETE_MARKER = "checkpoint_complete.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(output_dir: Path) -> List[Tuple[int, Path]]:
    """(step, folder) of every checkpoint-N folder, oldest first."""
    if not output_dir.is_dir():
        return []
    return sorted((_step(path), path) for path in output_dir.iterdir() if _step(path) >= 0 and path.is_dir())


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / COMPLETE_MARKER).is_file() and (checkpoint / "trainer_state.json").is_file()


def latest_complete(output_dir: Path) -> Optional[Path]:
    complete = [path for _, path in checkpoints(output_dir) if is_complete(path)]
    return complete[-1] if complete else None


def resolve_resume(trainer_cfg: TrainerConfig, output_dir: Path) -> Optional[str]:
    """The checkpoint to hand to `Trainer.train(resume_from_checkpoint=...)`, or None for a fresh start."""
    setting = trainer_cfg.resume_from
    if setting is None:
        return None
    if setting == "auto":
        chosen = latest_loadable(output_dir)
    else:
        chosen = Path(setting).expanduser()
        if not (chosen / "trainer_state.json").is_file():
            raise ConfigError(f"trainer.resume_from={setting}: not a checkpoint folder (no trainer_state.json)")
        if not (chosen / COMPLETE_MARKER).is_file():
            # A checkpoint written by plain transformers has no marker; it is the user's call.
            log.warning("trainer.resume_from=%s has no %s: it may be incomplete", setting, COMPLETE_MARKER)
        problem = checkpoint_problem(chosen)
        if problem:
            raise ConfigError(f"trainer.resume_from={setting} cannot be loaded: {problem}. Name another checkpoint, "
                              f"or trainer.resume_from=auto (the newest loadable one)")
    chosen_step = _step(chosen) if chosen is not None else -1
    for step, path in checkpoints(output_dir):
        if step > chosen_step and not is_complete(path):
            log.warning("removing %s: the run was interrupted while writing it", path)
            shutil.rmtree(path, ignore_errors=True)
    if chosen is None:
        return None
    state = json.loads((chosen / "trainer_state.json").read_text())
    log.info("resuming from %s (step %s)", chosen, state.get("global_step"))
    return str(chosen)


def latest_loadable(output_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint that can be loaded (config/run_files.py checks its files). A newer one
    marked complete but damaged (truncated weights, a corrupt trainer_state.json) is set aside as
    damaged-checkpoint-N (kept for a look; the Trainer would otherwise write the same step into it, under the old
    marker), with a warning naming what is wrong; the run goes on from the one before. Complete checkpoints none
    of which loads are a ConfigError: never a silent fresh start."""
    damaged = []
    for _, path in reversed(checkpoints(output_dir)):
        if not is_complete(path):
            continue
        problem = checkpoint_problem(path)
        if problem is None:
            _set_aside(damaged, f"resuming from {path.name} instead")
            return path
        damaged.append((path, problem))
    if damaged:
        listed = "; ".join(f"{path.name}: {problem}" for path, problem in damaged)
        raise ConfigError(f"no checkpoint in {output_dir} can be loaded ({listed}). Restore one, or start over "
                          f"with trainer.resume_from=null")
    return None


def _set_aside(damaged: List[Tuple[Path, str]], then: str) -> None:
    for path, problem in damaged:
        target = path.with_name(f"damaged-{path.name}")
        suffix = 1
        while target.exists():
            target, suffix = path.with_name(f"damaged-{path.name}.{suffix}"), suffix + 1
        path.rename(target)
        log.warning("%s is marked complete but cannot be loaded (%s); moved to %s, %s", path.name, problem,
                    target.name, then)


def prepare_resume(cfg, composed) -> Optional[str]:
    """`resolve_resume` for a run about to start, warning when the config differs from the one the checkpoints
    were trained with. Call it before the run's config.yaml is rewritten."""
    output_dir = Path(cfg.output_dir)
    checkpoint = resolve_resume(cfg.trainer, output_dir)
    if checkpoint is not None:
        changed = config_changes(output_dir / "config.yaml", composed)
        if changed:
            log.warning("resuming with a config that differs from the run's config.yaml in: %s", ", ".join(changed))
    return checkpoint


def finished_metrics(cfg, composed, checkpoint: Optional[str]) -> Optional[dict]:
    """The metrics of a run that already finished in output_dir with this same config, or None.

    Resuming from a checkpoint at the last step is not a no-op in transformers (the epoch loop runs one more step
    before it checks max_steps), so running a finished command again must not reach the Trainer.
    """
    output_dir = Path(cfg.output_dir)
    if checkpoint is None or not (output_dir / "final").is_dir() or not (output_dir / "metrics.json").is_file():
        return None
    state = read_json(Path(checkpoint) / "trainer_state.json", "Resume from another checkpoint "
                      "(trainer.resume_from=PATH) or start over (trainer.resume_from=null)")
    unfinished = state.get("global_step", 0) < state.get("max_steps", 0)
    if unfinished or config_changes(output_dir / "config.yaml", composed):
        return None
    log.info("%s already finished (step %d, final/ written); nothing to do. trainer.resume_from=null starts over, "
             "a larger trainer.max_steps or trainer.epochs continues", output_dir, state["global_step"])
    return read_json(output_dir / "metrics.json", "Delete it and run the same command again (it continues from the "
                     "newest checkpoint and rewrites it)")


def _step(checkpoint: Path) -> int:
    match = _CHECKPOINT.match(checkpoint.name)
    return int(match.group(1)) if match else -1


def config_changes(old_yaml: Path, new_cfg) -> List[str]:
    """Keys whose values differ between the config a run was started with and the one resuming it."""
    from omegaconf import OmegaConf

    if not old_yaml.is_file():
        return []
    saved = read_yaml(old_yaml, "It records the config the run started with: restore it, or delete it to go on with "
                              "this command's config (the run rewrites it)")
    old = _flatten(OmegaConf.to_container(saved, resolve=False))
    new = _flatten(OmegaConf.to_container(new_cfg, resolve=True))
    ignored = {"output_dir", "run_name", "trainer.resume_from"}
    # hub.*: where the result is uploaded does not change the training (and a finished run run again only uploads)
    return sorted(k for k in set(old) | set(new)
                  if k not in ignored and not k.startswith("hub.") and old.get(k) != new.get(k))


def _flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


class CheckpointCompleteMarker(TrainerCallback):
    """Marks a checkpoint folder as complete once the Trainer has written all of it."""

    def on_save(self, args, state, control, **kwargs):
        from qwenvl_ft.distributed import ranks

        ranks.barrier()  # every rank's part (its shard, its RNG state) is on disk before the folder is marked
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not folder.is_dir():
            return
        # Written under a temporary name and renamed: the marker itself is never half-written.
        write_atomically(folder / COMPLETE_MARKER,
                         json.dumps({"global_step": state.global_step, "saved_at": time.time()}))


class ReloadConvertedWeights(TrainerCallback):
    """Loads full-model checkpoint weights the way `from_pretrained` does.

    transformers 5.23 saves Qwen2-VL checkpoints in the original key layout (`save_pretrained` reverts the model's
    key conversion: `model.language_model.*` is written as `model.*`, `model.visual.*` as `visual.*`), but
    `Trainer._load_from_checkpoint` and `_load_best_model` read them back with a plain
    `load_state_dict(strict=False)`: no key matches and the weights silently stay as they were
    (huggingface/transformers#43701). This reloads them through `from_pretrained`, which applies the conversion,
    right after the Trainer's attempt: at train begin when resuming, at train end for the best checkpoint.
    Adapters (PEFT loads them itself), DeepSpeed and FSDP checkpoints take other, working paths and are left alone.
    """

    def __init__(self, resume_from: Optional[str]):
        self.resume_from = resume_from

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.resume_from is not None:
            self._reload(model, Path(self.resume_from), args)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if args.load_best_model_at_end and state.best_model_checkpoint:
            self._reload(model, Path(state.best_model_checkpoint), args)

    @staticmethod
    def _reload(model, folder: Path, args) -> None:
        if model is None or hasattr(model, "peft_config") or args.deepspeed or args.fsdp:
            return
        if not (folder / "config.json").is_file():
            return
        import torch

        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        with torch.device("cpu"):
            loaded = type(model).from_pretrained(str(folder), dtype=dtype)
        model.load_state_dict(loaded.state_dict(), strict=True)  # in place: the optimizer keeps its tensors
        del loaded
        log.info("loaded the weights of %s", folder)


class StopOnSignal(TrainerCallback):
    """On SIGTERM (schedulers' preemption notice) or SIGINT (Ctrl-C): finish the current optimizer step, save a
    checkpoint, stop. A second signal while waiting terminates at once.

    The handler only sets a flag; the Trainer acts on it at the next step end through `control`, so the checkpoint
    is the ordinary one (with its completion marker). Ctrl-C at a terminal reaches the whole process group, so
    DataLoader workers (forked while the handler is installed, so they inherit it) get it too: in them it does
    nothing, and they keep feeding the step that is finishing; they end with the main process.
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self.received: Optional[int] = None
        self.stopping = False
        self._previous = {}
        self._pid = os.getpid()

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker: the main process decides
            return
        if self.received is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        log.warning("received %s: saving a checkpoint after the current step, then stopping (%s again stops at "
                    "once, without saving)", signal.Signals(signum).name,
                    "Ctrl-C" if signum == signal.SIGINT else "the same signal")

    @contextmanager
    def installed(self) -> Iterator["StopOnSignal"]:
        """Handlers active for the block (signal handlers can only be set from the main thread)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        self._previous = {s: signal.signal(s, self._handle) for s in self.signals}
        try:
            yield self
        finally:
            for s, previous in self._previous.items():
                signal.signal(s, previous)

    def on_step_end(self, args, state, control, **kwargs):
        from qwenvl_ft.distributed import ranks

        # The ranks of a distributed run stop at the same step, or the checkpoint's collectives would hang: the
        # signal may reach one rank a step before the others.
        if ranks.any_rank(self.received is not None, args.device):
            self.stopping = True
            control.should_save = True
            control.should_training_stop = True
        return control

    def interrupted(self, state) -> bool:
        """True when a signal (to this rank or another one of the run) stopped training before its last step."""
        return self.stopping and state.global_step < state.max_steps
