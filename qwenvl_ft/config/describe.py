"""`qwenvl-ft COMMAND --help`: every config key of the command, with its type, default and a one-line description.

The descriptions are the schema's own comments (config/schema.py and the group files: the comment after a field, or
the comment block above it, or a nested group's docstring), read from the source, so that the schema stays the one
place where a field is documented. Standard library only: `--help` must stay as fast as `--cfg job`.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
import typing
from enum import Enum
from functools import lru_cache
from typing import Dict, List, Tuple

WIDTH = 118  # characters per line of the help text
KEY_WIDTH = 44


@lru_cache(maxsize=None)
def _own_comments(cls) -> Dict[str, str]:
    """Field name -> its comment, for the fields declared in `cls`'s own body."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # made at runtime (dataclasses.make_dataclass): no source
        return {}
    lines = source.splitlines()
    tree = ast.parse(source)
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    comments = {}
    for node in body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        trailing = _comment(lines[node.end_lineno - 1]) or _comment(lines[node.lineno - 1])
        if trailing:
            comments[node.target.id] = trailing
            continue
        above, index = [], node.lineno - 2
        while index >= 0 and lines[index].strip().startswith("#"):
            above.insert(0, lines[index].strip().lstrip("#").strip())
            index -= 1
        if above:
            comments[node.target.id] = " ".join(above)
    return comments


def _comment(line: str) -> str:
    """The comment at the end of a source line ('' if none); a '#' inside a string literal is not one."""
    import io
    import tokenize

    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(line.strip() + "\n").readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return ""
    found = [t.string for t in tokens if t.type == tokenize.COMMENT]
    return found[-1].lstrip("#").strip() if found else ""


def field_comments(cls) -> Dict[str, str]:
    """Field name -> description for every field of the dataclass `cls`, its base classes' included."""
    out: Dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            out.update(_own_comments(klass))
    return out


def _unwrap_optional(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) is typing.Union and len(args) == 1 else tp


def list_element(tp):
    """The dataclass of a list-of-dataclasses field's elements (None for any other type)."""
    tp = _unwrap_optional(tp)
    if typing.get_origin(tp) in (list, List):
        element = typing.get_args(tp)[0]
        return element if dataclasses.is_dataclass(element) else None
    return None


def _type_name(tp) -> str:
    tp = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if origin in (list, List):
        return f"[{_type_name(typing.get_args(tp)[0])}, ...]"
    if origin in (dict, Dict):
        return "{key: value}"
    if isinstance(tp, type) and issubclass(tp, Enum):
        return "|".join(member.value for member in tp)
    if origin is typing.Union:  # a number or a word such as auto (trainer.batch_size, data.num_workers)
        return "|".join(_type_name(arg) for arg in typing.get_args(tp) if arg is not type(None))
    return getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(value):
            return ""
    else:
        return "(required)"
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, list):
        value = "[" + ", ".join(str(getattr(v, "value", v)) for v in value) + "]"
    if value is None:
        value = "null"
    return f"= {value}"


def _first_line(text: str) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else ""


def field_rows(cls, prefix: str) -> List[Tuple[str, str]]:
    """(key with type and default, description) for every field of `cls`, nested groups expanded in place."""
    comments = field_comments(cls)
    hints = typing.get_type_hints(cls)
    rows: List[Tuple[str, str]] = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        nested = _unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(nested):
            doc = comments.get(f.name) or _first_line(nested.__doc__)
            rows.append((f"{key}.*", doc))
            rows += field_rows(nested, key + ".")
            continue
        element = list_element(hints[f.name])
        if element is not None:  # a list of settings (trainer.grpo.rewards): the list, then one element's keys
            rows.append((f"{key}: {_type_name(hints[f.name])} {_default(f)}".rstrip(),
                         comments.get(f.name) or _first_line(element.__doc__)))
            rows += field_rows(element, key + "[].")
            continue
        rows.append((f"{key}: {_type_name(hints[f.name])} {_default(f)}".rstrip(), comments.get(f.name, "")))
    return rows


def one_line(text: str) -> str:
    """The first sentence of a comment: what `--help` shows of it."""
    sentence = re.split(r"(?<=[.!?])\s+(?=[A-Z(`])", text.strip(), maxsplit=1)[0]
    return sentence[:-1] if sentence.endswith(".") and not sentence.endswith("..") else sentence


def _format_rows(rows: List[Tuple[str, str]]) -> List[str]:
    lines = []
    for key, doc in rows:
        doc = one_line(doc)
        if not doc:
            lines.append(f"  {key}")
            continue
        if len(key) + 2 > KEY_WIDTH - 1:
            lines.append(f"  {key}")
            head = " " * KEY_WIDTH
        else:
            head = f"  {key}".ljust(KEY_WIDTH)
        wrapped = textwrap.wrap(doc, WIDTH - KEY_WIDTH) or [""]
        lines.append(head + wrapped[0])
        lines += [" " * KEY_WIDTH + more for more in wrapped[1:]]
    return lines


def group_options(config_dir, group: str) -> List[str]:
    folder = config_dir / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def command_help(command: str, summary: str, root) -> str:
    """The help text of one command: usage, its groups with their options, and every key described."""
    from qwenvl_ft.config.compose import available_recipes, config_dir

    conf = config_dir()
    lines = [f"usage: qwenvl-ft {command} [RECIPE.yaml | recipe=NAME] [group=option ...] [key=value ...] "
             f"[--cfg job] [-m]", "", summary, "",
             f"recipes (recipe=NAME; `qwenvl-ft recipes` shows their files): {', '.join(available_recipes())}",
             "`--cfg job` prints the config a recipe and overrides resolve to; the defaults below are the schema's."]
    for title, doc, rows in command_sections(root):
        options = group_options(conf, title) if title != "run" else []
        lines += ["", title + (f"  (options: {title}={'|'.join(options)})" if options else "")]
        if doc:
            lines.append(f"  {doc}")
        lines += _format_rows(rows)
    return "\n".join(lines)


def command_sections(root) -> List[Tuple[str, str, List[Tuple[str, str]]]]:
    """(title, the group's one-line doc, its rows) of a command's config: "run" for the top-level keys, then one
    per group (model, data, ..., eval, hub)."""
    hints = typing.get_type_hints(root)
    comments = field_comments(root)
    top = [f for f in dataclasses.fields(root) if not dataclasses.is_dataclass(_unwrap_optional(hints[f.name]))]
    sections = [("run", "", [(f"{f.name}: {_type_name(hints[f.name])} {_default(f)}".rstrip(),
                              comments.get(f.name, "")) for f in top])]
    for f in dataclasses.fields(root):
        group = _unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(group):
            sections.append((f.name, _first_line(group.__doc__), field_rows(group, f.name + ".")))
    return sections
