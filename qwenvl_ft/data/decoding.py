"""Reading a JSON or JSONL data file into (location, record) pairs: UTF-8 (or UTF-16/32 with a byte-order mark),
the layout told from the content rather than the suffix, and an error that says where the rows were expected when
the top level is not a list of them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, List, Optional, Tuple

from qwenvl_ft.data.rows import Problem
from qwenvl_ft.errors import DataError


def _decode_utf8(raw: bytes, where: str, offset: int = 0) -> str:
    """`raw` (text already in UTF-8: data.encoding's and byte-order marks' conversions are done on opening)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise decoding_error(where, raw, err, "UTF-8", offset) from None


def decoding_error(where: str, raw: bytes, err: UnicodeDecodeError, encoding: str, offset: int = 0,
                   line: Optional[int] = None) -> DataError:
    """A file (or line) whose text `encoding` cannot decode: the line, the byte and its offset in the file, and
    the two ways out. `offset` is where `raw` starts in the file; `line`, when `where` names none, its line."""
    if line is None and ":line " not in where:
        line = raw[:err.start].count(b"\n") + 1
    at = f"{where}:line {line}" if line is not None else where
    encoding = "UTF-8" if _is_utf8(encoding) else encoding
    return DataError(f"{at}: text is not valid {encoding} (byte 0x{raw[err.start]:02x} at byte offset "
                     f"{offset + err.start}): re-save the file as UTF-8, or set data.encoding to its encoding "
                     f"(e.g. data.encoding=latin-1 or cp1252)")


def _is_utf8(encoding: str) -> bool:
    import codecs

    return codecs.lookup(encoding).name == "utf-8"


def check_text_encoding(path: Path, encoding: str) -> None:
    """DataError naming the first line of `path` that `encoding` cannot decode (the CSV/TSV reader's own error
    names neither), read line by line: the file is never in memory at once."""
    import codecs

    if "\n".encode(encoding) != b"\n":  # UTF-16/32: lines are not split on the byte; decode it whole
        raw = path.read_bytes()
        try:
            raw.decode(encoding)
        except UnicodeDecodeError as err:
            raise decoding_error(str(path), raw, err, encoding) from None
        return
    decoder_name = codecs.lookup(encoding).name
    offset = 0
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8-sig" if decoder_name == "utf-8" and number == 1 else encoding)
            except UnicodeDecodeError as err:
                raise decoding_error(str(path), line, err, encoding, offset, number) from None
            offset += len(line)


