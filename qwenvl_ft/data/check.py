"""Validate a whole dataset before any GPU time is spent: `qwenvl-ft data-check`, and the first step of training.

Every row is read, converted, its images and videos opened and decoded, its text rendered and tokenised, and its
length fitted to data.max_length, through the collator's own code (the training method's measurer, e.g.
`VisionChatCollator.measure`: `encode` without the pixel arithmetic), so a row that passes here does not fail in
the middle of training. The method that reads data.format supplies how its rows are stored, read and measured
(data/kinds.py), so conversations, preference pairs and prompts are all checked, cached and reused the same way
(qwenvl_ft/data/prepare.py). Only the processor is loaded, never the model. The result is the valid rows and a
`DataReport`: rows with problems (file, row, field, reason), image sizes and visual tokens, text tokens, sequence
lengths, rows truncated or dropped by data.overlength, duplicate ids, the mixture of data.sources, and the padding
expected at the configured batch size.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from qwenvl_ft.config.schema import DataConfig
from qwenvl_ft.data.batching import stored_lengths
from qwenvl_ft.data.collate import SampleStats, VisionChatCollator
from qwenvl_ft.data.mixing import Duplicate, Mixture
from qwenvl_ft.data.prepare import measure_all
from qwenvl_ft.data.sources import Problem
from qwenvl_ft.data.store import DROPPED, INVALID, OK, StatsView
from qwenvl_ft.errors import DataError

Measure = Callable[[dict], SampleStats]  # a training method's measurer (data/kinds.py)

log = logging.getLogger("qwenvl_ft")

MAX_PROBLEMS_SHOWN = 50


# ----------------------------------------------------------------------------------------------------------------
# checking rows


def _measure_all(rows: Sequence[dict], measure: Measure, workers: int) -> List[Tuple[str, object]]:
    names = {OK: "ok", DROPPED: "dropped", INVALID: "invalid"}
    return [(names[code], result) for code, result in measure_all(rows, measure, workers)]


@dataclass
class SplitReport:
    """One split (train or eval) after checking."""

    name: str
    rows: int = 0  # rows checked (after reading and converting)
    stats: Any = field(default_factory=list)  # the valid rows kept: a StatsView (or a list of SampleStats)
    dropped: List[Problem] = field(default_factory=list)  # valid rows data.overlength left out
    invalid: List[Problem] = field(default_factory=list)

    @property
    def truncated(self) -> int:
        if isinstance(self.stats, StatsView):
            return int((self.stats.column("length") < self.stats.column("full_length")).sum())
        return sum(1 for s in self.stats if s.truncated)


def check_rows(rows: Sequence[dict], measure: Measure, name: str = "train",
               workers: int = 0) -> Tuple[List[dict], SplitReport]:
    """(rows to train on, report) of rows in a list (no store, no cache): every row measured once; invalid and
    dropped rows left out and recorded."""
    report = SplitReport(name, rows=len(rows))
    kept = []
    for row, (outcome, result) in zip(rows, _measure_all(rows, measure, workers)):
        if outcome == "ok":
            kept.append(row)
            report.stats.append(result)
        elif outcome == "dropped":
            report.dropped.append(Problem(row.get("source", "?"), result))
        else:
            report.invalid.append(Problem(row.get("source", "?"), result))
    return kept, report


# ----------------------------------------------------------------------------------------------------------------
# the report


def percentiles(values: Sequence[float], points=(0, 50, 90, 99, 100)) -> Dict[str, float]:
    import numpy as np

    if not len(values):
        return {}
    array = np.asarray(values, dtype=float)
    names = {0: "min", 100: "max"}
    return {names.get(p, f"p{p}"): float(np.percentile(array, p, method="nearest")) for p in points}


def histogram(values: Sequence[int], bins: int = 10, width: int = 40) -> List[str]:
    import numpy as np

    array = np.asarray(values, dtype=float)
    array = array[~np.isnan(array)]  # a column read back from the row store holds floats (NaN: not measured)
    if not len(array):
        return []
    counts, edges = np.histogram(array, bins=int(max(1, min(bins, array.max() - array.min()))))
    peak = max(counts.max(), 1)
    return [f"  {int(lo):>7d}-{int(hi):<7d} {int(c):>7d} {'#' * int(round(width * c / peak))}"
            for lo, hi, c in zip(edges[:-1], edges[1:], counts)]


def expected_padding(lengths: Sequence[int], cfg: DataConfig, batch_size: int, seed: int) -> Tuple[float, str]:
    """(padding fraction of the batch tensors, how batches are formed) for the configured batch layout."""
    if not len(lengths):
        return 0.0, "no rows"
    if getattr(cfg, "packing", False):
        return 0.0, "packed rows (data.packing): no padding"
    if getattr(cfg, "max_tokens_per_batch", None):
        from qwenvl_ft.data.batching import padding_fraction, plan_token_budget

        batches = plan_token_budget(lengths, cfg.max_tokens_per_batch, seed)
        return padding_fraction(lengths, batches, packed=False), \
            f"token-budget batches of <= {cfg.max_tokens_per_batch} tokens"
    if getattr(cfg, "group_by_length", False):
        import torch
        from transformers.trainer_pt_utils import LengthGroupedSampler

        order = list(LengthGroupedSampler(batch_size, lengths=list(lengths),
                                          generator=torch.Generator().manual_seed(seed)))
        how = f"length-grouped batches of {batch_size}"
    else:
        order = list(range(len(lengths)))
        random.Random(seed).shuffle(order)  # the Trainer's random sampler: any order is as likely
        how = f"random batches of {batch_size}"
    real = total = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start: start + batch_size]]
        real += sum(batch)
        total += max(batch) * len(batch)
    return 1 - real / total, how


def _columns(stats) -> StatsView:
    """A StatsView of a split's kept rows, also for a plain list of SampleStats (check_rows)."""
    if isinstance(stats, StatsView):
        return stats
    import pyarrow as pa

    from qwenvl_ft.data.store import stats_record, stats_schema

    table = pa.Table.from_pylist([stats_record(i, 0, 0, s.source, OK, s) for i, s in enumerate(stats)],
                                 schema=stats_schema(SampleStats))
    return StatsView(table, [True] * len(stats), SampleStats)


