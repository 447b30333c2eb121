"""Conventions of the suite's fixtures and processes (keep new ones to these, so that the suite stays fast on 2 cores):

- Share what is built, per process: a tiny model's processor through `processor_of(option)` / `tiny_processor`
  (session scope); random tiny weights are materialised once per machine (QWENVL_FT_CACHE's random_models/; each test
  has its own QWENVL_FT_CACHE, so no data-check entry is shared by accident). A test that changes a
  shared object makes its own copy first.
- A command runs in process, through the CLI's `main([...])` (with `monkeypatch.chdir` where the run folder is
  relative), unless a fresh interpreter is what the test proves: signals and SIGKILL to a run, lock holders, several
  processes, or what a fresh `sys.modules` holds. Such a test says why in a comment: each fresh interpreter costs
  5-8 s of CPU in imports.
- Files are spread over the workers whole (`--dist loadfile`), the heaviest first (HEAVIEST_FIRST below), so that
  no long file starts last on one worker while the other one idles.
- The README's install skips pip's compilation of the whole virtualenv (`--no-compile`); the suite's processes write
  the bytecode of what they import, once, for the processes after them (_write_bytecode_caches below).
"""

import os
import sys

import pytest


def _write_bytecode_caches() -> None:
    """pip compiles every module of every package it installs, one core for ~50 s on the 24,000 files of the test
    virtualenv (about half of the install); the suite imports a fraction of them. The README's install leaves that
    out (`pip install --no-compile`) and the first process that imports a module writes its .pyc, which the next
    ones read, also where the environment says PYTHONDONTWRITEBYTECODE (CI images often do): otherwise each of the
    suite's fresh interpreters (training subprocesses, launched workers) would compile torch and transformers again,
    ~10 s of CPU each. Set before torch is imported, so the processes the tests start inherit it."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    sys.dont_write_bytecode = False


_write_bytecode_caches()

# Random tiny models are cached per test session, never in the user's home.
os.environ.setdefault("QWENVL_FT_CACHE", os.path.join(os.environ.get("TMPDIR", "/tmp"), "qwenvl_ft_test_cache"))
SESSION_CACHE = os.environ["QWENVL_FT_CACHE"]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _share_the_cores_between_workers() -> None:
    """Under pytest-xdist each worker process would start as many compute threads as there are cores, so two
    workers ran four on two cores, and the tiny models' short operators spent their time waiting on each other:
    with one thread per share of the cores the default tier took 380 s instead of 836 s on 2 cores. Set before
    torch is imported, so the training subprocesses some tests start inherit it too."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers > 1:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))


_share_the_cores_between_workers()


def _bind_absl_to_the_real_stderr():
    """absl (TensorBoard imports it) creates a logging handler bound to the sys.stderr of that moment, here pytest's
    capture file. Hydra's logging setup (every in-process `qwenvl-ft` command) closes every handler ever created
    (logging.shutdown over logging._handlerList), and absl's close() closes its stream unless it is the *current*
    sys.stderr: under a test that redirects stderr, pytest's capture file is closed and the session dies at
    teardown ("I/O operation on closed file"). Bound to sys.__stderr__, which absl never closes, it is harmless
    (it is attached to no logger)."""
    try:
        from absl import logging as absl_logging
    except ImportError:
        return
    absl_logging.get_absl_handler().python_handler.stream = sys.__stderr__


# The files that take longest (CPU seconds on 2 cores, measured with --durations), heaviest first. xdist's loadfile
# hands out whole files, by default those with the most tests first; long files with few tests (the resume and
# training runs) then start last and one worker runs on alone. Giving the longest files first (longest processing
# time first) balances the two workers. A file not listed keeps xdist's order, after these.
HEAVIEST_FIRST = ["test_eval_infer_merge.py", "test_grounding_demos.py", "test_dpo.py", "test_estimate.py",
                  "test_train_tiny.py", "test_experts.py", "test_grpo.py", "test_distributed.py", "test_resume.py",
                  "test_config_ux.py", "test_methods.py", "test_config.py", "test_trackers.py", "test_telemetry.py",
                  "test_packing.py", "test_peft_import.py", "test_dpo_packing.py", "test_varlen_attention.py",
                  "test_compile.py"]


def pytest_configure(config):
    """Longest files first under `--dist loadfile` (HEAVIEST_FIRST): xdist's own reordering of the files by their
    number of tests is switched off and the collection order below is kept."""
    if getattr(config.option, "dist", "no") == "loadfile":
        config.option.loadscopereorder = False
    _bind_absl_to_the_real_stderr()


def _heaviest_first(items):
    rank = {name: i for i, name in enumerate(HEAVIEST_FIRST)}
    by_file = {}
    for item in items:
        by_file.setdefault(item.path.name, []).append(item)
    # after the listed files, xdist's default order: the files with the most tests first
    order = sorted(by_file, key=lambda name: (rank.get(name, len(rank)), -len(by_file[name]), name))
    items[:] = [item for name in order for item in by_file[name]]


@pytest.fixture(scope="session", autouse=True)
def _trackers_that_trl_binds_at_import():
    """TRL binds W&B and MLflow when its modules are first imported (`if is_wandb_available(): import wandb`), and
    every command that runs through the CLI hides the trackers its run does not use while it runs
    (qwenvl_ft/training/optional_packages.py). In one process that runs commands through the CLI's main and calls
    `train()` directly too, the first import of TRL then decides whether a later run finds `wandb` in TRL's module
    (NameError at the end of training when it was hidden then and is not now). Imported once here (about 1.5 s),
    they are never hidden in the test processes, whatever order the files run in; what a fresh command imports
    is checked in fresh interpreters (tests/test_optional_packages.py, tests/test_peft_import.py)."""
    import importlib.util

    for name in ("wandb", "mlflow"):
        if importlib.util.find_spec(name) is not None:
            __import__(name)


@pytest.fixture(autouse=True)
def _environment_as_it_was():
    """A command run in process may set environment variables for the processes it would start (the CLI adds a
    recipe file's folder to QWENVL_FT_RECIPES for a launch's workers); they are put back after each test, so one
    test's recipe folder never shows up in another's recipe list."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(autouse=True)
def _own_data_cache(_environment_as_it_was, tmp_path_factory):
    """Each test gets its own qwenvl-ft cache folder (QWENVL_FT_CACHE), so that no test reads another's data-check
    entry (the per-user cache, qwenvl_ft/data/cache.py) and none writes to ~/.cache; its random_models/ is a link
    to the session's, so the random tiny models are still built once. Set after `_environment_as_it_was` saved
    the environment, so it is put back after the test."""
    shared = os.path.join(SESSION_CACHE, "random_models")
    os.makedirs(shared, exist_ok=True)
    own = tmp_path_factory.mktemp("qwenvl_ft_cache")
    os.symlink(shared, own / "random_models")
    os.environ["QWENVL_FT_CACHE"] = str(own)


def pytest_collection_modifyitems(config, items):
    _heaviest_first(items)
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def processor_of():
    """option -> the processor of that model option's tiny random model (each built once per session)."""
    from qwenvl_ft.config.compose import compose
    from qwenvl_ft.config.compose import validate
    from qwenvl_ft.modeling.build import build_processor

    built = {}

    def processor(option: str = "tiny"):
        if option not in built:
            typed = validate(compose(["recipe=demo", f"model={option}"], output_dir="/tmp/unused"))
            built[option] = build_processor(typed.model, typed.data)
        return built[option]

    return processor


@pytest.fixture(scope="session")
def tiny_processor(processor_of):
    return processor_of("tiny")
