"""A run's data, read, split, checked and measured once, and stored so that nothing is done twice.

`prepare` reads every source (data.path or data.sources, and data.eval_path) one row at a time into an Arrow file
(qwenvl_ft/data/store.py), handles duplicate ids, plans the split and the mixture on row numbers
(qwenvl_ft/data/mixing.py), runs the method's measurer on every row it will use (in DataLoader workers, with a
progress bar; qwenvl_ft/data/measuring.py) and writes the result: the training and held-out rows that passed, each
with its `length` in tokens, and a table of every row's outcome and measurements. Packing, token-budget batches and
length grouping read `length` instead of measuring again (qwenvl_ft/data/batching.py), and the data-check report is
computed from the table.

With a cache folder (qwenvl_ft/data/cache.py) that result is an entry keyed by the data files and every setting
that changes it: the next start with the same key (a resumed run, another job of the sweep, another rank) opens it
memory-mapped and decodes nothing. Memory stays flat in the number of rows: rows live in the mapped files, and the
main process holds a few numbers per row.
"""

from __future__ import annotations

import atexit
import bisect
import dataclasses
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from qwenvl_ft.config.data import CacheMode, DataConfig
from qwenvl_ft.data.cache import Entry, cache_key, rank
from qwenvl_ft.data.measuring import measure_all
from qwenvl_ft.data.mixing import Duplicate, Mixture, Share, SourceSpan, SplitPlan, mix, plan_splits
from qwenvl_ft.data.records import iter_rows
from qwenvl_ft.data.rows import Problem
from qwenvl_ft.data.splitting import handle_duplicates, source_config
from qwenvl_ft.data.store import DROPPED, INVALID, OK, RowKind, RowWriter, StatsView, bookkeeping, carried_schema, \
    gather, open_carried, open_rows, open_table, stats_record, stats_schema

log = logging.getLogger("qwenvl_ft")

TRAIN, EVAL = 0, 1  # split codes of the result table


@dataclass
class SourceSummary:
    """One source's rows through the check (the data-check report has a line per source)."""

    name: str
    read: int = 0  # rows in the file
    invalid: int = 0  # unreadable rows, rows the measurer refused, duplicate ids under on_duplicate_id=error
    duplicates_left_out: int = 0  # later rows of a duplicated id (on_duplicate_id=drop or error)
    held_out: int = 0
    dropped: int = 0  # by data.overlength
    train_rows: int = 0  # valid training rows
    drawn: int = 0  # training rows in the mixture (with repeats)


@dataclass
class Prepared:
    train: Any  # datasets.Dataset of the training rows (memory-mapped), with `length` when measured
    eval: Optional[Any]  # the same for the held-out rows; None when there are none
    problems: List[Problem]  # every invalid row: unreadable, refused by the measurer, duplicate id (error)
    sources: List[SourceSummary]
    duplicates: List[Duplicate]
    mixture: Optional[Mixture]
    stats: Optional[Any] = None  # pyarrow Table: one row per measured row (store.stats_schema)
    stats_type: Any = None
    folder: Optional[Path] = None  # the cache entry (or scratch folder) holding it all
    cached: bool = False  # read from the cache rather than computed

    def kept(self, split: str) -> StatsView:
        """The measured results of the rows of `split` ("train", "eval") that passed."""
        import numpy as np

        if self.stats is None:
            return StatsView(None, [], self.stats_type)
        code = TRAIN if split == "train" else EVAL
        splits = np.asarray(self.stats.column("split").to_numpy())
        outcomes = np.asarray(self.stats.column("outcome").to_numpy())
        return StatsView(self.stats, (splits == code) & (outcomes == OK), self.stats_type)

    def refused(self, split: str, outcome: int) -> List[Problem]:
        """The rows of `split` with that outcome (DROPPED, INVALID), as (source, message)."""
        import pyarrow.compute as pc

        if self.stats is None:
            return []
        code = TRAIN if split == "train" else EVAL
        mask = pc.and_(pc.equal(self.stats.column("split"), code), pc.equal(self.stats.column("outcome"), outcome))
        picked = self.stats.filter(mask).select(["where", "message"]).to_pylist()
        return [Problem(p["where"], p["message"]) for p in picked]

    def measured(self, split: str) -> int:
        import numpy as np

        if self.stats is None:
            return 0
        code = TRAIN if split == "train" else EVAL
        return int((np.asarray(self.stats.column("split").to_numpy()) == code).sum())


