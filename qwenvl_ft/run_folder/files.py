"""The run folder's files: written atomically (never half-written), the job's summary.json, and the space and
permission checks that name the folder and why it cannot be written.

The run folder's lock, one writer per folder, is qwenvl_ft/run_folder/lock.py.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Dict, Optional

from qwenvl_ft.errors import ConfigError

log = logging.getLogger("qwenvl_ft")


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary `.NAME.partial` next to it: the file is never half-written."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def write_summary(output_dir: str, payload: Dict) -> None:
    from qwenvl_ft.distributed import ranks

    if not ranks.is_main_process():  # one run folder, one writer: the main process of a distributed run
        return
    path = Path(output_dir)
    path.mkdir(parents=True, exist_ok=True)
    write_atomically(path / "summary.json", json.dumps(payload, indent=2, default=str))


def save_summary(output_dir: str, payload: Dict) -> str:
    """write_summary that never raises: the error being reported matters more than the summary (a full disk
    fails both). Returns "" or a sentence saying that summary.json could not be written."""
    try:
        write_summary(output_dir, payload)
        return ""
    except OSError as err:
        partial = Path(output_dir) / ".summary.json.partial"
        try:
            partial.unlink()
        except OSError:
            pass
        log.error("could not write %s/summary.json: %s", output_dir, err)
        return f"\n(summary.json could not be written either: {err.strerror or err})"


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1024 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TB"


def _existing(path: Path) -> Path:
    """The nearest ancestor of `path` (or itself) that exists."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def free_space(path: Path) -> Optional[int]:
    try:
        return shutil.disk_usage(_existing(path)).free
    except OSError:
        return None


def unwritable_reason(folder: Path, err: OSError) -> str:
    existing = _existing(folder)
    if existing.exists() and not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if err.errno == errno.EROFS:
        return f"{existing} is on a read-only file system"
    if err.errno in (errno.EACCES, errno.EPERM):
        return f"no permission to write in {existing}"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        free = free_space(existing)
        return f"the disk is full ({human_bytes(free)} free)" if free is not None else "the disk is full"
    return err.strerror or str(err)


def ensure_writable(folder, what: str = "output folder") -> Path:
    """Create `folder` (with its parents) and check that a file can be written in it; a ConfigError that names
    the folder and why not (a file in the way, a read-only file system, permissions, a full disk)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".qwenvl_ft-write-test-{os.getpid()}"
        try:
            probe.write_bytes(b"\0" * 4096)  # a block: an empty file is created even on a full disk
        finally:
            probe.unlink(missing_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot write the {what} {Path(os.path.abspath(folder))}: {unwritable_reason(folder, err)}."
                          f" Choose another with hydra.run.dir=DIR (or output_dir=DIR), or run from a folder "
                          f"you can write to (outputs/ is relative to it)") from None
    return folder
