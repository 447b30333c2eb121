"""Validate a whole dataset before any GPU time is spent: `qwenvl-ft data-check`, and the first step of training.

Every row is read, converted, its images and videos opened and decoded, its text rendered and tokenised, and its
length fitted to data.max_length, through the collator's own code (the training method's measurer, e.g.
`VisionChatCollator.measure`: `encode` without the pixel arithmetic), so a row that passes here does not fail in
the middle of training. The method that reads data.format supplies the reader and the measurer, so conversations,
preference pairs and prompts are all checked the same way. Only the processor is loaded, never the model. The result is the valid rows and a `DataReport`: rows with problems (file, row, field,
reason), image sizes and visual tokens, text tokens, sequence lengths, rows truncated or dropped by
data.overlength, and the padding expected at the configured batch size.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from qwenvl_ft.config.schema import DataConfig
from qwenvl_ft.data.collate import RowDropped, SampleStats, VisionChatCollator
from qwenvl_ft.data.sources import Problem
from qwenvl_ft.data.workers import check_workers
from qwenvl_ft.errors import DataError

Measure = Callable[[dict], SampleStats]  # a training method's measurer (methods/base.py)

log = logging.getLogger("qwenvl_ft")

MAX_PROBLEMS_SHOWN = 50


# ----------------------------------------------------------------------------------------------------------------
# checking rows


def _measure_one(measure: Measure, row: dict):
    try:
        return "ok", measure(row)
    except RowDropped as err:
        return "dropped", str(err)
    except DataError as err:
        return "invalid", str(err)
    except Exception as err:  # a row that breaks a library is still that row's problem, not a crash at step 9000
        return "invalid", f"{row.get('source', '?')}: unexpected error while encoding ({type(err).__name__}: {err})"


class _Measured:
    """Map-style dataset: item i is row i measured (what the DataLoader workers run)."""

    def __init__(self, rows: Sequence[dict], measure: Measure):
        self.rows, self.measure = rows, measure

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        return _measure_one(self.measure, self.rows[index])


def _as_is(items):
    return items


def _measure_all(rows: Sequence[dict], measure: Measure, workers: int) -> List[Tuple[str, object]]:
    if workers == 0 or len(rows) < 2 * workers:
        return [_measure_one(measure, row) for row in rows]
    from torch.utils.data import DataLoader

    # The same worker processes (and pickled collator) training uses; one row per item keeps results in order.
    loader = DataLoader(_Measured(rows, measure), batch_size=None, num_workers=workers, collate_fn=_as_is)
    return list(loader)


@dataclass
class SplitReport:
    """One split (train or eval) after checking."""

    name: str
    rows: int = 0  # rows checked (after reading and converting)
    stats: List[SampleStats] = field(default_factory=list)  # the valid rows kept
    dropped: List[Problem] = field(default_factory=list)  # valid rows data.overlength left out
    invalid: List[Problem] = field(default_factory=list)

    @property
    def truncated(self) -> int:
        return sum(1 for s in self.stats if s.truncated)


def check_rows(rows: Sequence[dict], measure: Measure, name: str = "train",
               workers: int = 0) -> Tuple[List[dict], SplitReport]:
    """(rows to train on, report): every row measured once; invalid and dropped rows left out and recorded."""
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

    if not len(values):
        return []
    counts, edges = np.histogram(np.asarray(values), bins=max(1, min(bins, max(values) - min(values))))
    peak = max(counts.max(), 1)
    return [f"  {int(lo):>7d}-{int(hi):<7d} {int(c):>7d} {'#' * int(round(width * c / peak))}"
            for lo, hi, c in zip(edges[:-1], edges[1:], counts)]


def expected_padding(lengths: Sequence[int], cfg: DataConfig, batch_size: int, seed: int) -> Tuple[float, str]:
    """(padding fraction of the batch tensors, how batches are formed) for the configured batch layout."""
    if not lengths:
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


@dataclass
class DataReport:
    problems: List[Problem]  # every invalid row, from reading or from encoding
    splits: Dict[str, SplitReport]
    settings: Dict[str, object]
    padding: float = 0.0
    padding_layout: str = ""

    def summary(self) -> Dict[str, object]:
        """The numbers, for summary.json / data_check.json."""
        out: Dict[str, object] = {"invalid_rows": len(self.problems), "padding_fraction": round(self.padding, 4)}
        for name, split in self.splits.items():
            lengths = [s.length for s in split.stats]
            out[name] = {
                "rows_kept": len(split.stats), "truncated": split.truncated, "dropped": len(split.dropped),
                "images": sum(len(s.image_tokens) for s in split.stats),
                "videos": sum(len(s.video_tokens) for s in split.stats),
                "text_only_rows": sum(1 for s in split.stats if not s.image_tokens and not s.video_tokens),
                "sequence_length": percentiles(lengths),
                "text_tokens": percentiles([s.text_tokens for s in split.stats]),
                "label_tokens": percentiles([s.label_tokens for s in split.stats]),
                "visual_tokens_per_image": percentiles([t for s in split.stats for t in s.image_tokens]),
                "visual_tokens_per_video": percentiles([t for s in split.stats for t in s.video_tokens]),
                "image_width": percentiles([w for s in split.stats for w, _ in s.image_sizes]),
                "image_height": percentiles([h for s in split.stats for _, h in s.image_sizes]),
            }
        return out

    def to_dict(self) -> Dict[str, object]:
        return {
            "settings": self.settings,
            "summary": self.summary(),
            "problems": [asdict(p) for p in self.problems],
            "dropped": [asdict(p) for s in self.splits.values() for p in s.dropped],
            "truncated": [s.source for split in self.splits.values() for s in split.stats if s.truncated],
            "rows": {name: [asdict(s) for s in split.stats] for name, split in self.splits.items()},
        }

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
        read = len(self.problems) + sum(len(x.stats) + len(x.dropped) for x in self.splits.values())
        lines.append(f"rows: {read} read, {len(self.problems)} invalid; " + "; ".join(
            f"{name}: {len(x.stats)} kept, {x.truncated} truncated, {len(x.dropped)} dropped"
            for name, x in self.splits.items()))
        for name, split in self.splits.items():
            if not split.stats:
                continue
            images = [t for x in split.stats for t in x.image_tokens]
            videos = [t for x in split.stats for t in x.video_tokens]
            text_only = sum(1 for x in split.stats if not x.image_tokens and not x.video_tokens)
            lines.append(f"{name}: {len(split.stats)} rows, {len(images)} images, {len(videos)} videos, "
                         f"{text_only} text-only rows")
            if images:
                sizes = Counter(f"{w}x{h}" for x in split.stats for w, h in x.image_sizes)
                common = ", ".join(f"{size} ({n})" for size, n in sizes.most_common(3))
                lines.append(stats_line("image width", [w for x in split.stats for w, _ in x.image_sizes], " px"))
                lines.append(stats_line("image height", [h for x in split.stats for _, h in x.image_sizes], " px"))
                lines.append(f"  most common image sizes: {common}")
                lines.append(stats_line("visual tokens per image", images))
            if videos:
                frames = [f for x in split.stats for f, _, _ in x.video_sizes]
                lines.append(stats_line("frames per video (source)", frames))
                lines.append(stats_line("visual tokens per video", videos))
            lines.append(stats_line("text tokens per row", [x.text_tokens for x in split.stats]))
            lines.append(stats_line("trained (assistant) tokens per row", [x.label_tokens for x in split.stats]))
            lengths = [x.length for x in split.stats]
            lines.append(stats_line("sequence length", lengths))
            lines += histogram(lengths)
        if "train" in self.splits and self.splits["train"].stats:
            lines.append(f"padding: {self.padding:.1%} of the batch tokens with {self.padding_layout}")
        dropped = [p for split in self.splits.values() for p in split.dropped]
        if dropped:
            lines.append(f"dropped by data.overlength ({len(dropped)}):")
            lines += [f"  {p.message}" for p in dropped[:10]]
            if len(dropped) > 10:
                lines.append(f"  ... and {len(dropped) - 10} more")
        if self.problems and problems:
            lines.append(f"invalid rows ({len(self.problems)}):")
            lines += [f"  {p.message}" for p in self.problems[:MAX_PROBLEMS_SHOWN]]
            if len(self.problems) > MAX_PROBLEMS_SHOWN:
                lines.append(f"  ... and {len(self.problems) - MAX_PROBLEMS_SHOWN} more")
        return "\n".join(lines)

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


def check_data(cfg: DataConfig, processor, batch_size: int = 1, seed: int = 42) -> CheckedData:
    """Read both splits, measure every row, and report. Raises DataError only for what makes the dataset
    unusable as a whole (a missing or unreadable file, a hub id that does not load); bad rows are in the report.
    The training method that reads data.format reads and measures the rows."""
    method = cfg.format.method
    measure = method.measurer(processor, cfg)
    collator = VisionChatCollator(processor, cfg)  # the image and video bounds the report states
    load_problems: List[Problem] = []
    train_rows, eval_rows = method.read_rows(cfg, load_problems)
    train, train_report = check_rows(train_rows, measure, "train", check_workers(cfg.num_workers, len(train_rows)))
    evaluation, eval_report = check_rows(eval_rows, measure, "eval", check_workers(cfg.num_workers, len(eval_rows)))
    splits = {"train": train_report} if not eval_rows else {"train": train_report, "eval": eval_report}
    settings = {
        "format": cfg.format.value, "method": method.name, "rows": method.row_kind,
        "path": cfg.path or "generated", "eval_path": cfg.eval_path,
        "max_length": cfg.max_length, "overlength": cfg.overlength.value, "min_pixels": collator.min_pixels,
        "max_pixels": collator.max_pixels, "video_min_pixels": collator.video_min_pixels,
        "video_max_pixels": collator.video_max_pixels, "batch_size": batch_size,
        "resized": f"{cfg.resized_height}x{cfg.resized_width}" if cfg.resized_height else None,
        "max_visual_tokens": cfg.max_visual_tokens, "skip_invalid": cfg.skip_invalid,
    }
    problems = sorted(load_problems + train_report.invalid + eval_report.invalid, key=_file_order)
    report = DataReport(problems, splits, settings)
    report.padding, report.padding_layout = expected_padding([s.length for s in train_report.stats], cfg,
                                                             batch_size, seed)
    return CheckedData(train, evaluation, report)


def load_checked_splits(cfg: DataConfig, processor, batch_size: int, seed: int = 42, output_dir=None):
    """(train dataset, eval dataset or None, report) for training: the check first, and a refusal to go on with
    invalid rows unless data.skip_invalid (then they are left out and counted). The datasets are the training
    method's (`Method.to_dataset`); the report's train stats hold each kept row's length, in order."""
    checked = check_data(cfg, processor, batch_size, seed)
    report = checked.report
    listing = _write_report(report, output_dir)
    log.info("data check:\n%s", report.text(problems=False))
    if report.problems and not cfg.skip_invalid:
        raise report.error(listing)
    if report.problems:
        log.warning("data.skip_invalid=true: %d invalid row(s) left out", len(report.problems))
    if not checked.train:
        raise DataError(f"{cfg.path or cfg.format.value}: no training rows left after the data check")
    to_dataset = cfg.format.method.to_dataset
    return to_dataset(checked.train), (to_dataset(checked.eval) if checked.eval else None), report


def _write_report(report: DataReport, output_dir) -> Optional[str]:
    if output_dir is None:
        return None
    path = Path(output_dir) / "data_check.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_dict(), indent=1, default=str))
    return str(path)


def data_check(composed) -> Dict:
    """`qwenvl-ft data-check`: the report on stdout and in data_check.json; status 2 when a row is invalid
    (unless data.skip_invalid)."""
    from qwenvl_ft.config.compose import validate
    from qwenvl_ft.modeling.build import build_processor

    cfg = validate(composed)
    processor = build_processor(cfg.model, cfg.data)
    checked = check_data(cfg.data, processor, cfg.trainer.batch_size, cfg.data.seed)
    report = checked.report
    listing = _write_report(report, cfg.output_dir)
    print(report.text())
    if listing:
        print(f"report: {listing}")
    if report.problems and not cfg.data.skip_invalid:
        raise report.error(listing, listed_above=True)
    if report.problems:
        print(f"data.skip_invalid=true: {len(report.problems)} invalid row(s) would be left out")
        log.warning("data.skip_invalid=true: %d invalid row(s) would be left out", len(report.problems))
    return report.summary()
