"""Validate a whole dataset before any GPU time is spent: what `qwenvl-ft data-check` runs
(qwenvl_ft/commands/data_check.py), and the first step of training.

Every row is read, converted, its images and videos opened and decoded, its text rendered and tokenised, and its
length fitted to data.max_length, through the collator's own code (the training method's measurer, e.g.
`VisionChatCollator.measure`: `encode` without the pixel arithmetic), so a row that passes here does not fail in
the middle of training. The method that reads data.format supplies how its rows are stored, read and measured
(data/kinds.py), so conversations, preference pairs and prompts are all checked, cached and reused the same way
(qwenvl_ft/data/prepare.py). Only the processor is loaded, never the model. The result is the valid rows and a
`DataReport` (data/report.py): rows with problems (file, row, field, reason), image sizes and visual tokens, text
tokens, sequence lengths, rows truncated or dropped by data.overlength, duplicate ids, the mixture of data.sources,
and the padding expected at the configured batch size.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

from qwenvl_ft.config.data import DataConfig
from qwenvl_ft.data.batching import stored_lengths
from qwenvl_ft.data.collate import SampleStats, VisionChatCollator
from qwenvl_ft.data.measuring import measure_all
from qwenvl_ft.data.report import DataReport, SplitReport, write_report
from qwenvl_ft.data.rows import Problem
from qwenvl_ft.data.store import DROPPED, INVALID, OK
from qwenvl_ft.errors import DataError

Measure = Callable[[dict], SampleStats]  # a training method's measurer (data/kinds.py)

log = logging.getLogger("qwenvl_ft")


# ----------------------------------------------------------------------------------------------------------------
# checking rows


def _measure_all(rows: Sequence[dict], measure: Measure, workers: int) -> List[Tuple[str, object]]:
    names = {OK: "ok", DROPPED: "dropped", INVALID: "invalid"}
    return [(names[code], result) for code, result in measure_all(rows, measure, workers)]


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
    The training method that reads data.format stores, reads and measures the rows. The results are cached
    (qwenvl_ft/data/cache.py: the per-user cache; `output_dir` in a run over several machines) and a later call
    with the same data, settings and method reads them instead of measuring again."""
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
                                dropped=prepared.refused(name, DROPPED), invalid=prepared.refused(name, INVALID),
                                min_box_patches=cfg.grounding.min_box_patches)
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
    listing = write_report(report, output_dir, rows=False)
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
