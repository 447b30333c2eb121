"""The built-in reward functions: verifiable checks of a completion against a row's reference answer, or of its form.

Every function follows TRL's reward-function convention (trl/trainer/grpo_trainer.py, `_calculate_rewards`): it is
called with keyword arguments `completions` (one per sampled completion: a string, or for chat prompts a list of
one assistant message), `prompts`, `completion_ids`, every dataset column as a list (`solution`, ...), and
`trainer_state`, `log_extra`, `log_metric`; it returns one float per completion, or None where the reward does not
apply to that row (TRL turns None into NaN, leaves it out of the weighted sum and of the logged mean, and gives a
completion that no reward applies to an advantage of 0). The options of a reward (`trainer.grpo.rewards[i].options`)
arrive as further keyword arguments.

Conventions shared by the match rewards:
- the answer is taken out of the completion by `extract`: `all` (the whole text), `answer_tag` (the last
  <answer>...</answer>), `boxed` (the last \\boxed{...}), `last_line`, or a regular expression whose first group is
  the answer (last match); a completion with no answer so found scores 0;
- the reference is the row's `field` column (default `solution`), read as it is unless `reference_extract` says
  otherwise; a row whose reference is missing, empty or NaN gets None (not applicable), never a score.

Why our own: TRL ships `accuracy_reward` (needs the math_verify package and LaTeX answers) and `think_format_reward`
(one fixed pattern); the tasks people train Qwen2-VL on with GRPO (grounding boxes, counting, multiple choice, JSON
extraction, short answers) need the checks below, with options.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import re
import string
from typing import Any, Callable, List, Optional, Sequence

Scores = List[Optional[float]]

# ----------------------------------------------------------------------------------------------------------------
# text of a completion and of a reference


def completion_text(completion: Any) -> str:
    """The generated text: a plain string, or the content of the last message of a conversational completion
    (content given as a string or as a list of {"type": "text", "text": ...} items)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, (list, tuple)) and completion:
        content = completion[-1].get("content") if isinstance(completion[-1], dict) else completion[-1]
        if isinstance(content, str):
            return content
        if isinstance(content, (list, tuple)):
            return "".join(item.get("text") or "" for item in content
                           if isinstance(item, dict) and item.get("type") == "text")
    return ""


