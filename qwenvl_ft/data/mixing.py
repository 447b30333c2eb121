"""Which rows of which data file a run reads, holds out and trains on: data.sources, duplicate ids, the split and
the mixture.

Everything here works on row numbers into the rows as read (every source's rows one after another, then the
data.eval_path rows), so the same plan serves rows held in a list and rows in the Arrow store of
qwenvl_ft/data/store.py. The steps, per source: seeded shuffle (data.shuffle), `max_rows`, held-out rows
(data.eval_size: a fraction of each source, or a count shared among the sources in proportion to their size);
then the training rows of all sources are concatenated, or, with weights, drawn in those proportions from the
rows that passed the data check (`mix`).
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from qwenvl_ft.config.data import DataConfig, DuplicateIds
from qwenvl_ft.errors import DataError

ID_FIELDS = ("id", "uid", "sample_id", "question_id")  # what data.id_field=null looks for, in this order


def record_id(record, id_field: Optional[str]) -> Optional[str]:
    """The id a record carries (data.id_field, else the first of ID_FIELDS it has), as a string; None if none."""
    if not isinstance(record, dict):
        return None
    for name in (id_field,) if id_field else ID_FIELDS:
        value = record.get(name)
        if value is not None and not isinstance(value, (dict, list)):
            return str(value)
    return None


# ----------------------------------------------------------------------------------------------------------------
# duplicate ids


@dataclass
class Duplicate:
    """Rows of one file that share an id: where the first is, and where the others are."""

    row_id: str
    first: str
    others: List[str]

    def message(self) -> str:
        return f"id {self.row_id!r}: {self.first}, and again at " + ", ".join(self.others)


def duplicate_positions(ids: Sequence[Optional[str]]) -> Dict[str, List[int]]:
    """id -> positions (ascending) of every id that occurs more than once; None ids are not compared.

    Counted by Arrow (`value_counts`), so a million ids cost one pass in C and only the duplicates reach Python.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    array = ids if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(list(ids), type=pa.string())
    counts = pc.value_counts(array)
    repeated = [v for v in pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1)).to_pylist()
                if v is not None]
    if not repeated:
        return {}
    found: Dict[str, List[int]] = {value: [] for value in repeated}
    mask = pc.is_in(array, value_set=pa.array(repeated, type=pa.string()))
    for position in pc.indices_nonzero(pc.fill_null(mask, False)).to_pylist():
        found[array[position].as_py()].append(position)
    return found


def duplicates_of(ids: Sequence[Optional[str]], wheres: Sequence[str], offset: int = 0
                  ) -> Tuple[List[Duplicate], List[int]]:
    """(duplicates, row numbers of every row after the first of its id). `ids`/`wheres` are one file's rows;
    `offset` is the row number of its first row."""
    def where(position: int) -> str:
        value = wheres[position]
        return value.as_py() if hasattr(value, "as_py") else value

    duplicates, later = [], []
    for row_id, positions in sorted(duplicate_positions(ids).items(), key=lambda item: item[1][0]):
        duplicates.append(Duplicate(row_id, where(positions[0]), [where(p) for p in positions[1:]]))
        later += [offset + p for p in positions[1:]]
    return duplicates, later


def duplicate_message(policy: DuplicateIds, duplicate: Duplicate) -> str:
    """What a later row of a duplicated id is told under data.on_duplicate_id=error."""
    return (f"duplicate id {duplicate.row_id!r}, first at {duplicate.first} (data.on_duplicate_id={policy.value}; "
            f"'drop' keeps the first, 'warn' keeps both)")


# ----------------------------------------------------------------------------------------------------------------
# split


@dataclass
class SourceSpan:
    """One source's rows in the combined row numbering: rows [start, start + count), read from `name`."""

    name: str
    start: int
    count: int
    weight: Optional[float] = None
    max_rows: Optional[int] = None

    @property
    def rows(self) -> range:
        return range(self.start, self.start + self.count)


@dataclass
class SplitPlan:
    train: List[int]  # row numbers, training order (before a weighted mixture)
    eval: List[int]
    train_by_source: List[List[int]]  # each source's training rows (what `mix` draws from)
    held_out: List[int] = field(default_factory=list)  # rows held out per source


def _eval_counts(cfg: DataConfig, sizes: List[int], names: List[str]) -> List[int]:
    if cfg.eval_path or cfg.eval_size == 0:
        return [0] * len(sizes)
    if cfg.eval_size < 1:
        counts = [max(1, round(cfg.eval_size * n)) if n else 0 for n in sizes]
    else:
        counts = _shares(int(cfg.eval_size), [n / max(sum(sizes), 1) for n in sizes])
    for count, size, name in zip(counts, sizes, names):
        if count and count >= size:
            where = f" of {name}" if len(sizes) > 1 else ""
            raise DataError(f"data.eval_size={cfg.eval_size} leaves no training rows{where} ({size} rows in all)")
    return counts


