"""FSDP2 between two CPU processes (gloo), run by tests/test_distributed_runs.py under torchrun.

accelerate applies FSDP only on accelerators (between CPU processes it drops the FSDP plugin, so a Trainer run
with dist=fsdp would be plain DDP; qwenvl-ft refuses dist=fsdp without GPUs for that reason). This worker shards
the tiny model with accelerate's own FSDP2 functions (`fsdp2_apply_ac`, `fsdp2_prepare_model`) and the plugin the
TrainingArguments build from `qwenvl_ft.distributed.fsdp.fsdp_arguments`, i.e. the wrapping, resharding and
activation checkpointing a GPU run gets, and compares with one unsharded process on the same global batch:

- mixed modality: rank 0 a text-only row, rank 1 an image row (the vision tower kept in step by
  qwenvl_ft.distributed.modality); the full gradients equal the single-process ones;
- three AdamW steps of LoRA and of full fine-tuning: the global losses equal the single-process ones, and the
  consolidated state dict (what final/ gets) has the unwrapped model's names and the single-process weights.

Usage: torchrun --nproc-per-node 2 tests/fsdp_worker.py DATA.jsonl OUT.json
"""

import json
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist

from qwenvl_ft.config.compose import compose, validate
from qwenvl_ft.data.check import check_data
from qwenvl_ft.data.collate import VisionChatCollator
from qwenvl_ft.distributed.fsdp import fsdp_arguments
from qwenvl_ft.distributed.modality import keep_vision_in_step
from qwenvl_ft.modeling.build import build_model, build_processor

WRAPPER = "_checkpoint_wrapped_module."


def config(data_path, adapter):
    return validate(compose(["recipe=demo", "dist=fsdp", f"adapter={adapter}", "data=llava", f"data.path={data_path}",
                             "data.max_length=96", "model.gradient_checkpointing=true", "adapter.dropout=0",
                             "adapter.target_modules=[q_proj,v_proj,down_proj]"], output_dir="/tmp/unused"))


def shard(model, typed, rank):
    """What accelerate's `_prepare_fsdp2` does to the model, with the plugin the Trainer would build."""
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_apply_ac, fsdp2_prepare_model
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir="/tmp/unused", report_to=[], **fsdp_arguments(typed))
    assert not args.gradient_checkpointing, "FSDP's checkpoint wrapper replaces transformers' checkpointing"
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), is_main_process=rank == 0,
                                  mixed_precision="no", device=torch.device("cpu"))
    if plugin.activation_checkpointing:
        model = fsdp2_apply_ac(accelerator, model)
    return fsdp2_prepare_model(accelerator, model), plugin


def fsdp_units(sharded):
    """How many modules of each class are sharded as a unit of their own: the module is an FSDP unit, or the
    activation-checkpoint wrapper around it is (accelerate >= 1.16 shards the wrapper, so that FSDP's hooks stay
    outside the recomputed code; 1.15 shards both the layer and its wrapper). Either way the unit holds exactly that
    one layer's parameters."""
    from torch.distributed.fsdp import FSDPModule

    wrapped_by_unit = {id(m._checkpoint_wrapped_module) for m in sharded.modules()
                       if isinstance(m, FSDPModule) and hasattr(m, "_checkpoint_wrapped_module")}
    counts = {}
    for module in sharded.modules():
        if hasattr(module, "_checkpoint_wrapped_module"):
            continue  # counted as the layer it wraps
        if isinstance(module, FSDPModule) or id(module) in wrapped_by_unit:
            name = type(module).__name__
            name = name[len("FSDP"):] if name.startswith("FSDP") else name
            counts[name] = counts.get(name, 0) + 1
    return counts


def token_count(batch):
    return int((batch["labels"][:, 1:] != -100).sum())


def local_loss(model, batch, global_tokens, world):
    """This rank's share of the global mean loss, scaled for FSDP's gradient averaging over the ranks."""
    loss = model(**batch).loss
    return loss * token_count(batch) / global_tokens * world, loss.detach() * token_count(batch)


