"""Reward functions for GRPO, declared in the config: the registry of built-ins, users' own functions by path, and
the callables handed to TRL's GRPOTrainer (and scored by `qwenvl-ft eval`).

A reward is declared as `{function: NAME or "module:function" or "path/to/file.py:function", name: LABEL,
weight: W, options: {...}}` (`trainer.grpo.rewards`). `build_rewards` turns the list into `Reward` callables and
is where everything that can be checked without data is checked, so that a typo fails as a ConfigError before
anything loads: an unknown built-in (the valid names are listed), an option a built-in does not have or of the
wrong type, a path that does not import, a function whose signature TRL cannot call. `check_fields` does the rest
once the rows are read: every column a reward reads must exist. The built-ins are in builtins.py (matches, numbers,
choices, format, JSON) and boxes.py (grounding: box_iou, iou, box_format); checked.py names a user's reward that
fails.

This package imports only the standard library (and qwenvl_ft.errors for ConfigError, qwenvl_ft.grounding for
boxes), so checking a config stays fast and torch-free.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from qwenvl_ft.errors import ConfigError
from qwenvl_ft.rewards import boxes, builtins
from qwenvl_ft.rewards.builtins import check_extract
from qwenvl_ft.rewards.checked import raised, row_call_arguments, scores_of

# Keywords TRL passes to every reward function besides the dataset columns (GRPOTrainer._calculate_rewards).
TRL_KEYWORDS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric",
                "environments")


# ----------------------------------------------------------------------------------------------------------------
# the built-ins and their options


def _is_str(value) -> Optional[str]:
    return None if isinstance(value, str) and value else "must be a non-empty string"


def _is_number(low: float, high: float = math.inf):
    def check(value) -> Optional[str]:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            return f"must be a number in [{low:g}, {high:g}]"
        return None
    return check


def _is_bool(value) -> Optional[str]:
    return None if isinstance(value, bool) else "must be true or false"


def _is_regex(value) -> Optional[str]:
    if not isinstance(value, str) or not value:
        return "must be a regular expression"
    try:
        re.compile(value)
    except re.error as err:
        return f"is not a valid regular expression ({err})"
    return None


def _is_letters(value) -> Optional[str]:
    ok = isinstance(value, str) and value.isalpha() and value.isupper() and len(set(value)) == len(value)
    return None if ok else "must be distinct capital letters, e.g. ABCD"


def _is_optional(check):
    return lambda value: None if value is None else check(value)


def _is_str_list(value) -> Optional[str]:
    ok = value is None or (isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value))
    return None if ok else "must be a list of field names"


_FIELD = {"field": _is_str}  # the column holding the reference
_EXTRACTS = {"extract": check_extract, "reference_extract": check_extract}


@dataclass(frozen=True)
class Builtin:
    function: Callable
    options: Dict[str, Callable[[Any], Optional[str]]]  # option -> check (None: fine, else why not)
    reads_field: bool  # whether it reads the reference column named by its `field` option


BUILTINS: Dict[str, Builtin] = {
    "exact_match": Builtin(builtins.exact_match, {**_FIELD, **_EXTRACTS}, True),
    "normalised_match": Builtin(builtins.normalised_match, {**_FIELD, **_EXTRACTS}, True),
    "number_match": Builtin(builtins.number_match, {**_FIELD, **_EXTRACTS, "tolerance": _is_number(0),
                                                    "relative_tolerance": _is_number(0)}, True),
    "choice_match": Builtin(builtins.choice_match, {**_FIELD, **_EXTRACTS, "letters": _is_letters}, True),
    "format": Builtin(builtins.format_match, {"pattern": _is_regex, "full": _is_bool}, False),
    "valid_json": Builtin(builtins.valid_json, {"extract": check_extract, "keys": _is_str_list}, False),
    "box_iou": Builtin(boxes.box_iou, {**_FIELD, "extract": check_extract,
                                          "threshold": _is_optional(_is_number(0, 1))}, True),
    "iou": Builtin(boxes.iou_reward, {**_FIELD, "extract": check_extract,
                                         "threshold": _is_optional(_is_number(0, 1))}, True),
    "box_format": Builtin(boxes.box_format, {"form": boxes.check_box_form, "extract": check_extract}, False),
}


# ----------------------------------------------------------------------------------------------------------------
# the callables TRL gets


class Reward:
    """One configured reward. TRL calls it like any reward function and logs it as rewards/<name>/mean and /std
    (TRL names a callable object by its `__name__`); the options are bound here. `last` keeps the most recent call
    (prompts, completions, scores) for the sampled completions written to TensorBoard."""

    def __init__(self, name: str, function: Callable, weight: float, options: Dict[str, Any],
                 fields: Sequence[str], origin: str):
        self.__name__ = name
        self.name, self.function, self.weight = name, function, weight
        self.options, self.fields, self.origin = dict(options), tuple(fields), origin
        self.last: Optional[tuple] = None

    def __call__(self, completions, **kwargs) -> List[Optional[float]]:
        try:
            result = self.function(completions=completions, **kwargs, **self.options)
            result = list(result) if inspect.isgenerator(result) else result
        except Exception as err:  # the user's code: named with its row, not dumped (rewards/checked.py)
            raise raised(self, err, completions, kwargs, self._failing_row(completions, kwargs)) from None
        scores = scores_of(self, result, completions, kwargs)
        self.last = (kwargs.get("prompts"), completions, scores)
        return scores

    def _failing_row(self, completions, kwargs) -> Optional[int]:
        for index in range(len(completions)):
            one, alone = row_call_arguments(kwargs, completions, index)
            try:
                self.function(completions=one, **alone, **self.options)
            except Exception:
                return index
        return None

    def __repr__(self) -> str:
        return f"Reward({self.name!r}: {self.origin}, weight={self.weight:g}, options={self.options})"


class AsyncReward(Reward):
    """A user's `async def` reward: TRL awaits it (it checks `__call__`), `score` runs it to completion."""

    async def __call__(self, completions, **kwargs) -> List[Optional[float]]:
        try:
            result = await self.function(completions=completions, **kwargs, **self.options)
        except Exception as err:
            raise raised(self, err, completions, kwargs, await self._failing_row(completions, kwargs)) from None
        scores = scores_of(self, result, completions, kwargs)
        self.last = (kwargs.get("prompts"), completions, scores)
        return scores

    async def _failing_row(self, completions, kwargs) -> Optional[int]:
        for index in range(len(completions)):
            one, alone = row_call_arguments(kwargs, completions, index)
            try:
                await self.function(completions=one, **alone, **self.options)
            except Exception:
                return index
        return None


