"""Experiment trackers: TensorBoard, Weights & Biases, SwanLab and MLflow (trainer.report_to, trainer.tracker).

The training curves are transformers' own integrations' job (its TensorBoardCallback, WandbCallback,
SwanLabCallback and MLflowCallback, through `report_to`). What they do not log is the run as qwenvl-ft sees it:

  - the resolved config (`config.yaml`) as the run's hyperparameters (the integrations log TrainingArguments and
    the model's config, which say nothing about the data, the adapter or the freezing);
  - the held-out metrics before and after training (the generation check, outside the Trainer's loop);
  - a prediction gallery -- image, prompt, prediction, reference for `trainer.tracker.gallery_size` held-out rows --
    before training, at each evaluation (trainer.eval_steps) and after training.

`Trackers` is a TrainerCallback that logs these into the very runs the integrations log into. It opens each run
itself in `on_init_end` (before any integration's `on_train_begin`), with the project, name, tags and config from
trainer.tracker; each integration finds the run already open and attaches to it, as their documentation allows
("run may have been created manually"). Owning the runs is also what lets the after-training metrics and gallery
land in them (MLflowCallback ends the runs it starts in `on_train_end`, before the after-training check) and lets
a sweep's next job start a run of its own. Everything is logged from the main process only: the Trainer's
`state.is_world_process_zero` decides, as it does for the integrations.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from transformers import TrainerCallback

log = logging.getLogger("qwenvl_ft")

DEFAULT_PROJECT = "qwenvl-ft"
PROJECT_ENV = {"wandb": "WANDB_PROJECT", "swanlab": "SWANLAB_PROJECT", "mlflow": "MLFLOW_EXPERIMENT_NAME"}
GALLERY_MAX_SIDE = 448  # gallery images are shrunk to this, so that the logs stay small
NOT_HYPERPARAMETERS = ("output_dir", "run_name")  # the run's identity; the Trainer logs them under the same names


@dataclass
class GalleryEntry:
    """One held-out row as the gallery shows it."""

    image: Any  # PIL image (the row's first image, shrunk), or None for a text-only row
    prompt: str
    prediction: str
    reference: str

    def caption(self) -> str:
        return f"prompt: {self.prompt}\nprediction: {self.prediction}\nreference: {self.reference}"


def gallery_entries(rows: Sequence[dict], predictions: Sequence[str], references: Sequence[str],
                    collator=None) -> List[GalleryEntry]:
    """Gallery entries of canonical conversation rows, their predictions and references; with the `collator` that
    sized the images, boxes and points in either are drawn on the first image (the reference's thin and white)."""
    from qwenvl_ft.data.images import open_image
    from qwenvl_ft.data.turns import prompt_messages

    entries = []
    for row, prediction, reference in zip(rows, predictions, references):
        image = None
        if row.get("images"):
            image = open_image(row["images"][0], f"{row.get('source', '?')}: images[0]").copy()
            if collator is not None:
                image = with_boxes(image, row, prediction, reference, collator)
            image.thumbnail((GALLERY_MAX_SIDE, GALLERY_MAX_SIDE))
        users = [m for m in prompt_messages(row) if m["role"] == "user"]
        prompt = "".join(part.get("text") or "" for part in users[-1]["content"] if part["type"] == "text") \
            if users else ""
        entries.append(GalleryEntry(image, prompt.strip(), prediction, reference))
    return entries


def with_boxes(image, row: dict, prediction: str, reference: str, collator):
    """The image with the boxes of the prediction and of the reference drawn, mapped from the family's convention
    (for the size the model saw this image at) to the image's own pixels; the image itself when there are none."""
    from qwenvl_ft.data.grounding import marks_in_image
    from qwenvl_ft.grounding.draw import draw_marks

    predicted = marks_in_image(prediction, row["images"][0], collator)
    expected = marks_in_image(reference, row["images"][0], collator)
    return draw_marks(image, predicted, expected) if predicted or expected else image


def main_process_can_generate(cfg, when: str) -> bool:
    """Whether the main process can generate the gallery alone (the trackers live there). Not when the model is
    sharded over the processes (FSDP, ZeRO-3: every forward gathers weights from all of them, so the others would
    have to take part), nor before training under DeepSpeed or FSDP (the model is put on its devices when
    training starts). The held-out metrics themselves are computed by every rank together
    (evaluation/held_out.py: held_out_generation)."""
    from qwenvl_ft.distributed import ranks
    from qwenvl_ft.distributed.placement import placed_when_training_starts

    if not ranks.is_distributed():
        return True
    return not cfg.dist.is_sharded and not (when == "before" and placed_when_training_starts(cfg))


def plain(value: Any) -> Any:
    """Enums as their values, containers rebuilt: what every tracker's config serialiser takes."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def flat_config(node: Dict, prefix: str = "") -> Dict[str, Any]:
    """Dotted keys -> scalar values (lists as JSON, None as "null"): the form of a hyperparameter table (MLflow's
    parameters, TensorBoard's HParams)."""
    out: Dict[str, Any] = {}
    for key, value in plain(node).items():
        if not prefix and key in NOT_HYPERPARAMETERS:
            continue
        if isinstance(value, dict) and value:
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    return out


def hyperparameters(resolved: Dict) -> Dict:
    """The resolved config as nested hyperparameters (W&B and SwanLab show nested keys dotted)."""
    return {key: value for key, value in plain(resolved).items() if key not in NOT_HYPERPARAMETERS}


# ----------------------------------------------------------------------------------------------------------------
# one class per tracker: open a run (or take the one already open), log metrics and a gallery, close


class TensorBoardTracker:
    """Event files next to the TensorBoardCallback's (TENSORBOARD_LOGGING_DIR): one run in TensorBoard's UI. The
    gallery is one image and one text card per row index, stepped, so TensorBoard's slider shows each row's
    prediction before, during and after training."""

    def __init__(self, log_dir: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=log_dir)
        self.metrics: Dict[str, float] = {}

    def log_config(self, resolved: Dict, yaml_text: str) -> None:
        self.flat = flat_config(resolved)
        self.writer.add_text("config", "    " + yaml_text.replace("\n", "\n    "))  # markdown code block

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.metrics.update(metrics)
        self.writer.flush()

    def log_gallery(self, name: str, entries: List[GalleryEntry], step: int) -> None:
        import numpy as np

        for index, entry in enumerate(entries):
            tag = f"gallery/{index:02d}"
            if entry.image is not None:
                self.writer.add_image(tag, np.asarray(entry.image.convert("RGB")), step, dataformats="HWC")
            card = [f"**{name}** (step {step})", f"**prompt:** {entry.prompt}",
                    f"**prediction:** {entry.prediction}", f"**reference:** {entry.reference}"]
            self.writer.add_text(tag, "  \n".join(card), step)
        self.writer.flush()

    def close(self, ok: bool) -> None:
        """The HParams dashboard entry: the config against the held-out metrics (their scalars are logged)."""
        from torch.utils.tensorboard.summary import hparams

        if getattr(self, "flat", None):
            for summary in hparams(self.flat, self.metrics):
                self.writer.file_writer.add_summary(summary)
        self.writer.close()


class WandbTracker:
    def __init__(self, project: str, name: str, tags: List[str], output_dir: str, config: Dict):
        import wandb

        self.wandb = wandb
        self.owned = wandb.run is None
        if self.owned:
            # wandb/ next to the run's other outputs, unless WANDB_DIR says otherwise
            wandb.init(project=project, name=name, tags=tags or None, config=config,
                       dir=None if os.environ.get("WANDB_DIR") else output_dir)
        else:
            wandb.config.update(config, allow_val_change=True)
        self.run = wandb.run

    def log_config(self, resolved: Dict, yaml_text: str) -> None:
        pass  # given to wandb.init

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        # WandbCallback plots everything against train/global_step and lets W&B count its own steps; passing
        # `step=` here would be refused once the callback's logs have moved W&B's counter past it.
        self.run.log({**metrics, "train/global_step": step})

    def log_gallery(self, name: str, entries: List[GalleryEntry], step: int) -> None:
        wandb = self.wandb
        table = wandb.Table(columns=["image", "prompt", "prediction", "reference"])
        for entry in entries:
            table.add_data(wandb.Image(entry.image) if entry.image is not None else None, entry.prompt,
                           entry.prediction, entry.reference)
        self.run.log({f"gallery/{name}": table, "train/global_step": step})

    def close(self, ok: bool) -> None:
        if self.owned:
            self.run.finish(exit_code=0 if ok else 1)


class SwanLabTracker:
    def __init__(self, project: str, name: str, tags: List[str], output_dir: str, config: Dict):
        import swanlab

        self.swanlab = swanlab
        self.owned = not swanlab.has_run()  # (swanlab 0.10: get_run() raises without one)
        if self.owned:
            # swanlog/ next to the run's other outputs, unless SWANLAB_LOG_DIR says otherwise
            log_dir = None if os.environ.get("SWANLAB_LOG_DIR") else str(Path(output_dir) / "swanlog")
            swanlab.init(project=project, name=name, tags=tags or None, config=config, log_dir=log_dir)
        else:
            swanlab.config.update(config)

    def log_config(self, resolved: Dict, yaml_text: str) -> None:
        pass  # given to swanlab.init

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        self.swanlab.log(metrics, step=step)

    def log_gallery(self, name: str, entries: List[GalleryEntry], step: int) -> None:
        swanlab = self.swanlab
        images = [swanlab.Image(e.image, caption=e.caption()) for e in entries if e.image is not None]
        logs = {f"gallery_text/{name}": [swanlab.Text(e.caption()) for e in entries]}
        if images:
            logs[f"gallery/{name}"] = images
        swanlab.log(logs, step=step)

    def close(self, ok: bool) -> None:
        if self.owned:
            self.swanlab.finish(state="success" if ok else "crashed",
                                error=None if ok else "the training run failed (see its log)")


class MlflowTracker:
    def __init__(self, project: str, name: str, tags: List[str]):
        import mlflow

        self.mlflow = mlflow
        self.owned = mlflow.active_run() is None
        if self.owned:
            mlflow.set_experiment(project)
            mlflow.start_run(run_name=name, tags={tag: "" for tag in tags})

    def log_location(self) -> None:
        uri = self.mlflow.get_tracking_uri()
        experiment = self.mlflow.get_experiment(self.mlflow.active_run().info.experiment_id).name
        log.info("mlflow: experiment %s in %s (browse it: mlflow ui --backend-store-uri %s)", experiment, uri, uri)

    def log_config(self, resolved: Dict, yaml_text: str) -> None:
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        params = [(k, str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in flat_config(resolved).items()]
        for start in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            self.mlflow.log_params(dict(params[start: start + MAX_PARAMS_TAGS_PER_BATCH]))
        self.mlflow.log_text(yaml_text, "config.yaml")

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def log_gallery(self, name: str, entries: List[GalleryEntry], step: int) -> None:
        from PIL import Image

        table: Dict[str, list] = {"prompt": [e.prompt for e in entries],
                                  "prediction": [e.prediction for e in entries],
                                  "reference": [e.reference for e in entries]}
        if any(e.image is not None for e in entries):  # a text-only row gets a blank tile
            table = {"image": [e.image if e.image is not None else Image.new("RGB", (1, 1), "white")
                               for e in entries], **table}
        self.mlflow.log_table(table, artifact_file=f"gallery/{name}_step{step:06d}.json")

    def close(self, ok: bool) -> None:
        if self.owned:
            self.mlflow.end_run(status="FINISHED" if ok else "FAILED")


def _metric_name(key: str, when: str) -> str:
    key = key[len("eval_"):] if key.startswith("eval_") else key
    return key[: -len(f"_{when}")] if key.endswith(f"_{when}") else key


# ----------------------------------------------------------------------------------------------------------------


class Trackers(TrainerCallback):
    """The run's trackers, opened on the main process when the Trainer is built, closed by `close`.

    `gallery` (optional) makes the gallery of an evaluation: model -> entries (the run skeleton's `run_trackers`
    makes it of evaluation/held_out.py's `predict_gallery`). `held_out` logs the before/after
    metrics and gallery (the run skeleton calls it); anything logged before the trackers are open waits for them.
    """

    def __init__(self, cfg, resolved: Dict, yaml_text: str,
                 gallery: Optional[Callable[[Any], List[GalleryEntry]]] = None):
        from qwenvl_ft.training.preflight import active_trackers

        self.cfg = cfg
        self.names = active_trackers(cfg.trainer.report_to)
        self.resolved, self.yaml_text = resolved, yaml_text
        self.gallery = gallery if cfg.trainer.tracker.gallery_size > 0 else None
        self.open_trackers: Optional[list] = None  # None until on_init_end; [] on other processes
        self.gallery_step: Optional[int] = None  # step of the last evaluation's gallery
        self.pending: List[tuple] = []

    # -- Trainer events ----------------------------------------------------------------------------------------

    def on_init_end(self, args, state, control, **kwargs):
        if self.open_trackers is not None:
            return
        self.open_trackers = self._open(args) if state.is_world_process_zero else []
        for call in self.pending:
            self._log(*call)
        self.pending.clear()

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        # once per step: a method's own evaluation after training (DPO's held-out rewards) repeats the last one
        if self.open_trackers and self.gallery is not None and model is not None \
                and state.global_step != self.gallery_step and main_process_can_generate(self.cfg, "eval"):
            self.gallery_step = state.global_step
            self._log("gallery", "eval", self.gallery(model), state.global_step)

    # -- what the run skeleton calls ---------------------------------------------------------------------------

    def held_out(self, when: str, metrics: Dict[str, Any], step: int, model=None) -> None:
        """Held-out metrics of `when` ("before" / "after" training) as `held_out_<when>/<name>`, and the gallery of
        `model` then. Names may carry the metrics.json form (`eval_exact_match_after`): prefix and suffix go."""
        numbers = {f"held_out_{when}/{_metric_name(key, when)}": float(value) for key, value in metrics.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
        if numbers:
            self._log("metrics", numbers, step)
        if model is not None and self.wants_gallery and main_process_can_generate(self.cfg, when):
            self._log("gallery", when, self.gallery(model), step)

    @contextmanager
    def closing(self):
        """Close the trackers when the block ends: finished if it returned, failed if it raised."""
        ok = False
        try:
            yield self
            ok = True
        finally:
            self.close(ok)

    @property
    def wants_gallery(self) -> bool:
        """Whether a gallery would reach any tracker (so that nobody generates one for nothing)."""
        return self.gallery is not None and bool(self.names) and self.open_trackers != []

    def close(self, ok: bool = True) -> None:
        for tracker in self.open_trackers or []:
            try:
                tracker.close(ok)
            except Exception as err:  # a tracker that cannot flush must not hide the run's own outcome
                log.warning("closing the %s run failed: %s", type(tracker).__name__, err)
        self.open_trackers = []

    # -- inside ------------------------------------------------------------------------------------------------

    def _log(self, kind: str, *payload) -> None:
        if self.open_trackers is None:  # the Trainer is not built yet: wait for on_init_end
            self.pending.append((kind, *payload))
            return
        for tracker in self.open_trackers:
            if kind == "metrics":
                tracker.log_metrics(*payload)
            else:
                tracker.log_gallery(*payload)

    def _open(self, args) -> list:
        tracker_cfg = self.cfg.trainer.tracker
        name, output_dir = args.run_name, str(self.cfg.output_dir)
        config = hyperparameters(self.resolved)
        opened = []
        for tracker in self.names:
            project = tracker_cfg.project or os.environ.get(PROJECT_ENV.get(tracker, ""), "") or DEFAULT_PROJECT
            if tracker == "tensorboard":
                opened.append(TensorBoardTracker(os.environ.get("TENSORBOARD_LOGGING_DIR")
                                                 or str(Path(output_dir) / "tensorboard")))
            elif tracker == "wandb":
                opened.append(WandbTracker(project, name, list(tracker_cfg.tags), output_dir, config))
            elif tracker == "swanlab":
                opened.append(SwanLabTracker(project, name, list(tracker_cfg.tags), output_dir, config))
            elif tracker == "mlflow":
                opened.append(MlflowTracker(project, name, list(tracker_cfg.tags)))
        for tracker in opened:
            tracker.log_config(self.resolved, self.yaml_text)
        log.info("trackers: %s (run %s)", ", ".join(self.names), name)
        for tracker in opened:
            if isinstance(tracker, MlflowTracker):  # say where it goes: MLflow 3's default is ./mlflow.db
                tracker.log_location()
        return opened