# ----------------------------------------------------------------------------------------------------------------
# reading


@dataclass
class _Read:
    spans: List[SourceSpan]
    eval_span: Optional[SourceSpan]
    summaries: List[SourceSummary]
    problems: List[Problem] = field(default_factory=list)


def _progress(iterable, desc: str, enabled: bool, total: Optional[int] = None, delay: float = 0.0):
    """A tqdm bar on stderr, like the Trainer's (`delay`: shown only once it has taken that long). Only on a
    terminal (tqdm's `disable=None`): redirected to a file or a CI log, a bar is only noise."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=" rows", disable=None if enabled else True, mininterval=1.0,
                delay=delay, leave=False)


def _read(cfg: DataConfig, kind: RowKind, converters, generate, writer: RowWriter, progress: bool) -> _Read:
    """Every source into `writer` (origin = its index in data.sources, -1 for held-out files and rows)."""
    problems: List[Problem] = []

    def put(rows, origin: int, name: str) -> Tuple[SourceSpan, SourceSummary]:
        start, before = writer.count, len(problems)
        for row, row_id in _progress(rows, f"reading {name}", progress, delay=2.0):
            writer.add({**kind.encode(row), "origin": origin, "row_id": row_id})
        read = writer.count - start
        return SourceSpan(name, start, read), SourceSummary(name, read=read + len(problems) - before,
                                                            invalid=len(problems) - before)

    if cfg.format.is_generated:
        train_rows, eval_rows = generate(cfg)
        span, summary = put(((row, None) for row in train_rows), 0, cfg.format.value)
        eval_span, _ = put(((row, None) for row in eval_rows), -1, f"{cfg.format.value} (held out)")
        return _Read([span], eval_span, [summary], problems)
    spans, summaries = [], []
    for index, source in enumerate(cfg.source_list()):
        span, summary = put(iter_rows(source_config(cfg, source), source.path, problems, converters), index,
                            source.path)
        spans.append(dataclasses.replace(span, weight=source.weight, max_rows=source.max_rows))
        summaries.append(summary)
    eval_span = None
    if cfg.eval_path:
        eval_span, _ = put(iter_rows(cfg, cfg.eval_path, problems, converters), -1, cfg.eval_path)
    return _Read(spans, eval_span, summaries, problems)


# ----------------------------------------------------------------------------------------------------------------
# measuring


def _measure(folder: Path, store, needed: List[int], splits: List[int], measure: Callable, workers: int,
             stats_type, total_rows: int, progress: bool):
    """Measure the `needed` rows of the store; write the result table, and the carried fields (store.py
    `carried_fields`) of every measured row, in the same order, to carried.arrow; return each row's length (-1: not
    measured or not kept) and outcome, indexed by row number."""
    import numpy as np
    import pyarrow as pa

    length = np.full(total_rows, -1, dtype=np.int32)
    outcome = np.full(total_rows, -1, dtype=np.int8)
    origins = np.asarray(store.data.table.column("origin").to_numpy())
    wheres = store.data.table.column("source")
    schema, carried = stats_schema(stats_type), carried_schema(stats_type)
    subset = store.select(needed) if needed else store.select([])
    pending: List[dict] = []
    with pa.OSFile(str(folder / "stats.arrow"), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer, \
            pa.OSFile(str(folder / "carried.arrow"), "wb") as carried_sink, \
            pa.ipc.new_stream(carried_sink, carried) as carried_writer:
        results = _progress(measure_all(subset, measure, workers), "data check", progress, total=len(needed))
        for position, (code, result) in enumerate(results):
            row = needed[position]
            outcome[row] = code
            if code == OK:
                length[row] = result.length
            pending.append((stats_record(row, splits[position], int(origins[row]), wheres[row].as_py(), code,
                                         result), {name: getattr(result, name, None) for name in carried.names}))
            if len(pending) >= 4096:
                _flush(pending, (writer, schema), (carried_writer, carried))
        _flush(pending, (writer, schema), (carried_writer, carried))
    return length, outcome


def _flush(pending: List[tuple], *outputs) -> None:
    """Write the pending records, each a tuple of one record per output ((writer, schema) pairs)."""
    import pyarrow as pa

    for index, (writer, schema) in enumerate(outputs):
        writer.write_table(pa.Table.from_pylist([records[index] for records in pending], schema=schema))
    pending.clear()


# ----------------------------------------------------------------------------------------------------------------
# the whole preparation


def _source_of(spans: Sequence[SourceSpan]) -> Callable[[int], int]:
    starts = [span.start for span in spans]
    return lambda row: bisect.bisect_right(starts, row) - 1


def _images_are_paths(table) -> bool:
    """True when every image of the store is a reference string (no encoded bytes): the splits then store them
    as plain strings, as `to_dataset` does (qwenvl_ft.data.sources)."""
    import pyarrow.compute as pc

    for name in table.column_names:
        column = table.column(name)
        if _is_image_list(column.type):
            flat = pc.list_flatten(column)
            if len(flat) and pc.struct_field(flat, "bytes").null_count != len(flat):
                return False
    return True


def _is_image_list(arrow_type) -> bool:
    import pyarrow as pa

    return pa.types.is_list(arrow_type) and pa.types.is_struct(arrow_type.value_type) and \
        {f.name for f in arrow_type.value_type} == {"bytes", "path"}


def _paths_only(table):
    """Image lists of {"bytes": null, "path"} records as lists of their path strings."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for index, name in enumerate(table.column_names):
        column = table.column(name)
        if _is_image_list(column.type):
            array = column.combine_chunks()
            paths = pa.ListArray.from_arrays(array.offsets, pc.struct_field(array.flatten(), "path"))
            table = table.set_column(index, pa.field(name, paths.type), paths)
    return table


