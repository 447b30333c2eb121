import os
import sys

import pytest

# Random tiny models are cached per test session, never in the user's home.
os.environ.setdefault("QWENVL_FT_CACHE", os.path.join(os.environ.get("TMPDIR", "/tmp"), "qwenvl_ft_test_cache"))
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


def pytest_configure(config):
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


def pytest_collection_modifyitems(config, items):
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
