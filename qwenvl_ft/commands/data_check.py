"""`qwenvl-ft data-check`: check the whole dataset (qwenvl_ft/data/check.py) and report on it, before any GPU time
is spent."""

from __future__ import annotations

import logging
from typing import Dict

from qwenvl_ft.data.check import check_data
from qwenvl_ft.data.report import write_report

log = logging.getLogger("qwenvl_ft")


def data_check(composed) -> Dict:
    """`qwenvl-ft data-check`: the report on stdout and in data_check.json; status 2 when a row is invalid
    (unless data.skip_invalid)."""
    from qwenvl_ft.config.compose import validate
    from qwenvl_ft.estimate.autofit import fit
    from qwenvl_ft.modeling.build import build_processor
    from qwenvl_ft.run_folder.files import ensure_writable
    from qwenvl_ft.run_folder.lock import lock_folder

    cfg, fitted = fit(validate(composed))  # auto settings: the batch the run would choose here sets the padding
    for line in fitted.reasons:
        print(f"auto: {line}")
    lock = lock_folder(ensure_writable(cfg.output_dir))  # it writes data_check.json and the cache there
    processor = build_processor(cfg.model, cfg.data)
    checked = check_data(cfg.data, processor, cfg.trainer.batch_size, cfg.data.seed,
                         output_dir=cfg.output_dir)
    report = checked.report
    listing = write_report(report, cfg.output_dir)
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
