"""How many DataLoader worker processes decode, resize and tokenise: `data.num_workers` (a number, or `auto`).

A GPU step must not wait for its batch. A 1024x768 photo costs about 20-30 ms of decoding, resizing and patchifying
on one core (docs/performance.md, "Data path"), so a QLoRA 7B step of 4 x 8 such rows needs about a second of CPU
work that only worker processes can overlap with the GPU. `auto` gives each rank its share of the CPUs (minus
one for the rank's own process, which drives the GPU), capped: beyond a few workers per GPU the input pipeline is
far ahead of any VLM step (bench/input_pipeline.py measures it) and every extra worker costs memory and start-up.
Workers are persistent (no re-forking every epoch and evaluation) and prefetch two batches each (PyTorch's default,
stated so that it is visible here).

On a CPU-only run the workers compete with the training computation for the same cores; `auto` there is what
measured fastest on the project's 2-core CI machine (docs/performance.md, "Workers on CPU").

The batches are the same for any worker count: the Trainer's sampler draws the order in the main process and the
collators are deterministic (tests/test_telemetry.py compares 0 and 2 workers batch by batch).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Union

# Workers per rank at most with `auto` on a GPU.
GPU_WORKER_CAP = 8
# Workers with `auto` on a CPU-only run (measured: docs/performance.md, "Workers on CPU").
CPU_ONLY_WORKERS = 1
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


def loader_workers(setting: Union[int, str], cuda: bool, cpus: int, ranks: int = 1) -> LoaderWorkers:
    """Workers for training batches: `setting` is data.num_workers."""
    if setting != "auto":
        count = int(setting)
        return LoaderWorkers(count, count > 0, PREFETCH_FACTOR if count > 0 else None, "data.num_workers")
    if not cuda:
        count = min(CPU_ONLY_WORKERS, max(0, cpus - 1))
        return LoaderWorkers(count, count > 0, PREFETCH_FACTOR if count > 0 else None,
                             f"auto: CPU-only run, {cpus} CPUs")
    count = max(1, min(GPU_WORKER_CAP, cpus // ranks - 1))
    return LoaderWorkers(count, True, PREFETCH_FACTOR,
                         f"auto: {cpus} CPUs / {ranks} rank(s) on this machine, minus the rank's own, at most "
                         f"{GPU_WORKER_CAP}")


def training_workers(setting: Union[int, str]) -> LoaderWorkers:
    import torch

    return loader_workers(setting, torch.cuda.is_available(), available_cpus(), local_world_size())


def check_workers(setting: Union[int, str]) -> int:
    """Workers for data-check: nothing else runs then, so with `auto` every CPU of this rank's share decodes
    (one worker alone would only add inter-process copies to the main process's own work)."""
    if setting != "auto":
        return int(setting)
    count = min(GPU_WORKER_CAP, available_cpus() // local_world_size())
    return count if count > 1 else 0
