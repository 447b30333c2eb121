"""Starting the processes of a run, and recognising processes that someone else started.

`qwenvl-ft train dist=ddp ...` is a launcher itself: `plan` decides how many processes this machine runs, and
`launch` starts them through torch's own launcher API (`torch.distributed.run`, i.e. torchrun: rendezvous, process
supervision, restarts, multi-node; nothing hand-written), each running `python -m qwenvl_ft train` with the same
overrides plus the values resolved once here: `run_name`, the output folder, the number of processes. Every rank
therefore composes the same config; the main process records it (config.yaml, with dist.world_size) and the others
check theirs against it (training/start.py `start_run`).

Started by someone else (`torchrun -m qwenvl_ft ...`, `accelerate launch -m qwenvl_ft ...`, `srun python -m
qwenvl_ft ...`), a process is a worker from the start: `prepare_worker` (called by the CLI before Hydra composes
anything) maps SLURM's task variables to torch's, and makes the ranks agree on one run name and one launch id
through the launcher's rendezvous store, so that a default (time-stamped) run name cannot split the run over two
folders.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from qwenvl_ft.config.dist import DistEngine
from qwenvl_ft.config.schema import TrainConfig
from qwenvl_ft.distributed import ranks
from qwenvl_ft.errors import ConfigError

log = logging.getLogger("qwenvl_ft")

RUN_NAME_FORMAT = "%Y-%m-%d_%H-%M-%S"  # the default run_name of conf/train.yaml (${now:...}); a test compares them
_STORE_PREFIX = "qwenvl_ft"
_kept_alive = []  # the rendezvous store: on rank 0 it hosts the server the process group will share


class WorkersStopped(ConfigError):
    """The launched processes stopped on a config or data error; its message is above (no traceback: exit 2)."""


class WorkersFailed(RuntimeError):
    """A launched process failed otherwise; its traceback is above."""


# ----------------------------------------------------------------------------------------------------------------
# processes started by someone else


def is_worker() -> bool:
    """Whether this process was started by a launcher (ours, torchrun, accelerate launch, srun): it trains."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def export_slurm_env() -> bool:
    """`srun python -m qwenvl_ft ...` with one task per GPU: torch's RANK / WORLD_SIZE / LOCAL_RANK from SLURM's
    task variables; MASTER_ADDR is the batch script's export or the job's first node (`scontrol show hostnames`),
    MASTER_PORT the export or one derived from the job id (two jobs sharing a node do not collide). Each task sees
    its node's GPUs and takes the one of its LOCAL_RANK, as under torchrun. With one task per node each task is a
    machine running qwenvl-ft's own launcher instead (`cluster_machine`). Returns whether it applied."""
    tasks = int(os.environ.get("SLURM_NTASKS", "1"))
    nodes = int(os.environ.get("SLURM_JOB_NUM_NODES", os.environ.get("SLURM_NNODES", "1")))
    if is_worker() or tasks <= 1 or tasks == nodes or "SLURM_PROCID" not in os.environ:
        return False
    if "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = _first_node(os.environ.get("SLURM_JOB_NODELIST", ""))
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 40000))
    tasks_per_node = os.environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
    os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
                      LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"))
    if tasks_per_node.isdigit():
        os.environ["LOCAL_WORLD_SIZE"] = tasks_per_node
    return True


def _first_node(node_list: str) -> str:
    import subprocess

    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", node_list], capture_output=True, text=True,
                               check=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError):
        hosts = []
    if not hosts:
        raise ConfigError("srun with several tasks: export MASTER_ADDR (the first node of the job, e.g. "
                          "MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1))")
    return hosts[0]


def _rendezvous_store():
    """The key-value store of the launch (torchrun's agent store, or one hosted by rank 0 at MASTER_ADDR:PORT that
    the process group shares later): torch's own rendezvous, not a side channel."""
    import torch.distributed as dist

    store, _, _ = next(dist.rendezvous("env://"))
    _kept_alive.append(store)
    return dist.PrefixStore(_STORE_PREFIX, store)


def prepare_worker(overrides: Sequence[str]) -> List[str]:
    """Before Hydra composes: for a worker of someone else's launcher, the run name and launch id of rank 0 on
    every rank. Returns the overrides to compose with (run_name=... added when the user gave none)."""
    export_slurm_env()
    overrides = list(overrides)
    if not is_worker() or os.environ.get(ranks.LAUNCH_ID_ENV):  # a single process, or our own launcher's worker
        return overrides
    given = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+~") == "run_name"), None)
    launch_id, run_name = ranks.launch_id() or uuid.uuid4().hex, given or time.strftime(RUN_NAME_FORMAT)
    if ranks.is_distributed():
        store = _rendezvous_store()
        if ranks.is_main_process():
            store.set("launch_id", launch_id)
            store.set("run_name", run_name)
        # get() waits for rank 0; a restart of the same launch finds the keys still set: same folder, resumed.
        launch_id, run_name = store.get("launch_id").decode(), store.get("run_name").decode()
    os.environ[ranks.LAUNCH_ID_ENV] = launch_id
    return overrides if given else overrides + [f"run_name={run_name}"]


