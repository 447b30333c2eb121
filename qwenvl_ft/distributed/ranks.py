"""Rank helpers that work before the Trainer exists.

The run folder, the resolved config and the data check come before the TrainingArguments (which set up
accelerate's state), so rank questions are answered from the launcher's environment variables (torchrun,
accelerate launch and our own launcher set RANK / WORLD_SIZE / LOCAL_RANK; `launch.export_slurm_env` maps srun's)
and the process group is created on first need, with the backend accelerate would pick. accelerate and DeepSpeed
reuse an initialised default group, so creating it early changes nothing for them.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Iterator, Optional

LAUNCH_ID_ENV = "QWENVL_FT_LAUNCH_ID"


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_distributed() -> bool:
    return world_size() > 1


def is_main_process() -> bool:
    """Global rank 0: the one process that writes the run folder's shared files."""
    return rank() == 0


def launch_id() -> Optional[str]:
    """The same value on every rank of one launch (our launcher sets it; torchrun's run id and SLURM's job id
    stand in under other launchers); None for a plain single-process run."""
    for name in (LAUNCH_ID_ENV, "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        value = os.environ.get(name)
        if value and value != "none":
            return value
    return None


def default_backend() -> str:
    """NCCL between GPUs (with gloo for CPU tensors: FSDP's CPU offloading and full state dicts gather on the CPU,
    which is why accelerate picks the same pair for them), gloo between CPU processes."""
    import torch

    return "cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo"


def ensure_process_group(backend: Optional[str] = None, timeout_s: int = 1800) -> None:
    """Initialise torch.distributed's default group from the environment (env://) unless it exists already."""
    import torch
    import torch.distributed as dist

    if not is_distributed() or dist.is_initialized():
        return
    backend = backend or default_backend()
    if "nccl" in backend:
        torch.cuda.set_device(local_rank())  # before the first collective, or every rank would use GPU 0
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))


def barrier() -> None:
    """Wait until every rank gets here (nothing to wait for in a single process)."""
    if not is_distributed():
        return
    import torch.distributed as dist

    ensure_process_group()
    dist.barrier()


@contextmanager
def main_process_first() -> Iterator[None]:
    """The main process runs the block first (writing what the others then read), the others after it."""
    if not is_main_process():
        barrier()
    try:
        yield
    finally:
        if is_main_process():
            barrier()


def broadcast_object(value=None):
    """The main process's `value` on every rank (the others pass anything)."""
    if not is_distributed():
        return value
    import torch.distributed as dist

    ensure_process_group()
    box = [value if is_main_process() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool, device=None) -> bool:
    """True on every rank when it is true on at least one (e.g. a stop signal that reached some ranks first)."""
    if not is_distributed():
        return flag
    import torch
    import torch.distributed as dist

    ensure_process_group()
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def run_on_main(function, *args, **kwargs):
    """`function(*args, **kwargs)` on the main process only; every rank returns its result, or raises its error.

    Without passing the error on, a main process that stops (invalid data, a bad path) would leave the others
    waiting in the next collective until the timeout; this way every rank stops with the same one-screen message.
    """
    if not is_distributed():
        return function(*args, **kwargs)
    outcome = None
    if is_main_process():
        try:
            outcome = ("ok", function(*args, **kwargs))
        except Exception as err:  # handed to every rank, then raised on each
            outcome = ("error", err)
    status, payload = broadcast_object(outcome)
    if status == "error":
        raise payload
    return payload