def full_gradients(model):
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[name.replace(WRAPPER, "")] = grad
    return grads


def mixed_modality(data_path, rank, world):
    typed = config(data_path, "full")
    processor = build_processor(typed.model, typed.data)
    rows = check_data(typed.data, processor).train
    text_row = next(r for r in rows if not r.get("images"))
    image_row = next(r for r in rows if r.get("images"))
    collator = VisionChatCollator(processor, typed.data)
    batches = [collator([text_row]), collator([image_row])]
    global_tokens = sum(token_count(b) for b in batches)

    model = build_model(typed.model, typed.adapter)
    model.train()
    sharded, plugin = shard(model, typed, rank)
    keep_vision_in_step(sharded, always=True)
    units = fsdp_units(sharded)
    scaled, _ = local_loss(sharded, batches[rank], global_tokens, world)
    scaled.backward()
    grads = full_gradients(sharded)  # collective: every rank

    result = {"wrap_classes": plugin.transformer_cls_names_to_wrap, "fsdp_units": units,
              "layers": {"Qwen2VLDecoderLayer": model.config.text_config.num_hidden_layers,
                         "Qwen2VLVisionBlock": model.config.vision_config.depth},
              "checkpoint_wrappers": sum(hasattr(m, "_checkpoint_wrapped_module") for m in sharded.modules()),
              "transformers_checkpointing": sum(bool(getattr(m, "gradient_checkpointing", False))
                                                for m in sharded.modules())}
    if rank == 0:
        reference = build_model(typed.model, typed.adapter)
        reference.train()
        reference(**collator([text_row, image_row])).loss.backward()
        expected = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
        result["same_names"] = sorted(expected) == sorted(grads)
        result["max_abs_diff"] = max(float((grads[n] - g).abs().max()) for n, g in expected.items())
        result["max_abs_grad"] = max(float(g.abs().max()) for g in expected.values())
        result["vision_grad_norm"] = float(sum(g.norm() ** 2 for n, g in expected.items() if ".visual." in n) ** 0.5)
    return result


def losses_over_steps(data_path, adapter, rank, world, steps=3):
    typed = config(data_path, adapter)
    processor = build_processor(typed.model, typed.data)
    rows = [r for r in check_data(typed.data, processor).train if r.get("images")]
    collator = VisionChatCollator(processor, typed.data)
    global_batches = [rows[2 * s:2 * s + 2] for s in range(steps)]

    def run(model, sharded):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for rows_of_step in global_batches:
            mine = [collator([row]) for row in rows_of_step]
            global_tokens = sum(token_count(b) for b in mine)
            if sharded:
                scaled, loss_sum = local_loss(model, mine[rank], global_tokens, world)
                dist.all_reduce(loss_sum)
                loss = float(loss_sum) / global_tokens
            else:
                scaled = model(**collator(rows_of_step)).loss
                loss = float(scaled)
            scaled.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss)
        return losses

    torch.manual_seed(0)
    model = build_model(typed.model, typed.adapter)
    model.train()
    sharded, _ = shard(model, typed, rank)
    keep_vision_in_step(sharded, always=True)
    result = {"fsdp": run(sharded, True)}
    consolidated = full_state_dict(sharded)  # collective: every rank
    if rank == 0:
        torch.manual_seed(0)
        reference = build_model(typed.model, typed.adapter)
        reference.train()
        result["single"] = run(reference, False)
        expected = reference.state_dict()
        result["state_dict_keys_match"] = sorted(consolidated) == sorted(expected)
        result["state_dict_max_abs_diff"] = max(float((consolidated[k] - v).abs().max()) for k, v in expected.items()
                                                if k in consolidated)
    return result


def full_state_dict(model):
    """What accelerate's `get_state_dict` returns for an FSDP2 model (and distributed/saving.py saves as final/):
    the full state dict on rank 0, names as in the unwrapped model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def main(data_path, out_path):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {"mixed_modality": mixed_modality(data_path, rank, world),
               "lora": losses_over_steps(data_path, "lora", rank, world),
               "full": losses_over_steps(data_path, "full", rank, world)}
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
