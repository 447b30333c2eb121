"""The records of one data file, converted into canonical rows one at a time: JSON and JSONL (data/decoding.py), or
anything Hugging Face datasets loads (a save_to_disk folder, parquet/arrow/csv/tsv files, a folder of them, a hub
id). A bad row raises, or with a `problems` list is recorded there and left out.
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from qwenvl_ft.config.data import DataConfig, DataFormat
from qwenvl_ft.data.converters import CONVERTERS, Converter
from qwenvl_ft.data.decoding import check_text_encoding, read_json_records
from qwenvl_ft.data.grounding import read_objects
from qwenvl_ft.data.rows import Problem
from qwenvl_ft.errors import DataError


_LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".arrow", ".csv", ".tsv")


def _looks_local(path_str: str) -> bool:
    return path_str.startswith(("/", "./", "../", "~")) or path_str.endswith(_LOCAL_SUFFIXES)


def _records(cfg: DataConfig, path_str: str,
             problems: Optional[List[Problem]] = None) -> Tuple[Iterator[Tuple[str, Any]], Path]:
    path = Path(path_str).expanduser()
    base = Path(cfg.image_folder).expanduser() if cfg.image_folder else (path.parent if path.is_file() else path)
    if path.suffix in (".json", ".jsonl"):
        if not path.exists():
            raise DataError(f"{path}: data file not found")
        return read_json_records(path, problems, cfg.encoding), base
    if not path.exists() and _looks_local(path_str):
        raise DataError(f"{path}: data file or folder not found")
    return _hf_records(cfg, path_str), base


def _hf_dataset(cfg: DataConfig, path_str: str):
    """Hugging Face datasets: a save_to_disk folder, parquet/arrow/csv files, a folder of them, or a hub id (needs
    the network)."""
    import datasets

    path = Path(path_str).expanduser()
    try:
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
            dataset = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                if cfg.split not in dataset:
                    raise DataError(f"{path}: no split '{cfg.split}' (splits: {', '.join(dataset)}); set data.split")
                dataset = dataset[cfg.split]
            return dataset
        if path.is_file():
            if path.suffix not in _LOCAL_SUFFIXES:
                raise DataError(f"{path}: unknown data file type '{path.suffix}' (expected one of "
                                f"{', '.join(_LOCAL_SUFFIXES)}, a save_to_disk folder or a hub id)")
            if path.suffix in (".csv", ".tsv"):  # a byte-order mark (Excel's UTF-8 export) is read past
                check_text_encoding(path, cfg.encoding)  # the line and byte, which the CSV reader does not name
                encoding = "utf-8-sig" if codecs.lookup(cfg.encoding).name == "utf-8" else cfg.encoding
                return datasets.load_dataset("csv", data_files=str(path), split=cfg.split, encoding=encoding,
                                             sep="\t" if path.suffix == ".tsv" else ",")
            return datasets.load_dataset(path.suffix[1:], data_files=str(path), split=cfg.split)
        return datasets.load_dataset(str(path) if path.is_dir() else path_str, split=cfg.split)
    except DataError:
        raise
    except Exception as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DataError(f"{path_str}: cannot load dataset ({type(err).__name__}: {message})") from None


def _hf_records(cfg: DataConfig, path_str: str) -> Iterator[Tuple[str, Any]]:
    import datasets

    dataset = _hf_dataset(cfg, path_str)
    # Images stay undecoded ({"bytes", "path"}) until the collator opens them, with its own error messages.
    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Image):
            dataset = dataset.cast_column(name, datasets.Image(decode=False))
        elif isinstance(feature, (datasets.Sequence, datasets.List)) and isinstance(feature.feature, datasets.Image):
            dataset = dataset.cast_column(name, datasets.List(datasets.Image(decode=False)))
    for index, record in enumerate(dataset):
        yield f"{path_str}:row {index}", record


def iter_rows(cfg: DataConfig, path: str, problems: Optional[List[Problem]] = None,
              converters: Dict[DataFormat, Converter] = CONVERTERS) -> Iterator[Tuple[dict, Optional[str]]]:
    """(canonical row, its id or None) for every row of one file, read one at a time (data.id_field names the id;
    qwenvl_ft.data.mixing.record_id). Bad rows raise, or with `problems` are recorded there and left out."""
    from qwenvl_ft.data.mixing import record_id

    records, base = _records(cfg, path, problems)
    convert = converters[cfg.format]
    for where, record in records:
        try:
            row = convert(record, where, base, cfg)
            objects = read_objects(record, where, cfg.grounding, len(row.get("images") or []))
            if objects is not None:
                row["objects"] = objects
        except DataError as err:
            if problems is None:
                raise
            problems.append(Problem(where, str(err)))
            continue
        yield row, record_id(record, cfg.id_field)


def load_rows(cfg: DataConfig, path: str, problems: Optional[List[Problem]] = None,
              converters: Dict[DataFormat, Converter] = CONVERTERS) -> List[dict]:
    """Canonical rows of one file (`converters`: the layouts to read, preference.py passes its own). The first bad
    row raises DataError; with `problems`, every bad row is recorded there and left out instead (a file that cannot
    be read at all still raises)."""
    return [row for row, _ in iter_rows(cfg, path, problems, converters)]
