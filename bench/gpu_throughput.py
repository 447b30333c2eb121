"""GPU training throughput, peak memory and MFU: qwenvl-ft packed vs padded vs stock TRL, on random-weight
Qwen2-VL-2B / 7B (the real architectures; nothing is downloaded), QLoRA / LoRA / full fine-tuning.

    python bench/gpu_throughput.py                                   # the whole matrix (about 25 minutes on an H100)
    python bench/gpu_throughput.py --models qwen2_vl_2b --methods lora --layouts packed padded trl
    python bench/gpu_throughput.py --dpo --models qwen2_vl_7b --methods qlora   # DPO: padded, padding-free, trl
    python bench/gpu_throughput.py --smoke [--dpo]                   # tiny model on CPU: checks the script runs
    python bench/gpu_throughput.py --models qwen2_vl_2b --methods lora --layouts packed \
        --label compile --set model.compile=true                     # a lever: Hydra overrides, labelled
    python bench/gpu_throughput.py --dry-run ...                     # the configs only (composed and checked)

`--set` overrides go to every qwenvl-ft run of the invocation, not to the stock TRL layout (the baseline stays
stock); `--label` names the variant in the tables, so that before/after rows of several invocations line up.

Every run builds the model exactly as `qwenvl-ft train` does (model=..., model.random_init=true, adapter=...,
bf16 autocast, non-reentrant gradient checkpointing, flash_attention_2 when flash-attn is installed, else sdpa),
trains `--warmup` steps untimed and then `--steps` timed steps on the same synthetic caption rows (one image of
one of several sizes, 20-200 word captions). Layouts:

  padded  qwenvl-ft's collator, trainer.batch_size rows, right padding
  packed  qwenvl-ft padding-free packing, one row of <= data.max_tokens_per_batch tokens per step
          (default: batch size x max_length, the same activation budget as a padded batch of full-length rows)
  trl     the same model through stock trl.SFTTrainer with DataCollatorForVisionLanguageModeling, batch size rows

Reported per run, by the telemetry every qwenvl-ft run logs (qwenvl_ft/training/telemetry.py; the stock TRL
trainers get the same mixin and callback here, so that every layout is measured alike), over the timed steps:
samples/s and tokens/s (real tokens), padding fraction of the batch tensors, data-wait fraction,
torch.cuda.max_memory_allocated() next to `qwenvl-ft estimate`'s prediction for the same config, and MFU: model
FLOPs per second (qwenvl_ft/estimate/flops.py: training_flops, the convention in its docstring; DPO adds the reference
forward) over the GPU's dense bf16 peak (--peak-tflops, else the telemetry's table); and the collator's own
seconds per timed step (in the DataLoader's worker processes when there are workers, `data.num_workers=auto`).
`--profile` prints torch.profiler's top operators by host and by device time for each run.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_tables import print_tables  # noqa: E402  (bench/, beside this script)

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
    if args.peak_tflops:
        overrides.append(f"trainer.peak_tflops={args.peak_tflops}")
    if method == "qlora":
        overrides += ["optimizer=paged_adamw_8bit"] if cuda else []
    return overrides


def run_overrides(model_name, method, layout, args, cuda: bool) -> list:
    """Every override of one SFT run: the common ones, the layout's, and the invocation's `--set` levers (which
    the stock TRL layout does not take)."""
    overrides = common_overrides(model_name, method, args, cuda)
    if layout == "packed":
        overrides += ["data.packing=true"] + ([f"data.max_tokens_per_batch={args.pack_tokens}"] if args.pack_tokens
                                              else [])
    return overrides + (list(args.set) if layout != "trl" else [])


def prepare(overrides, output_dir, build):
    """The run's validated config, predicted peak GiB, processor and model (`build`: build_model or
    build_base_model), on the GPU unless 4-bit (bitsandbytes places those itself)."""
    import torch

    from qwenvl_ft.config.compose import compose, validate
    from qwenvl_ft.estimate.autofit import fit
    from qwenvl_ft.estimate.memory import GiB, estimate_memory
    from qwenvl_ft.modeling.build import build_processor, model_source

    cfg, fitted = fit(validate(compose(overrides, output_dir=str(output_dir))))  # `auto` settings, as a run does
    for line in fitted.reasons:
        print(f"auto: {line}", flush=True)
    predicted = estimate_memory(cfg).total / GiB
    source = model_source(cfg.model)
    processor = build_processor(cfg.model, cfg.data, source)
    model = build(cfg.model, cfg.adapter, source)
    if torch.cuda.is_available() and not cfg.adapter.load_in_4bit:
        model = model.to("cuda")
    return cfg, predicted, processor, model


def run(model_name, method, layout, args, rows, tmp):
    import torch

    from qwenvl_ft.data.collate import VisionChatCollator
    from qwenvl_ft.data.arrow import to_dataset
    from qwenvl_ft.modeling.build import build_model
    from qwenvl_ft.trainers.sft import build_trainer

    cuda = torch.cuda.is_available()
    overrides = run_overrides(model_name, method, layout, args, cuda)
    cfg, predicted, processor, model = prepare(overrides, tmp / f"{model_name}-{method}-{layout}", build_model)
    collator = VisionChatCollator(processor, cfg.data)
    if layout == "trl":
        import datasets
        from trl import SFTConfig, SFTTrainer

        from qwenvl_ft.training.arguments import training_arguments

        dataset = datasets.Dataset.from_list([{"messages": r["messages"], "images": r["images"]} for r in rows])
        targs = training_arguments(cfg)
        targs.update(remove_unused_columns=False, max_length=None, save_strategy="no")
        trainer = with_telemetry(SFTTrainer, cfg)(model=model, args=SFTConfig(**targs), train_dataset=dataset,
                                                    processing_class=processor, callbacks=telemetry_callback(cfg))
    else:
        trainer = build_trainer(cfg, model, processor, collator, to_dataset(rows), None)
    return measure(trainer, model, cfg, model_name, method, layout, args, predicted)


def with_telemetry(trainer_cls, cfg):
    """A stock TRL trainer class with the run telemetry's mixin, as qwenvl-ft's trainers have it."""
    from qwenvl_ft.training.trainer import trainer_class
    from qwenvl_ft.training.telemetry import TelemetryMixin

    return trainer_class(trainer_cls, (TelemetryMixin,))


def telemetry_callback(cfg):
    from qwenvl_ft.training.telemetry import RunTelemetry

    return [RunTelemetry(cfg)]


class CollateTimer:
    """The trainer's collator, timed: seconds spent collating, summed in shared memory, so that the time DataLoader
    workers spend (in other processes, which inherit the counter) is counted too. It also keeps the largest batch
    (rows, tokens, visual tokens, ViT patches: each its maximum over batches), against which the memory estimate's
    formulas are checked; `pairs`: DPO batches, whose pair images the vision tower encodes once."""

    def __init__(self, inner, image_token_id: int, pairs: bool):
        import multiprocessing

        self.inner, self.seconds = inner, multiprocessing.Value("d", 0.0)
        self.largest = multiprocessing.Array("d", 4)
        self.image_token_id, self.pairs = image_token_id, pairs

    def __call__(self, items):
        started = time.perf_counter()
        batch = self.inner(items)
        with self.seconds.get_lock():
            self.seconds.value += time.perf_counter() - started
        self._keep_largest(batch)
        return batch

    def _keep_largest(self, batch):
        ids = batch.get("input_ids")
        if ids is None:
            return
        share = 2 if self.pairs else 1
        pixels = batch.get("pixel_values")
        shape = (ids.shape[0], ids.numel(), int((ids == self.image_token_id).sum()) // share,
                 (pixels.shape[0] // share) if pixels is not None else 0)
        with self.largest.get_lock():
            for index, value in enumerate(shape):
                self.largest[index] = max(self.largest[index], value)

    def budget(self):
        """The largest batch as the estimate's BatchBudget, or None when no batch was seen."""
        from qwenvl_ft.estimate.budget import BatchBudget

        rows, tokens, visual, patches = (int(v) for v in self.largest)
        if not tokens:
            return None
        return BatchBudget(rows, tokens, visual, patches, "the largest batch of the run", patches // max(1, rows))


def timed_steps_only(telemetry, timer, warmup: int, cuda: bool, static: dict):
    """Zeroes the telemetry's counters, the collate timer (and CUDA's peak) once the warm-up steps are done, and
    keeps in `static` the most memory held between timed steps (weights, adapter, optimizer states: what stays
    allocated when a step's activations are freed)."""
    from transformers import TrainerCallback

    from qwenvl_ft.training.telemetry import Window

    class AfterWarmup(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if cuda and state.global_step > warmup:
                import torch

                static["bytes"] = max(static.get("bytes", 0), torch.cuda.memory_allocated())
            if state.global_step == warmup:
                telemetry.total, telemetry.window = Window(), Window()
                with timer.seconds.get_lock():
                    timer.seconds.value = 0.0
                if cuda:
                    import torch

                    torch.cuda.reset_peak_memory_stats()

    return AfterWarmup()


def measure(trainer, model, cfg, model_name, method, layout, args, predicted):
    """Train; the figures are the run telemetry's over the timed steps (samples/s counts pairs for DPO)."""
    import torch

    from qwenvl_ft.training.telemetry import find_telemetry

    cuda = torch.cuda.is_available()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    attn = base.config.get_text_config()._attn_implementation  # packing on sdpa: sdpa_varlen or torch_varlen
    telemetry = find_telemetry(trainer)
    timer = trainer.data_collator = CollateTimer(trainer.data_collator, base.config.image_token_id,
                                                 pairs=layout.startswith("dpo"))
    static = {}
    trainer.add_callback(timed_steps_only(telemetry, timer, args.warmup, cuda, static))
    if args.profile:  # where a step's time goes: the top operators by host and by device time
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            trainer.train()
        for key in ["self_cpu_time_total"] + (["self_cuda_time_total"] if cuda else []):
            print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60), flush=True)
    else:
        trainer.train()
    figures = telemetry.summary
    steps = telemetry.total.steps
    result = dict(model=model_name, method=method, layout=layout, variant=args.label, steps=steps,
                  s_per_step=figures["step_time_s"], samples_s=figures["samples_per_s"],
                  tokens_s=figures["tokens_per_s"], padding=figures["padding_fraction"],
                  data_wait=figures["data_wait_fraction"], peak_gib=figures.get("peak_allocated_gib", float("nan")),
                  predicted_gib=predicted, mfu=figures.get("mfu", float("nan")), attn=attn,
                  collate_s=timer.seconds.value / max(1, steps), static_gib=static.get("bytes", 0) / 2 ** 30,
                  largest=list(map(int, timer.largest)), **estimate_at(cfg, timer.budget()))
    del trainer, model
    if cuda:
        torch.cuda.empty_cache()
    return result