def _split_summary(split: SplitReport) -> Dict[str, object]:
    v = _columns(split.stats)
    images, videos = v.counts("image_tokens"), v.counts("video_tokens")
    return {
        "rows_kept": len(v), "truncated": split.truncated, "dropped": len(split.dropped),
        "images": int(images.sum()), "videos": int(videos.sum()),
        "text_only_rows": int(((images == 0) & (videos == 0)).sum()),
        "sequence_length": percentiles(v.column("length")),
        "text_tokens": percentiles(v.column("text_tokens")),
        "label_tokens": percentiles(v.column("label_tokens")),
        "visual_tokens_per_image": percentiles(v.flat("image_tokens")),
        "visual_tokens_per_video": percentiles(v.flat("video_tokens")),
        "visual_tokens_per_row": percentiles(v.column("full_length") - v.column("text_tokens")),
        "image_width": percentiles(v.flat("image_sizes", 0)),
        "image_height": percentiles(v.flat("image_sizes", 1)),
    }


@dataclass
class DataReport:
    problems: List[Problem]  # every invalid row, from reading or from encoding
    splits: Dict[str, SplitReport]
    settings: Dict[str, object]
    padding: float = 0.0
    padding_layout: str = ""
    sources: List[Any] = field(default_factory=list)  # prepare.SourceSummary per data source
    duplicates: List[Duplicate] = field(default_factory=list)
    mixture: Optional[Mixture] = None
    cache: str = ""  # where the results are stored, and whether they were read from there

    def summary(self) -> Dict[str, object]:
        """The numbers, for summary.json / data_check.json."""
        out: Dict[str, object] = {"invalid_rows": len(self.problems), "padding_fraction": round(self.padding, 4),
                                  "duplicate_ids": len(self.duplicates)}
        for name, split in self.splits.items():
            out[name] = _split_summary(split)
        if len(self.sources) > 1:
            out["sources"] = [asdict(s) for s in self.sources]
        if self.mixture is not None:
            out["mixture"] = self.mixture.to_dict()
        return out

    def to_dict(self, rows: bool = True) -> Dict[str, object]:
        """Everything; `rows` adds every kept row's measurements (left out of the file for very large data)."""
        out = {
            "settings": self.settings,
            "summary": self.summary(),
            "problems": [asdict(p) for p in self.problems],
            "dropped": [asdict(p) for s in self.splits.values() for p in s.dropped],
            "duplicates": [asdict(d) for d in self.duplicates],
            "truncated": [w for split in self.splits.values() for w in _truncated(split)],
            "cache": self.cache,
        }
        if rows:
            out["rows"] = {name: [asdict(s) for s in split.stats] for name, split in self.splits.items()}
        return out

    def text(self, problems: bool = True) -> str:
        """The report for people; `problems=False` leaves out the invalid rows (when an error lists them)."""
        def stats_line(label: str, values: Sequence[float], unit: str = "") -> str:
            p = percentiles(values)
            if not p:
                return f"  {label}: none"
            return f"  {label}: " + "  ".join(f"{k} {v:,.0f}{unit}" for k, v in p.items())

        s = self.settings
        lines = [f"data: format={s['format']} ({s['rows']} for trainer={s['method']}) path={s['path']} | "
                 f"max_length={s['max_length']} "
                 f"(overlength={s['overlength']}) | image pixels {s['min_pixels']:,}..{s['max_pixels']:,}"
                 + (f" (fixed {s['resized']})" if s.get("resized") else "")]
        read = sum(x.read for x in self.sources) if self.sources else \
            len(self.problems) + sum(len(x.stats) + len(x.dropped) for x in self.splits.values())
        lines.append(f"rows: {read} read, {len(self.problems)} invalid; " + "; ".join(
            f"{name}: {len(x.stats)} kept, {x.truncated} truncated, {len(x.dropped)} dropped"
            for name, x in self.splits.items()))
        if len(self.sources) > 1:
            lines.append("sources:")
            for src in self.sources:
                lines.append(f"  {src.name}: {src.read} read, {src.invalid} invalid, {src.dropped} dropped, "
                             f"{src.held_out} held out, {src.train_rows} training rows"
                             + (f", {src.duplicates_left_out} duplicate ids left out" if src.duplicates_left_out
                                else ""))
        if self.mixture is not None:
            lines += self.mixture.lines()
        for name, split in self.splits.items():
            if not split.stats:
                continue
            v = _columns(split.stats)
            images, videos = v.flat("image_tokens"), v.flat("video_tokens")
            text_only = int(((v.counts("image_tokens") == 0) & (v.counts("video_tokens") == 0)).sum())
            lines.append(f"{name}: {len(v)} rows, {len(images)} images, {len(videos)} videos, "
                         f"{text_only} text-only rows")
            if len(images):
                widths, heights = v.flat("image_sizes", 0), v.flat("image_sizes", 1)
                sizes = Counter(zip(widths.tolist(), heights.tolist()))
                common = ", ".join(f"{w}x{h} ({n})" for (w, h), n in sizes.most_common(3))
                lines.append(stats_line("image width", widths, " px"))
                lines.append(stats_line("image height", heights, " px"))
                lines.append(f"  most common image sizes: {common}")
                lines.append(stats_line("visual tokens per image", images))
            if len(videos):
                lines.append(stats_line("frames per video (source)", v.flat("video_sizes", 0)))
                lines.append(stats_line("visual tokens per video", videos))
            lines.append(stats_line("text tokens per row", v.column("text_tokens")))
            lines.append(stats_line("trained (assistant) tokens per row", v.column("label_tokens")))
            lengths = v.column("length")
            lines.append(stats_line("sequence length", lengths))
            lines += histogram(lengths.tolist())
        if "train" in self.splits and self.splits["train"].stats:
            lines.append(f"padding: {self.padding:.1%} of the batch tokens with {self.padding_layout}")
        dropped = [p for split in self.splits.values() for p in split.dropped]
        if dropped:
            lines.append(f"dropped by data.overlength ({len(dropped)}):")
            lines += [f"  {p.message}" for p in dropped[:10]]
            if len(dropped) > 10:
                lines.append(f"  ... and {len(dropped) - 10} more")
        if self.duplicates:
            lines += self.duplicate_lines()
        if self.problems and problems:
            lines.append(f"invalid rows ({len(self.problems)}):")
            lines += [f"  {p.message}" for p in self.problems[:MAX_PROBLEMS_SHOWN]]
            if len(self.problems) > MAX_PROBLEMS_SHOWN:
                lines.append(f"  ... and {len(self.problems) - MAX_PROBLEMS_SHOWN} more")
        if self.cache:
            lines.append(self.cache)
        return "\n".join(lines)

    def duplicate_lines(self) -> List[str]:
        policy = self.settings.get("on_duplicate_id", "warn")
        effect = {"warn": "all kept: each trains as often as it occurs",
                  "drop": "the first of each kept, the others left out",
                  "error": "the later ones are invalid rows"}.get(policy, "")
        lines = [f"duplicate ids ({len(self.duplicates)}, data.on_duplicate_id={policy}: {effect}):"]
        lines += [f"  {d.message()}" for d in self.duplicates[:MAX_PROBLEMS_SHOWN]]
        if len(self.duplicates) > MAX_PROBLEMS_SHOWN:
            lines.append(f"  ... and {len(self.duplicates) - MAX_PROBLEMS_SHOWN} more")
        return lines

    def error(self, listing: Optional[str] = None, listed_above: bool = False) -> DataError:
        if listed_above:
            where = " and in " + listing if listing else ""
            return DataError(f"{len(self.problems)} invalid row(s), listed above{where}; fix them, or set "
                             f"data.skip_invalid=true to leave them out")
        shown = [f"  {p.message}" for p in self.problems[:MAX_PROBLEMS_SHOWN]]
        more = len(self.problems) - len(shown)
        tail = [f"  ... and {more} more" + (f" (all in {listing})" if listing else "")] if more > 0 else []
        return DataError("\n".join([f"{len(self.problems)} invalid row(s):"] + shown + tail +
                                   ["fix them, or set data.skip_invalid=true to leave them out"]))