# ----------------------------------------------------------------------------------------------------------------
# our own launcher


@dataclass
class LaunchPlan:
    processes: int  # on this machine
    machines: int
    machine_rank: int
    reason: str
    main_address: Optional[str] = None  # machine 0's, with several machines

    @property
    def world_size(self) -> int:
        return self.processes * self.machines


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def plan(cfg: TrainConfig) -> Optional[LaunchPlan]:
    """How many processes `qwenvl-ft train` starts on this machine, or None to train in this process."""
    dist = cfg.dist
    gpus = visible_gpus()
    if dist.engine == DistEngine.none:
        if gpus > 1:
            # The Trainer would wrap the model in DataParallel over every visible GPU (which TRL refuses); one
            # launched process trains on its own GPU instead.
            return LaunchPlan(1, 1, 0, f"dist=single: one process on the first of {gpus} visible GPUs "
                                       f"(dist=ddp trains on all of them)")
        return None
    if dist.engine == DistEngine.fsdp and gpus == 0:
        raise ConfigError("dist=fsdp needs GPUs: accelerate applies FSDP on accelerators only (between CPU "
                          "processes it drops the FSDP plugin and the run would silently be plain DDP). Use "
                          "dist=ddp or dist=zero3 for CPU processes")
    processes = dist.num_processes
    if processes is None:
        if gpus == 0:
            log.warning("dist=%s without visible GPUs: one CPU process. Set dist.num_processes=N to run N CPU "
                        "processes (gloo)", dist.engine.value)
        processes = max(gpus, 1)
    if processes == 1 and dist.num_machines == 1 and dist.engine == DistEngine.ddp and gpus <= 1:
        return None  # DDP of one process is a plain run; DeepSpeed and FSDP still need their launch environment
    if dist.num_machines == 1:
        return LaunchPlan(processes, 1, 0, f"{processes} processes on this machine, {dist.engine.value}")
    machine_rank, address = dist.machine_rank, dist.main_process_ip
    if address is None:
        machine_rank, address = cluster_machine(dist.num_machines)
    return LaunchPlan(processes, dist.num_machines, machine_rank,
                      f"{processes} processes on each of {dist.num_machines} machines (this one is {machine_rank}), "
                      f"{dist.engine.value}", address)


def cluster_machine(machines: int) -> Tuple[int, str]:
    """(this machine's rank, machine 0's address) inside a SLURM job that runs one task per node (sweep=slurm's
    jobs through submitit's view of the job, or `srun` in a batch script through SLURM's variables)."""
    try:
        from submitit import JobEnvironment

        job = JobEnvironment()
        nodes, node, first = job.num_nodes, job.node, job.hostnames[0]
    except Exception:  # not a submitit job, or submitit not installed
        if "SLURM_NODEID" not in os.environ:
            raise ConfigError("dist.num_machines > 1 needs dist.main_process_ip (the address of machine 0, "
                              "reachable from all) and dist.machine_rank on each machine") from None
        nodes = int(os.environ.get("SLURM_JOB_NUM_NODES", os.environ.get("SLURM_NNODES", "1")))
        node = int(os.environ["SLURM_NODEID"])
        first = os.environ.get("MASTER_ADDR") or _first_node(os.environ.get("SLURM_JOB_NODELIST", ""))
    if nodes != machines:
        raise ConfigError(f"dist.num_machines={machines}, but this job runs on {nodes} node(s)")
    return node, first


def _hidden_size(cfg: TrainConfig) -> Optional[int]:
    if cfg.model.architecture is not None:
        return cfg.model.architecture.hidden_size
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
        return config.get_text_config().hidden_size
    except Exception:  # offline and not cached: the check runs without the bucket sizes
        return None


def check_before_launch(cfg: TrainConfig, launch: LaunchPlan, overrides: Sequence[str], is_sweep: bool) -> None:
    """What would otherwise fail in every process at once, minutes later."""
    if launch.machines > 1 and not is_sweep and not any(o.split("=", 1)[0] == "run_name" for o in overrides):
        raise ConfigError("dist.num_machines > 1: give the run a fixed name (run_name=NAME, the same on every "
                          "machine), so that all machines write to one run folder")
    if cfg.dist.engine == DistEngine.deepspeed:
        from qwenvl_ft.distributed.zero import check_deepspeed_config

        check_deepspeed_config(cfg, launch.world_size, _hidden_size(cfg))


