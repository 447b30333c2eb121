"""End-to-end SFT throughput on CPU: qwenvl-ft's batch layouts against stock TRL, same model, data and epoch.

    python bench/cpu_throughput.py [--rows 256] [--batch-size 8] [--threads 2] [--repeats 2]

Every run trains the tiny random Qwen2-VL (fp32, sdpa, full fine-tuning, AdamW, no gradient checkpointing) for
one epoch over the same rows, from the same initial weights, through `SFTTrainer.train()`; the wall time covers
building the trainer (qwenvl-ft's batch planning included), data loading, collation, forward, backward and optimizer
steps. Both stacks are warmed up first (imports, caches), and each run is the fastest of --repeats, taken
round-robin. Runs:

  trl-stock         trl.SFTTrainer with its built-in DataCollatorForVisionLanguageModeling (dataset in TRL's
                    conversational format, batch 8, right padding; TRL refuses packing and padding-free for vision)
  padded            qwenvl-ft, batch 8, right padding (the default layout)
  length-grouped    qwenvl-ft, batch 8, data.group_by_length=true (transformers' LengthGroupedSampler)
  token-budget      qwenvl-ft, data.max_tokens_per_batch = the padded run's mean padded batch size (same tokens
                    per step), rows of similar length padded together
  packed-same-mem   qwenvl-ft, data.packing=true with the same token budget as token-budget: one row per step
  packed-default    qwenvl-ft, data.packing=true with the default budget (batch size x data.max_length)

Rows are short caption-like samples: an image of one of five sizes (4 to 36 visual tokens) and a 3-30 word
caption, 40-110 tokens in all. Padding fraction is measured on the batches the collators actually produced.
Wall time is what counts; CPU time (all threads of the process) is printed too because a shared machine's load
inflates wall time unevenly between runs. Prints a markdown table and the ratios; docs/performance.md records a
run.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORDS = ("a red circle green square blue triangle yellow cross on the left right top bottom of the image next to "
         "small large bright dark white black grey cat dog cup table coffee plate food street bike man riding "
         "playing grass").split()
SIZES = [(56, 56), (112, 56), (112, 112), (168, 84), (168, 168)]  # 4, 8, 16, 18, 36 visual tokens


def caption_rows(count: int, seed: int = 0):
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    rows = []
    for index in range(count):
        width, height = rng.choice(SIZES)
        image = Image.new("RGB", (width, height), tuple(rng.randint(150, 255) for _ in range(3)))
        ImageDraw.Draw(image).ellipse((4, 4, width - 4, height - 4), fill=tuple(rng.randint(0, 120) for _ in range(3)))
        caption = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30)))
        rows.append({
            "messages": [
                {"role": "user", "content": [{"type": "image", "text": None},
                                             {"type": "text", "text": "Describe the image."}]},
                {"role": "assistant", "content": [{"type": "text", "text": caption}]},
            ],
            "images": [image],
            "source": f"bench:{index}",
        })
    return rows


class Counting:
    """Wraps a collator and counts real and tensor tokens of what it produces."""

    def __init__(self, inner):
        self.inner, self.real, self.tensor, self.batches = inner, 0, 0, 0

    def __call__(self, items):
        batch = self.inner(items)
        self.tensor += batch["input_ids"].numel()
        self.real += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        self.batches += 1
        return batch


def _common_args(output_dir: str, batch_size: int, seed: int) -> dict:
    # the same seed as qwenvl-ft's runs: the same shuffle, so the same batches and padding
    return dict(output_dir=output_dir, num_train_epochs=1, per_device_train_batch_size=batch_size,
                learning_rate=1e-3, lr_scheduler_type="constant", optim="adamw_torch", bf16=False, fp16=False,
                gradient_checkpointing=False, logging_steps=10_000, save_strategy="no", report_to=[],
                disable_tqdm=True, seed=seed, dataloader_num_workers=0, remove_unused_columns=False, max_length=None)


def run_qwenvl_ft(name, overrides, rows, tmp):
    from qwenvl_ft.config.compose import compose, validate
    from qwenvl_ft.data.collate import VisionChatCollator
    from qwenvl_ft.data.arrow import to_dataset
    from qwenvl_ft.modeling.build import build_model, build_processor
    from qwenvl_ft.trainers.sft import build_trainer

    cfg = validate(compose(["recipe=demo", "adapter=full", "trainer.epochs=1", "trainer.report_to=[none]",
                              "trainer.disable_tqdm=true", "trainer.logging_steps=10000", "trainer.save_steps=100000",
                              "optimizer.scheduler=constant", "optimizer.warmup_ratio=0", "data.max_length=256",
                              *overrides], output_dir=str(tmp / name)))
    processor = build_processor(cfg.model, cfg.data)
    model = build_model(cfg.model, cfg.adapter)
    collator = VisionChatCollator(processor, cfg.data)
    started, cpu = time.perf_counter(), time.process_time()  # planning (lengths, packs) counts against qwenvl-ft
    trainer = build_trainer(cfg, model, processor, collator, to_dataset(rows), None)
    counting = Counting(trainer.data_collator)
    trainer.data_collator = counting
    trainer.train()
    return (time.perf_counter() - started, time.process_time() - cpu), counting, trainer.state.global_step


def run_trl(rows, tmp, batch_size):
    from transformers import Qwen2VLForConditionalGeneration
    from trl import SFTConfig, SFTTrainer

    from qwenvl_ft.config.compose import compose, validate
    from qwenvl_ft.modeling.build import build_processor, model_source

    cfg = validate(compose(["recipe=demo"], output_dir=str(tmp / "trl")))
    source = model_source(cfg.model)
    processor = build_processor(cfg.model, cfg.data, source)
    model = Qwen2VLForConditionalGeneration.from_pretrained(source, dtype="float32", attn_implementation="sdpa")
    # TRL's conversational vision format: `messages` (content lists) + `images` (decoded by datasets)
    import datasets

    dataset = datasets.Dataset.from_list([{"messages": r["messages"], "images": r["images"]} for r in rows])
    started, cpu = time.perf_counter(), time.process_time()
    trainer = SFTTrainer(model=model, args=SFTConfig(**_common_args(str(tmp / "trl"), batch_size, cfg.seed)),
                         train_dataset=dataset, processing_class=processor)
    counting = Counting(trainer.data_collator)
    trainer.data_collator = counting
    trainer.train()
    return ((time.perf_counter() - started, time.process_time() - cpu), counting, trainer.state.global_step,
            type(counting.inner).__name__)


def bench_arguments(count_flag: str, count_help: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument(count_flag, type=int, default=256, help=count_help)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def quiet_offline_cpu(threads: int, prefix: str) -> Path:
    """Offline, warnings and library logging off, `threads` intra-op threads; returns a fresh scratch folder."""
    import logging
    import tempfile

    os.environ.setdefault("QWENVL_FT_CACHE", "/tmp/qwenvl_ft_bench_cache")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    import torch
    import transformers

    logging.disable(logging.WARNING)
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(threads)
    return Path(tempfile.mkdtemp(prefix=prefix))


def fastest(repeats: int, jobs: dict) -> dict:
    """{name: (function, arguments)} -> {name: its fastest outcome of `repeats` (outcome[0][0] is wall seconds)}.

    The jobs run round-robin, so that a change of load on a shared machine hits every job alike, and the fastest
    run of each counts: load only ever slows a run down."""
    outcomes = {name: [] for name in jobs}
    for _ in range(repeats):
        for name, (function, arguments) in jobs.items():
            outcomes[name].append(function(*arguments))
    return {name: min(runs, key=lambda outcome: outcome[0][0]) for name, runs in outcomes.items()}


def versions_line() -> str:
    import torch
    import transformers
    import trl

    return f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}"


def main() -> None:
    args = bench_arguments("--rows", "caption rows in the epoch")
    tmp = quiet_offline_cpu(args.threads, "qwenvl_bench_")
    rows = caption_rows(args.rows)
    load_before = os.getloadavg()

    # Untimed warm-up of both stacks: imports, lazy initialisation and the model cache are nobody's throughput.
    run_trl(rows[:16], tmp, args.batch_size)
    run_qwenvl_ft("warm-up", ["data.packing=true"], rows[:16], tmp)

    bs = f"trainer.batch_size={args.batch_size}"
    first = fastest(args.repeats, {"trl-stock": (run_trl, (rows, tmp, args.batch_size)),
                                   "padded": (run_qwenvl_ft, ("padded", [bs], rows, tmp))})
    timing, counting, steps, collator_name = first["trl-stock"]
    results = [("trl-stock", f"TRL {collator_name}, batch {args.batch_size}", timing, counting, steps)]
    timing, counting, steps = first["padded"]
    results.append(("padded", f"qwenvl-ft, batch {args.batch_size}", timing, counting, steps))
    same_tokens = max(round(counting.tensor / counting.batches), 256)  # the padded run's mean tokens per step
    layouts = [
        ("length-grouped", [bs, "data.group_by_length=true"], f"batch {args.batch_size}, grouped by length"),
        ("token-budget", [f"data.max_tokens_per_batch={same_tokens}"], f"padded, <= {same_tokens} tokens per step"),
        ("packed-same-mem", ["data.packing=true", f"data.max_tokens_per_batch={same_tokens}"],
         f"packed, <= {same_tokens} tokens per step"),
        ("packed-default", [bs, "data.packing=true"], f"packed, <= {args.batch_size * 256} tokens per step"),
    ]
    rest = fastest(args.repeats, {name: (run_qwenvl_ft, (name, overrides, rows, tmp))
                                  for name, overrides, _ in layouts})
    for name, _, what in layouts:
        timing, counting, steps = rest[name]
        results.append((name, what, timing, counting, steps))
    load_after = os.getloadavg()

    padded_rate = args.rows / results[1][2][0]
    trl_rate = args.rows / results[0][2][0]
    padded_cpu_rate = args.rows / results[1][2][1]
    print(f"\n{args.rows} caption-like rows, 1 epoch, tiny random Qwen2-VL (fp32, sdpa, full fine-tuning), "
          f"{args.threads} threads, fastest of {args.repeats} round-robin runs each after an untimed warm-up")
    print(f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    print(versions_line() + "\n")
    print("| run | layout | steps | wall s | CPU s | samples/s | tokens/s | padding | vs padded | vs TRL "
          "| vs padded (CPU s) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, what, (seconds, cpu_seconds), counting, steps in results:
        rate = args.rows / seconds
        padding = 1 - counting.real / counting.tensor
        print(f"| {name} | {what} | {steps} | {seconds:.1f} | {cpu_seconds:.1f} | {rate:.1f} | "
              f"{counting.real / seconds:.0f} | {padding:.1%} | {rate / padded_rate:.2f}x | {rate / trl_rate:.2f}x | "
              f"{args.rows / cpu_seconds / padded_cpu_rate:.2f}x |")


if __name__ == "__main__":
    main()
