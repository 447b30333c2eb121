"""The preference collator: canonical pairs (preference.py) -> a DPOTrainer batch.

TRL's `DataCollatorForVisionPreference` does the real work and is used as it is: the chat template, the prompt
tokenised with its images and each answer appended, `completion_mask`, and Qwen2-VL's `mm_token_type_ids`
(without which M-RoPE would give image tokens text positions). The batch is the chosen sequences, then the
rejected ones, each with its own copy of the prompt images. This wrapper adds only what TRL's collator does not do:

  - images: it wants decoded PIL images; rows carry paths, base64 or bytes, opened here by the SFT collator's
    `load_images` (same data.min_pixels / max_pixels / fixed resize, same errors naming the row);
  - length: it cuts every sequence at max_length blindly, which can cut inside an image (the forward of the whole
    batch then fails) or remove every answer token (the pair then silently contributes nothing); here
    data.overlength applies as in SFT: cut in text only, or drop the pair (logged), or stop naming the row;
  - precomputed reference log-probabilities (training/dpo.py) pass through as `ref_chosen_logps` /
    `ref_rejected_logps`, the keys DPOTrainer reads.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Set

import torch

from qwenvl_ft.config.schema import DataConfig, Overlength
from qwenvl_ft.data.collate import VisionChatCollator
from qwenvl_ft.errors import DataError

log = logging.getLogger("qwenvl_ft")

REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


class VisionPreferenceCollator:
    def __init__(self, processor, data_cfg: DataConfig):
        from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

        self.processor = processor
        self.cfg = data_cfg
        self.images = VisionChatCollator(processor, data_cfg)
        self.vision_end_id = processor.tokenizer.convert_tokens_to_ids("<|vision_end|>")
        self.trl_collator = DataCollatorForVisionPreference(processor=processor, max_length=None)

    def __call__(self, rows: List[dict]) -> Dict[str, torch.Tensor]:
        batch = self._collate(rows)
        dropped = self.overlong_pairs(batch, rows)
        if dropped:
            rows = [row for index, row in enumerate(rows) if index not in dropped]
            if not rows:
                raise DataError(f"every pair of a batch was dropped for exceeding data.max_length="
                                f"{self.cfg.max_length}; raise data.max_length or lower data.max_pixels")
            batch = self._collate(rows)
        limit = self.cfg.max_length
        if limit is not None:
            for key in ("input_ids", "attention_mask", "completion_mask", "mm_token_type_ids", "token_type_ids"):
                if key in batch:
                    batch[key] = batch[key][:, :limit]
        for key in REF_KEYS:
            if key in rows[0]:
                batch[key] = torch.tensor([float(row[key]) for row in rows])
        return batch

    def _collate(self, rows: List[dict]) -> Dict[str, torch.Tensor]:
        examples = [{"images": self.images.load_images(row), "prompt": row["prompt"], "chosen": row["chosen"],
                     "rejected": row["rejected"]} for row in rows]
        try:
            return dict(self.trl_collator(examples))
        except ValueError as err:  # e.g. image items and images disagree; say which rows were in the batch
            sources = ", ".join(row.get("source", "?") for row in rows)
            raise DataError(f"cannot build a preference batch from {sources}: {err}") from None

    def overlong_pairs(self, batch: Dict[str, torch.Tensor], rows: List[dict]) -> Set[int]:
        """Indices of the pairs data.overlength drops; raises for data.overlength=error. Sequences are flushed
        left, so a text-only cut is a column slice, done by the caller."""
        limit = self.cfg.max_length
        if limit is None or batch["input_ids"].shape[1] <= limit:
            return set()
        policy = self.cfg.overlength
        lengths = batch["attention_mask"].sum(dim=1)
        dropped: Set[int] = set()
        for index in (lengths > limit).nonzero().flatten().tolist():
            pair = index % len(rows)
            answer = "chosen" if index < len(rows) else "rejected"
            over = f"{rows[pair].get('source', '?')} ({answer}): {int(lengths[index])} tokens, over " \
                   f"data.max_length={limit}"
            if policy == Overlength.error:
                raise DataError(f"{over} (data.overlength=error; raise data.max_length, lower data.max_pixels, or "
                                f"set data.overlength to truncate_text or drop)")
            ids = batch["input_ids"][index]
            vision_ends = (ids == self.vision_end_id).nonzero()
            if policy == Overlength.drop:
                reason = "data.overlength=drop"
            elif len(vision_ends) and int(vision_ends[-1]) >= limit:
                reason = f"the cut would fall inside an image (its vision tokens end at {int(vision_ends[-1])})"
            elif not batch["completion_mask"][index, :limit].any():
                reason = "the cut would remove every answer token"
            else:
                continue
            if pair not in dropped:
                log.warning("%s: pair dropped, %s", over, reason)
            dropped.add(pair)
        return dropped
