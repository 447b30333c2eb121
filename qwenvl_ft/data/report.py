"""The data check's report (`DataReport`): what `qwenvl-ft data-check` prints, what a training start logs, the
numbers of summary.json, and data_check.json (every row's measurements too).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from qwenvl_ft.data.collate import SampleStats
from qwenvl_ft.data.mixing import Duplicate, Mixture
from qwenvl_ft.data.rows import Problem
from qwenvl_ft.data.store import OK, StatsView
from qwenvl_ft.errors import DataError

MAX_PROBLEMS_SHOWN = 50


@dataclass
class SplitReport:
    """One split (train or eval) after checking."""

    name: str
    rows: int = 0  # rows checked (after reading and converting)
    stats: Any = field(default_factory=list)  # the valid rows kept: a StatsView (or a list of SampleStats)
    dropped: List[Problem] = field(default_factory=list)  # valid rows data.overlength left out
    invalid: List[Problem] = field(default_factory=list)
    min_box_patches: float = 1.0  # data.grounding.min_box_patches: smaller boxes are listed

    @property
    def truncated(self) -> int:
        if isinstance(self.stats, StatsView):
            return int((self.stats.column("length") < self.stats.column("full_length")).sum())
        return sum(1 for s in self.stats if s.truncated)


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
        "boxes": int(v.counts("box_patches").sum()),
        "box_side_patches": percentiles(v.flat("box_patches")),
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
        lines = self._reading_lines()
        for name, split in self.splits.items():
            if not split.stats:
                continue
            lines += _split_lines(name, split)
        if "train" in self.splits and self.splits["train"].stats:
            lines.append(f"padding: {self.padding:.1%} of the batch tokens with {self.padding_layout}")
        lines += self._left_out_lines(problems)
        if self.cache:
            lines.append(self.cache)
        return "\n".join(lines)

    def _reading_lines(self) -> List[str]:
        """The settings, the rows read, kept, truncated and dropped per split, the sources and their mixture."""
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
        return lines

    def _left_out_lines(self, problems: bool) -> List[str]:
        """Rows data.overlength dropped, duplicate ids, and (with `problems`) the invalid rows."""
        lines: List[str] = []
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
        return lines

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


def _stats_line(label: str, values: Sequence[float], unit: str = "") -> str:
    p = percentiles(values)
    if not p:
        return f"  {label}: none"
    return f"  {label}: " + "  ".join(f"{k} {v:,.0f}{unit}" for k, v in p.items())


def _split_lines(name: str, split: SplitReport) -> List[str]:
    """One split's kept rows: images and videos, their sizes and visual tokens, text and trained tokens, sequence
    lengths and their histogram."""
    lines: List[str] = []
    v = _columns(split.stats)
    images, videos = v.flat("image_tokens"), v.flat("video_tokens")
    text_only = int(((v.counts("image_tokens") == 0) & (v.counts("video_tokens") == 0)).sum())
    lines.append(f"{name}: {len(v)} rows, {len(images)} images, {len(videos)} videos, "
                 f"{text_only} text-only rows")
    if len(images):
        widths, heights = v.flat("image_sizes", 0), v.flat("image_sizes", 1)
        sizes = Counter(zip(widths.tolist(), heights.tolist()))
        common = ", ".join(f"{w}x{h} ({n})" for (w, h), n in sizes.most_common(3))
        lines.append(_stats_line("image width", widths, " px"))
        lines.append(_stats_line("image height", heights, " px"))
        lines.append(f"  most common image sizes: {common}")
        lines.append(_stats_line("visual tokens per image", images))
    if len(videos):
        lines.append(_stats_line("frames per video (source)", v.flat("video_sizes", 0)))
        lines.append(_stats_line("visual tokens per video", videos))
    lines += _box_lines(v, split)
    lines.append(_stats_line("text tokens per row", v.column("text_tokens")))
    lines.append(_stats_line("trained (assistant) tokens per row", v.column("label_tokens")))
    lengths = v.column("length")
    lines.append(_stats_line("sequence length", lengths))
    lines += histogram(lengths.tolist())
    return lines


def _box_lines(v: StatsView, split: SplitReport) -> List[str]:
    """Boxes (data.grounding): how many, their smaller side in patches once resized, and the rows with one under
    data.grounding.min_box_patches (listed: the model cannot tell such a box from its neighbours)."""
    sides = v.flat("box_patches")
    if not len(sides):
        return []
    per_row = v.counts("box_patches")
    lines = [f"  boxes: {len(sides)} in {int((per_row > 0).sum())} rows",
             _stats_line("box size (smaller side, patches once resized)", sides)]
    floor = split.min_box_patches
    small = [s for s in split.stats if any(side < floor for side in s.box_patches)]
    if small:
        shown = ", ".join(s.source for s in small[:10]) + (f" and {len(small) - 10} more" if len(small) > 10 else "")
        lines.append(f"  boxes under data.grounding.min_box_patches={floor:g} patch once resized: {len(small)} "
                     f"rows ({shown})")
    return lines


def _truncated(split: SplitReport) -> List[str]:
    v = _columns(split.stats)
    if not len(v):
        return []
    mask = v.column("length") < v.column("full_length")
    if not mask.any():
        return []
    sources = v.table.column("source").to_numpy(zero_copy_only=False)[v.mask]
    return [str(x) for x in sources[mask]]


# data_check.json lists every row's measurements up to this many rows (a start should not spend seconds writing
# them); all of them are in the cache entry's stats.arrow.
ROWS_IN_REPORT = 20_000


def write_report(report: DataReport, output_dir, rows: bool = True) -> Optional[str]:
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
