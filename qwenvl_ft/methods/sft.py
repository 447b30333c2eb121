"""Supervised fine-tuning: conversations in, loss on the assistant turns, TRL's SFTTrainer with our collator.

The declaration; its rows are qwenvl_ft/data/kinds.py's CONVERSATION_ROWS, its training qwenvl_ft/trainers/sft.py
(batch layouts: padded, length-grouped, token budget, packed).
"""

from __future__ import annotations

from qwenvl_ft.methods.base import Method

# The conversation layouts (qwenvl_ft/data/sources.py reads them; shapes.py generates the demo's).
FORMATS = {
    "shapes": "generated offline: coloured shapes and questions about them (the demo)",
    "llava": "`conversations` with from/value and <image> placeholders, `image` path(s) or base64",
    "messages": "OpenAI / TRL style `messages` with content lists and an `images` column",
    "self_llm": "caption layout: image path between <|vision_start|> and <|vision_end|> in the user text",
    "amazon": "column formatter for philschmid/amazon-product-descriptions-vlm",
    "columns": "any table: data.columns names the image and answer columns, data.prompt the user text",
    "auto": "detected per row: `messages` rows, `conversations` rows (self_llm when the first user text embeds "
            "<|vision_start|>path<|vision_end|>, llava otherwise)",
}


class Sft(Method):
    name = "sft"
    summary = "supervised fine-tuning on conversations, loss on the assistant turns (TRL SFTTrainer)"
    demo_recipe = "demo"
    data_formats = FORMATS
    generated_formats = ("shapes",)
    row_kind = "conversations"
    batch_unit = "rows"
    length_batching = True
    trains_on_prompt = True
    arguments_class = "trl:SFTConfig"
    argument_sources = {
        "remove_unused_columns": "qwenvl-ft (its collator needs the raw rows)",
        "dataset_kwargs": "qwenvl-ft (rows are processed by its collator)",
        "max_length": "data.max_length (the collator truncates, never inside an image)",
        "packing": "data.packing", "padding_free": "data.packing",
        "train_sampling_strategy": "data.group_by_length / data.max_tokens_per_batch",
    }
    rows = "qwenvl_ft.data.kinds:CONVERSATION_ROWS"
    training = "qwenvl_ft.trainers.sft:TRAINING"


METHOD = Sft()
