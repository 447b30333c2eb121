"""Held-out generation during a training run: the check before and after training (greedy answers to the held-out
rows, on the device the model trains on, scored against their references; every method's, through its
`generation_rows`), and the trackers' prediction gallery."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

from qwenvl_ft.config.commands import EVAL_METRICS
from qwenvl_ft.config.schema import TrainConfig

if TYPE_CHECKING:
    from qwenvl_ft.training.trackers import GalleryEntry

log = logging.getLogger("qwenvl_ft")

# Figures of the check before training that are scored once training has ended (`score_later`), with the same
# values: rouge-score imports nltk (0.5-1 s of start-up, before the first step), nothing shows them before
# training (the log line has exact match), and the check after training imports it anyway.
SCORED_LATER = ("bleu", "rouge_l")


def held_out_generation(model, processor, rows: List[dict], cfg: TrainConfig, when: str,
                        later: Optional[Dict] = None) -> Dict:
    """The before/after check: greedy answers to the held-out rows (conversations ending on the reference), on
    the device the model trains on, with exact match, BLEU and ROUGE-L; a few predictions are logged. With
    `later` (a dict), BLEU and ROUGE-L are left out and what scores them goes into `later`, for `score_later`.

    In a distributed run the main process generates alone when every process holds the whole model (DDP, ZeRO-1/2;
    the others wait), and every process generates its share of the rows when the model is sharded (FSDP, ZeRO-3:
    each forward gathers weights from all of them). Before training, DeepSpeed and FSDP have not yet put the model
    on its devices (ZeRO-3 holds it partitioned, FSDP shards it when training starts), so the check is left out
    there; `qwenvl-ft eval` compares the base with final/."""
    from qwenvl_ft.data.collate import VisionChatCollator
    from qwenvl_ft.distributed import ranks
    from qwenvl_ft.distributed.placement import placed_when_training_starts
    from qwenvl_ft.evaluation.generate import generate_answers
    from qwenvl_ft.evaluation.metrics import METRICS, compute

    collator = VisionChatCollator(processor, cfg.data)
    batch, new_tokens = cfg.trainer.eval_batch_size, cfg.trainer.max_new_tokens
    if ranks.is_distributed() and when == "before" and placed_when_training_starts(cfg):
        log.info("held-out generation before training: left out under dist.engine=%s (the model is placed on its "
                 "devices when training starts)", cfg.dist.engine.value)
        return {}
    if ranks.is_distributed() and cfg.dist.is_sharded:
        predictions = sharded_answers(model, collator, rows, batch, new_tokens)
    else:
        predictions = ranks.run_on_main(generate_answers, model, collator, rows, batch, new_tokens,
                                        progress=f"held-out predictions {when} training")
    references = [collator.reference(row) for row in rows]
    names = [name for name in METRICS if later is None or name not in SCORED_LATER]
    result = {**compute(predictions, references, names), "predictions": predictions, "references": references}
    if later is not None:
        later.update(when=when, predictions=predictions, references=references)
    shown = min(cfg.trainer.num_predictions_to_print, len(rows))
    boxes = f", IoU@0.5 {result['iou_50']:.1%}" if "iou_50" in result else ""
    lines = [f"held-out predictions {when} training (exact match {result['exact_match']:.1%}{boxes} on {len(rows)} "
             f"rows):"]
    for prediction, reference in list(zip(result["predictions"], result["references"]))[:shown]:
        lines.append(f"  predicted: {prediction!r:40s} reference: {reference!r}")
    log.info("\n".join(lines))
    return {f"eval_{name}_{when}": result[name] for name in EVAL_METRICS if name in result}


def score_later(later: Dict) -> Dict:
    """The figures `held_out_generation` left out into `later` (SCORED_LATER), named as it names the others
    (`eval_rouge_l_before`); {} for an empty `later`."""
    if not later:
        return {}
    from qwenvl_ft.evaluation.metrics import compute

    result = compute(later["predictions"], later["references"], list(SCORED_LATER))
    return {f"eval_{name}_{later['when']}": result[name] for name in SCORED_LATER if name in result}


def sharded_answers(model, collator, rows: List[dict], batch_size: int, max_new_tokens: int) -> List[str]:
    """Greedy answers to `rows` from a model sharded over the processes: each process answers a contiguous share
    (padded to the same number of batches, so that every process runs the same number of forwards), with
    `synced_gpus` (transformers keeps a finished process stepping until all are done); the shares are gathered in
    order."""
    import torch.distributed as dist

    from qwenvl_ft.distributed import ranks
    from qwenvl_ft.evaluation.generate import generate_answers

    world, rank = ranks.world_size(), ranks.rank()
    share = math.ceil(len(rows) / world)
    mine = rows[rank * share:(rank + 1) * share]
    padded = mine + [rows[0]] * (share - len(mine))  # answers to the padding are dropped below
    answers = generate_answers(model, collator, padded, batch_size,
                               generation=dict(max_new_tokens=max_new_tokens, do_sample=False, synced_gpus=True))
    gathered: List[Optional[List[str]]] = [None] * world
    dist.all_gather_object(gathered, answers[:len(mine)])
    return [answer for part in gathered for answer in part]


def predict_gallery(model, collator, rows: Sequence[dict], batch_size: int, max_new_tokens: int) -> List[GalleryEntry]:
    """Greedy predictions of `model` on `rows`, as the trackers' gallery entries (training/trackers.py)."""
    from qwenvl_ft.evaluation.generate import generate_answers
    from qwenvl_ft.training.trackers import gallery_entries

    predictions = generate_answers(model, collator, list(rows), batch_size, max_new_tokens)
    return gallery_entries(rows, predictions, [collator.reference(row) for row in rows], collator)