def _write_split(folder: Path, name: str, kind: RowKind, rows_table, indices: List[int], length,
                 paths_only: bool, carried=None) -> None:
    """The rows at `indices` with their `length` and, where the measurer gave them, their carried fields
    (`carried`: (table of carried.arrow, each row number's position in it))."""
    import datasets
    import numpy as np
    import pyarrow as pa

    extra = {"length": datasets.Value("int32")} if length is not None else {}
    columns = list(kind.features())
    features = kind.features()
    if paths_only:
        for column in columns:
            if isinstance(features[column], datasets.List) and isinstance(features[column].feature, datasets.Image):
                extra[column] = datasets.List(datasets.Value("string"))
    if carried is not None:
        extra.update(datasets.Features.from_arrow_schema(carried[0].schema))
    writer = RowWriter(folder / f"{name}.arrow", kind, extra)
    start = 0
    for table in gather(rows_table, indices):
        table = table.select(columns)
        if paths_only:
            table = _paths_only(table)
        chunk = np.asarray(indices[start: start + table.num_rows], dtype=np.int64)
        if length is not None:
            table = table.append_column("length", pa.array(length[chunk], type=pa.int32()))
        if carried is not None:
            picked = carried[0].take(pa.array(carried[1][chunk]))
            for column in picked.column_names:
                table = table.append_column(column, picked.column(column))
        start += table.num_rows
        writer.add_table(table)
    writer.close()


