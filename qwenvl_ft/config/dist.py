"""The `dist` group: how many processes, on how many machines, and which engine shares the work
(qwenvl_ft/distributed/).

Standard library only: `--cfg job` must not pay for torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import List, Optional

from qwenvl_ft.errors import check as _check


class DistEngine(str, Enum):
    none = "none"  # one process (dist=single)
    ddp = "ddp"  # PyTorch DistributedDataParallel: a whole copy of the model per process, gradients all-reduced
    fsdp = "fsdp"  # PyTorch FSDP2 through accelerate: parameters, gradients and optimizer states sharded
    deepspeed = "deepspeed"  # DeepSpeed ZeRO through accelerate: dist.zero.stage says what is partitioned


class OffloadDevice(str, Enum):
    none = "none"
    cpu = "cpu"


class FsdpStateDict(str, Enum):
    sharded = "sharded"  # one file per rank: fast, and no rank ever holds the whole model
    full = "full"  # gathered on rank 0 into one file per checkpoint


@dataclass
class FsdpConfig:
    """FSDP2 settings (dist.engine=fsdp). Each wrap unit is gathered for its forward and backward only."""

    # true: full shard, each unit's parameters are freed after its forward and gathered again for the backward
    # (ZeRO-3-like); false: kept gathered between forward and backward (more memory, one all-gather less).
    reshard_after_forward: bool = True
    # With model.gradient_checkpointing: FSDP's own checkpoint wrapper on the wrap units instead of transformers'
    # (which would gather every unit a second time in the backward).
    activation_checkpointing: bool = True
    cpu_offload: bool = False  # parameters and gradients in CPU memory between uses (slow; for tight GPUs)
    state_dict_type: FsdpStateDict = FsdpStateDict.sharded  # checkpoint-*/ layout; final/ is always consolidated
    # Wrap units by class name. Empty: the model's decoder layers and vision blocks (read off the model family).
    wrap_classes: List[str] = field(default_factory=list)
    # Load the checkpoint on rank 0 only and broadcast it while sharding (CPU memory of one copy per machine
    # instead of one per process).
    cpu_ram_efficient_loading: bool = False


@dataclass
class ZeroConfig:
    """DeepSpeed ZeRO settings (dist.engine=deepspeed). The DeepSpeed JSON is generated from these and the rest of
    the config (qwenvl_ft/distributed/zero.py), never kept by hand."""

    stage: int = 2  # 1: optimizer states, 2: + gradients, 3: + parameters partitioned over the processes
    offload_optimizer: OffloadDevice = OffloadDevice.none  # optimizer states (and the step) in CPU memory
    offload_param: OffloadDevice = OffloadDevice.none  # parameters in CPU memory between uses (stage 3 only)
    overlap_comm: bool = True  # overlap gradient reduction with the backward
    contiguous_gradients: bool = True  # gradients copied into one buffer as produced (less fragmentation)
    # Stage 3: gather the partitioned weights when saving, so that final/ is one ordinary model (on rank 0).
    gather_16bit_weights_on_model_save: bool = True


@dataclass
class DistConfig:
    """How the run is spread over processes and machines. `single` runs one process; the others start one process
    per GPU (`qwenvl-ft train` launches them itself through torch's launcher; `torchrun`, `accelerate launch` and
    `srun` work too). See docs/distributed.md."""

    engine: DistEngine = DistEngine.none  # set by the option: none (single), ddp, fsdp or deepspeed (zero*)
    # Processes on this machine. None: one per visible GPU; on a machine without GPUs one process (a warning says
    # so): set it to run N CPU processes over gloo.
    num_processes: Optional[int] = None
    num_machines: int = 1  # machines in the run, each starting num_processes processes
    machine_rank: int = 0  # this machine's number, 0 .. num_machines-1 (machine 0 hosts the rendezvous)
    # Address of machine 0, reachable from all; needed with num_machines > 1 (inside a SLURM job: the first node)
    main_process_ip: Optional[str] = None
    main_process_port: int = 29500  # the rendezvous port on machine 0
    backend: Optional[str] = None  # torch.distributed backend; None: nccl with GPUs, gloo on CPU
    timeout_s: int = 1800  # a collective waiting longer than this fails the run instead of hanging it
    # Restarts of the whole process group after a failure (torch elastic); each restart resumes from the newest
    # complete checkpoint like a re-run of the same command.
    max_restarts: int = 0
    # Filled in when the run starts (processes x machines) so that config.yaml records it; not set by hand.
    world_size: Optional[int] = None
    gpu_memory_gib: Optional[float] = None  # one GPU's memory: `qwenvl-ft estimate` says which options fit it
    fsdp: FsdpConfig = field(default_factory=FsdpConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)

    def __post_init__(self) -> None:
        _check(self.num_processes is None or self.num_processes >= 1, "dist.num_processes must be >= 1")
        _check(self.num_machines >= 1, "dist.num_machines must be >= 1")
        _check(0 <= self.machine_rank < self.num_machines,
               f"dist.machine_rank must be in 0..{self.num_machines - 1} (dist.num_machines={self.num_machines})")
        _check(0 < self.main_process_port < 65536, "dist.main_process_port must be a port number")
        _check(self.timeout_s > 0 and self.max_restarts >= 0, "dist.timeout_s must be > 0, dist.max_restarts >= 0")
        _check(self.engine != DistEngine.none or (self.num_processes in (None, 1) and self.num_machines == 1),
               "dist=single runs one process; pick dist=ddp, fsdp, zero2, zero3 or zero3_offload for more")
        _check(self.zero.stage in (0, 1, 2, 3), "dist.zero.stage must be 0, 1, 2 or 3")
        _check(self.gpu_memory_gib is None or self.gpu_memory_gib > 0, "dist.gpu_memory_gib must be > 0")
        _check(self.zero.offload_param == OffloadDevice.none or self.zero.stage == 3,
               "dist.zero.offload_param needs dist.zero.stage=3 (only stage 3 partitions the parameters)")

    @property
    def is_sharded(self) -> bool:
        """Whether parameters are split over the processes (every process must then run every module)."""
        return self.engine == DistEngine.fsdp or (self.engine == DistEngine.deepspeed and self.zero.stage == 3)