def build_rewards(configs: Sequence[Any]) -> List[Reward]:
    """`trainer.grpo.rewards` (RewardConfig objects or mappings with function/name/weight/options) as Reward
    callables; ConfigError for anything wrong with them."""
    if not configs:
        raise ConfigError("trainer.grpo.rewards is empty: GRPO needs at least one reward function (built-ins: "
                          f"{', '.join(BUILTINS)}; or your own as module:function)")
    rewards, names = [], set()
    for index, config in enumerate(configs):
        if isinstance(config, dict):
            config = {"weight": 1.0, **config}
        get = config.get if isinstance(config, dict) else lambda key, c=config: getattr(c, key, None)
        where = f"trainer.grpo.rewards[{index}]"
        reward = _build_one(where, get("function"), get("name"), get("weight"), dict(get("options") or {}))
        if reward.name in names:
            raise ConfigError(f"{where}: the name '{reward.name}' is used by two rewards; give one a `name`")
        names.add(reward.name)
        rewards.append(reward)
    return rewards


def _build_one(where: str, spec: Any, name: Optional[str], weight: Any, options: Dict[str, Any]) -> Reward:
    if not isinstance(spec, str) or not spec.strip() or spec == "???":
        raise ConfigError(f"{where}.function is required: a built-in ({', '.join(BUILTINS)}) or "
                          f"module:function / path/to/file.py:function")
    if weight is None or isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise ConfigError(f"{where}.weight must be a finite number, got {weight!r}")
    if ":" in spec:
        function = load_function(spec, where)
        fields = check_signature(function, options, f"{where} ({spec})")
        kind = AsyncReward if inspect.iscoroutinefunction(function) else Reward
        return kind(name or function.__name__, function, float(weight), options, fields, spec)
    if spec not in BUILTINS:
        import difflib

        hint = difflib.get_close_matches(spec, BUILTINS, n=1)
        raise ConfigError(f"{where}.function: unknown reward '{spec}'.{f' Did you mean {hint[0]!r}?' if hint else ''}"
                          f" Built-ins: {', '.join(BUILTINS)}; your own: module:function or path/to/file.py:function")
    builtin = BUILTINS[spec]
    for key, value in options.items():
        if key not in builtin.options:
            raise ConfigError(f"{where}.options: '{key}' is not an option of {spec} (options: "
                              f"{', '.join(builtin.options) or 'none'})")
        problem = builtin.options[key](value)
        if problem:
            raise ConfigError(f"{where}.options.{key} {problem}, got {value!r}")
    fields = [options.get("field", "solution")] if builtin.reads_field else []
    return Reward(name or spec, builtin.function, float(weight), options, fields, spec)


# ----------------------------------------------------------------------------------------------------------------
# users' own functions