def estimate_at(cfg, budget) -> dict:
    """The estimate's parts (what stays between steps, activations) for the largest batch the run saw."""
    from qwenvl_ft.estimate.memory import GiB, estimate_memory

    if budget is None:
        return {}
    rows = estimate_memory(cfg, budget=budget).rows
    activations = sum(b for name, b, _ in rows if name.startswith("activations"))
    static = sum(b for name, b, _ in rows if not name.startswith("activations") and name != "gradients")
    return dict(seen_static_gib=static / GiB, seen_activations_gib=activations / GiB,
                seen_total_gib=sum(b for _, b, _ in rows) / GiB,
                seen_by_part={name: round(b / GiB, 3) for name, b, _ in rows})


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
    from qwenvl_ft.trainers.dpo import build_trainer, remove_redundant_work

    cuda = torch.cuda.is_available()
    overrides = common_overrides(model_name, method, args, cuda)
    overrides += ["trainer=dpo", "data=shapes_preference", f"trainer.batch_size={max(1, args.batch_size // 2)}",
                  "trainer.dpo.beta=0.1", f"data.packing={layout == 'padding-free'}"]
    overrides += list(args.set) if layout != "trl" else []
    cfg, predicted, processor, base = prepare(overrides, tmp / f"dpo-{model_name}-{method}-{layout}",
                                                build_base_model)
    peft_config = build_lora_config(base, cfg.model, cfg.adapter) if cfg.adapter.is_peft else None
    if layout == "trl":
        import datasets
        from trl import DPOConfig, DPOTrainer

        from qwenvl_ft.training.arguments import training_arguments

        dataset = datasets.Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected", "images")}
                                              for p in pairs])
        targs = training_arguments(cfg)
        targs.update(remove_unused_columns=False, max_length=cfg.data.max_length, save_strategy="no", beta=0.1)
        trainer = with_telemetry(DPOTrainer, cfg)(model=base, args=DPOConfig(**targs), train_dataset=dataset,
                                                    processing_class=processor, peft_config=peft_config,
                                                    callbacks=telemetry_callback(cfg))
    else:
        trainer = build_trainer(cfg, base, peft_config, processor, VisionPreferenceCollator(processor, cfg.data),
                                to_pair_dataset(pairs), None)
        remove_redundant_work(trainer, cfg.data.packing)
    return measure(trainer, trainer.model, cfg, model_name, method, f"dpo {layout}", args, predicted)


