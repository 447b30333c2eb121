"""The worst-case batch of one device step, in tokens, image tokens and ViT patches: padded rows of
data.max_length, or a full pack / token budget, each row holding its image budget (data.max_visual_tokens, else
the images at data.max_pixels, else at the family's processor default).
"""

from __future__ import annotations

from dataclasses import dataclass

from qwenvl_ft import families
from qwenvl_ft.config.data import DataConfig
from qwenvl_ft.errors import ConfigError


@dataclass
class BatchBudget:
    rows: int  # sequences per device step
    tokens: int  # language-model tokens per device step
    visual_tokens: int  # of which image tokens (after the 2x2 merge)
    vision_patches: int  # ViT tokens (before the merge)
    note: str
    row_patches: int = 0  # ViT patches of one row's images (the FLOPs estimate treats them as one image)


def batch_budget(data_cfg: DataConfig, batch_size: int, family: families.Family, pairs: bool = False) -> BatchBudget:
    """The worst-case batch of one device step, for a model of `family` (its merge size, pixels per visual token
    and default image size). `pairs`: DPO, trainer.batch_size pairs = a chosen and a rejected sequence each, whose
    images the vision tower encodes once (modeling/padding_free.py: share_pair_images)."""
    merge, factor = family.merge_size, family.factor
    max_length = data_cfg.max_length
    if max_length is None and data_cfg.max_tokens_per_batch is None:
        raise ConfigError("estimate needs data.max_length or data.max_tokens_per_batch to size a batch")
    encoded_rows = None
    if pairs:
        if max_length is None:
            raise ConfigError("estimate of a DPO run needs data.max_length to size a batch")
        rows, tokens, encoded_rows = 2 * batch_size, 2 * batch_size * max_length, batch_size
        note = f"{batch_size} pairs = {rows} rows (chosen, rejected) of data.max_length={max_length}"
        if data_cfg.packing:
            note += " (run without their padding; the worst case has none)"
    elif data_cfg.packing or data_cfg.max_tokens_per_batch is not None:
        from qwenvl_ft.data.batching import token_budget

        tokens = token_budget(data_cfg, batch_size)
        rows = max(1, tokens // max_length) if max_length else 1
        layout = "a full pack" if data_cfg.packing else "a full token budget"
        note = f"{layout} of {tokens} tokens = {rows} rows of {max_length or tokens}"
    else:
        rows, tokens = batch_size, batch_size * max_length
        note = f"{rows} padded rows of data.max_length={max_length}"
    if data_cfg.resized_height is not None:
        pixels, source = data_cfg.resized_height * data_cfg.resized_width, "the fixed resize"
    else:
        pixels = data_cfg.max_pixels or family.image_max_pixels
        source = "data.max_pixels" if data_cfg.max_pixels else "the processor's default max_pixels"
    per_image = max(1, pixels // (factor * factor))
    per_row = per_image * (data_cfg.max_images_per_row or 1)
    if data_cfg.max_visual_tokens is not None:
        per_row, source = min(per_row, data_cfg.max_visual_tokens), "data.max_visual_tokens"
    per_row = min(per_row, tokens // rows)
    note += f", each with {per_row} image tokens ({source})"
    if encoded_rows is not None:
        note += ", encoded once per pair"
    encoded = (encoded_rows or rows) * per_row  # image tokens through the vision tower
    return BatchBudget(rows, tokens, encoded, encoded * merge * merge, note, per_row * merge * merge)