def reference_value(value: Any) -> Optional[Any]:
    """A reference cell, or None when it is missing: None, NaN (what pandas and some datasets store for a gap) or
    blank text."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, str) and not value.strip():
        return None
    return value


def column(kwargs: dict, name: str, count: int) -> Sequence[Any]:
    if name not in kwargs:
        raise KeyError(f"the rows have no field '{name}' (fields: {', '.join(sorted(kwargs)) or 'none'})")
    values = kwargs[name]
    if len(values) != count:
        raise ValueError(f"field '{name}' has {len(values)} values for {count} completions")
    return values


# ----------------------------------------------------------------------------------------------------------------
# extracting the answer


EXTRACT_PRESETS = ("all", "answer_tag", "boxed", "last_line")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)


def _last_boxed(text: str) -> Optional[str]:
    """The content of the last \\boxed{...} (or \\fbox{...}), braces balanced."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    depth, begin = 0, text.index("{", start)
    for index in range(begin, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return text[begin + 1: index]
    return None  # unbalanced: the answer was cut off


def extract_answer(text: str, how: str) -> Optional[str]:
    """The answer part of `text` (see the module docstring), stripped; None when there is none."""
    if how == "all":
        found: Optional[str] = text
    elif how == "answer_tag":
        matches = _ANSWER_TAG.findall(text)
        found = matches[-1] if matches else None
    elif how == "boxed":
        found = _last_boxed(text)
    elif how == "last_line":
        lines = [line for line in text.splitlines() if line.strip()]
        found = lines[-1] if lines else None
    else:
        matches = list(re.finditer(how, text, re.DOTALL))
        found = matches[-1].group(1) if matches else None
    if found is None or not found.strip():
        return None
    return found.strip()


def check_extract(value: Any) -> Optional[str]:
    """Why `value` is not a valid `extract` option, or None."""
    if not isinstance(value, str) or not value:
        return f"must be one of {', '.join(EXTRACT_PRESETS)} or a regular expression with one group"
    if value in EXTRACT_PRESETS:
        return None
    try:
        pattern = re.compile(value)
    except re.error as err:
        return f"is neither one of {', '.join(EXTRACT_PRESETS)} nor a valid regular expression ({err})"
    if pattern.groups < 1:
        return "is a regular expression without a group; put the answer in a (group)"
    return None


def extracted_answers(completions: Sequence[Any], extract: str) -> List[Optional[str]]:
    return [extract_answer(completion_text(c), extract) for c in completions]


def _references(kwargs: dict, field: str, count: int, extract: str) -> List[Optional[Any]]:
    out = []
    for value in column(kwargs, field, count):
        value = reference_value(value)
        if isinstance(value, str):
            value = extract_answer(value, extract)
        out.append(value)
    return out


# ----------------------------------------------------------------------------------------------------------------
# exact and normalised match


def normalise(text: str) -> str:
    """Lower-cased, trimmed of surrounding punctuation, whitespace collapsed ("A red circle." == "a red  circle")."""
    text = text.lower().strip().strip(string.punctuation + " ")
    return re.sub(r"\s+", " ", text)


def _match(completions, kwargs, field, extract, reference_extract, same: Callable[[str, str], bool]) -> Scores:
    answers = extracted_answers(completions, extract)
    references = _references(kwargs, field, len(completions), reference_extract)
    return [None if ref is None else float(ans is not None and same(ans, str(ref)))
            for ans, ref in zip(answers, references)]


def exact_match(completions, field: str = "solution", extract: str = "all", reference_extract: str = "all",
                **kwargs) -> Scores:
    """1.0 when the answer equals the reference exactly (surrounding whitespace aside), else 0.0."""
    return _match(completions, kwargs, field, extract, reference_extract, lambda a, r: a == r.strip())


def normalised_match(completions, field: str = "solution", extract: str = "all", reference_extract: str = "all",
                     **kwargs) -> Scores:
    """1.0 when the answer equals the reference after lower-casing, trimming punctuation and collapsing whitespace
    (the same normalisation as `qwenvl-ft eval`'s exact match), else 0.0."""
    return _match(completions, kwargs, field, extract, reference_extract, lambda a, r: normalise(a) == normalise(r))


# ----------------------------------------------------------------------------------------------------------------
# numbers


# A number as answers write it: 1,234.5 / -3 / .5 / 2/3 / \frac{2}{3} / 2\sqrt{3} / \sqrt{2} / 3\pi.
_NUMBER = re.compile(
    r"-?\d*\\sqrt\{[^{}]*\}|\\d?frac\{[^{}]*\}\{[^{}]*\}|-?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:\s*\\pi)?"
    r"(?:\s*/\s*\d+(?:\.\d+)?)?")
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos}


def _latex_to_python(text: str) -> str:
    text = text.strip().strip("$").replace("\\left", "").replace("\\right", "").replace("\\!", "")
    text = re.sub(r"\\[dt]?frac", r"\\frac", text)
    for _ in range(8):  # innermost first; answers nest a few levels at most
        replaced = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", text)
        replaced = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", replaced)
        if replaced == text:
            break
        text = replaced
    text = re.sub(r"\\sqrt\s*(\d+(?:\.\d+)?)", r"sqrt(\1)", text)
    text = text.replace("\\pi", "pi").replace("\\cdot", "*").replace("\\times", "*").replace("^", "**")
    text = text.replace("{", "(").replace("}", ")").replace(" ", "")
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)  # thousands separators
    text = re.sub(r"(?<=[\d)])(?=[a-z(])", "*", text)  # 2sqrt(3), 3pi, 2(1+x): implicit multiplication
    return text.rstrip("%.")


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return float(node.value)
    if isinstance(node, ast.Name) and node.id == "pi":
        return math.pi
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise ValueError("exponent too large")
        return _OPERATORS[type(node.op)](left, right)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "sqrt" \
            and len(node.args) == 1 and not node.keywords:
        return math.sqrt(_evaluate(node.args[0]))
    raise ValueError(f"not a number: {ast.dump(node)[:40]}")


def parse_number(text: Any) -> Optional[float]:
    """`text` as a finite number, or None. Plain numbers, thousands separators, fractions (2/3, \\frac{2}{3}),
    square roots, pi and their products are evaluated (a small arithmetic-only evaluator, never `eval`); NaN and
    infinity are not numbers here, so they can never score."""
    if isinstance(text, bool):
        return None
    if isinstance(text, (int, float)):
        return float(text) if math.isfinite(text) else None
    if not isinstance(text, str) or not text.strip() or len(text) > 200:
        return None
    try:
        value = _evaluate(ast.parse(_latex_to_python(text), mode="eval"))
    except (SyntaxError, ValueError, TypeError, ZeroDivisionError, OverflowError, RecursionError):
        return None
    return value if math.isfinite(value) else None


