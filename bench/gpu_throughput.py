"""GPU training throughput, peak memory and MFU: qwenvl-ft packed vs padded vs stock TRL, on random-weight
Qwen2-VL-2B / 7B (the real architectures; nothing is downloaded), QLoRA / LoRA / full fine-tuning.

    python bench/gpu_throughput.py                                   # the whole matrix (about 25 minutes on an H100)
    python bench/gpu_throughput.py --models qwen2_vl_2b --methods lora --layouts packed padded trl
    python bench/gpu_throughput.py --dpo --models qwen2_vl_7b --methods qlora   # DPO: padded, padding-free, trl
    python bench/gpu_throughput.py --smoke [--dpo]                   # tiny model on CPU: checks the script runs

Every run builds the model exactly as `qwenvl-ft train` does (model=..., model.random_init=true, adapter=...,
bf16 autocast, non-reentrant gradient checkpointing, flash_attention_2 when flash-attn is installed, else sdpa),
trains `--warmup` steps untimed and then `--steps` timed steps on the same synthetic caption rows (one image of
one of several sizes, 20-200 word captions). Layouts:

  padded  qwenvl-ft's collator, trainer.batch_size rows, right padding
  packed  qwenvl-ft padding-free packing, one row of <= data.max_tokens_per_batch tokens per step
          (default: batch size x max_length, the same activation budget as a padded batch of full-length rows)
  trl     the same model through stock trl.SFTTrainer with DataCollatorForVisionLanguageModeling, batch size rows

Reported per run: samples/s and tokens/s (real tokens), padding fraction of the batch tensors,
torch.cuda.max_memory_allocated() next to `qwenvl-ft estimate`'s prediction for the same config, and MFU:
model FLOPs per second over the GPU's dense bf16 peak. Model FLOPs per token: 2N forward, +2N for the input
gradients, +2N for the weight gradients where weights train (so 6N full, 4N frozen base + adapters), N = the
language model's non-embedding parameters, plus the vision tower's per patch, plus causal attention
(4 x layers x hidden x context per token forward, x3 with the backward); gradient-checkpointing recomputation is
not counted (hardware FLOPs would be ~1/3 higher).
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

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10G": 125.0, "4090": 165.0}
IMAGE_SIZES = [(448, 448), (640, 480), (480, 640), (336, 336), (896, 672)]
WORDS = ("a photo of the with on in and large small red blue green white black dog cat man woman street table "
         "window tree car building sky water grass food plate cup sitting standing next to near under").split()


def caption_rows(count: int, seed: int = 0, sizes=IMAGE_SIZES, words=(20, 200)):
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    rows = []
    for index in range(count):
        width, height = rng.choice(sizes)
        image = Image.new("RGB", (width, height), tuple(rng.randint(100, 255) for _ in range(3)))
        pen = ImageDraw.Draw(image)
        for _ in range(6):
            x, y = rng.randint(0, width - 20), rng.randint(0, height - 20)
            pen.rectangle((x, y, x + rng.randint(10, width // 2), y + rng.randint(10, height // 2)),
                          fill=tuple(rng.randint(0, 255) for _ in range(3)))
        rows.append({
            "messages": [{"role": "user", "content": [{"type": "image", "text": None},
                                                      {"type": "text", "text": "Describe the image in detail."}]},
                         {"role": "assistant", "content": [{"type": "text", "text": " ".join(
                             rng.choice(WORDS) for _ in range(rng.randint(*words)))}]}],
            "images": [image],
            "source": f"bench:{index}",
        })
    return rows


class Meter:
    """Collator wrapper (real / tensor tokens, rows, attention work) + step timer (a TrainerCallback)."""

    def __init__(self, inner, warmup: int, cuda: bool):
        self.inner, self.warmup, self.cuda = inner, warmup, cuda
        self.batches = []  # (real tokens, tensor tokens, rows, sum of squared sample lengths, ViT patches)
        self.step_times = []
        self.collate_seconds = []
        self._last = None

    def __call__(self, items):
        started = time.perf_counter()
        batch = self.inner(items)
        self.collate_seconds.append(time.perf_counter() - started)
        if "attention_mask" in batch:
            lengths = batch["attention_mask"].sum(-1).tolist()
        else:  # packed: sample lengths from the text positions' restarts
            from qwenvl_ft.data.packing import sample_boundaries

            starts = sample_boundaries(batch["position_ids"]) + [batch["input_ids"].shape[1]]
            lengths = [b - a for a, b in zip(starts, starts[1:])]
        grids = batch.get("image_grid_thw")
        patches = int(grids.prod(-1).sum()) if grids is not None else 0
        self.batches.append((sum(lengths), batch["input_ids"].numel(), len(lengths), sum(n * n for n in lengths),
                             patches))
        return batch

    def callback(self):
        from transformers import TrainerCallback

        meter = self

        class StepTimer(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if meter.cuda:
                    import torch

                    torch.cuda.synchronize()
                now = time.perf_counter()
                if state.global_step == meter.warmup:
                    if meter.cuda:
                        import torch

                        torch.cuda.reset_peak_memory_stats()
                    meter._last = now
                elif state.global_step > meter.warmup:
                    meter.step_times.append(now - meter._last)
                    meter._last = now

        return StepTimer()


def model_flops_per_step(model, typed, real_tokens: int, squared: int, patches: int,
                         forward_only: bool = False) -> float:
    from qwenvl_ft.modeling.build import model_parts

    parts = model_parts(model)
    visual, language_model = parts.vision, parts.language_model
    text = model.config.get_text_config()
    n_lm = sum(p.numel() for n, p in language_model.named_parameters() if "embed_tokens" not in n)
    n_lm += text.vocab_size * text.hidden_size  # the LM head's matmul (tied or not)
    n_vit = sum(p.numel() for p in visual.parameters())
    lm_trains = not typed.adapter.is_peft and not typed.model.freeze_language_model
    vit_trains = not typed.model.freeze_vision_tower or typed.adapter.vision_lora
    if forward_only:
        lm_trains = vit_trains = None
    lm = {True: 6, False: 4, None: 2}[lm_trains] * n_lm * real_tokens
    vit = {True: 6, False: 2, None: 2}[vit_trains] * n_vit * patches
    attention = (1 if forward_only else 3) * 4 * text.num_hidden_layers * text.hidden_size * squared / 2
    return lm + vit + attention


def common_overrides(model_name, method, args, cuda: bool):
    """The config of a benchmark run, as `qwenvl-ft train` would get it on the command line."""
    attn = "flash_attention_2" if cuda and _has_flash_attn() else "sdpa"
    overrides = [f"model={model_name}", f"adapter={method}", f"trainer.batch_size={args.batch_size}",
                 f"trainer.max_steps={args.warmup + args.steps}", "trainer.report_to=[none]",
                 "trainer.disable_tqdm=true", "trainer.logging_steps=100000", "trainer.save_steps=100000",
                 "trainer.eval_generation=false", f"data.max_length={args.max_length}",
                 f"data.max_pixels={args.max_pixels}", "optimizer.scheduler=constant", "optimizer.warmup_ratio=0"]
    if not args.smoke:
        overrides += ["model.random_init=true", f"model.attn_implementation={attn}", "trainer.precision=bf16",
                      "model.gradient_checkpointing=true", "trainer.tf32=true"]
    else:
        overrides += ["model.freeze_vision_tower=true", "trainer.precision=fp32"]
    if method == "full":
        overrides += ["model.freeze_vision_tower=true", "model.freeze_merger=false"]
    if method == "qlora":
        overrides += ["optimizer=paged_adamw_8bit"] if cuda else []
    return overrides


def prepare(overrides, output_dir, build):
    """The run's validated config, predicted peak GiB, processor and model (`build`: build_model or
    build_base_model), on the GPU unless 4-bit (bitsandbytes places those itself)."""
    import torch

    from qwenvl_ft.config.compose import compose, validate
    from qwenvl_ft.estimate import GiB, estimate_memory
    from qwenvl_ft.modeling.build import build_processor, model_source

    typed = validate(compose(overrides, output_dir=str(output_dir)))
    predicted = estimate_memory(typed).total / GiB
    source = model_source(typed.model)
    processor = build_processor(typed.model, typed.data, source)
    model = build(typed.model, typed.adapter, source)
    if torch.cuda.is_available() and not typed.adapter.load_in_4bit:
        model = model.to("cuda")
    return typed, predicted, processor, model


def run(model_name, method, layout, args, rows, tmp):
    import torch

    from qwenvl_ft.data.collate import VisionChatCollator
    from qwenvl_ft.data.sources import to_dataset
    from qwenvl_ft.modeling.build import build_model
    from qwenvl_ft.methods.sft import build_trainer

    cuda = torch.cuda.is_available()
    overrides = common_overrides(model_name, method, args, cuda)
    if layout == "packed":
        overrides += ["data.packing=true"] + ([f"data.max_tokens_per_batch={args.pack_tokens}"] if args.pack_tokens
                                              else [])
    typed, predicted, processor, model = prepare(overrides, tmp / f"{model_name}-{method}-{layout}", build_model)
    collator = VisionChatCollator(processor, typed.data)
    if layout == "trl":
        import datasets
        from trl import SFTConfig, SFTTrainer

        from qwenvl_ft.training.common import training_arguments

        dataset = datasets.Dataset.from_list([{"messages": r["messages"], "images": r["images"]} for r in rows])
        targs = training_arguments(typed)
        targs.update(remove_unused_columns=False, max_length=None, save_strategy="no")
        trainer = SFTTrainer(model=model, args=SFTConfig(**targs), train_dataset=dataset, processing_class=processor)
    else:
        trainer = build_trainer(typed, model, processor, collator, to_dataset(rows), None)
    return measure(trainer, model, typed, model_name, method, layout, args, predicted)


def measure(trainer, model, typed, model_name, method, layout, args, predicted, pairs: bool = False):
    """Train with the Meter in place; samples/s counts pairs for DPO (`pairs`), whose FLOPs add the reference
    forward (2N per token) and whose vision tower encodes each pair's images once where qwenvl-ft shares them."""
    import torch

    from qwenvl_ft.estimate import GiB

    cuda = torch.cuda.is_available()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    attn = base.config.get_text_config()._attn_implementation  # packing on sdpa switches to sdpa_varlen
    meter = Meter(trainer.data_collator, args.warmup, cuda)
    trainer.data_collator = meter
    trainer.add_callback(meter.callback())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if args.profile:  # where a step's time goes: the top operators by host and by device time
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            trainer.train()
        for key in ["self_cpu_time_total"] + (["self_cuda_time_total"] if cuda else []):
            print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60), flush=True)
    else:
        trainer.train()
    timed = meter.batches[args.warmup: args.warmup + len(meter.step_times)]
    seconds = sum(meter.step_times)
    real = sum(b[0] for b in timed)
    tensor = sum(b[1] for b in timed)
    samples = sum(b[2] for b in timed) // (2 if pairs else 1)
    squared = sum(b[3] for b in timed)
    patches = sum(b[4] for b in timed) // (2 if pairs else 1)  # model FLOPs: a pair's images encoded once
    flops = model_flops_per_step(model, typed, real, squared, patches)
    if pairs:  # the reference forward: frozen weights, no backward
        flops += model_flops_per_step(model, typed, real, squared, patches, forward_only=True)
    peak = torch.cuda.max_memory_allocated() / GiB if cuda else float("nan")
    device_peak = _peak_tflops(args) if cuda else None
    mfu = flops / seconds / (device_peak * 1e12) if device_peak else float("nan")
    result = dict(model=model_name, method=method, layout=layout, steps=len(meter.step_times),
                  s_per_step=seconds / max(1, len(meter.step_times)), samples_s=samples / seconds,
                  tokens_s=real / seconds, padding=1 - real / tensor, peak_gib=peak, predicted_gib=predicted, mfu=mfu,
                  attn=attn, collate_s=sum(meter.collate_seconds[args.warmup:]) / max(1, len(meter.step_times)))
    del trainer, model
    if cuda:
        torch.cuda.empty_cache()
    return result


