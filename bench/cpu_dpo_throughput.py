"""End-to-end DPO throughput on CPU: qwenvl-ft padded and padding-free against stock TRL, same model, data and epoch.

    python bench/cpu_dpo_throughput.py [--pairs 256] [--batch-size 8] [--threads 2] [--repeats 2]

Every run trains LoRA (r=16 on every language-model projection; vision tower and merger frozen, as in the 2B/7B
DPO recipes) on the tiny random Qwen2-VL in fp32 with sdpa, for one epoch over the same preference pairs, from the
same initial weights, through `DPOTrainer.train()` (sigmoid loss, reference = the base with the adapter disabled,
computed every step). The wall time covers building the trainer, data loading, collation, the policy and reference
forwards, backward and optimizer steps. Each stack is warmed up first; each run is the fastest of --repeats,
taken round-robin.

  trl-stock      trl.DPOTrainer with its own DataCollatorForVisionPreference (PIL images in the dataset)
  padded         qwenvl-ft's DPO trainer with no padding-free hooks: what TRL computes, with our collator
  shared-images  + each pair's images encoded once for chosen and rejected (qwenvl-ft's default)
  padding-free   + the language model runs each batch's real tokens only (data.packing=true)

Pairs: an image of one of five sizes (4-36 visual tokens), a question, and a chosen and a rejected answer of 3-60
words each, drawn independently, so padding comes from prompts of different lengths and from answers of different
lengths. Padding fraction is measured on the batches the collators produced. Prints a markdown table with the
ratios; docs/performance.md records a run.
"""

from __future__ import annotations

import os
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_throughput import (SIZES, WORDS, Counting, bench_arguments, fastest, quiet_offline_cpu,  # noqa: E402
                            versions_line)

OVERRIDES = ["recipe=dpo_demo", "model.freeze_vision_tower=true", "model.freeze_merger=true", "trainer.epochs=1",
             "trainer.report_to=[none]", "trainer.disable_tqdm=true", "trainer.logging_steps=10000",
             "trainer.save_steps=100000", "optimizer.scheduler=constant", "optimizer.warmup_ratio=0",
             "data.max_length=512"]