def dry_run(args) -> None:
    """Each run's overrides composed and validated as the run would (a key another branch has not added yet, a
    wrong value: the config error), with `qwenvl-ft estimate`'s peak; nothing is built or trained."""
    import tempfile

    from qwenvl_ft.config.compose import compose, validate
    from qwenvl_ft.errors import ConfigError
    from qwenvl_ft.estimate.autofit import fit
    from qwenvl_ft.estimate.memory import GiB, estimate_memory

    output_dir = tempfile.mkdtemp(prefix="qwenvl_gpu_dry_")
    layouts = args.layouts if not args.dpo or args.layouts != ["padded", "packed", "trl"] else \
        ["padded", "padding-free", "trl"]
    failed = 0
    for model_name in args.models:
        for method in args.methods:
            for layout in layouts:
                overrides = run_overrides(model_name, method, "packed" if layout == "padding-free" else layout,
                                          args, cuda=True)
                if args.dpo:
                    overrides += ["trainer=dpo", "data=shapes_preference"]
                try:
                    cfg, _ = fit(validate(compose(overrides, output_dir=output_dir)))  # auto: this machine's
                    peak = f"{estimate_memory(cfg).total / GiB:.2f}"
                except ConfigError as error:
                    peak, failed = f"config error: {error}", failed + 1
                print(f"[{args.label}] {model_name} {method} {layout}: estimate {peak} GiB | {' '.join(overrides)}")
    if failed:
        sys.exit(f"{failed} run(s) would fail at their config")


def _has_flash_attn() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def parse_args(argv=None) -> argparse.Namespace:
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
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="Hydra overrides for every qwenvl-ft run (a lever; not the stock TRL layout)")
    parser.add_argument("--label", default=None, help="the variant's name in the tables (default: the --set list)")
    parser.add_argument("--dry-run", action="store_true",
                        help="compose and check each run's config and print its overrides and estimate; no training")
    args = parser.parse_args(argv)
    args.label = args.label or (" ".join(args.set) if args.set else "baseline")
    return args


def main() -> None:
    args = parse_args()
    if args.dry_run:
        dry_run(args)
        return
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
    print_tables(results, args.label)

if __name__ == "__main__":
    main()