def _shares(total: int, fractions: Sequence[float]) -> List[int]:
    """`total` split by `fractions` into whole numbers that add up to it (largest remainder)."""
    raw = [total * f for f in fractions]
    counts = [int(r) for r in raw]
    for index in sorted(range(len(raw)), key=lambda i: counts[i] - raw[i])[: total - sum(counts)]:
        counts[index] += 1
    return counts


def plan_splits(cfg: DataConfig, spans: List[SourceSpan], eval_rows: Sequence[int] = (),
                excluded: Sequence[int] = ()) -> SplitPlan:
    """Training and held-out row numbers. `eval_rows`: the data.eval_path rows; `excluded`: rows left out before
    splitting (duplicate ids under data.on_duplicate_id=drop or error)."""
    left_out = set(excluded)
    orders = []
    for index, span in enumerate(spans):
        order = [row for row in span.rows if row not in left_out] if left_out else list(span.rows)
        if cfg.shuffle:
            random.Random(cfg.seed + index).shuffle(order)  # source 0: the seed itself, as with one file
        orders.append(order[: span.max_rows] if span.max_rows else order)
    counts = _eval_counts(cfg, [len(o) for o in orders], [s.name for s in spans])
    train_by_source = [order[: len(order) - count] for order, count in zip(orders, counts)]
    held = [order[len(order) - count:] if count else [] for order, count in zip(orders, counts)]
    train = [row for rows in train_by_source for row in rows]
    if len(spans) > 1 and cfg.shuffle:
        random.Random(cfg.seed).shuffle(train)
    if cfg.max_samples is not None and not cfg.weighted:
        train = train[: cfg.max_samples]
    evaluation = [row for rows in held for row in rows] + list(eval_rows)
    return SplitPlan(train, evaluation, train_by_source, [len(h) for h in held])


# ----------------------------------------------------------------------------------------------------------------
# mixture


@dataclass
class Share:
    """One source's part of the training rows."""

    name: str
    available: int  # its training rows (after the check, for SFT)
    drawn: int  # rows it contributes (with repeats when drawn > available)
    weight: Optional[float] = None

    @property
    def repeats(self) -> float:
        return self.drawn / self.available if self.available else 0.0


@dataclass
class Mixture:
    how: str  # "concatenated" or "interleaved by weight"
    shares: List[Share]

    @property
    def total(self) -> int:
        return sum(s.drawn for s in self.shares)

    def lines(self) -> List[str]:
        total = max(self.total, 1)
        out = [f"mixture: {len(self.shares)} sources {self.how}, {self.total:,} training rows"]
        for share in self.shares:
            weight = f", weight {share.weight:g}" if share.weight is not None else ""
            repeat = f", each row x{share.repeats:.2f}" if share.drawn > share.available else ""
            out.append(f"  {share.name}: {share.drawn:,} rows ({share.drawn / total:.1%}{weight}) of "
                       f"{share.available:,}{repeat}")
        return out

    def to_dict(self) -> Dict:
        return {"how": self.how, "rows": self.total,
                "sources": [{"path": s.name, "weight": s.weight, "available": s.available, "drawn": s.drawn,
                             "share": round(s.drawn / max(self.total, 1), 4)} for s in self.shares]}


def mix(cfg: DataConfig, spans: List[SourceSpan], by_source: List[List[int]]) -> Tuple[List[int], Mixture]:
    """The training rows of the mixture and how it came out. Without weights: the sources' rows concatenated (in
    the order given). With weights: data.mixture_rows rows (default: as many as the sources give without
    repeating a row), split among the sources by weight and interleaved in a seeded random order; a source whose
    share is larger than its rows is repeated. data.max_samples caps the result."""
    if not cfg.weighted:
        train = [row for rows in by_source for row in rows]
        return train, Mixture("concatenated", [Share(s.name, len(r), len(r)) for s, r in zip(spans, by_source)])
    empty = [s.name for s, rows in zip(spans, by_source) if not rows]
    if empty:
        raise DataError(f"data.sources: no valid training rows in {', '.join(empty)}, which has a weight")
    weights = [s.weight for s in spans]
    fractions = [w / sum(weights) for w in weights]
    total = cfg.mixture_rows or min(int(len(rows) / f) for rows, f in zip(by_source, fractions))
    counts = _shares(total, fractions)
    rng = random.Random(cfg.seed)
    drawn: List[int] = []
    for rows, count in zip(by_source, counts):
        whole, part = divmod(count, len(rows))
        drawn += rows * whole + rows[:part]
    rng.shuffle(drawn)
    if cfg.max_samples is not None and cfg.max_samples < len(drawn):
        drawn = drawn[: cfg.max_samples]
        counts = [0] * len(spans)
        starts = [s.start for s in spans]
        for row in drawn:
            counts[bisect.bisect_right(starts, row) - 1] += 1
    shares = [Share(s.name, len(rows), count, s.weight) for s, rows, count in zip(spans, by_source, counts)]
    return drawn, Mixture("interleaved by weight", shares)
