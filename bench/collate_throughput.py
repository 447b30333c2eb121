"""Collate-path throughput: qwenvl-ft's collators against the tutorials' per-sample pipeline and TRL's DPO collator.

    python bench/collate_throughput.py [--samples 96] [--batch-size 8] [--repeats 3]

Both pipelines turn the same rows (one realistic 1024x768 JPEG, a question and a caption each) into a padded batch
with labels, one sample at a time, in one thread (what each DataLoader worker does):

  naive      the Qwen2-VL / TRL tutorials: qwen-vl-utils `process_vision_info` (open, PIL resize) then
             `processor(text=[...], images=[...])` per sample (the processor resizes again, on tensors), labels
             from the input ids;
  qwenvl-ft  `VisionChatCollator.__call__`: `encode` per sample (one decode, reduced-scale JPEG decoding when the
             model sees at most half the size, one torchvision resize, placeholders expanded by id), then `pad`.

A second table does the same for DPO pairs (the same image, question and caption as the chosen answer, a shorter
rejected one): stock TRL's `DataCollatorForVisionPreference` on PIL images (what `datasets` hands it) against
qwenvl-ft's `VisionPreferenceCollator`, which makes the same batch (tests/test_dpo.py) but processes each pair's
image once instead of once per answer.

Runs at the processor's default max_pixels (1280 * 28 * 28: 1024x768 is not downscaled) and at 256 * 28 * 28 (a
common training setting). The processor is the tiny test model's: Qwen2-VL's image processor with its default
settings and Qwen2-VL's chat template; the tokenizer is smaller than the real one, which only shortens the (small)
text part for both pipelines alike. Prints a markdown table; docs/performance.md ("Data path") records a run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CAPTION = ("A wooden table by a window with a cup of coffee, an open notebook and a pair of glasses; morning light "
           "falls across the page and a plant stands in the corner.")


def realistic_jpeg(path: Path, seed: int, size=(1024, 768)) -> None:
    """Smooth gradients, shapes and sensor-like noise: compresses (and decodes) like a photo, not like flat
    colour or white noise."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([120 + 80 * np.sin(x / (90 + 20 * c) + seed) * np.cos(y / (70 + 15 * c)) for c in range(3)], -1)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    pen = ImageDraw.Draw(image)
    for _ in range(25):
        x0, y0 = rng.integers(0, width - 50), rng.integers(0, height - 50)
        box = (x0, y0, x0 + rng.integers(20, 300), y0 + rng.integers(20, 300))
        colour = tuple(int(v) for v in rng.integers(0, 255, 3))
        (pen.ellipse if rng.random() < 0.5 else pen.rectangle)(box, fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(1.5))
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 6, (height, width, 3))
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, quality=90)


def make_rows(folder: Path, count: int):
    rows = []
    for i in range(count):
        path = folder / f"img_{i:03d}.jpg"
        if not path.exists():
            realistic_jpeg(path, seed=i)
        rows.append({
            "messages": [{"role": "user", "content": [{"type": "image", "text": None},
                                                      {"type": "text", "text": "Describe this photo in detail."}]},
                         {"role": "assistant", "content": [{"type": "text", "text": CAPTION}]}],
            "images": [str(path)], "videos": [], "source": f"bench:row {i}",
        })
    return rows


