"""Finishing a run: final/ saved whole or not at all, metrics.json and log_history.json, run_info.json, the model card
of final/ and its upload, and the record of a run stopped by a signal."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Dict, Optional

from qwenvl_ft.config.hub import HubConfig

log = logging.getLogger("qwenvl_ft")


def save_final(trainer, processor, output_dir: Path) -> Path:
    """Adapter (or full model) and processor in `final/`, written to a temporary folder and renamed into place,
    so a crash mid-save never leaves a folder that looks complete; refused (TrainingDiverged) when a trained
    weight is NaN or inf. Every rank takes part (FSDP and ZeRO-3 gather
    the weights collectively); the main process writes, the others wait until final/ is in place."""
    from qwenvl_ft.distributed import ranks
    from qwenvl_ft.distributed.saving import save_consolidated

    from qwenvl_ft.training.divergence import check_finite_weights

    check_finite_weights(trainer, output_dir)  # never a final/ of NaN weights
    final_dir = output_dir / "final"
    staging = output_dir / ".final.partial"
    if ranks.is_main_process():
        shutil.rmtree(staging, ignore_errors=True)
    ranks.barrier()
    try:
        save_consolidated(trainer, staging)
        if ranks.is_main_process():
            processor.save_pretrained(str(staging))
    except BaseException:  # a full disk, Ctrl-C: the partial copy would only take space
        if ranks.is_main_process():
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if ranks.is_main_process():
        if final_dir.exists():
            shutil.rmtree(final_dir)
        staging.rename(final_dir)
    ranks.barrier()
    return final_dir


def write_history(trainer, output_dir: Path, metrics: Dict) -> None:
    """metrics.json and log_history.json, by the main process, each written whole or not at all; the run's
    performance figures (training/telemetry.py) and start-up budget (training/startup.py) join `metrics`, so
    that summary.json carries them too."""
    from qwenvl_ft.distributed import ranks
    from qwenvl_ft.run_folder.files import write_atomically
    from qwenvl_ft.training import startup
    from qwenvl_ft.training.telemetry import summary_metrics

    metrics.update(summary_metrics(trainer))
    if startup.current() is not None:
        metrics.update(startup.current().metrics())
    if not ranks.is_main_process():
        return
    write_atomically(output_dir / "metrics.json", json.dumps(metrics, indent=2))
    write_atomically(output_dir / "log_history.json", json.dumps(trainer.state.log_history, indent=1))


def finish_final(output_dir: Path, command: Optional[str] = None, started_at: Optional[float] = None,
                 linear_attention: Optional[str] = None) -> Path:
    """Once final/, metrics.json and log_history.json are written (the held-out metrics after training included):
    run_info.json (command, hardware, software, times), the model card of final/, and the upload when hub.push.
    `command` defaults to this job's command line, `started_at` to when start_run wrote config.yaml (the start of
    this session of the run)."""
    from qwenvl_ft.publish.run_record import launch_command, run_info, typed_config, write_run_info

    config_yaml = output_dir / "config.yaml"
    started = started_at if started_at is not None else config_yaml.stat().st_mtime
    info = run_info(command or launch_command(), started)
    if linear_attention is not None:  # what ran the recurrent layers (modeling/linear_attention.py)
        info["linear_attention"] = linear_attention
    write_run_info(output_dir, info)
    return publish_final(output_dir, typed_config(config_yaml.read_text()).hub)


def publish_final(output_dir: Path, hub: HubConfig) -> Path:
    """(Re)write the card of final/ from the run folder's records, naming hub.repo_id as where to load it from
    when set, then upload final/ when hub.push (a HubError when that fails: final/ stays as it is)."""
    from qwenvl_ft.publish.card import build_card, write_card
    from qwenvl_ft.publish.hub import push_folder
    from qwenvl_ft.publish.run_record import launch_command, load_run

    final_dir = output_dir / "final"
    kind = "adapter" if (final_dir / "adapter_config.json").is_file() else "model"
    record = load_run(output_dir)
    serving = None
    if kind == "adapter":
        from qwenvl_ft import families
        from qwenvl_ft.publish.serving import serving_of_folder

        serving = serving_of_folder(final_dir, families.get(record.config.model.family.value)).sentence()
    card = write_card(final_dir, build_card(record, kind, hub.repo_id or str(final_dir), serving=serving))
    log.info("model card: %s", card)
    if hub.push:
        retry = (f"run the same command again (the run is finished: it only uploads):\n"
                 f"  {launch_command() or 'qwenvl-ft train ... (the same arguments)'}")
        push_folder(final_dir, hub, retry)
    return card


def interrupted(trainer, output_dir: Path, metrics: Dict) -> Dict:
    """Stopped by a signal (SIGTERM, Ctrl-C): the checkpoint is saved, final/ is not written (the run is not
    finished). `metrics["signal_number"]` tells runtime.run_task which exit status to give."""
    from qwenvl_ft.training.resume import StopOnSignal

    state = trainer.state
    checkpoint = output_dir / f"checkpoint-{state.global_step}"
    received = [cb.received for cb in trainer.callback_handler.callbacks
                if isinstance(cb, StopOnSignal) and cb.received is not None]
    metrics.update(interrupted=True, global_step=state.global_step, max_steps=state.max_steps,
                   checkpoint=str(checkpoint), signal_number=int(received[0]) if received else None)
    write_history(trainer, output_dir, metrics)
    log_performance(metrics)
    log.warning("interrupted at step %d of %d; checkpoint saved to %s. Run the same command again to resume.",
                state.global_step, state.max_steps, checkpoint)
    return metrics


def log_performance(metrics: Dict) -> None:
    """The run's performance figures as one console line (`performance: ...`), when it has them."""
    from qwenvl_ft.training.telemetry import performance_line

    if metrics.get("performance"):
        log.info("%s", performance_line(metrics["performance"]))
