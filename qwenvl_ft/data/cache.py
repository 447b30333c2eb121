"""Where the data check's results are stored, under which key, and how an entry is written without ever being seen
half-written.

An entry is a folder `<cache root>/<method>-<key>/` (qwenvl_ft/data/prepare.py fills it). The cache root is shared by
every run of a user (`cache_root`: ~/.cache/qwenvl_ft/data by default), so a new run on the same data and settings
measures nothing. The key is a hash of:
the training method, the measurer's fingerprint (for conversations: the processor's tokenizer, chat template and
image/video processor settings), every data setting that changes what is read, kept or measured (the whole data
group except the batch layout, worker count, skip_invalid and the cache settings themselves), and each data file's
identity (absolute path, size and modification time; every file of a dataset folder; a hub dataset by its id and
split). Images are not part of the key: after editing images in place, run with data.cache=refresh.

An entry is built in a temporary folder next to it and renamed into place (atomic, also on NFS), so concurrent
writers (sweep jobs, the ranks of a run) never see a partial entry; the second to finish drops its copy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Dict, List, Optional

from qwenvl_ft.cache_home import cache_home
from qwenvl_ft.config.data import CacheMode, DataConfig

log = logging.getLogger("qwenvl_ft")

VERSION = 3  # bump when the entry layout or the meaning of its contents changes
FOLDER = "data_cache"  # in the run folder of a multi-machine run
# Data settings that do not change what is read, kept or measured.
NOT_IN_KEY = ("num_workers", "packing", "max_tokens_per_batch", "group_by_length", "skip_invalid", "cache",
              "cache_dir")
RANK_WAIT_S = 3600.0  # how long a non-zero rank waits for rank 0's entry before computing its own


def data_settings(cfg: DataConfig) -> Dict:
    settings = dataclasses.asdict(cfg)
    for name in NOT_IN_KEY:
        settings.pop(name, None)
    return json.loads(json.dumps(settings, default=lambda value: getattr(value, "value", str(value))))


def _file_identity(path: Path) -> List:
    stat = path.stat()
    return [str(path), stat.st_size, stat.st_mtime_ns]


def file_identities(cfg: DataConfig) -> List:
    """(path, size, mtime) of every data file the config reads; a hub id or a generator by name."""
    names = [source.path for source in cfg.source_list()] if not cfg.format.is_generated else []
    if cfg.eval_path:
        names.append(cfg.eval_path)
    found = []
    for name in names:
        path = Path(name).expanduser().resolve()
        if path.is_file():
            found.append(_file_identity(path))
        elif path.is_dir():
            found.append([str(path), sorted(_file_identity(p)[1:] + [str(p.relative_to(path))]
                                            for p in path.rglob("*") if p.is_file())])
        else:
            found.append(["hub", name])
    return found


def cache_key(method: str, fingerprint: str, cfg: DataConfig) -> Dict:
    """The key material (stored in the entry's meta.json) whose hash names the entry."""
    return {"version": VERSION, "method": method, "measurer": fingerprint, "data": data_settings(cfg),
            "files": file_identities(cfg)}


def data_key(cfg: DataConfig) -> str:
    """The data files and settings alone (no method, no processor): names the data a data_check.json describes."""
    return key_hash({"data": data_settings(cfg), "files": file_identities(cfg)})


def key_hash(material: Dict) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:20]