def _truncated(split: SplitReport) -> List[str]:
    v = _columns(split.stats)
    if not len(v):
        return []
    mask = v.column("length") < v.column("full_length")
    if not mask.any():
        return []
    sources = v.table.column("source").to_numpy(zero_copy_only=False)[v.mask]
    return [str(x) for x in sources[mask]]


# ----------------------------------------------------------------------------------------------------------------
# whole dataset


def _file_order(problem: Problem):
    """Problems in file order ('f.jsonl:line 10' after 'f.jsonl:line 9'), whichever stage found them."""
    match = re.match(r"^(.*):(?:line|row) (\d+)$", problem.source)
    return (match.group(1), int(match.group(2))) if match else (problem.source, -1)


@dataclass
class CheckedData:
    train: List[dict]
    eval: List[dict]
    report: DataReport


def check_data(cfg: DataConfig, processor, batch_size: int = 1, seed: int = 42, output_dir=None,
               progress: bool = True) -> CheckedData:
    """Read both splits, measure every row, and report. Raises DataError only for what makes the dataset
    unusable as a whole (a missing or unreadable file, a hub id that does not load); bad rows are in the report.
    The training method that reads data.format stores, reads and measures the rows. With `output_dir`, the results
    are cached (qwenvl_ft/data/cache.py) and a later call with the same data, settings and method reads them
    instead of measuring again."""
    import time

    from qwenvl_ft.data.cache import cache_root, data_key, processor_fingerprint
    from qwenvl_ft.data.kinds import rows_of
    from qwenvl_ft.data.prepare import prepare

    method = cfg.format.method
    kind = rows_of(method)
    collator = VisionChatCollator(processor, cfg)  # the image and video bounds the report states
    started = time.perf_counter()
    prepared = prepare(cfg, kind.store_kind, kind.converters, generate=kind.generate,
                       measure=kind.measurer(processor, cfg), method=method.name,
                       fingerprint=processor_fingerprint(processor), workers=cfg.num_workers,
                       cache_root=cache_root(cfg, output_dir), stats_type=SampleStats, progress=progress)
    splits = {name: SplitReport(name, rows=prepared.measured(name), stats=prepared.kept(name),
                                dropped=prepared.refused(name, DROPPED), invalid=prepared.refused(name, INVALID))
              for name in ("train", "eval")}
    if not splits["eval"].rows:
        del splits["eval"]
    settings = {
        "format": cfg.format.value, "method": method.name, "rows": method.row_kind,
        "path": cfg.path or ("generated" if not cfg.sources else None),
        "sources": [s.path for s in cfg.sources] or None, "eval_path": cfg.eval_path,
        "max_length": cfg.max_length, "overlength": cfg.overlength.value, "min_pixels": collator.min_pixels,
        "max_pixels": collator.max_pixels, "video_min_pixels": collator.video_min_pixels,
        "video_max_pixels": collator.video_max_pixels, "batch_size": batch_size,
        "resized": f"{cfg.resized_height}x{cfg.resized_width}" if cfg.resized_height else None,
        "max_visual_tokens": cfg.max_visual_tokens, "skip_invalid": cfg.skip_invalid,
        "on_duplicate_id": cfg.on_duplicate_id.value,
        "data_key": data_key(cfg),  # what `qwenvl-ft estimate` compares before it uses these measurements
    }
    if cfg.sources:
        settings["path"] = " + ".join(s.path for s in cfg.sources)
    problems = sorted(prepared.problems + splits["train"].invalid +
                      (splits["eval"].invalid if "eval" in splits else []), key=_file_order)
    report = DataReport(problems, splits, settings, sources=prepared.sources, duplicates=prepared.duplicates,
                        mixture=prepared.mixture, cache=_cache_line(prepared, cfg, output_dir, splits,
                                                                    time.perf_counter() - started))
    lengths = stored_lengths(prepared.train) if len(prepared.train) else []
    report.padding, report.padding_layout = expected_padding(lengths, cfg, batch_size, seed)
    return CheckedData(prepared.train, prepared.eval, report)