def preference_pairs(rows, seed: int = 1):
    """The caption rows as DPO pairs: chosen = the row's caption, rejected = another row's (lengths differ)."""
    rng = random.Random(seed)
    return [{"prompt": row["messages"][:1], "chosen": row["messages"][1:],
             "rejected": rng.choice(rows)["messages"][1:], "images": row["images"], "source": row["source"]}
            for row in rows]


def run_dpo(model_name, method, layout, args, pairs, tmp):
    """One DPO run: `padded` is what trainer=dpo does by default (each pair's images encoded once), `padding-free`
    adds data.packing=true, `trl` is stock trl.DPOTrainer with its DataCollatorForVisionPreference. Batches hold
    batch_size / 2 pairs, i.e. as many sequences as the SFT runs."""
    import torch

    from qwenvl_ft.data.collate_preference import VisionPreferenceCollator
    from qwenvl_ft.data.preference import to_pair_dataset
    from qwenvl_ft.modeling.build import build_base_model, build_lora_config
    from qwenvl_ft.methods.dpo import build_trainer, remove_redundant_work

    cuda = torch.cuda.is_available()
    overrides = common_overrides(model_name, method, args, cuda)
    overrides += ["trainer=dpo", "data=shapes_preference", f"trainer.batch_size={max(1, args.batch_size // 2)}",
                  "trainer.dpo.beta=0.1", f"data.packing={layout == 'padding-free'}"]
    typed, predicted, processor, base = prepare(overrides, tmp / f"dpo-{model_name}-{method}-{layout}",
                                                build_base_model)
    peft_config = build_lora_config(base, typed.model, typed.adapter) if typed.adapter.is_peft else None
    if layout == "trl":
        import datasets
        from trl import DPOConfig, DPOTrainer

        from qwenvl_ft.training.common import training_arguments

        dataset = datasets.Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected", "images")}
                                              for p in pairs])
        targs = training_arguments(typed)
        targs.update(remove_unused_columns=False, max_length=typed.data.max_length, save_strategy="no", beta=0.1)
        trainer = DPOTrainer(model=base, args=DPOConfig(**targs), train_dataset=dataset, processing_class=processor,
                             peft_config=peft_config)
    else:
        trainer = build_trainer(typed, base, peft_config, processor, VisionPreferenceCollator(processor, typed.data),
                                to_pair_dataset(pairs), None)
        remove_redundant_work(trainer, typed.data.packing)
    return measure(trainer, trainer.model, typed, model_name, method, f"dpo {layout}", args, predicted, pairs=True)


