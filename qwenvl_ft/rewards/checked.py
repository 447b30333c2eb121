"""A reward function's call, checked: what it raised or returned wrong becomes one ConfigError naming the reward
(its name and module:function), the row (the `source` column, file:row), the line of the user's own file that
raised, and what was expected; not a traceback through TRL's trainer. `Reward.__call__` (rewards/__init__.py)
goes through here on every call, the run's first-batch check (`check_on_rows`) and `eval` included.

Standard library only, like the rest of the package.
"""

from __future__ import annotations

import inspect
import traceback
from typing import Any, Dict, List, Optional, Sequence

from qwenvl_ft.errors import ConfigError

EXPECTED = "one number per completion (None where the reward does not apply)"


def scores_of(reward, result, completions: Sequence[Any], kwargs: Dict[str, Any]) -> List[Any]:
    """`result` of `reward` checked as TRL needs it: a sequence of len(completions) numbers or None."""
    count = len(completions)
    if result is None or isinstance(result, (str, bytes, dict)) or not _iterable(result):
        raise _error(reward, f"returned {_shown(result)} for {count} completions", kwargs, None,
                     f"expected a list of {EXPECTED}")
    scores = list(result)
    if len(scores) != count:
        raise _error(reward, f"returned {len(scores)} scores for {count} completions", kwargs, None,
                     f"expected {EXPECTED}")
    for index, value in enumerate(scores):
        if not _number_or_none(value):
            raise _error(reward, f"returned {_shown(value)} ({type(value).__name__}) for completion {index + 1} of "
                                 f"{count}", kwargs, index, f"expected {EXPECTED}")
    return scores


def raised(reward, err: BaseException, completions: Sequence[Any], kwargs: Dict[str, Any],
           failing_row: Optional[int]) -> ConfigError:
    """The ConfigError for `err`, raised by `reward` on a batch; `failing_row`: the completion that raises alone."""
    what = f"raised {type(err).__name__}: {str(err).strip() or '(no message)'}{_user_frame(reward, err)}"
    return _error(reward, what, kwargs, failing_row, f"a reward must return {EXPECTED}, and not raise")


def row_call_arguments(kwargs: Dict[str, Any], completions: Sequence[Any], index: int):
    """The completion `index` alone, with its own slice of every per-completion keyword (to find the row that
    raises: a function that fails on a batch is called row by row)."""
    count = len(completions)
    one = {key: value[index:index + 1] if isinstance(value, list) and len(value) == count else value
           for key, value in kwargs.items()}
    return list(completions[index:index + 1]), one


def check_on_rows(rewards: Sequence[Any], rows: Sequence[Dict[str, Any]], completions: Sequence[Any],
                  **keywords: Any) -> None:
    """Call each user reward (module:function) once on `rows`, answered by `completions` (one per row), before
    training starts: a broken reward fails in seconds, with the messages above, not after the first generation.
    `keywords`: what TRL passes besides the columns (completion_ids, trainer_state), as the caller can make them."""
    import asyncio

    rows = list(rows)
    if not rows:
        return
    columns = {key: [row.get(key) for row in rows] for key in rows[0] if key != "prompt"}
    for reward in rewards:
        if ":" not in reward.origin:  # a built-in
            continue
        kwargs = dict(columns, prompts=[row.get("prompt") for row in rows], completion_ids=None, trainer_state=None,
                      log_extra=lambda *a, **k: None, log_metric=lambda *a, **k: None)
        kwargs.update(keywords)
        result = reward(completions=list(completions), **kwargs)
        if inspect.isawaitable(result):
            asyncio.run(result)


# ----------------------------------------------------------------------------------------------------------------


def _error(reward, what: str, kwargs: Dict[str, Any], index: Optional[int], expected: str) -> ConfigError:
    return ConfigError(f"reward '{reward.name}' ({reward.origin}) {what}\n  on {_rows(kwargs, index)}\n  {expected}. "
                       f"Fix the function (trainer.grpo.rewards) and run the same command again.")


def _rows(kwargs: Dict[str, Any], index: Optional[int]) -> str:
    sources = kwargs.get("source")
    if not isinstance(sources, list) or not sources:
        return "a batch of rows (no source column)"
    if index is not None and index < len(sources):
        return f"row {sources[index]}"
    distinct = list(dict.fromkeys(str(s) for s in sources))
    shown = ", ".join(distinct[:3]) + (f" and {len(distinct) - 3} more" if len(distinct) > 3 else "")
    return f"the batch of rows {shown}"


def _user_frame(reward, err: BaseException) -> str:
    """The innermost frame of the traceback in the reward function's own file (else the innermost of all)."""
    frames = traceback.extract_tb(err.__traceback__)
    try:
        own = inspect.getsourcefile(reward.function)
    except TypeError:
        own = None
    mine = [f for f in frames if own and f.filename == own]
    frame = (mine or frames or [None])[-1]
    if frame is None:
        return ""
    return f"\n  at {frame.filename}:{frame.lineno} in {frame.name}" + (f": {frame.line}" if frame.line else "")


def _iterable(value) -> bool:
    try:
        iter(value)
    except TypeError:
        return False
    return True


def _number_or_none(value) -> bool:
    if value is None:
        return True
    if isinstance(value, (str, bytes)):
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
