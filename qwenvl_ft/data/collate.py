"""The multimodal collator: canonical rows -> model inputs with labels on assistant turns only (or, with
data.train_on_prompt, on every token but the images' and videos').

Why our own: TRL's `DataCollatorForVisionLanguageModeling` trains on assistant tokens only through
`{% generation %}` markers, which the Qwen-VL models' real chat templates do not have, and it cannot say which row
broke.

The work is split so that other batch layouts (packing) reuse the per-sample part:
  `encode(row)`  -> one sample's token ids, labels, M-RoPE token types and vision tensors (1-D / per-image);
                    `encode_rows(rows)` the same for a batch's rows, their images in one processor call;
  `pad(samples)` -> a right-padded batch;
  `measure(row)` -> what `encode` would produce (lengths, visual tokens, sizes), through the same code but without
                    the pixel arithmetic: what `data-check` runs on every row.

Per sample, every image is read and decoded once (qwenvl_ft/data/images.py), sized by qwen-vl-utils'
`smart_resize` then the processor's (the tutorials' pipeline), resized once with torchvision's antialiased bicubic
(the image processor's own resize) and handed to the processor's torchvision backend with `do_resize=False`: the
naive pipeline resizes each image twice, first with PIL. Text is tokenised once with one placeholder per image and
the placeholders are expanded by id; special tokens are atomic, so this equals the processor's string expansion
(tests/test_data_collate.py compares the two, for every model family) while costing one short tokenisation instead
of one over thousands of `<|image_pad|>`, and it gives the length without processing any pixels. What a video
placeholder expands to is the family's (`video_tokens`: pads only, or timestamped spans per temporal patch), as
are the processor's resize rule and any video timing input (qwenvl_ft/families).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from qwenvl_ft import families
from qwenvl_ft.config.data import DataConfig, Overlength
from qwenvl_ft.data.grounding import box_patches, write_objects
from qwenvl_ft.data.images import ImageLimits, load_image
from qwenvl_ft.data.sample_info import SampleStats, Visuals  # noqa: F401  (re-exported)
from qwenvl_ft.data.turns import assistant_label_mask, prompt_messages, reference_answer, render_chat
from qwenvl_ft.data.video import Sampling, load_video, video_wrapper_replaced
from qwenvl_ft.data.workers import one_thread
from qwenvl_ft.errors import DataError
from qwenvl_ft.families import IMAGE, TEXT, VIDEO  # noqa: F401  (values of mm_token_type_ids, re-exported)

IGNORE_INDEX = -100
# Per-token tensors of a sample; every other key is per image / per video (pixel values, grids, video timing),
# and a batch (padded or packed) concatenates those in row order.
TOKEN_KEYS = ("input_ids", "labels", "mm_token_type_ids", "attention_mask", "position_ids")


def concat_vision(samples: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """The samples' vision tensors, each key concatenated over the samples that have it."""
    keys = dict.fromkeys(key for s in samples for key in s if key not in TOKEN_KEYS)
    return {key: torch.cat([s[key] for s in samples if key in s]) for key in keys}


class RowDropped(DataError):
    """A valid row that does not fit data.max_length under data.overlength: dropped and counted, not an error."""