def preference_pairs(count: int, seed: int = 0):
    from PIL import Image, ImageDraw

    rng = random.Random(seed)

    def answer():
        return [{"role": "assistant",
                 "content": [{"type": "text", "text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60)))}]}]

    pairs = []
    for index in range(count):
        width, height = rng.choice(SIZES)
        image = Image.new("RGB", (width, height), tuple(rng.randint(150, 255) for _ in range(3)))
        ImageDraw.Draw(image).ellipse((4, 4, width - 4, height - 4), fill=tuple(rng.randint(0, 120) for _ in range(3)))
        pairs.append({
            "prompt": [{"role": "user", "content": [{"type": "image", "text": None},
                                                    {"type": "text", "text": "Describe the image in detail."}]}],
            "chosen": answer(), "rejected": answer(), "images": [image], "source": f"bench:{index}",
        })
    return pairs


def _typed(tmp, name, batch_size, extra=()):
    from qwenvl_ft.config.compose import compose, validate

    return validate(compose(OVERRIDES + [f"trainer.batch_size={batch_size}", *extra], output_dir=str(tmp / name)))


def run_qwenvl_ft(name, pairs, tmp, batch_size, share_images, unpad):
    from qwenvl_ft.data.collate_preference import VisionPreferenceCollator
    from qwenvl_ft.data.preference import to_pair_dataset
    from qwenvl_ft.modeling.build import build_base_model, build_lora_config, build_processor
    from qwenvl_ft.modeling.padding_free import share_pair_images, unpad_language_model
    from qwenvl_ft.modeling.varlen_attention import use_for_language_model
    from qwenvl_ft.trainers.dpo import build_trainer

    cfg = _typed(tmp, name, batch_size)
    processor = build_processor(cfg.model, cfg.data)
    base = build_base_model(cfg.model, cfg.adapter)
    started, cpu = time.perf_counter(), time.process_time()
    trainer = build_trainer(cfg, base, build_lora_config(base, cfg.model, cfg.adapter), processor,
                            VisionPreferenceCollator(processor, cfg.data), to_pair_dataset(pairs), None)
    # the hooks one by one (trainers/dpo.py: remove_redundant_work applies both, or the first alone)
    if share_images:
        share_pair_images(trainer.model)
    if unpad:
        unpad_language_model(trainer.model)
        use_for_language_model(trainer.model)
    counting = Counting(trainer.data_collator)
    trainer.data_collator = counting
    trainer.train()
    return (time.perf_counter() - started, time.process_time() - cpu), counting, trainer.state.global_step


def run_trl(pairs, tmp, batch_size):
    import datasets
    from transformers import Qwen2VLForConditionalGeneration
    from trl import DPOConfig, DPOTrainer

    from qwenvl_ft.modeling.build import build_lora_config, build_processor, model_source

    cfg = _typed(tmp, "trl", batch_size)
    source = model_source(cfg.model)
    processor = build_processor(cfg.model, cfg.data, source)
    model = Qwen2VLForConditionalGeneration.from_pretrained(source, dtype="float32", attn_implementation="sdpa")
    peft_config = build_lora_config(model, cfg.model, cfg.adapter)  # the same adapter as qwenvl-ft's
    dataset = datasets.Dataset.from_list([{key: pair[key] for key in ("prompt", "chosen", "rejected", "images")}
                                          for pair in pairs])
    args = DPOConfig(output_dir=str(tmp / "trl"), num_train_epochs=1, per_device_train_batch_size=batch_size,
                     learning_rate=cfg.optimizer.lr, lr_scheduler_type="constant", optim="adamw_torch", bf16=False,
                     fp16=False, gradient_checkpointing=False, logging_steps=10_000, save_strategy="no", report_to=[],
                     disable_tqdm=True, seed=cfg.seed, dataloader_num_workers=0, beta=cfg.trainer.dpo.beta,
                     max_length=cfg.data.max_length)
    started, cpu = time.perf_counter(), time.process_time()
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor,
                         peft_config=peft_config)
    counting = Counting(trainer.data_collator)
    trainer.data_collator = counting
    trainer.train()
    return ((time.perf_counter() - started, time.process_time() - cpu), counting, trainer.state.global_step,
            type(counting.inner).__name__)


def compute_breakdown(pairs, tmp, batch_size, repeats):
    """Per-step model compute with pre-collated batches (policy forward + backward, reference forward; no
    collation, no optimizer), each layout measured `repeats` times in turn, fastest kept, and the share of TRL's
    fused LM head in it from torch.profiler."""
    from torch.profiler import profile

    from qwenvl_ft.data.collate_preference import VisionPreferenceCollator
    from qwenvl_ft.data.preference import to_pair_dataset
    from qwenvl_ft.modeling.build import build_base_model, build_lora_config, build_processor
    from qwenvl_ft.modeling.padding_free import share_pair_images, unpad_language_model
    from qwenvl_ft.modeling.varlen_attention import use_for_language_model
    from qwenvl_ft.trainers.dpo import build_trainer

    cfg = _typed(tmp, "compute", batch_size)
    processor = build_processor(cfg.model, cfg.data)
    base = build_base_model(cfg.model, cfg.adapter)
    trainer = build_trainer(cfg, base, build_lora_config(base, cfg.model, cfg.adapter), processor,
                            VisionPreferenceCollator(processor, cfg.data), to_pair_dataset(pairs), None)
    batches = [trainer.data_collator([trainer.train_dataset[i] for i in range(start, start + batch_size)])
               for start in range(0, len(pairs) - batch_size + 1, batch_size)]
    trainer.model.train()

    def steps(count):
        for batch in batches[:count]:
            trainer.compute_loss(trainer.model, batch).backward()

    def hooks(layout):
        handles = []
        if layout != "padded":
            handles += share_pair_images(trainer.model)
        if layout == "padding-free":
            handles += unpad_language_model(trainer.model)
        return handles

    use_for_language_model(trainer.model)  # sdpa_varlen: plain SDPA for padded batches, per sample when packed
    layouts = ("padded", "shared-images", "padding-free")
    best = {layout: float("inf") for layout in layouts}
    head = {}
    steps(2)  # warm-up
    for _ in range(repeats):
        for layout in layouts:
            handles = hooks(layout)
            started = time.perf_counter()
            steps(len(batches))
            best[layout] = min(best[layout], (time.perf_counter() - started) / len(batches))
            for handle in handles:
                handle.remove()
    profiled = min(8, len(batches))
    for layout in layouts:
        handles = hooks(layout)
        with profile() as profiler:
            steps(profiled)
        for handle in handles:
            handle.remove()
        head[layout] = sum(event.cpu_time_total for event in profiler.key_averages()
                           if event.key in ("ChunkedLogProbFunction", "ChunkedLogProbFunctionBackward"))
        head[layout] *= best[layout] / profiler.key_averages().self_cpu_time_total  # its share of the timed step
    return best, head


def main() -> None:
    args = bench_arguments("--pairs", "preference pairs in the epoch")
    tmp = quiet_offline_cpu(args.threads, "qwenvl_dpo_bench_")
    pairs = preference_pairs(args.pairs)
    load_before = os.getloadavg()

    run_trl(pairs[:16], tmp, args.batch_size)  # untimed warm-up of both stacks
    run_qwenvl_ft("warm-up", pairs[:16], tmp, args.batch_size, True, True)

    layouts = [
        ("padded", False, False, "qwenvl-ft collator, padded, images encoded twice"),
        ("shared-images", True, False, "padded, each pair's images encoded once"),
        ("padding-free", True, True, "images once, language model on real tokens only"),
    ]
    jobs = {"trl-stock": (run_trl, (pairs, tmp, args.batch_size))}
    jobs.update({name: (run_qwenvl_ft, (name, pairs, tmp, args.batch_size, share, unpad))
                 for name, share, unpad, _ in layouts})
    best = fastest(args.repeats, jobs)
    timing, counting, steps, collator_name = best["trl-stock"]
    results = [("trl-stock", f"TRL {collator_name}", timing, counting, steps)]
    for name, _, _, what in layouts:
        timing, counting, steps = best[name]
        results.append((name, what, timing, counting, steps))
    load_after = os.getloadavg()

    trl_rate, padded_rate = args.pairs / results[0][2][0], args.pairs / results[1][2][0]
    print(f"\n{args.pairs} preference pairs, 1 epoch, batch {args.batch_size} pairs, tiny random Qwen2-VL (fp32, sdpa, "
          f"LoRA r=16, vision frozen), reference computed every step, {args.threads} threads, fastest of "
          f"{args.repeats} round-robin runs each after an untimed warm-up")
    print(f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    print(versions_line() + "\n")
    print("| run | layout | steps | wall s | CPU s | pairs/s | padding | vs padded | vs TRL |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, what, (seconds, cpu_seconds), counting, steps in results:
        rate = args.pairs / seconds
        padding = 1 - counting.real / counting.tensor
        print(f"| {name} | {what} | {steps} | {seconds:.1f} | {cpu_seconds:.1f} | {rate:.1f} | {padding:.1%} | "
              f"{rate / padded_rate:.2f}x | {rate / trl_rate:.2f}x |")
    print("\npadding: share of the collated batches' tokens that are padding (padding-free runs them anyway "
          "through the collator, but the language model skips them)")

    best, head = compute_breakdown(pairs, tmp, args.batch_size, args.repeats + 1)
    print("\nModel compute per step, pre-collated batches (policy forward + backward, reference forward), fastest "
          f"of {args.repeats + 1}; TRL's fused LM head measured with torch.profiler and scaled to the timed step\n")
    print("| layout | ms/step | fused LM head ms | everything else ms | vs padded | everything else vs padded |")
    print("|---|---:|---:|---:|---:|---:|")
    for layout, seconds in best.items():
        rest = seconds - head[layout]
        print(f"| {layout} | {seconds * 1e3:.1f} | {head[layout] * 1e3:.1f} | {rest * 1e3:.1f} | "
              f"{best['padded'] / seconds:.2f}x | {(best['padded'] - head['padded']) / rest:.2f}x |")


if __name__ == "__main__":
    main()
