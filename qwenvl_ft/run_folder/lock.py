"""One folder, one writer: a lock file that names its owner, so that a second run started on a folder in use is
refused at once instead of both writing into it.

Why our own: `fcntl`/`flock` locks are not reliable across the nodes of an NFS or Lustre mount, do not say who holds
them, and would block the ranks of one distributed run from each other. Here:

- The lock is `<folder>/.qwenvl_ft.lock`, a small JSON record (pid, host, launch id, command, start time, last
  heartbeat). It is created atomically with `link()` of a fully written temporary file (the classic NFS-safe
  recipe: link fails if the name exists, and the record is never seen half-written); `O_EXCL` is the fallback on
  file systems without hard links.
- All ranks of one distributed launch share it: the launcher sets QWENVL_FT_LAUNCH_ID to the same value on every
  rank (else torchrun's TORCHELASTIC_RUN_ID, else SLURM_JOB_ID + SLURM_STEP_ID, else the rendezvous address), and
  a lock taken under the same launch id counts as ours.
- It is released when the command ends (`release_all`, called by commands/runtime.py's run_task; atexit as a
  fallback). After a crash it is stale: on the owner's host when that pid no longer runs (or runs a process started
  at another time, i.e. a reused pid); from another host when the owner's heartbeat, rewritten every HEARTBEAT_S
  seconds, is older than STALE_AFTER_S. A stale lock is moved aside with an atomic rename and re-checked before it
  is removed, so two processes that both find it stale do not both take it.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Dict, List, Optional

from qwenvl_ft.errors import ConfigError

log = logging.getLogger("qwenvl_ft")

LOCK_NAME = ".qwenvl_ft.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # a lock of another host whose heartbeat is older than this is abandoned
LAUNCH_VARIABLES = ("QWENVL_FT_LAUNCH_ID", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID")

_HELD: List["FolderLock"] = []


def launch_id() -> Optional[str]:
    """What all ranks of this distributed launch share, or None for a single process. Last resort: the rendezvous
    address (MASTER_ADDR:MASTER_PORT), which two launches running at the same time cannot share."""
    for name in LAUNCH_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value and value.lower() != "none":  # torchrun's default run id without rendezvous is "none"
            if name == "SLURM_JOB_ID" and os.environ.get("SLURM_STEP_ID"):
                value += "." + os.environ["SLURM_STEP_ID"]
            return f"{name}={value}"
    if os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT") and os.environ.get("WORLD_SIZE", "1") != "1":
        return f"MASTER={os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    return None


def _process_start(pid: int) -> Optional[float]:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:
        return None


def _alive(pid: int, started: Optional[float]) -> bool:
    """Whether `pid` still runs on this host as the process that took the lock."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    now = _process_start(pid)
    return started is None or now is None or abs(now - started) < 2.0


