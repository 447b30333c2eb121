"""The preference collator: canonical pairs (preference.py) -> a DPOTrainer batch.

The batch is exactly what TRL's `DataCollatorForVisionPreference` makes (tests/test_dpo.py compares them): the
chosen sequences, then the rejected ones, each the prompt rendered with TRL's own `apply_chat_template` (generation
prompt, and the answer as the rest of prompt + answer) tokenised separately from its answer, right-padded;
`completion_mask` over the answers; Qwen2-VL's `mm_token_type_ids` (without which M-RoPE would give image tokens
text positions); pixel values of the chosen sequences' images, then the same again for the rejected ones. What
differs is the work, not the result (1.4-2.4x the pairs per second of TRL's collator on 1024x768 photos,
bench/collate_throughput.py):

  - each pair's images are decoded, resized and turned into pixel values once, by the SFT collator's fast path
    (`VisionChatCollator.load_visuals` / `vision_features`: same data.min_pixels / max_pixels / fixed resize, same
    errors naming the row), and the second copy the batch layout needs is a tensor concatenation; TRL's collator
    wants PIL images and runs the image processor on every image twice, once per answer;
  - the prompt is tokenised with one <|image_pad|> per image, expanded by id, instead of a string with hundreds
    of placeholders;
  - length: data.overlength applies as in SFT (cut in text only, drop the pair (logged), or stop naming the row);
    TRL's collator would cut every sequence at max_length blindly, which can cut inside an image (the forward of
    the whole batch then fails) or remove every answer token (the pair then silently contributes nothing);
  - precomputed reference log-probabilities (training/dpo.py) pass through as `ref_chosen_logps` /
    `ref_rejected_logps`, the keys DPOTrainer reads.
"""

from __future__ import annotations

import logging
from typing import Dict, List, NamedTuple, Set, Tuple

import numpy as np
import torch

from qwenvl_ft.config.data import DataConfig, Overlength
from qwenvl_ft.data.collate import RowDropped, SampleStats, VisionChatCollator
from qwenvl_ft.data.workers import one_thread
from qwenvl_ft.errors import DataError

log = logging.getLogger("qwenvl_ft")

REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


class EncodedPair(NamedTuple):
    prompt: np.ndarray  # token ids, every image placeholder expanded to its visual tokens
    chosen: np.ndarray  # token ids of the chosen answer as TRL renders it (the rest of prompt + answer)
    rejected: np.ndarray
    vision: Dict[str, torch.Tensor]  # pixel_values, image_grid_thw of the pair's images (empty without images)


