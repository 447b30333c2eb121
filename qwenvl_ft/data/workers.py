"""How many DataLoader worker processes decode, resize and tokenise: `data.num_workers` (a number, or `auto`).

A GPU step must not wait for its batch. A 1024x768 photo costs about 20-30 ms of decoding, resizing and patchifying
on one core (docs/performance.md, "Data path"), so a QLoRA 7B step of 4 x 8 such rows needs about a second of CPU
work that only worker processes can overlap with the GPU. `auto` gives each rank its share of the CPUs (minus
one for the rank's own process, which drives the GPU), capped: beyond a few workers per GPU the input pipeline is
far ahead of any VLM step (bench/input_pipeline.py measures it) and every extra worker costs memory and start-up.
Workers are persistent (no re-forking every epoch and evaluation) and prefetch enough batches for a whole optimizer
step: the Trainer fetches all `gradient_accumulation_steps` micro-batches of a step before computing any of them
(`Trainer.get_batch_samples`), so with PyTorch's default of two batches per worker a step of 4 x 8 rows on one
worker waits for six collations with the GPU idle (bench/input_pipeline.py measures both).

On a CPU-only run the workers compete with the training computation for the same cores; `auto` there is what
measured fastest on the project's 2-core CI machine: none, batches collated in the training process
(docs/performance.md, "Workers on CPU": one worker cost 20-30% more CPU seconds and a slower loop).

The batches are the same for any worker count: the Trainer's sampler draws the order in the main process and the
collators are deterministic (tests/test_telemetry.py compares 0 and 2 workers batch by batch).
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional, Union

# Workers per rank at most with `auto` on a GPU.
GPU_WORKER_CAP = 8
# Workers with `auto` on a CPU-only run (measured: docs/performance.md, "Workers on CPU").
CPU_ONLY_WORKERS = 0
PREFETCH_FACTOR = 2


@dataclass
class LoaderWorkers:
    num_workers: int
    persistent: bool
    prefetch_factor: Optional[int]
    why: str

    def training_arguments(self) -> dict:
        """The transformers TrainingArguments that carry this."""
        return {"dataloader_num_workers": self.num_workers, "dataloader_persistent_workers": self.persistent,
                "dataloader_prefetch_factor": self.prefetch_factor}


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a scheduler's allocation), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def local_world_size() -> int:
    """Ranks on this machine (torchrun and accelerate set LOCAL_WORLD_SIZE), sharing its CPUs."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def prefetch_factor(workers: int, accumulation: int) -> Optional[int]:
    """Batches each worker keeps ready: together at least one optimizer step's micro-batches."""
    if workers == 0:
        return None
    return max(PREFETCH_FACTOR, math.ceil(accumulation / workers))


def loader_workers(setting: Union[int, str], cuda: bool, cpus: int, ranks: int = 1,
                   accumulation: int = 1) -> LoaderWorkers:
    """Workers for training batches: `setting` is data.num_workers, `accumulation` the micro-batches per step."""
    if setting != "auto":
        count, why = int(setting), "data.num_workers"
    elif not cuda:
        count, why = min(CPU_ONLY_WORKERS, max(0, cpus - 1)), f"auto: CPU-only run, {cpus} CPUs"
    else:
        count = max(1, min(GPU_WORKER_CAP, cpus // ranks - 1))
        why = (f"auto: {cpus} CPUs / {ranks} rank(s) on this machine, minus the rank's own, at most "
               f"{GPU_WORKER_CAP}")
    return LoaderWorkers(count, count > 0, prefetch_factor(count, accumulation), why)


def training_workers(setting: Union[int, str], accumulation: int = 1) -> LoaderWorkers:
    import torch

    return loader_workers(setting, torch.cuda.is_available(), available_cpus(), local_world_size(), accumulation)


# data-check with `auto` measures fewer rows than this in its own process: a small image row takes under a
# millisecond, less than handing it to a worker process and back.
CHECK_ROWS_PER_WORKER = 128


def check_workers(setting: Union[int, str], rows: int) -> int:
    """Workers for data-check of `rows` rows: nothing else runs then, so with `auto` every CPU of this rank's
    share decodes (one worker alone would only add inter-process copies to the main process's own work)."""
    if setting != "auto":
        return int(setting)
    count = min(GPU_WORKER_CAP, available_cpus() // local_world_size(), rows // CHECK_ROWS_PER_WORKER)
    return count if count > 1 else 0


@contextmanager
def one_thread():
    """Torch's intra-op threads set to one while collating in the training process, as a DataLoader worker has them
    (PyTorch sets one thread in every worker). A batch is a few hundred ops on small tensors (a small image is tens of
    thousands of values; even a photo's millions take milliseconds, against a CPU step of seconds), which gain
    nothing from a second thread, and on a busy machine each op waits at the thread pool's barrier for a descheduled
    thread: on the 2-core CI machine at load 4-7 a batch of 8 caption rows took 660 ms instead of 19 ms
    (docs/performance.md, "Data path"). Element-wise ops give the same values on any thread count, so the batch is
    unchanged. Setting the count is a variable write, free per batch."""
    import torch

    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