class FolderLock:
    """The lock of one folder; `acquire` raises ConfigError naming the owner when another run holds it."""

    def __init__(self, folder, what: str = "run folder", name: str = LOCK_NAME):
        self.folder, self.what = Path(folder), what
        self.path = self.folder / name
        self.record: Dict = {}
        self.owned = False  # created by this process (and released by it)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- the record ----------------------------------------------------------------------------------------------

    def _new_record(self) -> Dict:
        now = time.time()
        return {"pid": os.getpid(), "host": socket.gethostname(), "launch": launch_id(),
                "process_started": _process_start(os.getpid()), "started": now, "heartbeat": now,
                "command": " ".join(sys.argv) or "?", "token": uuid.uuid4().hex}

    def _read(self, path: Optional[Path] = None) -> Optional[Dict]:
        try:
            return json.loads((path or self.path).read_text())
        except (OSError, ValueError):
            return None

    def _write_temp(self, record: Dict) -> Path:
        temp = self.folder / f"{self.path.name}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        temp.write_text(json.dumps(record))
        return temp

    # -- taking it -----------------------------------------------------------------------------------------------

    def _create(self, record: Dict) -> bool:
        """Create the lock file holding `record`; False if it exists."""
        temp = self._write_temp(record)
        try:
            os.link(temp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links here (some FUSE and SMB mounts): exclusive create instead
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(descriptor, "w") as handle:
                handle.write(json.dumps(record))
            return True
        finally:
            temp.unlink(missing_ok=True)

    def _ours(self, owner: Dict) -> bool:
        same_process = owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname()
        launch = launch_id()
        return same_process or (launch is not None and owner.get("launch") == launch)

    def _stale(self, owner: Dict) -> bool:
        if owner.get("host") == socket.gethostname():
            return not _alive(int(owner.get("pid", -1)), owner.get("process_started"))
        return time.time() - float(owner.get("heartbeat", 0)) > STALE_AFTER_S

    def _break(self, owner: Dict) -> None:
        """Remove a stale lock: rename it aside (only one process can), then check that what was renamed is the
        lock found stale and not a new one taken meanwhile (then put that one back)."""
        aside = self.folder / f"{self.path.name}.stale-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        moved = self._read(aside)
        if moved is not None and moved.get("token") != owner.get("token"):
            try:
                os.link(aside, self.path)
            except OSError:
                pass
        else:
            log.warning("%s: removed the lock of a run that is gone (pid %s on %s, started %s)", self.folder,
                        owner.get("pid"), owner.get("host"), _when(owner.get("started")))
        aside.unlink(missing_ok=True)

    def acquire(self) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        record = self._new_record()
        for _ in range(5):
            if self._create(record):
                self.record, self.owned = record, True
                self._start_heartbeat()
                _HELD.append(self)
                return self
            owner = self._read()
            if owner is None:  # removed between our attempt and the read: try again
                continue
            if self._ours(owner):
                self.record = owner
                _HELD.append(self)
                return self
            if self._stale(owner):
                self._break(owner)
                continue
            raise ConfigError(self._in_use(owner))
        raise ConfigError(f"{self.folder}: could not take the lock {self.path} (it keeps changing hands)")

    def _in_use(self, owner: Dict) -> str:
        host = owner.get("host", "?")
        here = host == socket.gethostname()
        since = "" if here else (f"; its last heartbeat was {time.time() - float(owner.get('heartbeat', 0)):.0f} s "
                                 f"ago (it counts as abandoned after {STALE_AFTER_S:.0f} s)")
        return (f"the {self.what} {self.folder} is in use by another run: pid {owner.get('pid')} on host {host}, "
                f"started {_when(owner.get('started'))} ({owner.get('command', '?')}){since}. Wait for it to end, "
                f"or use another folder (run_name=NAME, hydra.run.dir=DIR). If that process is gone"
                f"{'' if here else ' from ' + host}, delete {self.path}")

    # -- keeping and releasing it --------------------------------------------------------------------------------

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="qwenvl-ft lock heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            current = self._read()
            if current is None:  # removed (the folder was deleted): nothing left to keep alive
                return
            if current.get("token") != self.record.get("token"):
                log.error("%s: the lock %s was taken over by another process", self.folder, self.path)
                return
            self.record["heartbeat"] = time.time()
            try:
                temp = self._write_temp(self.record)
                os.replace(temp, self.path)
            except OSError as err:  # a full disk must not end the run over a heartbeat
                log.warning("%s: could not refresh the lock (%s)", self.path, err)

    def release(self) -> None:
        self._stop.set()
        if self in _HELD:
            _HELD.remove(self)
        if not self.owned:
            return
        self.owned = False
        current = self._read()
        if current is not None and current.get("token") == self.record.get("token"):
            self.path.unlink(missing_ok=True)


def _when(timestamp) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(timestamp)))
    except (TypeError, ValueError):
        return "?"


def lock_folder(folder, what: str = "run folder", name: str = LOCK_NAME) -> FolderLock:
    """Take the lock of `folder` for this command (released by `release_all`, at the latest at exit); `name`
    tells apart locks of different things in one folder."""
    return FolderLock(folder, what, name).acquire()


def release_all() -> None:
    for lock in list(_HELD):
        lock.release()


atexit.register(release_all)
