"""Measuring every row once: the method's measurer on each row, its outcome (kept, dropped by data.overlength, or
invalid) and result, in DataLoader worker processes when there are enough rows for it to pay
(qwenvl_ft/data/prepare.py writes the results into the data check's table).
"""

from __future__ import annotations

from typing import Any, Callable, Tuple, Union

from qwenvl_ft.data.store import DROPPED, INVALID, OK
from qwenvl_ft.errors import DataError

MEASURE_CHUNK = 32  # rows per DataLoader item when measuring in workers


def measure_one(measure: Callable, row: dict) -> Tuple[int, Any]:
    """(outcome, result): the measurer's result, or the message of a row it drops or refuses."""
    from qwenvl_ft.data.collate import RowDropped

    try:
        return OK, measure(row)
    except RowDropped as err:
        return DROPPED, str(err)
    except DataError as err:
        return INVALID, str(err)
    except Exception as err:  # a row that breaks a library is still that row's problem, not a crash at step 9000
        return INVALID, (f"{row.get('source', '?')}: unexpected error while encoding "
                         f"({type(err).__name__}: {err})")


class _MeasuredChunks:
    """Map-style dataset for DataLoader workers: item i is rows [i*chunk, (i+1)*chunk) measured, in order. The
    workers read their rows from the memory-mapped store themselves."""

    def __init__(self, rows, measure: Callable, chunk: int = MEASURE_CHUNK):
        self.rows, self.measure, self.chunk = rows, measure, chunk

    def __len__(self) -> int:
        return (len(self.rows) + self.chunk - 1) // self.chunk

    def __getitem__(self, index: int):
        stop = min(len(self.rows), (index + 1) * self.chunk)
        return [measure_one(self.measure, self.rows[i]) for i in range(index * self.chunk, stop)]


def _as_is(items):
    return items


def measure_all(rows, measure: Callable, workers: Union[int, str] = 0):
    """(outcome, result) for every row, in order; in `workers` DataLoader worker processes (data.num_workers: a
    number, or `auto`, data/workers.py) when there are enough rows (the same workers and pickled measurer
    training uses)."""
    from qwenvl_ft.data.workers import check_workers

    workers = check_workers(workers, len(rows))
    if workers == 0 or len(rows) < 2 * workers * MEASURE_CHUNK:
        for index in range(len(rows)):
            yield measure_one(measure, rows[index])
        return
    from torch.utils.data import DataLoader

    loader = DataLoader(_MeasuredChunks(rows, measure), batch_size=None, num_workers=workers, collate_fn=_as_is)
    for chunk in loader:
        yield from chunk
