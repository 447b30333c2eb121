"""The model behind `qwenvl-ft chat`: a conversation of images, videos and text turned into the collator's rows, and
answers streamed token by token.

The model is loaded as `infer` loads it (qwenvl_ft/modeling/load.py: the base, base + adapter, or a merged
model) and prompts go through the training collator's `generation_batch`, so images and videos are sized, framed
and templated exactly as in training. With an adapter, the base model's answer comes from the same weights with the
adapter switched off (PEFT's `disable_adapter`), not from a second copy of the model.

Tokens are streamed with transformers' TextIteratorStreamer while `generate` runs in a worker thread. One
generation runs at a time (the adapter switch is a property of the one model); a closed stream (the page's stop
button, a closed tab) stops its generation at the next token.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional

from qwenvl_ft.config.commands import GenerationSettings
from qwenvl_ft.config.schema import ChatRunConfig
from qwenvl_ft.errors import ConfigError
from qwenvl_ft.errors import DataError

TUNED, BASE = "tuned", "base"  # the two views of a model with an adapter
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v"}
_ANSWER_SLOT = {"role": "assistant", "content": [{"type": "text", "text": ""}]}  # dropped from the prompt


@dataclass
class Turn:
    """One user message and the answers each view gave to it."""

    text: str
    images: List[str] = field(default_factory=list)
    videos: List[str] = field(default_factory=list)
    answers: Dict[str, str] = field(default_factory=dict)  # view -> answer
    annotated: Dict[str, str] = field(default_factory=dict)  # view -> the image with its answer's boxes drawn


def user_turn(text: str, files: List[str]) -> Turn:
    """A turn from the page's text box: files are images or videos by their suffix."""
    turn = Turn(text=(text or "").strip())
    for path in files:
        suffix = Path(path).suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            turn.images.append(path)
        elif suffix in VIDEO_SUFFIXES:
            turn.videos.append(path)
        else:
            raise DataError(f"{Path(path).name}: not a supported image ({', '.join(sorted(IMAGE_SUFFIXES))}) or "
                            f"video ({', '.join(sorted(VIDEO_SUFFIXES))})")
    if not turn.text and not turn.images and not turn.videos:
        raise DataError("the message is empty: type a question, attach an image or a video, or both")
    return turn


def conversation_row(turns: List[Turn], view: str, system_message: Optional[str] = None) -> dict:
    """The canonical row (qwenvl_ft/data/rows.py) of `turns` as `view` saw them, ending on the open question.
    Each user turn shows its images, then its videos, then its text, as the LLaVA layout does without
    placeholders."""
    messages, images, videos = [], [], []
    if system_message:
        messages.append({"role": "system", "content": [{"type": "text", "text": system_message}]})
    for turn in turns:
        content = [{"type": "image", "text": None} for _ in turn.images]
        content += [{"type": "video", "text": None} for _ in turn.videos]
        if turn.text:
            content.append({"type": "text", "text": turn.text})
        messages.append({"role": "user", "content": content})
        images += turn.images
        videos += turn.videos
        if view in turn.answers:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": turn.answers[view]}]})
    messages.append(_ANSWER_SLOT)
    return {"messages": messages, "images": images, "videos": videos, "source": "chat"}


class ChatEngine:
    def __init__(self, model, collator, has_adapter: bool, description: str):
        self.model, self.collator = model, collator
        self.has_adapter = has_adapter
        self.description = description
        self._one_at_a_time = threading.Lock()

    @classmethod
    def load(cls, cfg: ChatRunConfig) -> "ChatEngine":
        import os

        from qwenvl_ft.data.collate import VisionChatCollator
        from qwenvl_ft.modeling.load import kind_of, load_base, load_processor, load_tuned

        path = Path(os.path.normpath(cfg.chat.model_path)) if cfg.chat.model_path else None
        if path is not None and not path.exists():
            raise ConfigError(f"chat.model_path={path}: no such folder. Name the training run with run_name=NAME "
                              f"(as given to `qwenvl-ft train`), give the folder with chat.model_path=PATH, or chat "
                              f"with the base model: chat.model_path=null")
        kind = kind_of(path) if path is not None else None  # fails before anything loads
        processor = load_processor(cfg.model, cfg.data, path)
        model = load_base(cfg.model, cfg.adapter) if path is None else load_tuned(cfg.model, cfg.adapter, path)
        base = "random-weight tiny model" if cfg.model.random_init else cfg.model.name_or_path
        description = {None: f"base model {base}", "adapter": f"{base} + adapter {path}",
                       "model": f"fine-tuned model {path}"}[kind]
        return cls(model, VisionChatCollator(processor, cfg.data), kind == "adapter", description)

    @property
    def views(self) -> List[str]:
        return [TUNED, BASE] if self.has_adapter else [TUNED]

    def stream(self, row: dict, settings: GenerationSettings, view: str = TUNED) -> Iterator[str]:
        """The answer to `row` so far, after each new piece of text. `view` BASE switches the adapter off."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        if view == BASE and not self.has_adapter:
            raise ConfigError("the base-model view needs an adapter (chat.model_path names a full or merged model)")
        tokenizer = self.collator.tokenizer
        device = next(self.model.parameters()).device
        batch = self.collator.generation_batch([row]).to(device)
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = threading.Event()

        class Stopped(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

        failure: List[BaseException] = []

        def generate() -> None:
            try:
                with self._one_at_a_time, self._adapter_off(view == BASE), torch.no_grad():
                    self.model.generate(**batch, **settings.kwargs(), streamer=streamer, use_cache=True,
                                        stopping_criteria=StoppingCriteriaList([Stopped()]),
                                        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                                        pad_token_id=tokenizer.pad_token_id)
            except BaseException as err:  # reported in the caller's thread, after the stream ends
                failure.append(err)
                streamer.end()

        worker = threading.Thread(target=generate, name="qwenvl-ft-chat-generate", daemon=True)
        worker.start()
        text = ""
        try:
            for piece in streamer:
                text += piece
                yield text.strip()
        finally:
            stop.set()  # a closed stream stops its generation
            worker.join()
        if failure:
            raise failure[0]

    def answer(self, row: dict, settings: GenerationSettings, view: str = TUNED) -> str:
        text = ""
        for text in self.stream(row, settings, view):
            pass
        return text

    def annotate(self, row: dict, answer: str, folder: Path) -> Optional[str]:
        """A PNG in `folder` of the conversation's latest image with the answer's boxes and points drawn (in the
        family's convention for that image as the model saw it), or None when the answer holds none."""
        from qwenvl_ft.data.grounding import marks_in_image
        from qwenvl_ft.data.images import open_image
        from qwenvl_ft.grounding.draw import draw_marks

        if not row.get("images"):
            return None
        placed = marks_in_image(answer, row["images"][-1], self.collator)
        if not placed:
            return None
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"annotated_{len(list(folder.glob('annotated_*.png'))):04d}.png"
        draw_marks(open_image(row["images"][-1], "chat"), placed).save(path)
        return str(path)

    def _adapter_off(self, off: bool):
        return self.model.disable_adapter() if off else contextlib.nullcontext()