def processor_fingerprint(processor) -> str:
    """What of a processor changes how a row is tokenised and how many visual tokens an image becomes."""
    import transformers

    tokenizer = getattr(processor, "tokenizer", processor)
    parts = {
        # the processor's code decides too (transformers 5.25 changed how a timestamped video expands)
        "transformers": transformers.__version__,
        "tokenizer": [type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer),
                      str(getattr(tokenizer, "chat_template", None) or getattr(processor, "chat_template", "")),
                      sorted(map(str, getattr(tokenizer, "all_special_tokens", [])))],
    }
    for name in ("image_processor", "video_processor"):
        part = getattr(processor, name, None)
        if part is not None and hasattr(part, "to_dict"):
            parts[name] = json.loads(json.dumps(part.to_dict(), sort_keys=True, default=str))
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def user_cache() -> Path:
    """The per-user cache every run and `data-check` share (as HF datasets' cache): data/ in qwenvl-ft's cache
    folder (qwenvl_ft/cache_home.py: $QWENVL_FT_CACHE, else ${XDG_CACHE_HOME:-~/.cache}/qwenvl_ft)."""
    return cache_home() / "data"


def multi_node() -> bool:
    """Whether this process is one of a launch over several machines: more ranks in all (WORLD_SIZE) than on this
    machine (LOCAL_WORLD_SIZE, set by torchrun, accelerate and our SLURM set-up; unknown counts as several)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return world > int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0) if world > 1 else False


def cache_root(cfg: DataConfig, output_dir: Optional[str]) -> Optional[Path]:
    """Where the entries live: data.cache_dir if set; else, in a launch over several machines, data_cache/ in the
    run folder (the sweep's folder for a job of a -m sweep), which every machine sees, while a home folder may be
    each machine's own and the other machines' ranks wait for rank 0's entry; else the per-user cache
    (`user_cache`), so that a later run, a sweep job or `data-check` with the same data and settings reads what an
    earlier one measured. None when caching is off, or a multi-machine run has no folder."""
    if cfg.cache == CacheMode.off:
        return None
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    if not multi_node():
        return user_cache()
    if output_dir is None:
        return None
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:
            return Path(hydra_cfg.sweep.dir) / FOLDER
    except Exception:  # not inside a Hydra job (tests, notebooks): the output folder
        pass
    return Path(output_dir) / FOLDER


def rank() -> int:
    """This process's rank in a distributed launch (torchrun, accelerate, DeepSpeed and SLURM set RANK)."""
    for name in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(name)
        if value is not None and value.isdigit():
            return int(value)
    return 0


class Entry:
    """One cache entry folder."""

    def __init__(self, root: Path, method: str, material: Dict):
        self.root, self.material = Path(root), material
        self.key = key_hash(material)
        self.path = self.root / f"{method}-{self.key}"

    @property
    def complete(self) -> bool:
        meta = self.path / "meta.json"
        if not meta.is_file():
            return False
        try:
            return json.loads(meta.read_text()).get("version") == VERSION
        except (OSError, ValueError):
            return False

    def staging(self) -> Path:
        """A new, empty folder to build the entry in (renamed into place by `commit`)."""
        self.root.mkdir(parents=True, exist_ok=True)
        folder = self.root / f".{self.path.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        folder.mkdir()
        return folder

    def commit(self, staging: Path, replace: bool = False) -> None:
        """Rename `staging` into place. If another process committed the same entry first, theirs is kept
        (same key, same contents) unless `replace` (data.cache=refresh)."""
        if replace and self.path.exists():
            aside = self.root / f".{self.path.name}.old-{uuid.uuid4().hex[:8]}"
            try:
                self.path.rename(aside)
                shutil.rmtree(aside, ignore_errors=True)
            except OSError:
                pass
        try:
            staging.rename(self.path)
        except OSError:
            if not self.complete:
                raise
            shutil.rmtree(staging, ignore_errors=True)

    def wait(self, timeout_s: float = RANK_WAIT_S, poll_s: float = 1.0) -> bool:
        """Wait for another process (rank 0) to commit this entry; False after `timeout_s`."""
        deadline, said = time.monotonic() + timeout_s, 0.0
        while not self.complete:
            if time.monotonic() > deadline:
                return False
            if time.monotonic() - said > 60:
                log.info("rank %d: waiting for rank 0's data check (%s)", rank(), self.path)
                said = time.monotonic()
            time.sleep(poll_s)
        return True
