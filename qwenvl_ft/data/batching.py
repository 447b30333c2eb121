"""How training rows are grouped into device batches: padded (default), length-grouped, token-budget, packed.

All but the default need each row's token count before training. The data check measured every row already
(`VisionChatCollator.measure`: the same code as `encode`, without the pixel arithmetic) and stored it with the rows
as a `length` column, which is read here; rows without it are measured now. A row that data.overlength drops is
left out of the plan.

Token-budget batches and packs are planned once, before training, and handed to the Trainer as a dataset whose
items name whole batches (`grouped_dataset`, batch size 1). The Trainer's own sampler then shuffles batch order every
epoch, and resuming, sharding over GPUs and step counting work unchanged; only the composition of a batch stays
the same across epochs. Length grouping uses transformers' own `LengthGroupedSampler` through a `length` column.
"""

from __future__ import annotations

import bisect
import logging
import random
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence

from qwenvl_ft.config.data import DataConfig

log = logging.getLogger("qwenvl_ft")

# Rows are planned in shuffled windows of this many: big enough for dense packs, small enough that a batch mixes
# rows from all over the data rather than one length stratum of it.
PLAN_WINDOW = 2048


# ----------------------------------------------------------------------------------------------------------------
# lengths


def token_budget(data_cfg: DataConfig, batch_size: int) -> int:
    """Tokens per device step of a pack or a token-budget batch: data.max_tokens_per_batch, else (packing)
    trainer.batch_size x data.max_length."""
    return data_cfg.max_tokens_per_batch or batch_size * data_cfg.max_length


def stored_lengths(rows) -> Optional[List[int]]:
    """The `length` column the data check stored with the rows (qwenvl_ft/data/prepare.py), or None."""
    if getattr(rows, "column_names", None) is None or "length" not in rows.column_names:
        return None
    return rows.data.table.column("length").to_pylist() if rows._indices is None else list(rows["length"])


def row_lengths(collator, rows) -> List[Optional[int]]:
    """Tokens `collator.encode` will produce for each row: the data check's measurement when the rows carry it
    (measured once, before training), else `collator.measure` now (the same code path as `encode` without the
    pixel arithmetic); None for a row that data.overlength drops."""
    from qwenvl_ft.data.collate import RowDropped

    stored = stored_lengths(rows)
    if stored is not None:
        return stored
    lengths: List[Optional[int]] = []
    for row in rows:
        try:
            lengths.append(collator.measure(row).length)
        except RowDropped:
            lengths.append(None)
    return lengths


def row_length(collator, row: dict) -> int:
    return collator.measure(row).length


def _kept(lengths: Sequence[Optional[int]], what: str) -> List[int]:
    kept = [i for i, n in enumerate(lengths) if n is not None]
    if len(kept) < len(lengths):
        log.warning("%s: %d of %d rows left out (over data.max_length under data.overlength)", what,
                    len(lengths) - len(kept), len(lengths))
    return kept


# ----------------------------------------------------------------------------------------------------------------
# planning


def _windows(indices: Sequence[int], seed: int) -> List[List[int]]:
    order = list(indices)
    random.Random(seed).shuffle(order)
    return [order[i: i + PLAN_WINDOW] for i in range(0, len(order), PLAN_WINDOW)]


def plan_packs(lengths: Sequence[Optional[int]], max_tokens: int, seed: int) -> List[List[int]]:
    """Row indices per pack, each pack at most `max_tokens` tokens (a longer row gets a pack of its own).

    Best-fit decreasing inside each shuffled window: the longest row first, each into the fullest pack it still
    fits. Packs come out about 95-99% full on mixed lengths. Rows whose length is None are left out.
    """
    packs: List[List[int]] = []
    for window in _windows(_kept(lengths, "packing"), seed):
        open_packs: List[List[int]] = []
        free: List[tuple] = []  # sorted (free tokens, pack number)
        for index in sorted(window, key=lambda i: -lengths[i]):
            need = lengths[index]
            slot = bisect.bisect_left(free, (need, -1))
            if slot < len(free):
                room, number = free.pop(slot)
            else:
                room, number = max_tokens, len(open_packs)
                open_packs.append([])
            open_packs[number].append(index)
            if room - need > 0:
                bisect.insort(free, (room - need, number))
        packs += open_packs
    return packs