def load_function(spec: str, where: str) -> Callable:
    """`package.module:function` (importable) or `path/to/file.py:function` (a file, relative to the working
    folder)."""
    module_name, _, attribute = spec.rpartition(":")
    if not module_name or not attribute:
        raise ConfigError(f"{where}.function '{spec}' must be module:function or path/to/file.py:function")
    try:
        module = _load_module(module_name)
    except ConfigError as err:
        raise ConfigError(f"{where}.function '{spec}': {err}") from None
    except Exception as err:  # the user's module itself failed while importing
        raise ConfigError(f"{where}.function '{spec}': importing {module_name} failed "
                          f"({type(err).__name__}: {err})") from None
    function = getattr(module, attribute, None)
    if function is None:
        public = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise ConfigError(f"{where}.function '{spec}': {module_name} has no '{attribute}' (callables there: "
                          f"{', '.join(public) or 'none'})")
    if not callable(function) or inspect.isclass(function):
        raise ConfigError(f"{where}.function '{spec}' is a {type(function).__name__}, not a function")
    return function


def _load_module(name: str):
    if name.endswith(".py") or "/" in name or "\\" in name:
        path = Path(name).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"file {path} not found")
        # Registered under a name of its own in sys.modules, so its functions pickle (DataLoader workers, TRL's
        # async reward loop) like those of any importable module.
        module_name = "qwenvl_ft_user_rewards_" + re.sub(r"\W", "_", str(path.with_suffix("")))
        if module_name not in sys.modules:
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[module_name]
                raise
        return sys.modules[module_name]
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name and name.startswith(err.name):
            raise ConfigError(f"no module named {err.name} (it must be importable: on PYTHONPATH, or give "
                              f"the file: path/to/file.py:function)") from None
        raise


def check_signature(function: Callable, options: Dict[str, Any], where: str) -> List[str]:
    """The dataset columns `function` requires (its parameters without a default that TRL does not supply).
    ConfigError unless TRL can call it: keyword-callable, `completions` accepted, `**kwargs` present (TRL passes
    prompts, completion_ids, trainer_state, log_extra, log_metric and every column), every option a named
    parameter."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: cannot read the function's signature") from None
    parameters = signature.parameters
    shown = f"{getattr(function, '__name__', 'function')}{signature}"
    if any(p.kind == p.POSITIONAL_ONLY for p in parameters.values()):
        raise ConfigError(f"{where}: {shown} has positional-only parameters; TRL passes everything by keyword")
    if not any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
        raise ConfigError(f"{where}: {shown} must accept **kwargs: TRL calls a reward with prompts, completions, "
                          f"completion_ids, every dataset column, trainer_state, log_extra and log_metric as keywords")
    named = {n for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    for key in options:
        if key in TRL_KEYWORDS:
            raise ConfigError(f"{where}: option '{key}' is a keyword TRL passes itself; rename the parameter")
        if key not in named:
            raise ConfigError(f"{where}: option '{key}' is not a parameter of {shown}")
    required = [n for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                and p.default is p.empty and n not in TRL_KEYWORDS and n not in options]
    return required


def check_fields(rewards: Sequence[Reward], columns: Sequence[str]) -> None:
    """ConfigError when a reward reads a column the rows do not have (a built-in's `field`, a user function's
    required parameter)."""
    for reward in rewards:
        for name in reward.fields:
            if name not in columns:
                raise ConfigError(f"reward '{reward.name}' ({reward.origin}) reads the field '{name}', which the rows "
                                  f"do not have (fields: {', '.join(c for c in columns if c != 'prompt')})")


# ----------------------------------------------------------------------------------------------------------------
# scoring outside the trainer (held-out evaluation, `qwenvl-ft eval`)


def score(rewards: Sequence[Reward], prompts: Sequence[Any], completions: Sequence[Any],
          columns: Dict[str, Sequence[Any]]) -> Dict[str, List[Optional[float]]]:
    """Each reward's scores for the completions, called exactly as TRL calls it (None where it does not apply;
    NaN, which TRL reads the same way, becomes None)."""
    import asyncio

    out = {}
    for reward in rewards:
        kwargs = dict(columns, prompts=list(prompts), completion_ids=None, trainer_state=None,
                      log_extra=lambda *a, **k: None, log_metric=lambda *a, **k: None)
        result = reward(completions=list(completions), **kwargs)
        if inspect.isawaitable(result):
            result = asyncio.run(result)
        values = [None if v is None or math.isnan(float(v)) else float(v) for v in result]  # checked by Reward
        out[reward.name] = values
    return out


def summarise(rewards: Sequence[Reward], scores: Dict[str, List[Optional[float]]]) -> Dict[str, Optional[float]]:
    """Mean of each reward over the rows it applies to, and `reward`: the mean weighted sum per completion, as TRL
    logs it (a reward that does not apply adds nothing; a completion no reward applies to is left out)."""
    summary: Dict[str, Optional[float]] = {}
    for reward in rewards:
        applied = [v for v in scores[reward.name] if v is not None]
        summary[reward.name] = sum(applied) / len(applied) if applied else None
    count = len(next(iter(scores.values()))) if scores else 0
    totals = []
    for i in range(count):
        parts = [(r.weight, scores[r.name][i]) for r in rewards if scores[r.name][i] is not None]
        if parts:
            totals.append(sum(w * v for w, v in parts))
    summary["reward"] = sum(totals) / len(totals) if totals else None
    return summary