def _plan(cfg: DataConfig, read: _Read, table) -> Tuple[SplitPlan, List[Duplicate]]:
    """Duplicate ids (data.on_duplicate_id), then the split: which rows are trained on and held out."""
    if cfg.format.is_generated:
        rows = list(read.spans[0].rows)
        train = rows[: cfg.max_samples] if cfg.max_samples else rows
        return SplitPlan(train, list(read.eval_span.rows), [rows], held_out=[0]), []
    spans = read.spans + ([read.eval_span] if read.eval_span else [])
    duplicates, excluded = handle_duplicates(cfg, spans, table.column("row_id"), table.column("source"),
                                             read.problems)
    source_of = _source_of(read.spans)
    for row in excluded:
        summary = _summary_of(read, source_of, row)
        if summary is not None:
            summary.duplicates_left_out += 1
            summary.invalid += int(cfg.on_duplicate_id.value == "error")
    plan = plan_splits(cfg, read.spans, read.eval_span.rows if read.eval_span else (), excluded)
    for summary, held in zip(read.summaries, plan.held_out):
        summary.held_out = held
    return plan, duplicates


def _summary_of(read: _Read, source_of, row: int) -> Optional[SourceSummary]:
    """The summary of the source a row number belongs to (None for rows of data.eval_path)."""
    index = source_of(row)
    if 0 <= index < len(read.summaries) and row < read.spans[index].start + read.spans[index].count:
        return read.summaries[index]
    return None


def _choose(cfg: DataConfig, read: _Read, plan: SplitPlan, length) -> Tuple[List[int], List[int],
                                                                           Optional[Mixture]]:
    """(training rows, held-out rows, mixture) among the rows that passed the check (`length` >= 0)."""
    def valid(row: int) -> bool:
        return length is None or length[row] >= 0

    evaluation = [r for r in plan.eval if valid(r)]
    if cfg.weighted:
        train, mixture = mix(cfg, read.spans, [[r for r in rows if valid(r)] for rows in plan.train_by_source])
        return train, evaluation, mixture
    train = [r for r in plan.train if valid(r)]
    if len(read.spans) == 1:
        return train, evaluation, None
    counts, source_of = [0] * len(read.spans), _source_of(read.spans)
    for row in train:
        counts[source_of(row)] += 1
    return train, evaluation, Mixture("concatenated", [Share(s.name, n, n) for s, n in zip(read.spans, counts)])


def _build(folder: Path, cfg: DataConfig, kind: RowKind, converters, generate, measure, workers: int,
           stats_type, progress: bool) -> Dict:
    """Read, split, measure, mix and write the entry's files into `folder`; returns its meta.json contents."""
    writer = RowWriter(folder / "rows.arrow", kind, bookkeeping())
    read = _read(cfg, kind, converters, generate, writer, progress)
    total = writer.close()
    store = open_rows(folder / "rows.arrow")
    table = store.data.table
    plan, duplicates = _plan(cfg, read, table)
    candidates = [r for rows in plan.train_by_source for r in rows] if cfg.weighted else plan.train
    length = outcome = None
    needed: List[int] = []
    if measure is not None:
        needed = candidates + plan.eval
        splits = [TRAIN] * len(candidates) + [EVAL] * len(plan.eval)
        length, outcome = _measure(folder, store, needed, splits, measure, workers, stats_type, total, progress)
    train, evaluation, mixture = _choose(cfg, read, plan, length)
    _count(read, plan, candidates, outcome, mixture, train)

    paths_only = _images_are_paths(table)
    carried = open_carried(folder / "carried.arrow", needed, total) if measure is not None else None
    _write_split(folder, "train", kind, table, train, length, paths_only, carried)
    if evaluation:
        _write_split(folder, "eval", kind, table, evaluation, length, paths_only, carried)
    del store, table, carried
    for used in ("rows.arrow", "carried.arrow"):  # the splits hold what is used; these are not needed again
        (folder / used).unlink(missing_ok=True)
    return {"version": None, "rows": total, "train": len(train), "eval": len(evaluation),
            "measured": measure is not None,
            "problems": [dataclasses.asdict(p) for p in read.problems],
            "duplicates": [dataclasses.asdict(d) for d in duplicates],
            "sources": [dataclasses.asdict(s) for s in read.summaries],
            "mixture": dataclasses.asdict(mixture) if mixture else None}


