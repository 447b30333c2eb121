"""Tier 1: the fault paths end in one screen that names the file, folder or key, with no traceback: a missing
model, an output folder that cannot be written, a full disk while saving (real ENOSPC from /dev/full and from a
small tmpfs), Ctrl-C, a negative trainer.max_steps, and the file layouts that used to be read as bogus lines (a
byte-order mark, a top-level JSON object)."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from qwenvl_ft.commands.cli import main
from qwenvl_ft.config.compose import compose, validate
from qwenvl_ft.errors import ConfigError
from qwenvl_ft.errors import DataError

from data_helpers import data_cfg, llava, write_image, write_jsonl

ROOT = Path(__file__).resolve().parent.parent


def _no_traceback(*texts):
    for text in texts:
        assert "Traceback" not in text


# ----------------------------------------------------------------------------------------------------------------
# a missing model


def test_a_missing_model_is_named_with_where_it_was_looked_for(tmp_path, monkeypatch):
    from qwenvl_ft.modeling.locate import check_model_available, model_load_error

    with pytest.raises(ConfigError, match=r"model.name_or_path=/no/such/model: no such folder"):
        check_model_available("/no/such/model")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"holds no config.json.*notes.txt"):
        check_model_available(str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ConfigError) as err:
        check_model_available("someone/not-cached-VL")
    message = str(err.value)
    assert "someone/not-cached-VL" in message and str(tmp_path / "hub") in message
    assert "HF_HUB_OFFLINE=1" in message and "hf download someone/not-cached-VL" in message
    # what transformers raises once loading has started is named the same way
    loading = str(model_load_error("someone/x", OSError("We couldn't connect to the hub.\nmore")))
    assert loading.startswith("model.name_or_path=someone/x: cannot be loaded (We couldn't connect to the hub.)")
    assert "HF_HUB_OFFLINE=1" in loading


def test_cli_names_a_missing_model_before_loading_anything(tmp_path, capsys):
    status = main(["data-check", "recipe=demo", "model.random_init=false", f"model.name_or_path={tmp_path / 'nope'}",
                   f"hydra.run.dir={tmp_path / 'run'}"])
    out, err = capsys.readouterr()
    assert status == 2 and f"model.name_or_path={tmp_path / 'nope'}: no such folder" in err
    _no_traceback(out, err)


# ----------------------------------------------------------------------------------------------------------------
# an output folder that cannot be written


def test_an_output_folder_under_a_file_is_named_before_hydra_creates_it(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    status = main(["train", "recipe=demo", f"hydra.run.dir={tmp_path / 'afile' / 'run'}"])
    out, err = capsys.readouterr()
    assert status == 2
    assert f"cannot write the output folder {tmp_path / 'afile' / 'run'}: {tmp_path / 'afile'} is a file" in err
    _no_traceback(out, err)


def _unshare_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


needs_mounts = pytest.mark.skipif(not _unshare_available(), reason="needs unprivileged mount namespaces")


def _in_namespace(mount: str, script: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `python -c script` in a private mount namespace after `mount` (a real tmpfs, no root needed)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = f"{mount} && exec {sys.executable} -c \"$SCRIPT\""
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", command], cwd=cwd,
                          env={**env, "SCRIPT": script}, capture_output=True, text=True, timeout=120)


@needs_mounts
def test_a_read_only_file_system_is_named(tmp_path):
    (tmp_path / "ro").mkdir()
    script = ("from qwenvl_ft.run_folder.files import ensure_writable\n"
              "try:\n    ensure_writable('ro/run')\nexcept Exception as err:\n    print(err)\n")
    out = _in_namespace(f"mount -t tmpfs -o ro,size=64k tmpfs {tmp_path / 'ro'}", script, tmp_path)
    assert f"cannot write the output folder {tmp_path / 'ro' / 'run'}: {tmp_path / 'ro'} is on a read-only file " \
           f"system" in out.stdout, out.stderr[-2000:]


# ----------------------------------------------------------------------------------------------------------------
# a full disk while saving


def _save_task(run: Path):
    """A task that does what the Trainer does when it saves: torch.save into checkpoint-3/ (a link to /dev/full,
    which fails every write with a real ENOSPC)."""
    def task(cfg):
        import torch

        folder = run / "checkpoint-3"
        folder.mkdir(parents=True)
        (folder / "optimizer.pt").symlink_to("/dev/full")
        torch.save({"state": torch.zeros(4096)}, str(folder / "optimizer.pt"))
    return task


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_names_the_write_and_the_summary_does_not_mask_it(tmp_path, monkeypatch, capsys):
    from omegaconf import OmegaConf

    from qwenvl_ft.commands import runtime

    monkeypatch.setattr(runtime, "_job_info", lambda: (["recipe=demo"], False))
    monkeypatch.setattr(runtime, "LOW_SPACE_BYTES", 1 << 62)  # /dev/full's file system is not the full one
    cfg = OmegaConf.create({"output_dir": str(tmp_path / "run"), "run_name": "r"})
    (tmp_path / "run").mkdir()
    # the summary cannot be written either (its temporary file is /dev/full too), as on a really full disk
    (tmp_path / "run" / ".summary.json.partial").symlink_to("/dev/full")
    with pytest.raises(SystemExit) as exit_info:
        runtime.run_task(_save_task(tmp_path / "run"), cfg)
    err = capsys.readouterr().err
    err = err[err.index("qwenvl-ft: "):]  # (an earlier in-process CLI test may leave Hydra's log handlers behind)
    assert exit_info.value.code == runtime.DISK_FULL_EXIT_STATUS
    assert f"disk full: writing {tmp_path / 'run' / 'checkpoint-3' / 'optimizer.pt'} failed" in err
    assert "free on that file system" in err and "checkpoint-3 is incomplete" in err
    assert "summary.json could not be written either: No space left on device" in err
    _no_traceback(err)

    # with room for the summary, it records the failure and the checkpoint stays unmarked
    shutil.rmtree(tmp_path / "run")
    (tmp_path / "run").mkdir()
    with pytest.raises(SystemExit):
        runtime.run_task(_save_task(tmp_path / "run"), cfg)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and "optimizer.pt failed" in summary["error"]
    assert not (tmp_path / "run" / "checkpoint-3" / "checkpoint_complete.json").exists()


def test_write_failures_of_other_libraries_are_recognised(tmp_path):
    from qwenvl_ft.commands.runtime import write_failure

    def save_file(filename):  # what safetensors raises on ENOSPC: no errno, the text only
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    target = tmp_path / "model.safetensors"
    try:
        save_file(str(target))
    except RuntimeError as err:
        message = write_failure(err, str(tmp_path))
    assert message.startswith(f"disk full: writing {target} failed")
    assert write_failure(ValueError("a bug"), str(tmp_path)) is None
    assert write_failure(OSError(errno.EDQUOT, "Disk quota exceeded"), str(tmp_path)).startswith("disk full")


# ----------------------------------------------------------------------------------------------------------------
# Ctrl-C


def test_ctrl_c_stops_after_the_step_and_a_second_one_at_once(tmp_path):
    from transformers import TrainerControl, TrainerState

    from qwenvl_ft.training.resume import StopOnSignal

    stop = StopOnSignal()
    with stop.installed():
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: the flag is set
    assert stop.received == signal.SIGINT
    control = stop.on_step_end(SimpleNamespace(device="cpu"), TrainerState(), TrainerControl())
    assert control.should_save and control.should_training_stop

    pid = os.fork()
    if pid == 0:  # the child: two Ctrl-C, the second ends it at once
        try:
            child = StopOnSignal()
            with child.installed():
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
        finally:
            os._exit(0)  # reached only if the second Ctrl-C did not end the process
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGINT


def test_ctrl_c_in_a_forked_worker_is_left_to_the_main_process():
    from qwenvl_ft.training.resume import StopOnSignal

    stop = StopOnSignal()
    read, write = os.pipe()
    with stop.installed():
        pid = os.fork()
        if pid == 0:
            os.kill(os.getpid(), signal.SIGINT)  # inherited handler: nothing happens in the worker
            os.write(write, b"alive")
            os._exit(0)
        os.waitpid(pid, 0)
    assert os.read(read, 5) == b"alive" and stop.received is None


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    """As at a terminal: SIGINT to the whole process group, DataLoader workers included."""
    import time

    log = tmp_path / "log.txt"
    command = [sys.executable, "-m", "qwenvl_ft", "train", "recipe=demo", "data.shapes.num_train=32",
               "data.shapes.num_eval=2", "trainer.max_steps=100000", "trainer.save_steps=50000",
               "trainer.logging_steps=1", "data.num_workers=2", "trainer.eval_generation=false",
               "trainer.report_to=[none]", f"hydra.run.dir={tmp_path / 'run'}"]
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True,
                                env=dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1"))
    deadline = time.time() + 300
    while log.read_text().count("'loss'") < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=300) == 128 + signal.SIGINT, log.read_text()[-3000:]
    text = log.read_text()
    _no_traceback(text)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    step = summary["metrics"]["global_step"]
    assert summary["status"] == "interrupted" and summary["metrics"]["signal_number"] == signal.SIGINT
    assert (tmp_path / "run" / f"checkpoint-{step}" / "checkpoint_complete.json").exists()
    assert (tmp_path / "run" / "metrics.json").exists() and (tmp_path / "run" / "log_history.json").exists()
    assert "To resume, run the same command again" in text and "run_name=" in text


# ----------------------------------------------------------------------------------------------------------------
# config values silently accepted before


def test_max_steps_below_one_other_than_unset_is_a_config_error():
    for steps in ("-5", "0"):
        with pytest.raises(ConfigError, match=rf"trainer.max_steps={steps}: must be > 0, or -1"):
            compose(["recipe=demo", f"trainer.max_steps={steps}"], output_dir="/tmp/o")
    with pytest.raises(ConfigError, match=r"data.max_samples=-5: must be > 0"):
        compose(["recipe=demo", "data.max_samples=-5"], output_dir="/tmp/o")
    assert validate(compose(["recipe=demo", "trainer.max_steps=-1"], output_dir="/tmp/o")).trainer.max_steps == -1


# ----------------------------------------------------------------------------------------------------------------
# file layouts


def _rows(n=3, image="a.png"):
    return [llava(image, answer=f"answer {i}") for i in range(n)]


def test_a_byte_order_mark_is_read_past(tmp_path):
    from qwenvl_ft.data.records import load_rows

    write_image(tmp_path / "a.png")
    text = json.dumps(_rows(), indent=2)
    for name, encoding in (("utf8.json", "utf-8-sig"), ("utf16.json", "utf-16")):
        (tmp_path / name).write_text(text, encoding=encoding)
        rows = load_rows(data_cfg(tmp_path / name), str(tmp_path / name))
        assert [r["source"] for r in rows] == [f"{tmp_path / name}:row {i}" for i in range(3)]
    (tmp_path / "lines.jsonl").write_text("\n".join(json.dumps(r) for r in _rows()), encoding="utf-8-sig")
    assert len(load_rows(data_cfg(tmp_path / "lines.jsonl"), str(tmp_path / "lines.jsonl"))) == 3
    # Excel's CSV export starts with one too: the first column keeps its name
    (tmp_path / "t.csv").write_text("image,question,answer\na.png,What?,Red.\n", encoding="utf-8-sig")
    rows = load_rows(data_cfg(tmp_path / "t.csv", format="columns"), str(tmp_path / "t.csv"))
    assert rows[0]["images"] == [str(tmp_path / "a.png")]


def test_a_top_level_object_says_where_the_list_was_expected(tmp_path):
    from qwenvl_ft.data.records import load_rows

    cases = {"one.json": ({"data": _rows()}, "its one list field is 'data' (3 items)"),
             "two.json": ({"train": _rows(), "test": _rows(1)}, "its list fields are 'train' (3 items), 'test'"),
             "none.json": ({"version": 2}, "it has no list field (fields: version)")}
    for name, (document, fragment) in cases.items():
        (tmp_path / name).write_text(json.dumps(document, indent=2))
        with pytest.raises(DataError) as err:
            load_rows(data_cfg(tmp_path / name), str(tmp_path / name))
        message = str(err.value)
        assert message.startswith(f"{tmp_path / name}: the top level is a JSON object, where a list of rows was "
                                  f"expected") and fragment in message and message.count("\n") == 0
    # on one line, and named .jsonl: still one error, not a bogus row
    (tmp_path / "flat.json").write_text(json.dumps({"data": _rows()}))
    with pytest.raises(DataError, match="its one list field is 'data'"):
        load_rows(data_cfg(tmp_path / "flat.json"), str(tmp_path / "flat.json"))
    (tmp_path / "pretty.jsonl").write_text(json.dumps({"data": _rows()}, indent=2))
    with pytest.raises(DataError, match="its one list field is 'data'"):
        load_rows(data_cfg(tmp_path / "pretty.jsonl"), str(tmp_path / "pretty.jsonl"))
    # a one-line .jsonl file cannot be told from a row: its row error names the list field that holds the rows
    (tmp_path / "flat.jsonl").write_text(json.dumps({"data": _rows()}))
    with pytest.raises(DataError, match="the rows, they are in its list field 'data' \\(3 items\\)"):
        load_rows(data_cfg(tmp_path / "flat.jsonl"), str(tmp_path / "flat.jsonl"))
    # one row per line in a .json file is still JSONL, and a bad line is still just that line
    write_jsonl(tmp_path / "lines.json", _rows() + ['{"conversations": ['])
    problems = []
    assert len(load_rows(data_cfg(tmp_path / "lines.json"), str(tmp_path / "lines.json"), problems)) == 3
    assert [p.source for p in problems] == [f"{tmp_path / 'lines.json'}:line 4"]