def last_number(text: str) -> Optional[float]:
    """The last number written in `text`."""
    for match in reversed([m for m in _NUMBER.finditer(text) if re.search(r"\d", m.group())]):
        value = parse_number(match.group())
        if value is not None:
            return value
    return None


def number_match(completions, field: str = "solution", extract: str = "all", reference_extract: str = "all",
                 tolerance: float = 1e-6, relative_tolerance: float = 0.0, **kwargs) -> Scores:
    """1.0 when the answer's number equals the reference's within `tolerance` (absolute) or `relative_tolerance`
    (a fraction of the reference), else 0.0. The answer's number is the extracted text read as a number, else the
    last number written in it ("There are 3 cats." -> 3). A reference that is not a number gets None."""
    answers = extracted_answers(completions, extract)
    references = _references(kwargs, field, len(completions), reference_extract)
    scores: Scores = []
    for answer, reference in zip(answers, references):
        expected = parse_number(reference) if reference is not None else None
        if expected is None:
            scores.append(None)
            continue
        got = None if answer is None else (parse_number(answer) if parse_number(answer) is not None
                                           else last_number(answer))
        scores.append(float(got is not None and math.isclose(got, expected, rel_tol=relative_tolerance,
                                                             abs_tol=tolerance)))
    return scores


# ----------------------------------------------------------------------------------------------------------------
# multiple choice


def parse_choice(text: Any, letters: str) -> Optional[str]:
    """The option letter an answer picks: the whole answer ("B", "(B)", "B."), "the answer is B" / "Answer: (B)",
    a parenthesised "(B)", or "B." / "B)" at the start of a line; the last one found by the first rule that finds
    one. A capital letter inside a sentence ("A red circle") is not taken for an option."""
    if not isinstance(text, str):
        return None
    valid = f"[{re.escape(letters)}]"
    rules = (rf"^\s*\(?({valid})\)?[.):]?\s*$",
             rf"(?i:answer)\s*(?:(?i:is)\s*)?[:\-]?\s*\(?({valid})\)?(?![A-Za-z])",
             rf"\(({valid})\)",
             rf"(?m)^\s*({valid})[.):](?:\s|$)")
    for rule in rules:
        found = re.findall(rule, text)
        if found:
            return found[-1]
    return None


def choice_match(completions, field: str = "solution", extract: str = "all", reference_extract: str = "all",
                 letters: str = "ABCDEFGH", **kwargs) -> Scores:
    """1.0 when the completion picks the reference's option letter (see `parse_choice`), else 0.0. A reference
    with no option letter gets None."""
    answers = extracted_answers(completions, extract)
    references = _references(kwargs, field, len(completions), reference_extract)
    scores: Scores = []
    for answer, reference in zip(answers, references):
        expected = parse_choice(str(reference), letters) if reference is not None else None
        scores.append(None if expected is None else float(parse_choice(answer, letters) == expected))
    return scores


# ----------------------------------------------------------------------------------------------------------------
# form


THINK_ANSWER = r"^\s*<think>.+?</think>\s*<answer>.+?</answer>\s*$"


def format_match(completions, pattern: str = THINK_ANSWER, full: bool = True, **kwargs) -> Scores:
    """1.0 when the completion matches `pattern` (a regular expression, `.` matching newlines too): the whole
    completion with `full`, anywhere in it without; else 0.0. The default asks for <think>...</think> then
    <answer>...</answer> and nothing else."""
    compiled = re.compile(pattern, re.DOTALL)
    test = compiled.fullmatch if full else compiled.search
    return [float(test(completion_text(c)) is not None) for c in completions]


_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL | re.IGNORECASE)


def reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def valid_json(completions, extract: str = "all", keys: Optional[List[str]] = None, **kwargs) -> Scores:
    """1.0 when the answer is valid JSON (a ```json fence around it is allowed; NaN and Infinity, which Python
    would accept, are not JSON); with `keys`, it must be an object holding every one of them. Else 0.0."""
    scores: Scores = []
    for answer in extracted_answers(completions, extract):
        try:
            fenced = _FENCE.match(answer or "")
            value = json.loads(fenced.group(1) if fenced else answer, parse_constant=reject_constant)
        except (TypeError, ValueError):
            scores.append(0.0)
            continue
        scores.append(float(not keys or (isinstance(value, dict) and all(k in value for k in keys))))
    return scores