def _count(read: _Read, plan: SplitPlan, candidates: List[int], outcome, mixture: Optional[Mixture],
           train: List[int]) -> None:
    """Per-source counts of the measured outcomes and of the mixture."""
    source_of = _source_of(read.spans)
    if outcome is not None:
        for row in candidates + plan.eval:
            summary = _summary_of(read, source_of, row)
            if summary is not None:
                summary.invalid += int(outcome[row] == INVALID)
                summary.dropped += int(outcome[row] == DROPPED)
    for summary, rows in zip(read.summaries, plan.train_by_source):
        summary.train_rows = sum(1 for r in rows if outcome is None or outcome[r] == OK)
    if mixture is not None:
        for summary, share in zip(read.summaries, mixture.shares):
            summary.drawn = share.drawn
    elif read.summaries:
        read.summaries[0].drawn = len(train)


def _scratch() -> Path:
    """A folder for one process's prepared data when there is no cache (removed at exit)."""
    folder = Path(tempfile.mkdtemp(prefix="qwenvl_ft_data_"))
    atexit.register(shutil.rmtree, folder, True)
    return folder


def _load(folder: Path, stats_type, cached: bool) -> Prepared:
    meta = json.loads((folder / "meta.json").read_text())
    mixture = meta.get("mixture")
    if mixture is not None:
        mixture = Mixture(mixture["how"], [Share(**s) for s in mixture["shares"]])
    return Prepared(
        train=open_rows(folder / "train.arrow"),
        eval=open_rows(folder / "eval.arrow") if (folder / "eval.arrow").exists() else None,
        problems=[Problem(**p) for p in meta["problems"]],
        sources=[SourceSummary(**s) for s in meta["sources"]],
        duplicates=[Duplicate(**d) for d in meta["duplicates"]],
        mixture=mixture,
        stats=open_table(folder / "stats.arrow") if (folder / "stats.arrow").exists() else None,
        stats_type=stats_type, folder=folder, cached=cached)


def prepare(cfg: DataConfig, kind: RowKind, converters: Dict, generate: Optional[Callable] = None,
            measure: Optional[Callable] = None, method: str = "sft", fingerprint: str = "", workers: int = 0,
            cache_root: Optional[Path] = None, stats_type=None, progress: bool = True) -> Prepared:
    """The prepared data of `cfg`: from the cache entry when `cache_root` holds one with this key, else computed
    (and stored there). `measure` (row -> `stats_type` instance, raising RowDropped / DataError) may be None: the
    rows are then read, split and mixed but not measured. `fingerprint` must change whenever the measurer would
    measure a row differently (cache.processor_fingerprint for the collators); `method` names the training
    method and is part of the key."""
    from qwenvl_ft.data.cache import VERSION

    entry = Entry(cache_root, method, cache_key(method, fingerprint, cfg)) if cache_root is not None else None
    replace = cfg.cache == CacheMode.refresh
    if entry is not None and cfg.cache == CacheMode.on:
        if entry.complete or (rank() > 0 and entry.wait()):
            try:
                loaded = _load(entry.path, stats_type, cached=True)
                log.info("data: prepared rows and data check read from the cache %s", entry.path)
                return loaded
            except (OSError, ValueError, KeyError) as err:  # damaged by hand or by a full disk: build it again
                log.warning("data cache %s cannot be read (%s); checking the data again", entry.path, err)
                replace = True
    folder = entry.staging() if entry is not None else _scratch()
    try:
        meta = _build(folder, cfg, kind, converters, generate, measure, workers, stats_type, progress)
        meta["version"] = VERSION
        meta["key"] = entry.material if entry is not None else None
        (folder / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        if entry is not None:
            entry.commit(folder, replace=replace)
            folder = entry.path
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return _load(folder, stats_type, cached=False)
