"""Input stalls: the share of a training step spent waiting for batches, with 0, 1, 2 and `auto` DataLoader workers.

    python bench/input_pipeline.py [--rows 64] [--batch-size 4] [--accumulation 8] [--steps 3] [--warmup 1]
    python bench/input_pipeline.py --cpu-training [--skip-gpu-standin]   # + how `auto` was chosen for CPU runs

Rows of one 1024x768 JPEG, a question and a caption (bench/collate_throughput.py's realistic photos, read from
files) go through the real collator (`VisionChatCollator`, the processor's default max_pixels: 999 visual tokens
per image) and a torch DataLoader set up as the Trainer sets it up: a seeded random sampler, the worker count,
persistent workers and prefetch depth of `qwenvl_ft/data/workers.py`, no pinned memory (no GPU here). The loop does
what `Trainer._run_epoch` does: it fetches all `--accumulation` micro-batches of an optimizer step
(`get_batch_samples`), then computes them; the GPU's forward and backward are stood in for by a fixed wait per
micro-batch (`time.sleep`: the host idles, as it does while the GPU computes). The data-wait fraction is the time
blocked in `next()` over the step time, as the run telemetry measures it, over `--steps` steps after `--warmup`.

Step times per micro-batch (the rows' real token count times a time per token):

  7B  ms-swift's published Qwen2.5-VL-7B-Instruct LoRA example (examples/megatron/multimodal/dense/lora.sh in
      modelscope/ms-swift: "2 * 23GiB; 2.3s/it", packing to max_length 2048, global batch 4 on 2 GPUs, i.e. two
      packs of <= 2048 tokens per GPU per 2.3 s): at least 0.56 ms per token. A lower bound for the 7B recipes
      here: those packs hold few visual tokens (LaTeX_OCR formulas), where our rows carry 999 each, and
      qlora_7b_amazon dequantises 4-bit weights on top (both make the real step longer, the stall share smaller).
  2B  no Qwen2-VL-2B step time was found published; the 7B time per token scaled by the ratio of model FLOPs
      per token of the two models on these rows (qwenvl_ft/estimate/flops.py: training_flops, LoRA on all projections,
      frozen vision tower). Also a lower bound: small models reach a lower share of the GPU's peak, so their real
      step is longer than the FLOPs ratio says.

Columns: 0 workers (PyTorch's and transformers' default, and qwenvl-ft's before `auto`: collation inside the loop);
1 worker with PyTorch's default prefetch of 2 batches (the stock alternative); 1 and 2 workers with prefetch for a
whole step; `auto` as a GPU run on this machine resolves it. Prints a markdown table; docs/performance.md
("Input pipeline") records a run.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

MS_SWIFT_7B_SECONDS_PER_TOKEN = 2.3 / (2 * 2048)  # 2.3 s/it for two 2048-token packs per GPU


def load_average() -> str:
    try:
        return " / ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def flops_per_token_ratio(work) -> float:
    """Model FLOPs of the micro-batch `work` on Qwen2-VL-2B over Qwen2-VL-7B, LoRA r=8 on every LM projection."""
    from qwenvl_ft.config.compose import compose, validate
    from qwenvl_ft.estimate.flops import training_flops

    lora = ["adapter=lora", "adapter.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
            "model.freeze_vision_tower=true"]
    flops = {}
    for name in ("qwen2_vl_2b", "qwen2_vl_7b"):
        cfg = validate(compose([f"model={name}"] + lora, output_dir=tempfile.gettempdir()))
        flops[name] = training_flops(cfg).step(work)
    return flops["qwen2_vl_2b"] / flops["qwen2_vl_7b"]


def micro_batch_work(batch):
    """The batch's work as the run telemetry counts it, with Qwen2-VL's ViT (the same in 2B and 7B)."""
    from transformers import Qwen2VLConfig

    from qwenvl_ft.estimate.flops import StepWork
    from qwenvl_ft.training.telemetry import COUNTS, batch_counts

    counts = dict(zip(COUNTS, batch_counts(batch, Qwen2VLConfig().vision_config).tolist()))
    return StepWork(counts["tokens"], counts["token_pairs"], counts["patches"], counts["frame_pairs"],
                    counts["window_pairs"])


def make_loader(rows, collator, workers: int, prefetch, batch_size: int, seed: int):
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    generator = torch.Generator().manual_seed(seed)
    return DataLoader(rows, batch_size=batch_size, sampler=RandomSampler(rows, generator=generator),
                      collate_fn=collator, num_workers=workers, persistent_workers=workers > 0,
                      prefetch_factor=prefetch if workers else None, pin_memory=False, drop_last=True)


def stalls(loader, micro_step_s: float, accumulation: int, steps: int, warmup: int) -> dict:
    """Run the Trainer's fetch-then-compute loop; the wait over the timed steps, and the first step's."""
    iterator = iter(loader)
    waited = stepped = first = 0.0
    for step in range(warmup + steps):
        start = time.perf_counter()
        wait = 0.0
        for _ in range(accumulation):
            fetch = time.perf_counter()
            try:
                next(iterator)
            except StopIteration:  # a new epoch, as the Trainer starts one
                iterator = iter(loader)
                next(iterator)
            wait += time.perf_counter() - fetch
        time.sleep(micro_step_s * accumulation)  # the GPU's forward and backward of every micro-batch
        if step == 0:
            first = wait
        if step >= warmup:
            waited += wait
            stepped += time.perf_counter() - start
    return {"wait": waited / stepped, "first_wait_s": first, "step_s": stepped / steps}


def cpu_training(args, photos) -> None:
    """`auto` on a CPU-only run: the tiny model trained by the real trainer with 0, 1 and 2 workers, on the demo's
    shape images and on the 1024x768 photos; the runs are taken round-robin, the median of `--repeats` kept."""
    import statistics

    from qwenvl_ft.config.compose import compose, validate
    from qwenvl_ft.data.arrow import to_dataset
    from qwenvl_ft.data.collate import VisionChatCollator
    from qwenvl_ft.data.shapes import make_rows as shape_rows
    from qwenvl_ft.modeling.build import build_model, build_processor
    from qwenvl_ft.trainers.sft import build_trainer
    from qwenvl_ft.training.telemetry import find_telemetry

    quiet = ["trainer.report_to=[none]", "trainer.disable_tqdm=true", "trainer.eval_generation=false",
             "trainer.save_steps=100000", "trainer.logging_steps=100000"]
    photo_steps = max(2, args.cpu_steps // 5)  # a step over 4 photos costs the tiny model ~10x a shapes step
    datasets = {f"demo shapes (56 px), batch 8, {args.cpu_steps} steps":
                (["recipe=demo", f"trainer.max_steps={args.cpu_steps}"], shape_rows(512, 56, 0, "train")),
                f"1024x768 photos, batch 4, {photo_steps} steps":
                (["recipe=demo", "data.max_length=null", "trainer.batch_size=4", f"trainer.max_steps={photo_steps}"],
                 photos)}
    runs = {}
    for _ in range(args.repeats):
        for data_name, (overrides, rows) in datasets.items():
            for workers in (0, 1, 2):
                cfg = validate(compose(overrides + quiet + [f"data.num_workers={workers}"],
                                         output_dir=tempfile.mkdtemp(prefix="qwenvl_bench_cpu_")))
                processor = build_processor(cfg.model, cfg.data)
                collator = VisionChatCollator(processor, cfg.data)
                trainer = build_trainer(cfg, build_model(cfg.model, cfg.adapter), processor, collator,
                                        to_dataset(rows), None)
                start = time.perf_counter()
                trainer.train()
                wall = time.perf_counter() - start
                figures = find_telemetry(trainer).summary
                runs.setdefault((data_name, workers), []).append((wall, figures["samples_per_s"],
                                                                  figures["data_wait_fraction"]))
                print(f"  cpu {data_name} {workers} workers: {wall:.1f} s, {figures}", file=sys.stderr, flush=True)
    print(f"\nCPU-only training, tiny model (demo recipe), median of {args.repeats} round-robin runs; load average "
          f"{load_average()} at the end\n")
    print("| data | workers | train() wall s | samples/s (telemetry) | data wait |")
    print("|---|---:|---:|---:|---:|")
    for (data_name, workers), values in runs.items():
        print(f"| {data_name} | {workers} | {statistics.median(v[0] for v in values):.1f} | "
              f"{statistics.median(v[1] for v in values):.1f} | {statistics.median(v[2] for v in values):.1%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=64, help="distinct JPEG files (cycled through)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--cpu-training", action="store_true",
                        help="also time CPU-only training with 0, 1, 2 workers (how `auto` was chosen for CPU runs)")
    parser.add_argument("--cpu-steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-gpu-standin", action="store_true", help="only the CPU-only training table")
    args = parser.parse_args()
    os.environ.setdefault("QWENVL_FT_CACHE", os.path.join(tempfile.gettempdir(), "qwenvl_ft_test_cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    load_before = load_average()

    import torch

    from collate_throughput import make_rows
    from qwenvl_ft.config.compose import compose, validate
    from qwenvl_ft.data.collate import VisionChatCollator
    from qwenvl_ft.data.workers import available_cpus, loader_workers
    from qwenvl_ft.modeling.build import build_processor

    cfg = validate(compose(["recipe=demo", "data.max_length=null"], output_dir=tempfile.gettempdir()))
    folder = Path(tempfile.gettempdir()) / "qwenvl_ft_bench_images"
    folder.mkdir(exist_ok=True)
    files = make_rows(folder, args.rows)
    needed = args.batch_size * args.accumulation * (args.steps + args.warmup + 1)
    rows = [files[i % len(files)] for i in range(max(needed, len(files)))]
    collator = VisionChatCollator(build_processor(cfg.model, cfg.data), cfg.data)

    sample = collator(rows[: args.batch_size])
    work = micro_batch_work(sample)
    seven = work.tokens * MS_SWIFT_7B_SECONDS_PER_TOKEN
    two = seven * flops_per_token_ratio(work)
    start = time.perf_counter()
    for _ in range(3):
        collator(rows[: args.batch_size])
    collate_s = (time.perf_counter() - start) / 3

    if args.skip_gpu_standin:
        cpu_training(args, files)
        return
    cpus = available_cpus()
    auto = loader_workers("auto", cuda=True, cpus=cpus, accumulation=args.accumulation)
    configs = [("0 workers (the old default)", 0, None),
               ("1 worker, PyTorch's prefetch (2)", 1, 2),
               ("1 worker", 1, loader_workers(1, True, cpus, accumulation=args.accumulation).prefetch_factor),
               ("2 workers", 2, loader_workers(2, True, cpus, accumulation=args.accumulation).prefetch_factor),
               (f"auto ({auto.num_workers} on this machine)", auto.num_workers, auto.prefetch_factor)]
    results = {}
    for label, micro in (("2B", two), ("7B", seven)):
        for name, workers, prefetch in configs:
            loader = make_loader(rows, collator, workers, prefetch, args.batch_size, args.seed)
            results[(label, name)] = stalls(loader, micro, args.accumulation, args.steps, args.warmup)
            del loader
            print(f"  {label} {name}: {results[(label, name)]}", file=sys.stderr, flush=True)

    print(f"input pipeline: batch {args.batch_size} rows x accumulation {args.accumulation} of one 1024x768 JPEG "
          f"({os.path.getsize(files[0]['images'][0]) // 1024} KB, {int(sample['image_grid_thw'][0].prod()) // 4} "
          f"visual tokens) + text, {work.tokens / args.batch_size:.0f} tokens per row; collation "
          f"{collate_s * 1000:.0f} ms per micro-batch in one process; {args.warmup} warm-up + {args.steps} timed "
          f"steps")
    print(f"{platform.platform()}, {cpus} CPUs available, torch {torch.__version__}; load average (1/5/15 min) "
          f"{load_before} before, {load_average()} after")
    print(f"GPU step stood in for: 7B {seven:.2f} s, 2B {two:.2f} s per micro-batch "
          f"({seven * args.accumulation:.1f} s and {two * args.accumulation:.1f} s per optimizer step)\n")
    print("| workers | prefetch per worker | data wait, 2B step | data wait, 7B step | first step's wait, 7B |")
    print("|---|---:|---:|---:|---:|")
    for name, workers, prefetch in configs:
        short, long = results[("2B", name)], results[("7B", name)]
        print(f"| {name} | {prefetch or '-'} | {short['wait']:.1%} | {long['wait']:.1%} | "
              f"{long['first_wait_s']:.2f} s |")
    goal = results[("7B", configs[-1][0])]["wait"]
    print(f"\ngoal: under 5% data wait with the default (auto) at the 7B step time: "
          f"{'met' if goal < 0.05 else 'NOT met'} ({goal:.1%})")
    if args.cpu_training:
        cpu_training(args, files)


if __name__ == "__main__":
    main()
