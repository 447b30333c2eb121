"""Supervised fine-tuning: conversations in, loss on the assistant turns, TRL's SFTTrainer with our collator.

Batch layouts (padded, length-grouped, token budget, packed) are planned here from the data check's row lengths
(training/speed.py); the held-out generation check before and after training is the base class's.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from qwenvl_ft.methods.base import Method, TrainerParts

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

    def read_rows(self, data_cfg, problems: Optional[list] = None) -> Tuple[List[dict], List[dict]]:
        from qwenvl_ft.data.splitting import load_split_rows

        return load_split_rows(data_cfg, problems)

    def measurer(self, processor, data_cfg):
        return self.collator(processor, data_cfg).measure

    def to_dataset(self, rows: List[dict]):
        from qwenvl_ft.data.arrow import to_dataset

        return to_dataset(rows)

    def collator(self, processor, data_cfg):
        from qwenvl_ft.data.collate import VisionChatCollator

        return VisionChatCollator(processor, data_cfg)

    def store_kind(self):
        from qwenvl_ft.data.store import CONVERSATIONS

        return CONVERSATIONS

    def converters(self):
        from qwenvl_ft.data.converters import CONVERTERS

        return CONVERTERS

    def generate(self, data_cfg):
        from qwenvl_ft.data.shapes import generate

        return generate(data_cfg.shapes)

    def trainer_arguments(self, parts: TrainerParts, common: Dict):
        from trl import SFTConfig

        from qwenvl_ft.data.batching import training_batches
        from qwenvl_ft.data.packing import position_function

        cfg = parts.cfg
        batches = training_batches(cfg.data, cfg.trainer.batch_size, parts.collator, parts.train_rows,
                                   cfg.data.seed, lengths=parts.train_lengths,
                                   positions=position_function(parts.model_config) if parts.model_config else None)
        parts.state["batches"] = batches
        arguments = {**common, "per_device_train_batch_size": batches.per_device_batch_size}
        if batches.sampling_strategy is not None:
            arguments["train_sampling_strategy"] = batches.sampling_strategy
        return SFTConfig(
            **arguments,
            # The collator needs the raw rows; TRL must neither tokenise nor drop columns.
            remove_unused_columns=False,
            dataset_kwargs={"skip_prepare_dataset": True},
            max_length=None,  # truncation is the collator's (it never cuts an image)
        )

    def build_trainer(self, parts: TrainerParts):
        from peft import get_peft_model

        model = parts.model if parts.peft_config is None else get_peft_model(parts.model, parts.peft_config)
        return build_trainer(parts.cfg, model, parts.processor, parts.collator, parts.train_rows, parts.eval_rows,
                             parts)

    def result_line(self, metrics: Dict) -> str:
        line = super().result_line(metrics)
        if "eval_exact_match_before" in metrics and "eval_exact_match_after" in metrics:
            line += (f"; held-out exact match {metrics['eval_exact_match_before']:.1%} -> "
                     f"{metrics['eval_exact_match_after']:.1%}")
        return line


def build_trainer(cfg, model, processor, collator, train_rows, eval_rows, parts: Optional[TrainerParts] = None):
    """TRL's SFTTrainer in the configured batch layout. `parts` carries what the run skeleton prepared (arguments,
    callbacks, trainer mixins); without it (tests, benchmarks) the same is built here from `cfg`."""
    from trl import SFTTrainer

    from qwenvl_ft.training.common import finish_trainer, standalone_parts, trainer_class

    if parts is None:
        parts = standalone_parts(METHOD, cfg, model, processor, collator, train_rows, eval_rows)
    batches = parts.state["batches"]
    trainer = trainer_class(SFTTrainer, parts.trainer_mixins)(
        model=model,
        args=parts.arguments,
        data_collator=batches.collator,
        train_dataset=batches.dataset,
        eval_dataset=eval_rows if cfg.trainer.eval_steps is not None else None,
        processing_class=processor,
        callbacks=parts.callbacks,
    )
    return finish_trainer(trainer, cfg)


METHOD = Sft()
