"""Rows on disk: canonical rows written once, in chunks, to an Arrow file and read back memory-mapped.

Why: a Python dict per row costs about 2.5 KB, and `datasets.Dataset.from_list` copies every row once more into an
in-memory table, so a million rows held in lists took gigabytes before the first step. Rows written here stream from
the readers in chunks of CHUNK rows (pyarrow builds each chunk in C), and the `datasets.Dataset` read back
(`Dataset.from_file`) maps the file: memory holds only the pages being read, and DataLoader workers read their rows
from the same file. The per-row results of the data check (qwenvl_ft.data.prepare) go into a second Arrow file with
one column per field of the measurer's result dataclass (`SampleStats` for conversations).

Images are stored as `datasets.Image(decode=False)` records ({"bytes", "path"}): a path, URL, data URI or base64
string in `path`, encoded bytes (or a PIL image, encoded as PNG) in `bytes`; the collator reads either.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

CHUNK = 2048  # rows per Arrow record batch


@dataclass
class RowKind:
    """What a training method's rows look like on disk: their columns (`features`, datasets.Features) and how a
    canonical row becomes a record of them (`encode`)."""

    name: str  # "conversation", "preference pair"
    features: Callable[[], Any]
    encode: Callable[[dict], dict]


def image_record(ref: Any) -> dict:
    """An image reference as a datasets.Image(decode=False) record."""
    if isinstance(ref, str):
        return {"bytes": None, "path": ref}
    if isinstance(ref, dict):
        return {"bytes": ref.get("bytes"), "path": ref.get("path")}
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return {"bytes": bytes(ref), "path": None}
    import datasets

    return datasets.Image().encode_example(ref)  # a PIL image: PNG bytes


def messages_feature():
    import datasets

    text = datasets.Value("string")
    return datasets.List({"role": text, "content": datasets.List({"type": text, "text": text})})


def bookkeeping() -> dict:
    """Columns of the store of rows as read (not of the training rows): which data.sources entry a row came from
    (-1: data.eval_path or generated held-out rows) and its id (data.id_field)."""
    import datasets

    return {"origin": datasets.Value("int32"), "row_id": datasets.Value("string")}


def conversation_features():
    import datasets

    from qwenvl_ft.data.arrow import objects_feature

    text = datasets.Value("string")
    return datasets.Features({"messages": messages_feature(), "images": datasets.List(datasets.Image(decode=False)),
                              "videos": datasets.List({"path": text, "frames": datasets.List(text)}),
                              "source": text, "objects": objects_feature()})


def encode_conversation(row: dict) -> dict:
    from qwenvl_ft.data.arrow import _video_record

    return {"messages": row["messages"], "images": [image_record(i) for i in row.get("images") or []],
            "videos": [_video_record(v) for v in row.get("videos") or []], "source": row.get("source", "?"),
            "objects": row.get("objects") or []}


CONVERSATIONS = RowKind("conversation", conversation_features, encode_conversation)


# ----------------------------------------------------------------------------------------------------------------
# writing and reading rows


class RowWriter:
    """Appends canonical rows to an Arrow stream file, CHUNK rows at a time."""

    def __init__(self, path: Path, kind: RowKind, extra: Optional[dict] = None):
        import pyarrow as pa

        self.path, self.kind = Path(path), kind
        features = kind.features()
        if extra:
            features.update(extra)
        self.features = features
        self.schema = features.arrow_schema
        self._sink = pa.OSFile(str(self.path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, self.schema)
        self._pending: List[dict] = []
        self.count = 0

    def add(self, record: dict) -> None:
        """`record`: an encoded row (RowKind.encode) plus the bookkeeping columns."""
        self._pending.append(record)
        self.count += 1
        if len(self._pending) >= CHUNK:
            self._flush()

    def add_table(self, table) -> None:
        self._writer.write_table(table.cast(self.schema))
        self.count += table.num_rows

    def _flush(self) -> None:
        import pyarrow as pa

        if self._pending:
            self._writer.write_table(pa.Table.from_pylist(self._pending, schema=self.schema))
            self._pending = []

    def close(self) -> int:
        self._flush()
        self._writer.close()
        self._sink.close()
        return self.count


def open_rows(path: Path):
    """The datasets.Dataset of an Arrow stream file, memory-mapped."""
    import datasets

    return datasets.Dataset.from_file(str(path))


def open_table(path: Path):
    """A pyarrow Table over an Arrow stream file, memory-mapped (columns are read on use)."""
    import pyarrow as pa

    return pa.ipc.open_stream(pa.memory_map(str(path), "r")).read_all()


def gather(table, rows: Sequence[int]) -> Iterator:
    """The rows of `table` at the given positions (repeats allowed), as tables of at most CHUNK rows; only one
    chunk is in memory at a time."""
    from datasets.table import InMemoryTable

    lookup = InMemoryTable(table)
    for start in range(0, len(rows), CHUNK):
        yield lookup.fast_gather([int(r) for r in rows[start: start + CHUNK]]).combine_chunks()


# ----------------------------------------------------------------------------------------------------------------
# per-row results of a measurer, as Arrow columns


OK, DROPPED, INVALID = 0, 1, 2  # outcome codes


def _arrow_type(hint):
    import pyarrow as pa

    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin is typing.Union:
        return _arrow_type(args[0])
    if origin in (list, List, tuple, typing.Tuple):
        inner = args[0] if args else int
        return pa.list_(_arrow_type(inner))
    return {int: pa.int64(), str: pa.string(), float: pa.float64(), bool: pa.bool_()}[hint]


def carried_fields(stats_type) -> List[str]:
    """Fields of a measurer's result that are stored with the row in the split files (train.arrow, eval.arrow), for
    its collator, rather than in the result table: those with `stored_with_row` in their metadata."""
    return [f.name for f in dataclasses.fields(stats_type) if f.metadata.get("stored_with_row")]


def carried_schema(stats_type):
    """Arrow schema of the carried fields (`carried_fields`); empty when there are none."""
    import pyarrow as pa

    hints = typing.get_type_hints(stats_type)
    return pa.schema([pa.field(name, _arrow_type(hints[name])) for name in carried_fields(stats_type)])


def _reported_fields(stats_type) -> List[str]:
    carried = set(carried_fields(stats_type))
    return [f.name for f in dataclasses.fields(stats_type) if f.name not in carried]


def stats_schema(stats_type):
    """Arrow schema of the result table: bookkeeping columns, then one nullable column per dataclass field (the
    carried ones excepted)."""
    import pyarrow as pa

    hints = typing.get_type_hints(stats_type)
    # row: number in the rows as read; where: 'file:line N'; message: why a row was dropped or refused
    fields = [pa.field("row", pa.int64()), pa.field("split", pa.int8()), pa.field("origin", pa.int32()),
              pa.field("where", pa.string()), pa.field("outcome", pa.int8()), pa.field("message", pa.string())]
    fields += [pa.field(name, _arrow_type(hints[name])) for name in _reported_fields(stats_type)]
    return pa.schema(fields)


def stats_record(row: int, split: int, origin: int, where: str, outcome: int, result) -> dict:
    record = {"row": row, "split": split, "origin": origin, "where": where, "outcome": outcome,
              "message": result if outcome != OK else None}
    if outcome == OK:
        record.update({name: getattr(result, name) for name in _reported_fields(type(result))})
    return record


def open_carried(path: Path, needed: Sequence[int], total_rows: int):
    """(the table of the carried fields of the `needed` rows, in that order, memory-mapped; each row number's
    position in it), or None when the measurer carries nothing or gave nothing to carry (another method's measurer
    leaves the fields unset)."""
    import numpy as np

    table = open_table(path)
    if not table.num_columns or all(table.column(name).null_count == table.num_rows for name in table.column_names):
        return None
    positions = np.full(total_rows, -1, dtype=np.int64)
    positions[np.asarray(needed, dtype=np.int64)] = np.arange(len(needed))
    return table, positions


class StatsView:
    """The kept rows' results of one split, read column-wise from the result table (`column`, `flat`), or as
    measurer result objects one at a time (iteration, for reports and tests)."""

    def __init__(self, table, mask, stats_type):
        import numpy as np

        self.table, self.stats_type = table, stats_type
        self.mask = np.asarray(mask, dtype=bool)
        self._positions = np.flatnonzero(self.mask)

    def __len__(self) -> int:
        return int(self._positions.size)

    def __bool__(self) -> bool:
        return len(self) > 0

    def column(self, name: str):
        """One number per kept row (numpy)."""
        import numpy as np

        if self.table is None or not len(self):
            return np.zeros(0, dtype=np.int64)
        return np.asarray(self.table.column(name).to_numpy(zero_copy_only=False))[self.mask]

    def flat(self, name: str, index: Optional[int] = None):
        """The values of a list column over every kept row, one after another (numpy); `index` picks one element
        of each value (image_sizes: 0 = width, 1 = height)."""
        import numpy as np
        import pyarrow.compute as pc

        if self.table is None or not len(self):
            return np.zeros(0, dtype=np.int64)
        values = pc.list_flatten(self.table.column(name).filter(self.mask))
        if index is not None:
            values = pc.list_element(values, index)
        return np.asarray(values.to_numpy(zero_copy_only=False))

    def counts(self, name: str):
        """Length of a list column per kept row (numpy)."""
        import numpy as np
        import pyarrow.compute as pc

        if self.table is None or not len(self):
            return np.zeros(0, dtype=np.int64)
        return np.asarray(pc.list_value_length(self.table.column(name).filter(self.mask)).to_numpy(
            zero_copy_only=False))

    def records(self) -> Iterator[dict]:
        """Each kept row's measurements as a plain dict (field -> value), CHUNK rows at a time: what a report
        writes, without building result objects."""
        if self.table is None or not len(self):
            return
        kept = self.table.select(_reported_fields(self.stats_type)).filter(self.mask)
        for start in range(0, kept.num_rows, CHUNK):
            yield from kept.slice(start, CHUNK).to_pylist()

    def __iter__(self):
        hints = typing.get_type_hints(self.stats_type)
        for values in self.records():
            yield self.stats_type(**{name: _restore(value, hints[name]) for name, value in values.items()})

    def __getitem__(self, index: int):
        return next(iter(StatsView(self.table, _one_hot(self._positions[index], len(self.mask)),
                                   self.stats_type)))


def _one_hot(position: int, size: int):
    import numpy as np

    mask = np.zeros(size, dtype=bool)
    mask[position] = True
    return mask


def _restore(value, hint):
    """Arrow gives lists where the dataclass declares tuples (image sizes)."""
    args = typing.get_args(hint)
    if value is not None and typing.get_origin(hint) in (list, List) and args \
            and typing.get_origin(args[0]) in (tuple, typing.Tuple):
        return [tuple(v) for v in value]
    return value


def empty_stats(stats_type) -> Dict[str, StatsView]:
    return {"train": StatsView(None, [], stats_type), "eval": StatsView(None, [], stats_type)}
