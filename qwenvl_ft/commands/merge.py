"""`qwenvl-ft merge`: fold a LoRA / DoRA adapter into its base and save a complete model folder (safetensors
weights, config, generation config, processor with chat template) that plain transformers loads, with no PEFT.

A QLoRA adapter is merged into the base loaded unquantised, in merge.dtype (default model.dtype, bf16 for the
real models): folding a low-rank update into 4-bit NF4 weights would requantise them and lose the update's
precision. The merged model is therefore the unquantised base plus the adapter, which differs from what training
saw (the NF4-dequantised base plus the adapter) by the quantisation error of the base weights.

The folder is written next to its destination under a temporary name and renamed into place: it is either
complete or absent.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict

from omegaconf import DictConfig

from qwenvl_ft.config.compose import validate
from qwenvl_ft.config.saved_run import with_saved_run
from qwenvl_ft.config.schema import MergeRunConfig
from qwenvl_ft.errors import ConfigError
from qwenvl_ft.run_folder.files import ensure_writable
from qwenvl_ft.run_folder.lock import lock_folder

log = logging.getLogger("qwenvl_ft")


def merge(composed: DictConfig) -> Dict:
    cfg: MergeRunConfig = validate(with_saved_run(composed))  # the named run's config.yaml, overrides on top
    m = cfg.merge
    if m.adapter_path is None or m.output_path is None:
        raise ConfigError("merge.adapter_path and merge.output_path are required")
    adapter_path = Path(os.path.normpath(m.adapter_path))
    output_path = Path(os.path.normpath(m.output_path))
    # Two merges into the same folder would rename over each other: one writer per destination.
    lock = lock_folder(ensure_writable(output_path.parent, "merge output folder"), f"merge destination {output_path}",
                       name=f".qwenvl_ft.lock.{output_path.name}")

    from qwenvl_ft.modeling.load import adapter_config as read_adapter_config
    from qwenvl_ft.modeling.load import attach, kind_of, load_base, load_processor

    if kind_of(adapter_path) != "adapter":
        raise ConfigError(f"{adapter_path} holds a full model, not an adapter: there is nothing to merge")
    if output_path.exists() and not m.overwrite:
        raise ConfigError(f"{output_path} exists; pass merge.overwrite=true to replace it")
    adapter_config = read_adapter_config(adapter_path)  # checked whole before the base loads
    dtype = (m.dtype or cfg.model.dtype).value
    from qwenvl_ft import families
    from qwenvl_ft.publish.serving import serving_of_folder

    serving = serving_of_folder(adapter_path, families.get(cfg.model.family.value))
    log.info("serving: %s; the merged folder is a plain model, which vLLM serves", serving.sentence())
    if cfg.adapter.load_in_4bit:
        log.info("QLoRA adapter: merging into the unquantised %s base (not the 4-bit one it trained on)", dtype)

    base = load_base(cfg.model, cfg.adapter, quantize=False, dtype=dtype)
    # PEFT's bar (per module) on a terminal only, like every progress bar (qwenvl_ft/quiet.py)
    merged = attach(base, cfg.model, adapter_path).merge_and_unload(progressbar=sys.stderr.isatty())
    processor = load_processor(cfg.model, cfg.data, adapter_path)

    staging = Path(tempfile.mkdtemp(prefix=f".{output_path.name}.partial-", dir=output_path.parent))
    try:
        merged.save_pretrained(str(staging), max_shard_size=m.max_shard_size)
        processor.save_pretrained(str(staging))
        merge_info = {
            "adapter_path": str(adapter_path.resolve()),
            "base": cfg.model.name_or_path if not cfg.model.random_init else "random init (model.architecture)",
            "method": "dora" if adapter_config.get("use_dora") else ("qlora" if cfg.adapter.load_in_4bit else "lora"),
            "dtype": dtype,
            "merged_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "adapter_servable_by_vllm": serving.servable,
        }
        (staging / "merge_info.json").write_text(json.dumps(merge_info, indent=2))
        _write_card(staging, cfg, composed, adapter_path, merge_info, serving.sentence())
        _replace(staging, output_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    lock.release()
    log.info("merged %s into the base: %s", adapter_path, output_path)
    if cfg.hub.push:  # after the folder is in place: a failed upload loses nothing
        from qwenvl_ft.publish.hub import push_folder
        from qwenvl_ft.publish.run_record import launch_command

        command = launch_command() or "qwenvl-ft merge ..."
        retry = f"merge again with merge.overwrite=true:\n  {command} merge.overwrite=true"
        push_folder(output_path, cfg.hub, retry)
    return {"output_path": str(output_path)}


def _write_card(folder: Path, cfg: MergeRunConfig, composed: DictConfig, adapter_path: Path,
                merge_info: Dict, serving: str) -> None:
    """The merged model's card: the training run's record (the adapter's run folder) when there is one, else this
    command's config, plus how it was merged."""
    from omegaconf import OmegaConf

    from qwenvl_ft.publish.card import build_card, write_card
    from qwenvl_ft.publish.run_record import RunRecord, launch_command, load_run, typed_config

    merge_info = dict(merge_info, command=launch_command())
    record = load_run(adapter_path.parent)
    if record is None:  # an adapter from elsewhere: describe it with the config of this command
        train_keys = {k: v for k, v in OmegaConf.to_container(composed, resolve=True).items() if k != "merge"}
        text = OmegaConf.to_yaml(OmegaConf.create(train_keys))
        record = RunRecord(config=typed_config(text), config_yaml=text)
    write_card(folder, build_card(record, "merged", cfg.hub.repo_id or str(folder), merge_info, serving))


def _replace(staging: Path, target: Path) -> None:
    """Rename `staging` to `target`; an existing target is moved aside first and removed only afterwards."""
    if not target.exists():
        staging.rename(target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    old.rmdir()
    target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)