def _has_flash_attn() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def _peak_tflops(args):
    import torch

    if args.peak_tflops:
        return args.peak_tflops
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["qwen2_vl_2b", "qwen2_vl_7b"])
    parser.add_argument("--methods", nargs="+", default=["qlora", "lora", "full"])
    parser.add_argument("--layouts", nargs="+", default=["padded", "packed", "trl"])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--max-pixels", type=int, default=448 * 448)  # 256 visual tokens per image at most
    parser.add_argument("--pack-tokens", type=int, default=None, help="data.max_tokens_per_batch for packed runs")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU")
    parser.add_argument("--dpo", action="store_true",
                        help="DPO instead of SFT: layouts padded, padding-free, trl on preference pairs")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's top operators per run")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, a few steps: checks the script")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    import logging
    import tempfile

    import torch
    import transformers
    import trl

    logging.disable(logging.WARNING)
    transformers.logging.set_verbosity_error()
    if args.smoke:
        args.models, args.methods = ["tiny"], args.methods if args.methods != ["qlora", "lora", "full"] else ["lora"]
        args.rows, args.warmup, args.steps, args.max_length, args.batch_size = 48, 1, 2, 512, 4
        args.max_pixels = 112 * 112
        rows = caption_rows(args.rows, sizes=[(112, 112), (56, 112), (84, 84)], words=(3, 30))
    else:
        rows = caption_rows(args.rows)
    tmp = Path(tempfile.mkdtemp(prefix="qwenvl_gpu_bench_"))
    if args.dpo:
        pairs = preference_pairs(rows)
        if args.layouts == ["padded", "packed", "trl"]:
            args.layouts = ["padded", "padding-free", "trl"]
    results = []
    for model_name in args.models:
        for method in args.methods:
            for layout in args.layouts:
                try:
                    results.append(run_dpo(model_name, method, layout, args, pairs, tmp) if args.dpo
                                   else run(model_name, method, layout, args, rows, tmp))
                except Exception as err:  # e.g. out of memory: record it, go on with the matrix
                    results.append(dict(model=model_name, method=method, layout=layout, error=f"{type(err).__name__}: "
                                                                                             f"{str(err)[:80]}"))
                print(results[-1], flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"\n{device}; torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; "
          f"{platform.platform()}; batch {args.batch_size} x max_length {args.max_length}, max_pixels "
          f"{args.max_pixels}, {args.warmup} warm-up + {args.steps} timed steps\n")
    print("| model | method | layout | attention | s/step | samples/s | tokens/s | padding | peak GiB | estimate GiB "
          "| MFU | vs padded |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    padded = {(r["model"], r["method"]): r for r in results
              if r.get("layout") in ("padded", "dpo padded") and "error" not in r}
    for r in results:
        if "error" in r:
            print(f"| {r['model']} | {r['method']} | {r['layout']} | | failed: {r['error']} | | | | | | | |")
            continue
        base = padded.get((r["model"], r["method"]))
        ratio = f"{r['samples_s'] / base['samples_s']:.2f}x" if base else ""
        print(f"| {r['model']} | {r['method']} | {r['layout']} | {r['attn']} | {r['s_per_step']:.3f} | "
              f"{r['samples_s']:.1f} | {r['tokens_s']:.0f} | {r['padding']:.1%} | {r['peak_gib']:.2f} | "
              f"{r['predicted_gib']:.2f} | {r['mfu']:.1%} | {ratio} |")


if __name__ == "__main__":
    main()
