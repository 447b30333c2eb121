"""Each training method's rows as the data layer handles them: read, made into a dataset, measured, collated, stored
and generated. A method's declaration names its kind here (`Method.rows`, e.g. "qwenvl_ft.data.kinds:PAIR_ROWS",
qwenvl_ft/methods/) and `rows_of(method)` loads it; data/check.py, data-check, `eval` and the run skeleton ask it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Mapping, Optional, Tuple

from qwenvl_ft.config.data import DataConfig
from qwenvl_ft.data import arrow, converters, preference, prompts, shapes, splitting, store
from qwenvl_ft.data.collate import VisionChatCollator
from qwenvl_ft.data.collate_preference import VisionPreferenceCollator
from qwenvl_ft.methods.base import Method, load


def _as_stored(dataset):
    return dataset


@dataclass(frozen=True)
class MethodRows:
    """One training method's rows in the data layer (a default here is what most methods want)."""

    # (data_cfg, problems=None) -> (train rows, held-out rows) in the method's canonical form, data.max_samples
    # applied. Bad rows raise DataError, or go to `problems` when a list is given.
    read_rows: Callable[..., Tuple[List[dict], List[dict]]]
    to_dataset: Callable[[List[dict]], Any]  # a datasets.Dataset of canonical rows, as the method's trainer takes it
    collator: Callable[[Any, DataConfig], Any]  # (processor, data_cfg) -> the method's collator
    # How the canonical rows are written to the memory-mapped Arrow store (data/prepare.py: rows read once, checked,
    # measured and cached for every method): the columns and how a row becomes a record of them.
    store_kind: store.RowKind
    # data.format -> converter of one file record into a canonical row (data/converters.py `Converter`), for the
    # method's formats that are read from files
    converters: Mapping
    generator: Callable[[Any], Tuple[List[dict], List[dict]]]  # data.shapes -> the generated format's rows
    # (processor, data_cfg) -> what measures a row (its `measure`); None: the collator does
    measured_by: Optional[Callable[[Any, DataConfig], Any]] = None
    # A stored split (memory-mapped, with each row's measured `length`) as the dataset the method's trainer takes:
    # the store itself unless the method needs otherwise.
    from_store: Callable[[Any], Any] = _as_stored

    def measurer(self, processor, data_cfg: DataConfig) -> Callable[[dict], Any]:
        """row -> SampleStats (data/collate.py): everything the collator would check and count, without pixel
        values. Raises DataError for an invalid row and RowDropped for one data.overlength leaves out."""
        return (self.measured_by or self.collator)(processor, data_cfg).measure

    def generate(self, data_cfg: DataConfig) -> Tuple[List[dict], List[dict]]:
        """(train rows, held-out rows) of the method's generated format (`Method.generated_formats`)."""
        return self.generator(data_cfg.shapes)


def rows_of(method: Method) -> MethodRows:
    """The rows of `method` (its declaration's `rows` path), loaded by name."""
    return load(method.rows)


CONVERSATION_ROWS = MethodRows(
    read_rows=splitting.load_split_rows, to_dataset=arrow.to_dataset, collator=VisionChatCollator,
    store_kind=store.CONVERSATIONS, converters=converters.CONVERTERS, generator=shapes.generate)

PAIR_ROWS = MethodRows(
    read_rows=preference.load_pair_rows, to_dataset=preference.to_pair_dataset, collator=VisionPreferenceCollator,
    store_kind=preference.pairs_kind(), converters=preference.CONVERTERS, generator=preference.generate_pairs)

PROMPT_ROWS = MethodRows(
    read_rows=prompts.load_prompt_rows, to_dataset=prompts.to_prompt_dataset, collator=prompts.PromptImages,
    store_kind=prompts.prompts_kind(), converters=prompts.CONVERTERS, generator=prompts.generate_prompts,
    measured_by=prompts.PromptMeasurer, from_store=prompts.from_prompt_store)