class VisionChatCollator:
    """Applies the chat template, expands vision tokens and builds labels. Pickles (DataLoader workers)."""

    def __init__(self, processor, data_cfg: DataConfig):
        from qwen_vl_utils.vision_process import VIDEO_MAX_TOKEN_NUM, VIDEO_MIN_TOKEN_NUM

        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.cfg = data_cfg
        self.family_name = families.of_processor(processor).name
        self.limits = ImageLimits.from_config(data_cfg)
        ids = self.tokenizer.convert_tokens_to_ids
        self.vision_start_id, self.vision_end_id = ids("<|vision_start|>"), ids("<|vision_end|>")
        self.image_pad_id, self.video_pad_id = ids("<|image_pad|>"), ids("<|video_pad|>")
        self._text_ids: Dict[str, List[int]] = {}  # timestamps and other text a video placeholder expands to
        self._headers: Dict[Tuple[int, ...], str] = {}  # turn headers' text (assistant_label_mask)
        self.video_wrapper_replaced = video_wrapper_replaced(processor)
        # Never targets with data.train_on_prompt: the vision span and its markers (the SFT tutorial that trains on
        # the whole sequence masks exactly these); a video's timestamps stand for its <|video_pad|>, so are masked.
        self.vision_token_ids = np.asarray([self.vision_start_id, self.vision_end_id, self.image_pad_id,
                                            self.video_pad_id])
        image_processor = processor.image_processor
        self.patch_size = image_processor.patch_size
        self.merge_size = image_processor.merge_size
        self.factor = self.patch_size * self.merge_size
        size = image_processor.size
        self.processor_min_pixels = size.get("shortest_edge") or size.get("min_pixels")
        self.processor_max_pixels = size.get("longest_edge") or size.get("max_pixels")
        self.min_pixels = data_cfg.min_pixels or self.processor_min_pixels
        self.max_pixels = data_cfg.max_pixels or self.processor_max_pixels
        self.temporal_patch_size = getattr(getattr(processor, "video_processor", None), "temporal_patch_size", 2)
        # qwen-vl-utils' per-frame bounds (what Qwen's inference uses), not the video processor's size: build_processor
        # hands data.min/max_pixels to every sub-processor, and frames reach the processor already resized anyway.
        self.video_min_pixels = data_cfg.video_min_pixels or VIDEO_MIN_TOKEN_NUM * self.factor ** 2
        self.video_max_pixels = data_cfg.video_max_pixels or VIDEO_MAX_TOKEN_NUM * self.factor ** 2
        self.sampling = Sampling(data_cfg.video_fps, data_cfg.video_nframes, data_cfg.video_max_frames)

    @property
    def family(self) -> families.Family:
        """The declaration of the processor's model family (looked up by name: the collator pickles)."""
        return families.get(self.family_name)

    # -- sizes -------------------------------------------------------------------------------------------------

    def image_hw(self, width: int, height: int, where: str) -> Tuple[int, int]:
        """(height, width) the model sees: qwen-vl-utils' resize (bounds, or the fixed size), then the processor's
        (a no-op unless its bounds are tighter), as in the tutorials' pipeline."""
        from qwen_vl_utils import smart_resize as loader_resize

        processor_resize = self.family.resize_function()
        try:
            if self.cfg.resized_height is not None:
                h, w = loader_resize(self.cfg.resized_height, self.cfg.resized_width, factor=self.factor)
            else:
                h, w = loader_resize(height, width, factor=self.factor, min_pixels=self.min_pixels,
                                     max_pixels=self.max_pixels)
            return processor_resize(h, w, factor=self.factor, min_pixels=self.processor_min_pixels,
                                    max_pixels=self.processor_max_pixels)
        except ValueError:  # smart_resize refuses an aspect ratio over 200:1
            ratio = max(width, height) / max(1, min(width, height))
            raise DataError(f"{where}: image of {width}x{height} has an aspect ratio of {ratio:.0f}:1; "
                            f"{self.family.title} accepts at most 200:1 (crop or pad it)") from None

    def image_tokens(self, width: int, height: int, where: str = "?") -> int:
        """Language-model tokens of one image of this stored size."""
        return self._tokens(self._grid(1, *self.image_hw(width, height, where)))

    def video_hw(self, width: int, height: int, frames: int, budget: Optional[int], where: str) -> Tuple[int, int]:
        """(height, width) of every frame: within data.video_min/max_pixels, shrunk so that the video fits in
        `budget` visual tokens when there is one (qwen-vl-utils' total_pixels rule, as a token count)."""
        from qwen_vl_utils import smart_resize as loader_resize

        max_pixels = self.video_max_pixels
        if budget is not None:
            pairs = -(-frames // self.temporal_patch_size)
            max_pixels = min(max_pixels, budget * self.factor ** 2 // max(pairs, 1))
            if max_pixels < self.video_min_pixels:
                raise DataError(f"{where}: a video of {frames} frames does not fit in the {budget} visual tokens "
                                f"left by data.max_visual_tokens even at data.video_min_pixels="
                                f"{self.video_min_pixels}; sample fewer frames (data.video_fps, data.video_nframes)")
        try:
            if self.cfg.resized_height is not None:
                return loader_resize(self.cfg.resized_height, self.cfg.resized_width, factor=self.factor)
            return loader_resize(height, width, factor=self.factor, min_pixels=self.video_min_pixels,
                                 max_pixels=max_pixels)
        except ValueError:
            ratio = max(width, height) / max(1, min(width, height))
            raise DataError(f"{where}: video of {width}x{height} has an aspect ratio of {ratio:.0f}:1; "
                            f"{self.family.title} accepts at most 200:1") from None

    def _grid(self, frames: int, height: int, width: int) -> Tuple[int, int, int]:
        return (-(-frames // self.temporal_patch_size) if frames > 1 else 1, height // self.patch_size,
                width // self.patch_size)

    def _tokens(self, grid: Tuple[int, int, int]) -> int:
        return grid[0] * grid[1] * grid[2] // self.merge_size ** 2

    # -- images and videos -------------------------------------------------------------------------------------

    def load_visuals(self, row: dict, resize: bool = True) -> Visuals:
        from torchvision.transforms.v2 import functional as tvF

        source = row.get("source", "?")
        refs = list(row.get("images") or [])
        cap = self.cfg.max_images_per_row
        if cap is not None and len(refs) > cap:
            raise DataError(f"{source}: field 'images': {len(refs)} images, over data.max_images_per_row={cap}")
        visuals = Visuals()
        for index, ref in enumerate(refs):
            where = f"{source}: images[{index}]"
            image, (width, height) = load_image(ref, where, self.limits,
                                                target=lambda w, h: self.image_hw(w, h, where)[::-1])
            h, w = self.image_hw(width, height, where)
            visuals.image_sizes.append((width, height))
            visuals.image_grids.append(self._grid(1, h, w))
            if resize:
                pixels = tvF.pil_to_tensor(image)
                if pixels.shape[-2:] != (h, w):
                    pixels = tvF.resize(pixels, [h, w], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
                visuals.images.append(pixels.contiguous())
        budget = self.cfg.max_visual_tokens
        used = sum(self._tokens(g) for g in visuals.image_grids)
        if budget is not None and used > budget:
            raise DataError(f"{source}: field 'images': {used} visual tokens, over data.max_visual_tokens={budget} "
                            f"(lower data.max_pixels or data.max_images_per_row)")
        for index, ref in enumerate(row.get("videos") or []):
            where = f"{source}: videos[{index}]"
            left = None if budget is None else budget - used

            def frame_size(width, height, frames, where=where, left=left):
                return self.video_hw(width, height, frames, left, where)

            video = load_video(ref, where, self.limits, self.sampling, frame_size)
            frames, _, h, w = video.frames.shape
            grid = self._grid(frames, h, w)
            used += self._tokens(grid)
            visuals.video_grids.append(grid)
            visuals.video_sizes.append((video.source_frames, *video.source_size))
            visuals.video_fps.append(video.sample_fps)
            visuals.video_frame_times.append(video.frame_times)
            visuals.videos.append(video.frames)
        return visuals

    def vision_features(self, visuals: Visuals) -> Dict[str, torch.Tensor]:
        """Pixel values and grids from the processor's torchvision backend; our resize already happened."""
        out: Dict[str, torch.Tensor] = {}
        if visuals.images:
            features = self.processor.image_processor(images=visuals.images, do_resize=False, return_tensors="pt")
            out["pixel_values"], out["image_grid_thw"] = features["pixel_values"], features["image_grid_thw"]
            self._same_grids(out["image_grid_thw"], visuals.image_grids)
        if visuals.videos:
            features = self.processor.video_processor(videos=visuals.videos, do_resize=False, do_sample_frames=False,
                                                      cap_pixels_per_frame=False, return_tensors="pt")
            out["pixel_values_videos"] = features["pixel_values_videos"]
            out["video_grid_thw"] = features["video_grid_thw"]
            self._same_grids(out["video_grid_thw"], visuals.video_grids)
            seconds = self.family.video_seconds_input  # seconds per temporal patch, where the model takes them
            if seconds is not None:
                out[seconds] = torch.tensor([self.temporal_patch_size / fps for fps in visuals.video_fps])
        return out

    @staticmethod
    def _same_grids(actual: torch.Tensor, planned: List[Tuple[int, int, int]]) -> None:
        if actual.tolist() != [list(g) for g in planned]:  # a processor change, not bad data
            raise RuntimeError(f"the processor made grids {actual.tolist()} where the collator planned {planned}")

    # -- one sample --------------------------------------------------------------------------------------------

    def render(self, messages: List[dict], add_generation_prompt: bool = False) -> str:
        """The chat template's text; reasoning stripped or kept (data.thinking), data.enable_thinking for a prompt."""
        return render_chat(self.processor, messages, self.cfg, add_generation_prompt)

    def grounded(self, row: dict, visuals: Visuals) -> List[dict]:
        """The row's messages with its objects (data.grounding) written for the sizes its images are shown at."""
        return write_objects(row, self.shown_sizes(visuals), self.family.box_convention, self.cfg.grounding)

    def shown_sizes(self, visuals: Visuals) -> List[Tuple[Tuple[int, int], Tuple[int, int]]]:
        """(stored, shown) (width, height) of each image."""
        shown = [(g[2] * self.patch_size, g[1] * self.patch_size) for g in visuals.image_grids]
        return list(zip(visuals.image_sizes, shown))

    def reference(self, row: dict) -> str:
        """The row's last answer as training sees it (its objects written, which needs its images' sizes)."""
        if not row.get("objects"):
            return reference_answer(row)
        return reference_answer(dict(row, messages=self.grounded(row, self.load_visuals(row, resize=False))))

    def text_tokens(self, row: dict, visuals: Visuals, prompt_only: bool = False) -> Tuple[np.ndarray, np.ndarray]:
        """(token ids of the rendered text, with one placeholder per image or video; which of them are trained on).
        A training row the data check measured carries both (`text_ids`, `label_mask`: what this computed then,
        under the same processor and data settings, which key the cache entry); others are rendered and
        tokenised here."""
        if not prompt_only and row.get("text_ids") is not None:
            return np.asarray(row["text_ids"], dtype=np.int64), np.asarray(row["label_mask"], dtype=bool)
        row = dict(row, messages=self.grounded(row, visuals))
        text = self.render(prompt_messages(row), add_generation_prompt=True) if prompt_only else \
            self.render(row["messages"])
        ids = np.asarray(self.tokenizer(text)["input_ids"], dtype=np.int64)
        if self.cfg.train_on_prompt:  # every token but the vision span's
            return ids, ~np.isin(ids, self.vision_token_ids)
        return ids, assistant_label_mask(ids.tolist(), self.tokenizer, self._headers).numpy()

    def _tokens_and_labels(self, row: dict, visuals: Visuals, prompt_only: bool = False,
                           text: Optional[Tuple[np.ndarray, np.ndarray]] = None) -> Dict[str, torch.Tensor]:
        # NumPy, not torch, for these small index operations: torch's intra-op thread pool makes each of them cost
        # milliseconds on a busy machine (a DataLoader worker shares its cores with the others).
        ids, mask = text if text is not None else self.text_tokens(row, visuals, prompt_only)
        input_ids, origin = self.expand_placeholders(ids, visuals, row.get("source", "?"))
        labels = np.where(mask[origin], input_ids, IGNORE_INDEX)
        return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
                "mm_token_type_ids": torch.from_numpy(self.token_types(input_ids))}

    def expand_placeholders(self, ids: np.ndarray, visuals: Visuals, source: str) -> Tuple[np.ndarray, np.ndarray]:
        """(model input ids, index into `ids` of the token each of them stands for). Every <|image_pad|> becomes
        as many pads as its image has visual tokens, every <|video_pad|> what the family expands a video to (pads,
        or timestamped spans per temporal patch), replacing the chat template's vision markers around it too where
        the installed processor does (`video_wrapper_replaced`); every other token stays. Expanding by id after
        tokenising gives the processor's tokens without tokenising a string of hundreds of placeholders."""
        # first index replaced -> (end of the replaced span, index of the placeholder, what replaces the span)
        expansions: Dict[int, Tuple[int, int, np.ndarray]] = {}
        for pad_id, grids, kind in ((self.image_pad_id, visuals.image_grids, "image"),
                                    (self.video_pad_id, visuals.video_grids, "video")):
            positions = np.flatnonzero(ids == pad_id)
            if len(positions) != len(grids):
                raise DataError(f"{source}: the rendered text has {len(positions)} {kind} placeholder(s) for "
                                f"{len(grids)} {kind}(s) (does a text contain a literal <|{kind}_pad|>?)")
            for index, (position, grid) in enumerate(zip(positions.tolist(), grids)):
                if kind == "image":
                    expansions[position] = (position + 1, position, np.full(self._tokens(grid), pad_id, dtype=np.int64))
                    continue
                first, end = self._video_span(ids, position)
                tokens = np.asarray(self.video_tokens(grid, visuals.video_frame_times[index]), dtype=np.int64)
                expansions[first] = (end, position, tokens)
        if not expansions:
            return ids, np.arange(len(ids))
        pieces, origin, start = [], [], 0
        for first in sorted(expansions):
            end, placeholder, tokens = expansions[first]
            pieces += [ids[start:first], tokens]
            origin += [np.arange(start, first), np.full(len(tokens), placeholder)]
            start = end
        pieces.append(ids[start:])
        origin.append(np.arange(start, len(ids)))
        return np.concatenate(pieces), np.concatenate(origin)

    def _video_span(self, ids: np.ndarray, position: int) -> Tuple[int, int]:
        """The tokens a video's expansion replaces: its <|video_pad|>, and the <|vision_start|> ... <|vision_end|>
        around it where the processor replaces that whole wrapper (it does so only for the exact wrapper text)."""
        wrapped = 0 < position < len(ids) - 1 and ids[position - 1] == self.vision_start_id \
            and ids[position + 1] == self.vision_end_id
        return (position - 1, position + 2) if self.video_wrapper_replaced and wrapped else (position, position + 1)

    def video_tokens(self, grid: Tuple[int, int, int], frame_times: List[float]) -> List[int]:
        ids = {"video_pad": self.video_pad_id, "vision_start": self.vision_start_id, "vision_end": self.vision_end_id}
        return self.family.video_tokens(grid, frame_times, self.temporal_patch_size, self.merge_size, ids,
                                        self._encode_text)

    def _encode_text(self, text: str) -> List[int]:
        if text not in self._text_ids:
            self._text_ids[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._text_ids[text]

    def token_types(self, input_ids: np.ndarray) -> np.ndarray:
        """mm_token_type_ids: which tokens are image / video tokens (M-RoPE gives them 3-D positions)."""
        types = (input_ids == self.image_pad_id) * IMAGE + (input_ids == self.video_pad_id) * VIDEO
        return types.astype(np.int64)

    def encode(self, row: dict) -> Dict[str, torch.Tensor]:
        """One training sample: input_ids, labels, mm_token_type_ids (1-D) and, when the row has them,
        pixel_values / image_grid_thw, pixel_values_videos / video_grid_thw (/ the family's video timing input)."""
        return self.encode_rows([row])[0]

    def encode_rows(self, rows: List[dict]) -> List[Dict[str, torch.Tensor]]:
        """`encode` of each row, with the images of all of them in one image-processor call: a call costs about
        0.1 ms of argument checks besides its pixels (8 caption rows: 1.2 ms in one call, 1.9 ms in eight). The
        processor works image by image, so each sample is the one its own call gives."""
        visuals = [self.load_visuals(row) for row in rows]
        samples = [self.fit_length(self._tokens_and_labels(row, v), row.get("source", "?"))
                   for row, v in zip(rows, visuals)]
        grids = [grid for v in visuals for grid in v.image_grids]
        images = self.vision_features(Visuals(images=[i for v in visuals for i in v.images], image_grids=grids))
        patches = images["pixel_values"].split([t * h * w for t, h, w in grids]) if images else ()
        start = 0
        for sample, v in zip(samples, visuals):
            if v.images:
                sample["pixel_values"] = torch.cat(patches[start: start + len(v.images)])
                sample["image_grid_thw"] = images["image_grid_thw"][start: start + len(v.images)]
            start += len(v.images)
            sample.update(self.vision_features(dataclasses.replace(v, images=[], image_grids=[])))  # its videos
        return samples

    def measure(self, row: dict) -> SampleStats:
        """Everything `encode` checks and counts, without computing pixel values. Raises DataError for an invalid
        row and RowDropped for one data.overlength drops."""
        visuals = self.load_visuals(row, resize=False)
        text = self.text_tokens(dict(row, text_ids=None), visuals)
        sample = self._tokens_and_labels(row, visuals, text=text)
        full_length = sample["input_ids"].numel()
        sample = self.fit_length(sample, row.get("source", "?"))
        image_tokens = [self._tokens(g) for g in visuals.image_grids]
        video_tokens = [self._tokens(g) for g in visuals.video_grids]
        return SampleStats(
            source=row.get("source", "?"), length=sample["input_ids"].numel(), full_length=full_length,
            text_tokens=full_length - sum(image_tokens) - sum(video_tokens),
            label_tokens=int((sample["labels"] != IGNORE_INDEX).sum()),
            image_sizes=visuals.image_sizes, image_tokens=image_tokens,
            video_sizes=visuals.video_sizes, video_tokens=video_tokens,
            box_patches=box_patches(row, self.shown_sizes(visuals), self.family.box_convention, self.cfg.grounding,
                                    self.patch_size),
            text_ids=text[0].tolist(), label_mask=text[1].tolist())

    def fit_length(self, sample: Dict[str, torch.Tensor], where: str) -> Dict[str, torch.Tensor]:
        """Apply data.max_length under data.overlength. A cut never falls inside a vision span: a vision span
        cut short is what makes the model fail with "image features and image tokens do not match"."""
        limit = self.cfg.max_length
        length = sample["input_ids"].numel()
        if limit is None or length <= limit:
            return sample
        policy = self.cfg.overlength
        over = f"{where}: {length} tokens, over data.max_length={limit}"
        if policy == Overlength.error:
            raise DataError(f"{over} (data.overlength=error; raise data.max_length, lower data.max_pixels, or set "
                            f"data.overlength to truncate_text or drop)")
        if policy == Overlength.drop:
            raise RowDropped(f"{over}: dropped (data.overlength=drop)")
        vision_ends = (sample["input_ids"] == self.vision_end_id).nonzero()
        if len(vision_ends) and int(vision_ends[-1]) >= limit:
            raise RowDropped(f"{over}: dropped, the cut would fall inside an image or video (its vision tokens end "
                             f"at position {int(vision_ends[-1])})")
        answer = assistant_label_mask(sample["input_ids"][:limit].tolist(), self.tokenizer, self._headers) \
            if self.cfg.train_on_prompt else sample["labels"][:limit] != IGNORE_INDEX
        if not answer.any():
            raise RowDropped(f"{over}: dropped, the cut would remove every assistant token")
        return {key: value[:limit] for key, value in sample.items()}

    # -- a batch -----------------------------------------------------------------------------------------------

    def pad(self, samples: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        longest = max(s["input_ids"].numel() for s in samples)

        def stack(key: str, fill: int) -> torch.Tensor:
            out = torch.full((len(samples), longest), fill, dtype=samples[0][key].dtype)
            for i, s in enumerate(samples):
                out[i, : s[key].numel()] = s[key]
            return out

        batch = {"input_ids": stack("input_ids", self.tokenizer.pad_token_id)}
        if "labels" in samples[0]:
            batch["labels"] = stack("labels", IGNORE_INDEX)
        batch["mm_token_type_ids"] = stack("mm_token_type_ids", TEXT)
        lengths = torch.tensor([s["input_ids"].numel() for s in samples])
        batch["attention_mask"] = (torch.arange(longest)[None, :] < lengths[:, None]).long()
        batch.update(concat_vision(samples))
        return batch

    def __call__(self, rows: List[dict]) -> Dict[str, torch.Tensor]:
        with one_thread():
            return self.pad(self.encode_rows(rows))

    # -- generation --------------------------------------------------------------------------------------------

    def generation_batch(self, rows: List[dict]):
        """Prompts (every turn but the last assistant answer) left-padded for `generate`, with the same images and
        videos training sees."""
        from transformers import BatchFeature

        samples = []
        for row in rows:
            visuals = self.load_visuals(row)
            sample = self._tokens_and_labels(row, visuals, prompt_only=True)
            del sample["labels"]
            sample.update(self.vision_features(visuals))
            samples.append(sample)
        batch = self.pad(samples)
        longest = batch["input_ids"].shape[1]
        for i, sample in enumerate(samples):  # right-padded -> left-padded: roll each row's padding to the front
            shift = longest - sample["input_ids"].numel()
            for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
                batch[key][i] = batch[key][i].roll(shift)
        return BatchFeature(batch)