def torchrun_arguments(cfg: TrainConfig, launch: LaunchPlan, command: Sequence[str]) -> List[str]:
    """The command line torchrun's own parser takes for this launch."""
    dist = cfg.dist
    arguments = [f"--nproc-per-node={launch.processes}", f"--max-restarts={dist.max_restarts}"]
    if launch.machines == 1:
        arguments.append("--standalone")  # a free local port: concurrent runs on one machine never collide
    else:
        arguments += [f"--nnodes={launch.machines}", f"--node-rank={launch.machine_rank}", "--rdzv-backend=static",
                      f"--master-addr={launch.main_address}", f"--master-port={dist.main_process_port}"]
    return arguments + ["--module", *command]


def worker_command(command: str, overrides: Sequence[str], cfg: TrainConfig, launch: LaunchPlan) -> List[str]:
    """`qwenvl_ft COMMAND` with the user's overrides and what was resolved here once for all ranks."""
    keep = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in ("run_name", "dist.num_processes",
                                                                            "dist.world_size")]
    return ["qwenvl_ft", command, *keep, f"run_name={cfg.run_name}", f"hydra.run.dir={cfg.output_dir}",
            f"dist.num_processes={launch.processes}", f"dist.world_size={launch.world_size}"]


def launch(cfg: TrainConfig, launch_plan: LaunchPlan, overrides: Sequence[str], is_sweep: bool = False,
           command: str = "train") -> Dict:
    """Run the workers through torchrun's API and wait for them; the metrics rank 0 wrote, or the interruption.
    A worker's config or data error was printed by that worker; here it becomes WorkersStopped (exit status 2),
    any other failure WorkersFailed."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    check_before_launch(cfg, launch_plan, overrides, is_sweep)
    launch_id = uuid.uuid4().hex
    os.environ[ranks.LAUNCH_ID_ENV] = launch_id  # inherited by every worker of this launch
    argv = torchrun_arguments(cfg, launch_plan, worker_command(command, overrides, cfg, launch_plan))
    log.info("launching %s (launch id %s): torchrun %s", launch_plan.reason, launch_id, " ".join(argv))
    try:
        run(parse_args(argv))
    except ChildFailedError as err:
        return _failed(cfg, {rank: failure.exitcode for rank, failure in err.failures.items()})
    except SignalException as err:
        # SIGTERM/SIGINT to this launcher: torch elastic has passed it on to the workers (which save a
        # checkpoint and stop, see training/resume.py StopOnSignal) and waited for them.
        log.warning("launcher received %s; the workers were stopped", err.sigval.name)
        return _failed(cfg, {})
    finally:
        os.environ.pop(ranks.LAUNCH_ID_ENV, None)
    return _results(cfg)


def _failed(cfg: TrainConfig, statuses: Dict[int, int]) -> Dict:
    """The outcome of a launch that did not end with status 0 everywhere: an interruption with a checkpoint saved
    (resumable: rank 0's summary says so), or a failure.

    Every rank stops on a config or data error with status 2, but torchrun stops the remaining workers with
    SIGTERM (then SIGKILL) as soon as one has exited: a rank still on its way out shows that signal instead. So the
    launch stopped on the error when some rank exited 2 and every other one did too or was stopped by the
    launcher, whichever rank finished first."""
    metrics = _results(cfg)
    if metrics.get("interrupted") or not statuses:
        metrics.setdefault("interrupted", True)
        return metrics
    by_rank = ", ".join(f"rank {rank}: {_status_text(status)}" for rank, status in sorted(statuses.items()))
    if 2 in statuses.values() and all(s == 2 or s in _STOPPED_BY_LAUNCHER for s in statuses.values()):
        raise WorkersStopped(f"the launched processes stopped (exit status {by_rank}); the message is above")
    raise WorkersFailed(f"the launched processes failed (exit status {by_rank}); the first failure's traceback is "
                        f"above") from None


# what torchrun sends the workers still running once one has exited (SIGKILL after a grace period)
_STOPPED_BY_LAUNCHER = (-signal.SIGTERM, -signal.SIGKILL)


def _status_text(status: int) -> str:
    if status in _STOPPED_BY_LAUNCHER:
        return f"stopped by the launcher ({signal.Signals(-status).name})"
    return str(status)


def _results(cfg: TrainConfig) -> Dict:
    import json

    summary = Path(cfg.output_dir) / "summary.json"
    if summary.is_file():  # rank 0's run_task wrote it: status and metrics of the run
        return json.loads(summary.read_text()).get("metrics", {})
    metrics = Path(cfg.output_dir) / "metrics.json"
    return json.loads(metrics.read_text()) if metrics.is_file() else {}


def launch_if_needed(cfg: TrainConfig) -> Optional[Dict]:
    """Called where a train run starts: None when this process trains itself (a single run, or a worker), else
    the launched run's metrics."""
    if is_worker():
        return None
    launch_plan = plan(cfg)
    if launch_plan is None:
        return None
    overrides, is_sweep = _hydra_job()
    return launch(cfg, launch_plan, overrides, is_sweep)


def _hydra_job():
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    return list(hydra_cfg.overrides.task), hydra_cfg.mode == RunMode.MULTIRUN
