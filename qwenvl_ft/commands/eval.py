"""`qwenvl-ft eval`: generate on the held-out split with the base model and with the fine-tuned one, and report
them side by side.

Writes into output_dir: eval_report.json (settings, both sets of metrics, example predictions),
predictions.jsonl (every row: reference, base and tuned prediction) and tensorboard/ (metrics as scalars and a
gallery of image + prediction + reference).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from omegaconf import DictConfig

from qwenvl_ft.config.compose import validate
from qwenvl_ft.config.saved_run import with_saved_run
from qwenvl_ft.config.schema import EvalRunConfig
from qwenvl_ft.errors import ConfigError
from qwenvl_ft.run_folder.files import ensure_writable, write_atomically
from qwenvl_ft.run_folder.lock import lock_folder

log = logging.getLogger("qwenvl_ft")

REPORT = "eval_report.json"
GALLERY_MAX_SIDE = 448  # gallery images are shrunk to this, so the event file stays small


def evaluate(composed: DictConfig) -> Dict:
    cfg: EvalRunConfig = validate(with_saved_run(composed))  # the named run's config.yaml, overrides on top
    e = cfg.eval
    output_dir = ensure_writable(Path(cfg.output_dir), "eval output folder")
    lock = lock_folder(output_dir, "eval output folder")
    model_path = Path(os.path.normpath(e.model_path)) if e.model_path else None

    from qwenvl_ft.training.startup import import_model_libraries

    import_model_libraries()  # first, with the collector paused (training/startup.py)
    from qwenvl_ft.data.collate import VisionChatCollator
    from qwenvl_ft.data.kinds import rows_of
    from qwenvl_ft.evaluation.metrics import compute
    from qwenvl_ft.modeling.load import kind_of, load_processor
    from qwenvl_ft.trainers.base import training_of

    if model_path is not None:
        kind_of(model_path)  # fail before loading anything
    # The training method that reads data.format reads the held-out rows and says what a reference answer is.
    method = cfg.data.format.method
    training = training_of(method)
    _, held_out = rows_of(method).read_rows(cfg.data)
    if not held_out:
        raise ConfigError("no held-out rows to evaluate: set data.eval_size, data.eval_path or data.shapes.num_eval")
    method_rows = list(held_out)[: e.num_samples]
    rows = training.generation_rows(method_rows)
    processor = load_processor(cfg.model, cfg.data, model_path)
    collator = VisionChatCollator(processor, cfg.data)
    references = [collator.reference(row) for row in rows]

    predictions, models = _generate(cfg, model_path, collator, rows)
    metrics = {side: compute(preds, references, list(e.metrics)) for side, preds in predictions.items()}
    for side, values in training.evaluate_models(models, method_rows, processor, cfg, predictions).items():
        metrics.setdefault(side, {}).update(values)
    examples = [
        {"source": row.get("source"), "reference": references[i], **{side: p[i] for side, p in predictions.items()}}
        for i, row in enumerate(rows)
    ]
    _write_report(output_dir, cfg, model_path, rows, examples, metrics, collator)
    lock.release()
    return {f"{side}_{name}": value for side, values in metrics.items() for name, value in values.items()}


def _generate(cfg: EvalRunConfig, model_path: Optional[Path], collator, rows: List[dict]) -> Tuple[Dict, Dict]:
    """Answers of the base model (eval.compare_base) and of the fine-tuned one (eval.model_path) on `rows`:
    ({side: predictions}, {"base": model or None, "tuned": model or None})."""
    from transformers import set_seed

    from qwenvl_ft.evaluation.generate import generate_answers
    from qwenvl_ft.modeling.load import kind_of, load_base, load_tuned

    e, method = cfg.eval, cfg.data.format.method
    generation = e.generation.kwargs()
    predictions: Dict[str, List[str]] = {}
    base = tuned = None
    if e.compare_base:
        set_seed(cfg.seed)
        base = load_base(cfg.model, cfg.adapter)
        log.info("generating with the base model on %d held-out rows", len(rows))
        predictions["base"] = generate_answers(base, collator, rows, e.batch_size, generation=generation,
                                               progress="base model")
    if model_path is not None:
        set_seed(cfg.seed)
        # An adapter goes onto the base already in memory; a full model replaces it, unless the method compares
        # the two models directly (DPO's implicit rewards).
        if base is not None and kind_of(model_path) == "model" and not method.eval_needs_base:
            del base
            base = None
        tuned = load_tuned(cfg.model, cfg.adapter, model_path, base)
        log.info("generating with %s", model_path)
        predictions["tuned"] = generate_answers(tuned, collator, rows, e.batch_size, generation=generation,
                                                progress="fine-tuned model")
    return predictions, {"base": base, "tuned": tuned}


def _write_report(output_dir: Path, cfg: EvalRunConfig, model_path: Optional[Path], rows: List[dict],
                  examples: List[dict], metrics: Dict[str, Dict[str, float]], collator=None) -> None:
    """eval_report.json, predictions.jsonl and tensorboard/ in output_dir; the table in the log."""
    e = cfg.eval
    report = {
        "model_path": str(model_path.resolve()) if model_path else None,
        "base": cfg.model.name_or_path if not cfg.model.random_init else "random init (model.architecture)",
        "num_samples": len(rows),
        "generation": e.generation.kwargs(),
        "metrics": metrics,
        "examples": examples[: e.num_examples],
    }
    write_atomically(output_dir / REPORT, json.dumps(report, indent=2))
    write_atomically(output_dir / "predictions.jsonl", "".join(json.dumps(x) + "\n" for x in examples))
    log_gallery(output_dir / "tensorboard", rows, examples[: e.num_examples], metrics, collator)
    log.info("%s", format_table(metrics, examples[: e.num_examples], len(rows)))
    log.info("report: %s", output_dir / REPORT)


def format_table(metrics: Dict[str, Dict[str, float]], examples: List[dict], num_rows: int) -> str:
    sides = list(metrics)
    names = list(dict.fromkeys(name for values in metrics.values() for name in values))  # a side may lack one
    lines = [f"held-out evaluation on {num_rows} rows", "  " + f"{'metric':18s}" + "".join(f"{s:>12s}" for s in sides)]
    for name in names:
        cells = [f"{metrics[s][name]:12.4f}" if name in metrics[s] else f"{'-':>12s}" for s in sides]
        lines.append("  " + f"{name:18s}" + "".join(cells))
    for example in examples:
        lines.append(f"  reference: {example['reference']!r}")
        for side in sides:
            lines.append(f"    {side + ':':7s}  {example[side]!r}")
    return "\n".join(lines)


def log_gallery(log_dir: Path, rows: List[dict], examples: List[dict], metrics: Dict[str, Dict[str, float]],
                collator=None) -> None:
    """Metrics as scalars and, per example, its first image and a text card with reference and predictions; with
    the collator, boxes of the last side's prediction and of the reference are drawn on the image."""
    import numpy as np
    from torch.utils.tensorboard import SummaryWriter

    from qwenvl_ft.data.images import open_image
    from qwenvl_ft.training.trackers import with_boxes

    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for side, values in metrics.items():
            for name, value in values.items():
                writer.add_scalar(f"eval_{side}/{name}", value, 0)
        for index, (row, example) in enumerate(zip(rows, examples)):
            tag = f"eval_examples/{index:03d}"
            if row.get("images"):
                image = open_image(row["images"][0], f"{row.get('source', '?')}: images[0]")
                if collator is not None:
                    shown = [side for side in metrics if side in example][-1]
                    image = with_boxes(image, row, example[shown], example["reference"], collator)
                image.thumbnail((GALLERY_MAX_SIDE, GALLERY_MAX_SIDE))
                writer.add_image(tag, np.asarray(image), 0, dataformats="HWC")
            card = [f"**reference:** {example['reference']}"]
            card += [f"**{side}:** {example[side]}" for side in metrics]
            writer.add_text(tag, "  \n".join(card), 0)
    finally:
        writer.close()
