"""Tier 1: one run folder, one writer. A second run on a folder in use is refused at once with the owner's pid and
host; the lock goes when its owner ends, counts as stale once the owner is gone (crashed on this host, or silent
for too long on another), and is shared by the ranks of one distributed launch."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qwenvl_ft.errors import ConfigError
from qwenvl_ft.run_folder.lock import LOCK_NAME, STALE_AFTER_S, FolderLock, lock_folder, release_all

ROOT = Path(__file__).resolve().parent.parent

HOLDER = """
import sys, time
from qwenvl_ft.run_folder.lock import lock_folder
lock_folder(sys.argv[1])
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _holder(folder: Path, seconds: float = 60, **env) -> subprocess.Popen:
    """Another process (another run) holding the folder's lock."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(seconds)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.fixture(autouse=True)
def _no_launch_id(monkeypatch):
    for name in ("QWENVL_FT_LAUNCH_ID", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_STEP_ID", "MASTER_ADDR",
                 "MASTER_PORT", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    yield
    release_all()


def test_a_second_run_is_refused_with_the_owner_and_gets_it_after_the_owner_ends(tmp_path):
    holder = _holder(tmp_path, seconds=1.5)
    with pytest.raises(ConfigError) as err:
        lock_folder(tmp_path)
    message = str(err.value)
    assert f"the run folder {tmp_path} is in use by another run: pid {holder.pid} on host {socket.gethostname()}" \
        in message and f"delete {tmp_path / LOCK_NAME}" in message
    assert holder.wait(timeout=30) == 0
    assert not (tmp_path / LOCK_NAME).exists(), "released when its owner ended"
    lock = lock_folder(tmp_path)
    assert lock.owned and json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_crashed_owner_leaves_a_stale_lock_that_the_next_run_takes(tmp_path, caplog):
    holder = _holder(tmp_path)
    holder.send_signal(signal.SIGKILL)  # no cleanup runs
    holder.wait(timeout=30)
    assert (tmp_path / LOCK_NAME).exists()
    lock = lock_folder(tmp_path)
    assert lock.owned and f"removed the lock of a run that is gone (pid {holder.pid}" in caplog.text


def test_the_ranks_of_one_launch_share_the_lock(tmp_path, monkeypatch):
    holder = _holder(tmp_path, QWENVL_FT_LAUNCH_ID="job-7")
    try:
        monkeypatch.setenv("QWENVL_FT_LAUNCH_ID", "job-7")  # another rank of the same launch
        lock = lock_folder(tmp_path)
        assert not lock.owned  # the rank that took it releases it
        monkeypatch.setenv("QWENVL_FT_LAUNCH_ID", "job-8")  # another launch
        with pytest.raises(ConfigError, match="is in use by another run"):
            lock_folder(tmp_path)
        monkeypatch.delenv("QWENVL_FT_LAUNCH_ID")
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's default: not a launch id
        with pytest.raises(ConfigError):
            lock_folder(tmp_path)
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_from_another_host_is_stale_only_when_its_heartbeat_is_old(tmp_path):
    def other_host(heartbeat_age: float):
        record = {"pid": 1, "host": "node-17", "launch": None, "started": time.time() - 9999,
                  "heartbeat": time.time() - heartbeat_age, "command": "qwenvl-ft train", "token": "t"}
        (tmp_path / LOCK_NAME).write_text(json.dumps(record))

    other_host(heartbeat_age=5)
    with pytest.raises(ConfigError, match=r"pid 1 on host node-17.*last heartbeat was \d+ s ago"):
        lock_folder(tmp_path)
    other_host(heartbeat_age=STALE_AFTER_S + 60)
    assert lock_folder(tmp_path).owned


def test_the_same_process_may_take_its_folder_again(tmp_path):
    first = lock_folder(tmp_path)
    again = FolderLock(tmp_path).acquire()
    assert first.owned and not again.owned
    release_all()
    assert not (tmp_path / LOCK_NAME).exists()


def test_training_on_a_folder_in_use_is_refused_before_anything_loads(tmp_path):
    from qwenvl_ft.config.compose import compose
    from qwenvl_ft.training.start import start_run

    holder = _holder(tmp_path / "run")
    try:
        with pytest.raises(ConfigError, match=f"the run folder {tmp_path / 'run'} is in use"):
            start_run(compose(["recipe=demo"], output_dir=str(tmp_path / "run")))
        assert not (tmp_path / "run" / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
