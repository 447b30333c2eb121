"""A run's rows as (train rows, held-out rows): every source read (data/records.py), duplicate ids handled as
data.on_duplicate_id says, held-out rows split off and the sources mixed (data/mixing.py), or the generated demo
set; `read_method_rows` is the same for the rows of the other training methods (preference pairs, GRPO prompts).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Dict, List, Optional, Tuple

from qwenvl_ft.config.data import DataConfig, DataFormat, DuplicateIds, ShapesConfig, SourceConfig
from qwenvl_ft.data.arrow import to_dataset
from qwenvl_ft.data.converters import CONVERTERS, Converter
from qwenvl_ft.data.records import iter_rows
from qwenvl_ft.data.rows import Problem
from qwenvl_ft.errors import DataError

log = logging.getLogger("qwenvl_ft")


def source_config(cfg: DataConfig, source: SourceConfig) -> DataConfig:
    """The data config one source (data.sources entry, or data.path) is read with: its own path, format, image
    folder and split, everything else from the data group."""
    return dataclasses.replace(cfg, path=source.path, format=source.format or cfg.format,
                               image_folder=source.image_folder or cfg.image_folder,
                               split=source.split or cfg.split, sources=[], mixture_rows=None)


def split_rows(rows: List[dict], cfg: DataConfig, eval_size: float) -> Tuple[List[dict], List[dict]]:
    """Seeded shuffle (when enabled), then the last `eval_size` rows (a count, or a fraction when < 1) held out."""
    import random

    if cfg.shuffle:
        rows = list(rows)
        random.Random(cfg.seed).shuffle(rows)
    if eval_size == 0:
        return rows, []
    count = int(eval_size) if eval_size >= 1 else max(1, round(eval_size * len(rows)))
    if count >= len(rows):
        raise DataError(f"data.eval_size={eval_size} leaves no training rows ({len(rows)} rows in all)")
    return rows[:-count], rows[-count:]


def read_and_split(cfg: DataConfig, problems: Optional[List[Problem]] = None,
                   converters: Dict[DataFormat, Converter] = CONVERTERS, duplicates: Optional[list] = None
                   ) -> Tuple[List[dict], List[dict]]:
    """(train rows, eval rows) of data.path or data.sources (qwenvl_ft.data.mixing: per-source shuffle, max_rows
    and held-out rows, then concatenated or drawn by weight), with data.eval_path read as the eval split.
    Duplicate ids are handled as data.on_duplicate_id says and appended to `duplicates` when given."""
    from qwenvl_ft.data.mixing import SourceSpan, mix, plan_splits

    rows: List[dict] = []
    ids: List[Optional[str]] = []
    spans: List[SourceSpan] = []
    for source in cfg.source_list():
        start = len(rows)
        for row, row_id in iter_rows(source_config(cfg, source), source.path, problems, converters):
            rows.append(row)
            ids.append(row_id)
        spans.append(SourceSpan(source.path, start, len(rows) - start, source.weight, source.max_rows))
    eval_span = None
    if cfg.eval_path:
        start = len(rows)
        for row, row_id in iter_rows(cfg, cfg.eval_path, problems, converters):
            rows.append(row)
            ids.append(row_id)
        eval_span = SourceSpan(cfg.eval_path, start, len(rows) - start)
    wheres = [row.get("source", "?") for row in rows]
    found, excluded = handle_duplicates(cfg, spans + ([eval_span] if eval_span else []), ids, wheres, problems)
    if duplicates is not None:
        duplicates.extend(found)
    elif found:
        log.warning("%d id(s) occur more than once (data.on_duplicate_id=%s):\n%s", len(found),
                    cfg.on_duplicate_id.value, "\n".join(f"  {d.message()}" for d in found[:10]))
    plan = plan_splits(cfg, spans, eval_span.rows if eval_span else (), excluded)
    train = mix(cfg, spans, plan.train_by_source)[0] if cfg.weighted else plan.train
    return [rows[i] for i in train], [rows[i] for i in plan.eval]


def handle_duplicates(cfg: DataConfig, spans: list, ids, wheres, problems: Optional[List[Problem]]):
    """(duplicates found, row numbers to leave out) for rows of one file sharing an id, under
    data.on_duplicate_id: warn keeps them, drop leaves out all but the first, error makes the later ones invalid
    rows (recorded in `problems`, or raised)."""
    from qwenvl_ft.data.mixing import duplicate_message, duplicates_of

    policy = cfg.on_duplicate_id
    found, excluded = [], []
    if policy == DuplicateIds.allow:
        return found, excluded
    for span in spans:
        duplicates, later = duplicates_of(ids[span.start: span.start + span.count],
                                          wheres[span.start: span.start + span.count], span.start)
        found += duplicates
        if policy == DuplicateIds.warn:
            continue
        excluded += later
        if policy == DuplicateIds.error:
            for duplicate in duplicates:
                for where in duplicate.others:
                    message = f"{where}: {duplicate_message(policy, duplicate)}"
                    if problems is None:
                        raise DataError(message)
                    problems.append(Problem(where, message))
    return found, excluded


def load_split_rows(cfg: DataConfig, problems: Optional[List[Problem]] = None) -> Tuple[List[dict], List[dict]]:
    """(train rows, eval rows) as lists of canonical rows: read, seeded shuffle and split, data.max_samples."""
    if cfg.format == DataFormat.shapes:
        from qwenvl_ft.data.shapes import generate

        train, evaluation = generate(cfg.shapes)
        if cfg.max_samples is not None:
            train = train[: cfg.max_samples]
        return train, evaluation
    return read_and_split(cfg, problems)


def load_splits(cfg: DataConfig) -> Tuple[Any, Optional[Any]]:
    """(train dataset, eval dataset or None) of canonical rows; the first bad row raises. Training goes through
    qwenvl_ft.data.check.load_checked_splits instead, which also opens every image and reports every bad row."""
    train, evaluation = load_split_rows(cfg)
    if not train:
        raise DataError(f"{cfg.describe_path()}: no training rows")
    return to_dataset(train), (to_dataset(evaluation) if evaluation else None)


def read_method_rows(cfg: DataConfig, problems: Optional[List[Problem]], generated: DataFormat,
                     generate: Callable[[ShapesConfig], Tuple[List[dict], List[dict]]],
                     converters: Dict[DataFormat, Converter], holds: str) -> Tuple[List[dict], List[dict]]:
    """(train rows, held-out rows) of a method whose rows are not conversations (data/preference.py,
    data/prompts.py): `generate`d for the `generated` format, else read with `converters` (seeded shuffle and
    split), data.max_samples applied. The first bad row raises DataError, or with `problems` every bad row is
    recorded there and left out. `holds` names the rows, for a format that holds others."""
    if cfg.format == generated:
        train, evaluation = generate(cfg.shapes)
    elif cfg.format in converters:
        train, evaluation = read_and_split(cfg, problems, converters)
    else:
        raise DataError(f"data.format={cfg.format.value} does not hold {holds}")
    if cfg.max_samples is not None:
        train = train[: cfg.max_samples]
    return train, evaluation