def plan_token_budget(lengths: Sequence[Optional[int]], max_tokens: int, seed: int) -> List[List[int]]:
    """Row indices per padded batch: rows of similar length, as many as keep rows x longest <= `max_tokens`."""
    batches: List[List[int]] = []
    for window in _windows(_kept(lengths, "token budget"), seed):
        batch: List[int] = []
        for index in sorted(window, key=lambda i: lengths[i]):  # ascending: the newest row is the longest
            if batch and (len(batch) + 1) * lengths[index] > max_tokens:
                batches.append(batch)
                batch = []
            batch.append(index)
        if batch:
            batches.append(batch)
    return batches


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]], packed: bool) -> float:
    """Share of the batch tensors' tokens that are padding."""
    real = sum(lengths[i] for batch in batches for i in batch)
    total = real if packed else sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)
    return 1 - real / total if total else 0.0


# ----------------------------------------------------------------------------------------------------------------
# what the Trainer gets


def grouped_dataset(groups: List[List[int]]):
    """A datasets.Dataset (what TRL accepts) whose item i names the rows of batch i: `{"row_indices": [...]}`."""
    import datasets

    return datasets.Dataset.from_dict({"row_indices": groups})


class ExpandGroups:
    """Collator wrapper: `{"row_indices": [...]}` items become those rows (read here, in the DataLoader workers)
    and go to `inner` as one batch; plain rows (evaluation batches) pass through."""

    def __init__(self, inner: Callable, rows):
        self.inner, self.rows = inner, rows

    def __call__(self, items: List[dict]):
        rows = []
        for item in items:
            if "row_indices" in item:
                rows += [self.rows[i] for i in item["row_indices"]]
            else:
                rows.append(item)
        return self.inner(rows)


@dataclass
class TrainBatches:
    dataset: Any  # what the Trainer iterates
    collator: Callable
    per_device_batch_size: int
    sampling_strategy: Optional[str] = None  # transformers' TrainingArguments.train_sampling_strategy
    summary: str = "padded batches"


def training_batches(data_cfg: DataConfig, batch_size: int, collator, rows, seed: int,
                     positions: Optional[Callable] = None,
                     lengths: Optional[Sequence[Optional[int]]] = None, fixed_packs: bool = False) -> TrainBatches:
    """The dataset, collator and per-device batch size that give the configured batch layout (`positions`: the
    model's M-RoPE position function for packing, qwenvl_ft/data/packing.py: `position_function`). `lengths`: each
    row's token count when the data check has measured them already (else every row is measured here).
    `fixed_packs` (model.compile): every pack padded to exactly the token budget."""
    if lengths is None and (data_cfg.packing or data_cfg.max_tokens_per_batch is not None
                            or data_cfg.group_by_length):
        lengths = row_lengths(collator, rows)
    if data_cfg.packing:
        from qwenvl_ft.data.packing import PackingCollator

        budget = token_budget(data_cfg, batch_size)
        packs = plan_packs(lengths, budget, seed)
        tokens, count = sum(n for n in lengths if n is not None), sum(map(len, packs))
        summary = (f"packed: {count} rows in {len(packs)} packs of <= {budget} tokens ({tokens / len(packs):.0f} "
                   f"tokens and {count / len(packs):.1f} rows per pack on average, "
                   f"{tokens / (len(packs) * budget):.1%} full), "
                   + (f"each padded to {budget} tokens (model.compile: one shape)" if fixed_packs else "no padding"))
        packer = PackingCollator(collator, positions, pad_to=budget if fixed_packs else None)
        return TrainBatches(grouped_dataset(packs), ExpandGroups(packer, rows), 1, summary=summary)
    if data_cfg.max_tokens_per_batch is not None:
        batches = plan_token_budget(lengths, data_cfg.max_tokens_per_batch, seed)
        count = sum(map(len, batches))
        summary = (f"token budget: {count} rows in {len(batches)} padded batches of <= "
                   f"{data_cfg.max_tokens_per_batch} tokens ({count / len(batches):.1f} rows per batch on average, "
                   f"{padding_fraction(lengths, batches, packed=False):.1%} padding)")
        return TrainBatches(grouped_dataset(batches), ExpandGroups(collator, rows), 1, summary=summary)
    if data_cfg.group_by_length:
        # transformers' LengthGroupedSampler reads this column (the data check's when the rows carry it); a
        # dropped row counts as 0 (the collator decides)
        if stored_lengths(rows) is None:
            rows = rows.add_column("length", [n or 0 for n in lengths])
        return TrainBatches(rows, collator, batch_size, "group_by_length",
                            summary=f"length-grouped padded batches of {batch_size} rows")
    return TrainBatches(rows, collator, batch_size, summary=f"padded batches of {batch_size} rows")