class NaivePipeline:
    """The tutorials' collate function, per sample, padded with the tokenizer."""

    def __init__(self, processor, max_pixels: int):
        self.processor, self.max_pixels = processor, max_pixels
        self.image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")

    def __call__(self, rows):
        from qwen_vl_utils import process_vision_info

        features = []
        for row in rows:
            messages = [{"role": "user", "content": [{"type": "image", "image": row["images"][0],
                                                      "max_pixels": self.max_pixels},
                                                     {"type": "text", "text": "Describe this photo in detail."}]},
                        {"role": "assistant", "content": [{"type": "text", "text": CAPTION}]}]
            text = self.processor.apply_chat_template(messages, tokenize=False)
            images, _ = process_vision_info(messages)
            out = self.processor(text=[text], images=images, return_tensors="pt")
            labels = out["input_ids"].clone()
            labels[labels == self.image_pad] = -100
            features.append({"input_ids": out["input_ids"][0], "labels": labels[0],
                             "pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]})
        padded = self.processor.tokenizer.pad({"input_ids": [f["input_ids"] for f in features]},
                                              return_tensors="pt")
        labels = torch.full_like(padded["input_ids"], -100)
        for i, f in enumerate(features):
            labels[i, : f["labels"].numel()] = f["labels"]
        return {**padded, "labels": labels, "pixel_values": torch.cat([f["pixel_values"] for f in features]),
                "image_grid_thw": torch.cat([f["image_grid_thw"] for f in features])}


class StockPreferencePipeline:
    """Stock TRL DPO: images opened as PIL (as `datasets` decodes them), TRL's vision preference collator."""

    def __init__(self, processor):
        from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

        self.collator = DataCollatorForVisionPreference(processor=processor, max_length=None)

    def __call__(self, rows):
        return self.collator([{"images": [Image.open(path).convert("RGB") for path in row["images"]],
                               "prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}
                              for row in rows])


def preference_rows(rows):
    rejected = [{"role": "assistant", "content": [{"type": "text", "text": "A table with a cup on it."}]}]
    return [{"prompt": row["messages"][:1], "chosen": row["messages"][1:], "rejected": rejected,
             "images": row["images"], "source": row["source"]} for row in rows]


def timed(pipelines, rows, batch_size: int, repeats: int):
    """Samples per second of each pipeline (median over repeats) and its last batch. Repeats alternate between
    the pipelines, so that a load change on a shared machine hits both alike."""
    for pipeline in pipelines:
        pipeline(rows[:batch_size])  # warm up (imports, caches)
    runs = [[] for _ in pipelines]
    batches = [None] * len(pipelines)
    for _ in range(repeats):
        for index, pipeline in enumerate(pipelines):
            start = time.perf_counter()
            for offset in range(0, len(rows), batch_size):
                batches[index] = pipeline(rows[offset: offset + batch_size])
            runs[index].append(time.perf_counter() - start)
    return [len(rows) / statistics.median(r) for r in runs], batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("QWENVL_FT_CACHE", os.path.join(tempfile.gettempdir(), "qwenvl_ft_test_cache"))
    torch.set_num_threads(1)  # as in a DataLoader worker
    # keep library deprecation warnings out of the printed table
    warnings.filterwarnings("ignore", category=FutureWarning)

    from qwenvl_ft.config.compose import compose, validate
    from qwenvl_ft.config.data import DataConfig
    from qwenvl_ft.data.collate import VisionChatCollator
    from qwenvl_ft.modeling.build import build_processor

    cfg = validate(compose(["recipe=demo"], output_dir=tempfile.gettempdir()))
    folder = Path(tempfile.gettempdir()) / "qwenvl_ft_bench_images"
    folder.mkdir(exist_ok=True)
    rows = make_rows(folder, args.samples)
    default_max = build_processor(cfg.model, cfg.data).image_processor.size["longest_edge"]

    print(f"collate throughput: {args.samples} samples of one 1024x768 JPEG "
          f"({os.path.getsize(rows[0]['images'][0]) // 1024} KB) + text, batch {args.batch_size}, 1 thread, "
          f"median of {args.repeats}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}")
    print()
    print("| max_pixels | visual tokens / image | naive (samples/s) | qwenvl-ft (samples/s) | speed-up |")
    print("|---|---|---|---|---|")
    for max_pixels in (default_max, 256 * 28 * 28):
        data_cfg = DataConfig(max_pixels=max_pixels, max_length=None)
        processor = build_processor(cfg.model, data_cfg)
        (naive_rate, ours_rate), (naive_batch, ours_batch) = timed(
            [NaivePipeline(processor, max_pixels), VisionChatCollator(processor, data_cfg)], rows, args.batch_size,
            args.repeats)
        tokens = int(ours_batch["image_grid_thw"][0].prod()) // 4
        assert torch.equal(naive_batch["image_grid_thw"], ours_batch["image_grid_thw"]), "different image sizes"
        assert naive_batch["input_ids"].shape == ours_batch["input_ids"].shape
        print(f"| {max_pixels:,} | {tokens} | {naive_rate:.1f} | {ours_rate:.1f} | {ours_rate / naive_rate:.2f}x |")

    from qwenvl_ft.data.collate_preference import VisionPreferenceCollator

    pairs = preference_rows(rows)
    print(f"\nDPO pairs, batch {args.batch_size} pairs\n")
    print("| max_pixels | visual tokens / image | stock TRL (pairs/s) | qwenvl-ft (pairs/s) | speed-up |")
    print("|---|---|---|---|---|")
    for max_pixels in (default_max, 256 * 28 * 28):
        data_cfg = DataConfig(max_pixels=max_pixels, max_length=None)
        processor = build_processor(cfg.model, data_cfg)
        (stock_rate, ours_rate), (stock_batch, ours_batch) = timed(
            [StockPreferencePipeline(processor), VisionPreferenceCollator(processor, data_cfg)], pairs,
            args.batch_size, args.repeats)
        tokens = int(ours_batch["image_grid_thw"][0].prod()) // 4
        assert torch.equal(stock_batch["image_grid_thw"], ours_batch["image_grid_thw"]), "different image sizes"
        assert torch.equal(stock_batch["input_ids"], ours_batch["input_ids"])
        print(f"| {max_pixels:,} | {tokens} | {stock_rate:.1f} | {ours_rate:.1f} | {ours_rate / stock_rate:.2f}x |")


if __name__ == "__main__":
    main()