# Byte-order marks some editors (Notepad, Excel exports) put at the start of a text file. UTF-8's is read past;
# UTF-16/32 files are decoded whole and read as UTF-8.
_BOMS = ((b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe\x00\x00", "utf-32-le"), (b"\x00\x00\xfe\xff", "utf-32-be"),
         (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"))


def _open_text_bytes(path: Path, encoding: str = "utf-8"):
    """A binary stream of the file's UTF-8 text, positioned after any byte-order mark; a file in another
    `encoding` (data.encoding) is decoded whole and read as UTF-8."""
    import io

    try:
        handle = path.open("rb")
    except OSError as err:
        raise DataError(f"{path}: cannot read data file ({err.strerror})") from None
    head = handle.read(4)
    for bom, marked in _BOMS:
        if head.startswith(bom):
            if marked == "utf-8":
                handle.seek(len(bom))
                return handle
            with handle:
                raw = head + handle.read()
            try:
                return io.BytesIO(raw[len(bom):].decode(marked).encode("utf-8"))
            except UnicodeDecodeError as err:
                raise DataError(f"{path}: text is not valid {marked.upper()} ({err.reason} at offset {err.start}); "
                                f"re-save the file as UTF-8") from None
    handle.seek(0)
    if _is_utf8(encoding):
        return handle
    with handle:
        raw = handle.read()
    try:
        return io.BytesIO(raw.decode(encoding).encode("utf-8"))
    except UnicodeDecodeError as err:
        raise decoding_error(str(path), raw, err, encoding) from None


def _first_significant_byte(handle) -> bytes:
    """The first non-whitespace byte of the stream (b"" for an empty file); the position is kept."""
    position = handle.tell()
    while True:
        chunk = handle.read(65536)
        if not chunk:
            handle.seek(position)
            return b""
        stripped = chunk.lstrip()
        if stripped:
            handle.seek(position)
            return stripped[:1]


def _top_level_object_error(path: Path, document: dict) -> DataError:
    """A JSON file whose top level is an object: say where the list of rows was expected, and name the list
    field that probably holds them."""
    lists = [(key, len(value)) for key, value in document.items() if isinstance(value, list)]
    message = (f"{path}: the top level is a JSON object, where a list of rows was expected (a JSON array "
               f"[{{...}}, {{...}}] or one object per line, JSONL)")
    if len(lists) == 1:
        key, count = lists[0]
        message += (f"; its one list field is '{key}' ({count} items): if those are the rows, save that list as "
                    f"the file (e.g. jq '.{key}' {path.name} > rows.json)")
    elif lists:
        message += "; its list fields are " + ", ".join(f"'{k}' ({n} items)" for k, n in lists) + \
            ": save the one that holds the rows as the file"
    else:
        message += f"; it has no list field (fields: {', '.join(map(str, document)) or 'none'})"
    return DataError(message)


def _json_document(path: Path, raw: bytes) -> Any:
    text = _decode_utf8(raw, str(path))
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:line {err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from None


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
        return True
    except (ValueError, UnicodeDecodeError):
        return False


def _layout(path: Path, handle) -> str:
    """'array', 'object' (a single JSON document whose top level is an object) or 'lines' (JSONL).

    Told from the content, not only the suffix: a JSON array is read whole even when named .jsonl; a file that
    starts with '{' is JSONL when its first line is a complete JSON value (or, when it is not, its second line
    is), else it is one pretty-printed document. A one-line .json file holding one object is a document too.
    """
    first = _first_significant_byte(handle)
    if first == b"[":
        return "array"
    if first != b"{":
        return "lines"
    position = handle.tell()
    lines = [line for line in (handle.readline(), handle.readline(), handle.readline()) if line.strip()]
    handle.seek(position)
    if not lines:
        return "lines"
    if _is_json(lines[0]):
        return "object" if len(lines) == 1 and path.suffix != ".jsonl" else "lines"
    return "lines" if len(lines) > 1 and _is_json(lines[1]) else "object"


def read_json_records(path: Path, problems: Optional[List[Problem]] = None,
                      encoding: str = "utf-8") -> Iterator[Tuple[str, Any]]:
    """(location, record) for a JSON array file or a JSONL file; location is 'file:row N' or 'file:line N'.

    A JSONL line that is not valid JSON or UTF-8 raises, or with `problems` is recorded there and skipped. JSONL
    is read line by line (a file of millions of rows is never in memory at once); a JSON array is parsed whole.
    A UTF-8 (or UTF-16/32) byte-order mark is accepted; without one the text is read as `encoding`.
    """
    handle = _open_text_bytes(path, encoding)
    with handle:
        layout = _layout(path, handle)
        if layout != "lines" or not _first_significant_byte(handle):
            raw = handle.read()
            if not raw.strip():
                raise DataError(f"{path}: the data file is empty")
            document = _json_document(path, raw)
            if isinstance(document, dict):
                raise _top_level_object_error(path, document)
            if not isinstance(document, list):
                raise DataError(f"{path}: the top level is a JSON {type(document).__name__}, where a list of rows "
                                f"was expected")
            for index, record in enumerate(document):
                yield f"{path}:row {index}", record
            return
        offset = handle.tell()
        for number, line in enumerate(handle, start=1):
            start, offset = offset, offset + len(line)
            if not line.strip():
                continue
            where = f"{path}:line {number}"
            try:
                yield where, json.loads(_decode_utf8(line, where, start))
            except (DataError, json.JSONDecodeError) as err:
                message = str(err) if isinstance(err, DataError) else \
                    f"{where}: invalid JSON ({err.msg} at column {err.colno})"
                if problems is None:
                    raise DataError(message) from None
                problems.append(Problem(where, message))