class VisionPreferenceCollator:
    def __init__(self, processor, data_cfg: DataConfig):
        self.processor = processor
        self.cfg = data_cfg
        self.images = VisionChatCollator(processor, data_cfg)
        tokenizer = processor.tokenizer
        self.tokenizer = tokenizer
        self.vision_end_id = tokenizer.convert_tokens_to_ids("<|vision_end|>")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def __call__(self, rows: List[dict]) -> Dict[str, torch.Tensor]:
        with one_thread():  # as in a DataLoader worker (qwenvl_ft/data/workers.py)
            return self.collate(rows)

    def collate(self, rows: List[dict]) -> Dict[str, torch.Tensor]:
        pairs = [self.encode_pair(row) for row in rows]
        batch = self.batch(pairs)
        dropped = self.overlong_pairs(batch, rows)
        if dropped:
            rows = [row for index, row in enumerate(rows) if index not in dropped]
            if not rows:
                raise DataError(f"every pair of a batch was dropped for exceeding data.max_length="
                                f"{self.cfg.max_length}; raise data.max_length or lower data.max_pixels")
            batch = self.batch([pair for index, pair in enumerate(pairs) if index not in dropped])
        limit = self.cfg.max_length
        if limit is not None:
            for key in ("input_ids", "attention_mask", "completion_mask", "mm_token_type_ids"):
                batch[key] = batch[key][:, :limit]
        for key in REF_KEYS:
            if key in rows[0]:
                batch[key] = torch.tensor([float(row[key]) for row in rows])
        return batch

    def encode_pair(self, row: dict) -> EncodedPair:
        visuals = self.images.load_visuals(row)
        prompt, chosen, rejected, _ = self._token_ids(row, visuals)
        vision = self.images.vision_features(visuals) if visuals.images else {}
        return EncodedPair(prompt, chosen, rejected, vision)

    def measure(self, row: dict) -> SampleStats:
        """What `encode_pair` and the batch's length policy would make of this pair, without pixel values: the
        data check's measurer for preference pairs. `length` is the longer of prompt + chosen and prompt +
        rejected after data.overlength; label tokens count both answers. Raises DataError for an invalid pair and
        RowDropped for one data.overlength leaves out."""
        source = row.get("source", "?")
        visuals = self.images.load_visuals(row, resize=False)
        prompt, chosen, rejected, image_tokens = self._token_ids(row, visuals)
        full = len(prompt) + max(len(chosen), len(rejected))
        length = full
        limit = self.cfg.max_length
        if limit is not None and full > limit:
            self._fit(prompt, full, limit, source)
            length = limit
        kept = [min(len(a), max(0, length - len(prompt))) for a in (chosen, rejected)]
        return SampleStats(source=source, length=length, full_length=full, text_tokens=full - sum(image_tokens),
                           label_tokens=sum(kept), image_sizes=visuals.image_sizes, image_tokens=image_tokens,
                           video_sizes=[], video_tokens=[])

    def _fit(self, prompt: np.ndarray, length: int, limit: int, source: str) -> None:
        """data.overlength for a pair whose longer sequence has `length` tokens: raise for error and drop, and for
        truncate_text when the cut would fall inside an image or leave no answer token (the batch's rules)."""
        over = f"{source}: {length} tokens, over data.max_length={limit}"
        policy = self.cfg.overlength
        if policy == Overlength.error:
            raise DataError(f"{over} (data.overlength=error; raise data.max_length, lower data.max_pixels, or set "
                            f"data.overlength to truncate_text or drop)")
        if policy == Overlength.drop:
            raise RowDropped(f"{over}: dropped (data.overlength=drop)")
        vision_ends = np.flatnonzero(prompt == self.vision_end_id)
        if len(vision_ends) and int(vision_ends[-1]) >= limit:
            raise RowDropped(f"{over}: dropped, the cut would fall inside an image (its vision tokens end at "
                             f"position {int(vision_ends[-1])})")
        if len(prompt) >= limit:
            raise RowDropped(f"{over}: dropped, the cut would remove every answer token")

    def _token_ids(self, row: dict, visuals) -> Tuple[np.ndarray, np.ndarray, np.ndarray, List[int]]:
        """(prompt with every image placeholder expanded, chosen, rejected) token ids, as TRL renders the pair,
        and the visual tokens of each image."""
        from trl.data_utils import apply_chat_template

        source = row.get("source", "?")
        if visuals.videos:
            raise DataError(f"{source}: field 'videos': preference pairs take images only")
        try:
            texts = apply_chat_template({key: row[key] for key in ("prompt", "chosen", "rejected")}, self.processor)
        except (KeyError, ValueError) as err:
            raise DataError(f"{source}: cannot render the pair with the chat template: {err}") from None
        prompt, chosen, rejected = (np.asarray(self.tokenizer(texts[key], add_special_tokens=False)["input_ids"],
                                               dtype=np.int64) for key in ("prompt", "chosen", "rejected"))
        placeholders = prompt == self.images.image_pad_id
        prompt, origin = self.images.expand_placeholders(prompt, visuals, source)
        image_tokens = [int(n) for n in np.bincount(origin, minlength=len(placeholders))[placeholders]]
        for name, answer in (("chosen", chosen), ("rejected", rejected)):
            if np.isin(answer, (self.images.image_pad_id, self.images.video_pad_id)).any():
                raise DataError(f"{source}: field '{name}': an answer cannot contain an image")
        return prompt, chosen, rejected, image_tokens

    def batch(self, pairs: List[EncodedPair]) -> Dict[str, torch.Tensor]:
        """TRL's layout: every pair's prompt + chosen, then every pair's prompt + rejected, right-padded."""
        sequences = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
        longest = max(len(prompt) + len(answer) for prompt, answer in sequences)
        input_ids = np.full((len(sequences), longest), self.pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(sequences), longest), dtype=np.int64)
        completion_mask = np.zeros_like(attention_mask)
        for index, (prompt, answer) in enumerate(sequences):
            end = len(prompt) + len(answer)
            input_ids[index, :len(prompt)], input_ids[index, len(prompt):end] = prompt, answer
            attention_mask[index, :end] = 1
            completion_mask[index, len(prompt):end] = 1
        # image tokens occur in prompts only (encode_pair checks the answers), never as padding
        batch = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask),
                 "completion_mask": torch.from_numpy(completion_mask),
                 "mm_token_type_ids": torch.from_numpy(self.images.token_types(input_ids))}
        vision = [p.vision for p in pairs if p.vision]
        if vision:
            # the rejected sequences' images are the chosen ones' again (the model's vision hook encodes them once)
            batch["pixel_values"] = torch.cat([v["pixel_values"] for v in vision] * 2)
            batch["image_grid_thw"] = torch.cat([v["image_grid_thw"] for v in vision] * 2)
        return batch

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
