"""`qwenvl-ft infer`: one prompt over one or many images with the base model, base + adapter, or a merged model.

Images are sized exactly as in training (the data group's min/max pixels or fixed resize) and the prompt gets the
data group's system message, so the model sees what it was trained on. Predictions are printed and written as
JSONL, one {"image", "prompt", "prediction"} per line, in the order of infer.images. A prediction holding boxes or
points (in the family's convention, qwenvl_ft/grounding) also gets them as "objects" in the original image's pixels,
and a copy of the image with them drawn goes to annotated/ next to the predictions file.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Dict, List

from omegaconf import DictConfig

from qwenvl_ft.config.compose import validate
from qwenvl_ft.config.saved_run import with_saved_run
from qwenvl_ft.config.schema import InferRunConfig
from qwenvl_ft.errors import ConfigError
from qwenvl_ft.run_folder.files import ensure_writable, write_atomically
from qwenvl_ft.run_folder.lock import lock_folder

log = logging.getLogger("qwenvl_ft")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def expand_images(entries: List[str]) -> List[Path]:
    """Files as given, folders replaced by the images inside them (sorted by name)."""
    found: List[Path] = []
    for entry in entries:
        path = Path(entry).expanduser()
        if path.is_dir():
            inside = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not inside:
                raise ConfigError(f"infer.images: folder {path} holds no image ({', '.join(sorted(IMAGE_SUFFIXES))})")
            found += inside
        elif path.is_file():
            found.append(path)
        else:
            raise ConfigError(f"infer.images: {path} not found")
    return found


def prompt_rows(images: List[Path], prompt: str, system_message: str = None) -> List[dict]:
    """Canonical rows holding only the prompt turns."""
    rows = []
    for image in images:
        messages = [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": prompt}]}]
        if system_message:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system_message}]})
        rows.append({"messages": messages, "images": [str(image)], "source": str(image)})
    return rows


def infer(composed: DictConfig) -> Dict:
    cfg: InferRunConfig = validate(with_saved_run(composed))  # the named run's config.yaml, overrides on top
    i = cfg.infer
    if not i.images:
        raise ConfigError("infer.images is empty: pass infer.images=[a.jpg,b.png] or infer.images=[folder]")
    images = expand_images(list(i.images))
    model_path = Path(os.path.normpath(i.model_path)) if i.model_path else None
    output_file = Path(i.output_file) if i.output_file else Path(cfg.output_dir) / "predictions.jsonl"
    lock = lock_folder(ensure_writable(output_file.parent, "infer output folder"), "infer output folder")

    from qwenvl_ft.training.startup import import_model_libraries

    import_model_libraries()  # first, with the collector paused (training/startup.py)
    from transformers import set_seed

    from qwenvl_ft.data.collate import VisionChatCollator
    from qwenvl_ft.evaluation.generate import generate_answers
    from qwenvl_ft.modeling.load import kind_of, load_base, load_processor, load_tuned

    if model_path is not None:
        kind_of(model_path)  # fail before loading anything
    set_seed(cfg.seed)  # sampling (generation.do_sample) is reproducible
    processor = load_processor(cfg.model, cfg.data, model_path)
    model = load_base(cfg.model, cfg.adapter) if model_path is None else \
        load_tuned(cfg.model, cfg.adapter, model_path)
    collator = VisionChatCollator(processor, cfg.data)
    rows = prompt_rows(images, i.prompt, cfg.data.system_message)
    log.info("generating for %d image(s) with %s", len(rows), model_path or "the base model")
    predictions = generate_answers(model, collator, rows, i.batch_size, generation=i.generation.kwargs(),
                                   prompts_only=True, progress="infer")

    records = [{"image": str(image), "prompt": i.prompt, "prediction": prediction}
               for image, prediction in zip(images, predictions)]
    annotate_objects(records, rows, collator, output_file.parent / "annotated")
    write_atomically(output_file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    for record in records:
        print(f"{record['image']}\t{record['prediction']}")
    log.info("predictions: %s", output_file)
    lock.release()
    return {"num_predictions": len(records), "output_file": str(output_file)}


def annotate_objects(records: List[dict], rows: List[dict], collator, folder: Path) -> None:
    """Each record whose prediction holds boxes or points gets them in the original image's pixels ("objects"), and
    an annotated copy of its image in `folder`."""
    from qwenvl_ft.data.grounding import marks_in_image
    from qwenvl_ft.data.images import open_image
    from qwenvl_ft.grounding.draw import draw_marks

    for index, (record, row) in enumerate(zip(records, rows)):
        placed = marks_in_image(record["prediction"], row["images"][0], collator)
        if not placed:
            continue
        record["objects"] = [{"label": m.label, ("bbox" if m.is_box else "point"): [round(v, 1) for v in m.values]}
                             for m in placed]
        folder.mkdir(parents=True, exist_ok=True)
        image = draw_marks(open_image(row["images"][0], row["source"]), placed)
        record["annotated"] = str(folder / f"{index:04d}_{Path(record['image']).stem}.png")
        image.save(record["annotated"])