def _cache_line(prepared, cfg: DataConfig, output_dir, splits: Dict[str, SplitReport], elapsed: float) -> str:
    from qwenvl_ft.data.cache import cache_root

    measured = sum(split.rows for split in splits.values())
    if prepared.cached:
        return f"data check read from {prepared.folder} in {elapsed:.1f} s ({measured:,} rows, nothing decoded)"
    line = (f"data check: {measured:,} rows measured in {elapsed:.1f} s ({measured / max(elapsed, 1e-9):,.0f} "
            f"rows/s, {cfg.num_workers} worker(s))")
    if cfg.cache.value != "off" and cache_root(cfg, output_dir) is not None:
        line += f"; stored in {prepared.folder}"
    return line


def load_checked_splits(cfg: DataConfig, processor, batch_size: int, seed: int = 42, output_dir=None,
                        log_report: bool = True):
    """(train dataset, eval dataset or None, report) for training: the check first, and a refusal to go on with
    invalid rows unless data.skip_invalid (then they are left out and counted). The datasets are the training
    method's (`MethodRows.from_store`), memory-mapped, and carry each row's `length`, which the batch layouts read
    instead of measuring again (`batching.stored_lengths` reads them, in row order)."""
    checked = check_data(cfg, processor, batch_size, seed, output_dir=output_dir)
    report = checked.report
    listing = _write_report(report, output_dir, rows=False)
    if log_report:  # False: another rank of a distributed run, reading what its main process checked
        log.info("data check:\n%s", report.text(problems=False))
    if report.problems and not cfg.skip_invalid:
        raise report.error(listing)
    if report.problems:
        log.warning("data.skip_invalid=true: %d invalid row(s) left out", len(report.problems))
    if report.duplicates and cfg.on_duplicate_id.value == "warn":
        log.warning("%s", "\n".join(report.duplicate_lines()[:11]))
    if not len(checked.train):
        raise DataError(f"{cfg.describe_path()}: no training rows left after the data check")
    from qwenvl_ft.data.kinds import rows_of

    from_store = rows_of(cfg.format.method).from_store
    held_out = from_store(checked.eval) if checked.eval is not None and len(checked.eval) else None
    return from_store(checked.train), held_out, report


