"""One ordinary, consolidated model (or adapter) whatever the engine.

`Trainer.save_model` already gathers ZeRO-3's partitions (stage3_gather_16bit_weights_on_model_save) and FSDP's
shards when the FSDP plugin's state dict type is FULL_STATE_DICT. With SHARDED_STATE_DICT (our default: fast
checkpoints that no rank has to hold whole) it writes nothing at all, so the full state dict is gathered here with
accelerate's own `get_state_dict` and written by the main process through the model's `save_pretrained` (PEFT keeps
only the adapter's entries of it).
"""

from __future__ import annotations

from pathlib import Path


def save_consolidated(trainer, folder: Path) -> None:
    """Called on every rank (the gathers are collectives); only the main process writes."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if not trainer.is_fsdp_enabled or "FULL_STATE_DICT" in str(plugin.state_dict_type):
        trainer.save_model(str(folder))
        return
    state_dict = trainer.accelerator.get_state_dict(trainer.model)
    if trainer.args.should_save:
        model = trainer.accelerator.unwrap_model(trainer.model)
        model.save_pretrained(str(folder), state_dict=state_dict, safe_serialization=True)
