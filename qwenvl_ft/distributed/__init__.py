"""Running one config on many processes and machines, on engines that already exist (torch's launcher, accelerate,
DDP, FSDP2, DeepSpeed ZeRO); nothing here re-implements them.

- `ranks`: who am I (rank, world size, main process), barriers, main-process-first; usable before the Trainer
  exists (the run folder and the data check come first).
- `launch`: `qwenvl-ft train dist=...` starts its processes through torch's own launcher API (torchrun's), with
  one resolved config for all ranks; `torchrun`, `accelerate launch` and `srun` lines are recognised too.
- `zero`: the DeepSpeed config generated from the resolved config, its "auto" values filled by transformers'
  integration, checked by DeepSpeed's own config classes.
- `fsdp`: FSDP2 arguments (full shard, decoder layers and vision blocks as wrap units).
- `engine`: what the TrainingArguments get for the configured engine.
- `modality`: every rank runs the vision tower every step (mixed text-only / image batches never hang).
- `placement`: each QLoRA process's GPU; how much of a ZeRO-3 partitioned model a process holds.
- `saving`: one consolidated final/ whatever the engine.
- `memory`: per-GPU memory of each engine and world size, for `qwenvl-ft estimate`.

Heavy imports (torch, deepspeed) happen inside functions: composing a config stays torch-free.
"""