# data_check.json lists every row's measurements up to this many rows (a start should not spend seconds writing
# them); all of them are in the cache entry's stats.arrow.
ROWS_IN_REPORT = 20_000


def _write_report(report: DataReport, output_dir, rows: bool = True) -> Optional[str]:
    """data_check.json, written through a temporary file. `rows`: every row's measurements too, streamed one at a
    time (up to ROWS_IN_REPORT rows), so that memory does not grow with the data; a training start leaves them
    out (they are in the cache's stats.arrow) rather than spend seconds on them."""
    if output_dir is None:
        return None
    import os

    path = Path(output_dir) / "data_check.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    with_rows = rows and sum(len(s.stats) for s in report.splits.values()) <= ROWS_IN_REPORT
    head = json.dumps(report.to_dict(rows=False), indent=1, default=str)
    with partial.open("w") as handle:
        handle.write(head[:-2])  # the object without its closing "\n}"
        if with_rows:
            handle.write(',\n "rows": {')
            for number, (name, split) in enumerate(report.splits.items()):
                handle.write(("," if number else "") + f"\n  {json.dumps(name)}: [")
                for index, record in enumerate(_columns(split.stats).records()):
                    handle.write(("," if index else "") + "\n   " + json.dumps(record, default=str))
                handle.write("\n  ]")
            handle.write("\n }")
        handle.write("\n}\n")
    os.replace(partial, path)
    return str(path)


def data_check(composed) -> Dict:
    """`qwenvl-ft data-check`: the report on stdout and in data_check.json; status 2 when a row is invalid
    (unless data.skip_invalid)."""
    from qwenvl_ft.config.compose import validate
    from qwenvl_ft.modeling.build import build_processor
    from qwenvl_ft.runlock import lock_folder
    from qwenvl_ft.runtime import ensure_writable

    cfg = validate(composed)
    lock = lock_folder(ensure_writable(cfg.output_dir))  # it writes data_check.json and the cache there
    processor = build_processor(cfg.model, cfg.data)
    checked = check_data(cfg.data, processor, cfg.trainer.batch_size, cfg.data.seed,
                         output_dir=cfg.output_dir)
    report = checked.report
    listing = _write_report(report, cfg.output_dir)
    lock.release()
    print(report.text())
    if listing:
        print(f"report: {listing}")
    if report.problems and not cfg.data.skip_invalid:
        raise report.error(listing, listed_above=True)
    if report.problems:
        print(f"data.skip_invalid=true: {len(report.problems)} invalid row(s) would be left out")
        log.warning("data.skip_invalid=true: %d invalid row(s) would be left out", len(report.problems))
    return report.summary()
