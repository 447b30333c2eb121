"""The multimodal collator: canonical rows -> model inputs with labels on assistant turns only.

Why our own: TRL's `DataCollatorForVisionLanguageModeling` trains on assistant tokens only through
`{% generation %}` markers, which Qwen2-VL's real chat template does not have, and it cannot say which row broke.

The work is split in two so that other batch layouts (packing) reuse the per-sample part:
  `encode(row)`  -> one sample's token ids, labels, M-RoPE token types and vision tensors (1-D / per-image);
  `pad(samples)` -> a right-padded batch.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from qwenvl_ft.config.schema import DataConfig
from qwenvl_ft.data.images import open_image
from qwenvl_ft.errors import DataError

IGNORE_INDEX = -100


def assistant_label_mask(input_ids: Sequence[int], tokenizer) -> torch.Tensor:
    """True on the tokens of every assistant turn's content and its closing <|im_end|>; False elsewhere.

    Turns are found by token: each `<|im_start|>` is followed by the role and a newline, then the content up to
    `<|im_end|>`. The role is read by decoding the few tokens after `<|im_start|>`, so this works whatever the
    vocabulary merges "assistant\\n" into.
    """
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = list(input_ids)
    mask = torch.zeros(len(ids), dtype=torch.bool)
    for start in (i for i, t in enumerate(ids) if t == im_start):
        header_end = None
        for k in range(1, 9):
            if start + k >= len(ids):
                break
            if "\n" in tokenizer.decode(ids[start + 1: start + 1 + k]):
                header_end = start + 1 + k
                break
        if header_end is None:
            continue
        role = tokenizer.decode(ids[start + 1: header_end]).split("\n", 1)[0].strip()
        if role != "assistant":
            continue
        try:
            end = ids.index(im_end, header_end)
        except ValueError:  # truncated inside this turn: everything left is content
            end = len(ids) - 1
        mask[header_end: end + 1] = True
    return mask


class VisionChatCollator:
    """Applies the chat template, expands image tokens through the processor and builds labels."""

    def __init__(self, processor, data_cfg: DataConfig):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.cfg = data_cfg
        self.vision_end_id = self.tokenizer.convert_tokens_to_ids("<|vision_end|>")
        image_processor = processor.image_processor
        self.patch_size = image_processor.patch_size
        size = image_processor.size
        self.min_pixels = data_cfg.min_pixels or size.get("shortest_edge") or size.get("min_pixels")
        self.max_pixels = data_cfg.max_pixels or size.get("longest_edge") or size.get("max_pixels")

    # -- images ------------------------------------------------------------------------------------------------

    def load_images(self, row: dict) -> List:
        from qwen_vl_utils import fetch_image

        images = []
        for index, ref in enumerate(row["images"] or []):
            where = f"{row.get('source', '?')}: images[{index}]"
            image = open_image(ref, where)
            request = {"image": image, "min_pixels": self.min_pixels, "max_pixels": self.max_pixels}
            if self.cfg.resized_height is not None:
                request.update(resized_height=self.cfg.resized_height, resized_width=self.cfg.resized_width)
            try:
                images.append(fetch_image(request, image_patch_size=self.patch_size))
            except ValueError as err:  # e.g. aspect ratio over 200:1, which Qwen2-VL's resize rejects
                raise DataError(f"{where}: image of size {image.size[0]}x{image.size[1]} cannot be resized "
                                f"for the model ({err})") from None
        return images

    # -- one sample --------------------------------------------------------------------------------------------

    def render(self, messages: List[dict], add_generation_prompt: bool = False) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def encode(self, row: dict) -> Dict[str, torch.Tensor]:
        images = self.load_images(row)
        features = self.processor(text=[self.render(row["messages"])], images=images or None, return_tensors="pt")
        input_ids = features["input_ids"][0]
        labels = torch.where(assistant_label_mask(input_ids.tolist(), self.tokenizer), input_ids,
                             torch.full_like(input_ids, IGNORE_INDEX))
        sample = {"input_ids": input_ids, "labels": labels, "mm_token_type_ids": features["mm_token_type_ids"][0]}
        if images:
            sample["pixel_values"] = features["pixel_values"]
            sample["image_grid_thw"] = features["image_grid_thw"]
        return self.truncate(sample, row.get("source", "?"))

    def truncate(self, sample: Dict[str, torch.Tensor], where: str) -> Dict[str, torch.Tensor]:
        """Cut to data.max_length in text only: a cut inside a vision span would break the image."""
        limit = self.cfg.max_length
        length = sample["input_ids"].numel()
        if limit is None or length <= limit:
            return sample
        vision_ends = (sample["input_ids"] == self.vision_end_id).nonzero()
        if len(vision_ends) and int(vision_ends[-1]) >= limit:
            raise DataError(f"{where}: {length} tokens exceed data.max_length={limit} and the cut would fall "
                            f"inside an image (its vision tokens end at position {int(vision_ends[-1])}); "
                            f"raise data.max_length or lower data.max_pixels")
        if not (sample["labels"][:limit] != IGNORE_INDEX).any():
            raise DataError(f"{where}: {length} tokens exceed data.max_length={limit} and the cut would remove "
                            f"every assistant token")
        for key in ("input_ids", "labels", "mm_token_type_ids"):
            sample[key] = sample[key][:limit]
        return sample

    # -- a batch -----------------------------------------------------------------------------------------------

    def pad(self, samples: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        longest = max(s["input_ids"].numel() for s in samples)

        def stack(key: str, fill: int) -> torch.Tensor:
            out = torch.full((len(samples), longest), fill, dtype=samples[0][key].dtype)
            for i, s in enumerate(samples):
                out[i, : s[key].numel()] = s[key]
            return out

        batch = {
            "input_ids": stack("input_ids", self.tokenizer.pad_token_id),
            "labels": stack("labels", IGNORE_INDEX),
            "mm_token_type_ids": stack("mm_token_type_ids", 0),
        }
        lengths = torch.tensor([s["input_ids"].numel() for s in samples])
        batch["attention_mask"] = (torch.arange(longest)[None, :] < lengths[:, None]).long()
        with_images = [s for s in samples if "pixel_values" in s]
        if with_images:
            batch["pixel_values"] = torch.cat([s["pixel_values"] for s in with_images])
            batch["image_grid_thw"] = torch.cat([s["image_grid_thw"] for s in with_images])
        return batch

    def __call__(self, rows: List[dict]) -> Dict[str, torch.Tensor]:
        return self.pad([self.encode(row) for row in rows])

    # -- generation --------------------------------------------------------------------------------------------

    def generation_batch(self, rows: List[dict]) -> Dict[str, torch.Tensor]:
        """Prompts (every turn but the last assistant answer) left-padded for `generate`."""
        texts, images = [], []
        for row in rows:
            texts.append(self.render(prompt_messages(row), add_generation_prompt=True))
            images += self.load_images(row)
        return self.processor(text=texts, images=images or None, padding=True, padding_side="left",
                              return_tensors="pt")


def prompt_messages(row: dict) -> List[dict]:
    return row["messages"][:-1]


def reference_answer(row: dict) -> str:
    return "".join(i["text"] or "" for i in row["messages"][-1]["content"] if i["type"] == "text")

