"""How start-up time and memory grow with the number of rows: the data check's speed, the time to the first optimizer
step with and without the cached data check, and the peak memory of the main process.

    python bench/data_scale.py [--rows 10000 100000] [--workers 2] [--pool 10000] [--baseline /path/to/old/tree]
                               [--photos 1024x768] [--skip-check-rate]

Rows are LLaVA JSONL rows of small generated images (56x56 to 112x112 PNG: 4 to 16 visual tokens), or with
--photos photo-sized JPEGs resized to 224x224 pixels (64 visual tokens), with a short question and a 2-8 word
answer. Each row references one of --pool distinct image files (row i uses image i mod
pool): every row still opens and decodes its image, as a dataset of unique files would (from the page cache, as a
warm file system serves them), without writing a million files.

Every measurement is a fresh `qwenvl-ft` process, so that imports and memory do not carry over:

  check rows/s      `qwenvl-ft data-check` with data.cache=off, with 0 and with --workers DataLoader workers: rows
                    measured per second, from the check's own timing (reading, converting, decoding, tokenising)
  first step cold   `qwenvl-ft train` (tiny random Qwen2-VL, data.packing=true, trainer.max_steps=1) with an empty
                    data.cache_dir: seconds from process start to the first optimizer step (the Trainer logs step 1)
  first step warm   the same command in a new run folder with the cache filled by the cold run (as a resumed run,
                    another sweep job or another rank starts)
  peak RSS          the main process's high-water mark (VmHWM), DataLoader workers not included
  baseline          with --baseline (a checkout of the code before this change), its cold first step and peak RSS:
                    rows held in Python lists and an in-memory table, packing lengths measured a second time

Prints a markdown table; docs/performance.md records a run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("red green blue yellow circle square triangle small large bright dark left right top bottom cat dog cup "
         "table plate street bike grass").split()
SIZES = [(56, 56), (112, 56), (112, 112)]


def make_data(folder: Path, rows: int, pool: int, photo_size=None) -> Path:
    """rows.jsonl with `rows` rows over `pool` images (made once per folder): small PNGs, or with `photo_size`
    (width, height) photo-sized JPEGs (smooth colour, a shape and sensor-like noise, ~100-200 KB at 1024x768)."""
    folder.mkdir(parents=True, exist_ok=True)
    images = folder / "images"
    suffix = "jpg" if photo_size else "png"
    if not (images / f"{pool - 1}.{suffix}").exists():
        images.mkdir(exist_ok=True)
        rng = random.Random(0)
        for index in range(pool):
            image = _photo(rng, *photo_size) if photo_size else _shape(rng, *SIZES[index % len(SIZES)])
            image.save(images / f"{index}.{suffix}", **({"quality": 90} if photo_size else {}))
    path = folder / f"rows_{rows}.jsonl"
    if not path.exists():
        rng = random.Random(rows)
        with path.open("w") as handle:
            for index in range(rows):
                answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8)))
                handle.write(json.dumps({"id": index, "image": f"images/{index % pool}.{suffix}", "conversations": [
                    {"from": "human", "value": "<image>\nWhat is in the picture?"},
                    {"from": "gpt", "value": answer}]}) + "\n")
    return path


def _shape(rng, width: int, height: int):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), tuple(rng.randint(150, 255) for _ in range(3)))
    ImageDraw.Draw(image).ellipse((4, 4, width - 4, height - 4), fill=tuple(rng.randint(0, 120) for _ in range(3)))
    return image


def _photo(rng, width: int, height: int):
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([rng.uniform(60, 200) + rng.uniform(-60, 60) * (x / width) + rng.uniform(-60, 60) * (y / height)
                     for _ in range(3)], axis=-1)
    cx, cy, r = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height, rng.uniform(0.1, 0.3) * height
    base[(x - cx) ** 2 + (y - cy) ** 2 < r * r] *= 0.5
    noise = np.roll(_noise(height, width), (rng.randrange(height), rng.randrange(width)), axis=(0, 1))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


_NOISE = {}


def _noise(height: int, width: int):
    """One field of sensor-like noise per size, shifted per image (drawing it anew took most of a photo's time)."""
    import numpy as np

    if (height, width) not in _NOISE:
        _NOISE[height, width] = np.random.default_rng(0).normal(0, 6, (height, width, 3)).astype(np.float32)
    return _NOISE[height, width]


def run(command, tree: Path, cwd: Path, timeout: float = 7200) -> dict:
    """Run a qwenvl-ft command; (wall s, s to the first optimizer step, peak RSS MB, output)."""
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1")
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "qwenvl_ft", *command], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1)
    peak = [0]

    def watch():  # the high-water mark of the main process, read until it exits
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            try:
                match = re.search(r"VmHWM:\s+(\d+) kB", status.read_text())
                if match:
                    peak[0] = max(peak[0], int(match.group(1)))
            except OSError:
                pass
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    first_step, lines = None, []
    for line in proc.stdout:
        lines.append(line)
        if first_step is None and "'loss'" in line:
            first_step = time.perf_counter() - started
    proc.wait(timeout=timeout)
    watcher.join()
    output = "".join(lines)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{output[-3000:]}")
    return {"wall_s": time.perf_counter() - started, "first_step_s": first_step, "peak_rss_mb": peak[0] / 1024,
            "output": output}


def check_rate(output: str) -> float:
    match = re.search(r"([\d,]+) rows measured in ([\d.]+) s", output)
    return int(match.group(1).replace(",", "")) / float(match.group(2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--pool", type=int, default=10_000)
    parser.add_argument("--folder", default="/tmp/qwenvl_ft_data_scale")
    parser.add_argument("--baseline", default=None, help="source tree of the code to compare against")
    parser.add_argument("--photos", default=None, metavar="WxH",
                        help="photo-sized JPEGs of this size instead of small PNGs (resized to 64 visual tokens)")
    parser.add_argument("--skip-check-rate", action="store_true", help="only the first-step times and memory")
    args = parser.parse_args()
    folder = Path(args.folder)
    load_before = os.getloadavg()
    results = []
    for rows in args.rows:
        photo_size = tuple(int(v) for v in args.photos.split("x")) if args.photos else None
        data = make_data(folder, rows, args.pool, photo_size)
        common = ["data=llava", f"data.path={data}", "data.max_length=256"]
        if photo_size:
            common.append(f"data.max_pixels={224 * 224}")
        work = folder / f"runs_{rows}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        row = {"rows": rows}
        for workers in () if args.skip_check_rate else (0, args.workers):
            out = run(["data-check", *common, "data.cache=off", f"data.num_workers={workers}",
                       f"hydra.run.dir={work / f'check{workers}'}"], ROOT, work)
            row[f"check_rows_s_{workers}"] = check_rate(out["output"])
            print(f"{rows} rows, check with {workers} workers: {row[f'check_rows_s_{workers}']:.0f} rows/s "
                  f"(peak RSS {out['peak_rss_mb']:.0f} MB)", flush=True)
            row[f"check_rss_{workers}"] = out["peak_rss_mb"]
        train = ["train", "recipe=demo", *common, "data.packing=true", "trainer.max_steps=1",
                 "trainer.eval_generation=false", "trainer.report_to=[none]", f"data.num_workers={args.workers}",
                 f"data.cache_dir={work / 'cache'}"]
        for name in ("cold", "warm"):
            out = run([*train, f"hydra.run.dir={work / name}"], ROOT, work)
            row[f"{name}_s"], row[f"{name}_rss"] = out["first_step_s"], out["peak_rss_mb"]
            print(f"{rows} rows, first step {name}: {out['first_step_s']:.1f} s, peak RSS {out['peak_rss_mb']:.0f} "
                  f"MB", flush=True)
        if args.baseline:
            base = [a for a in train if not a.startswith("data.cache_dir=")]
            out = run([*base, f"hydra.run.dir={work / 'baseline'}"], Path(args.baseline), work)
            row["base_s"], row["base_rss"] = out["first_step_s"], out["peak_rss_mb"]
            print(f"{rows} rows, baseline first step: {out['first_step_s']:.1f} s, peak RSS "
                  f"{out['peak_rss_mb']:.0f} MB", flush=True)
        results.append(row)
    load_after = os.getloadavg()

    images = f"{args.photos} JPEG (resized to 224x224 pixels)" if args.photos else "56x56..112x112 PNG"
    print(f"\n{len(args.rows)} sizes, rows of one {images} (pool of {args.pool} images) + short text; "
          f"tiny random Qwen2-VL, data.packing=true, max_length 256")
    print(f"{platform.platform()}, {os.cpu_count()} CPUs; load average {load_before[0]:.1f} before, "
          f"{load_after[0]:.1f} after")
    header = ["rows", "check rows/s (0 workers)", f"check rows/s ({args.workers} workers)", "first step cold (s)",
              "first step warm (s)", "cold / warm", "peak RSS cold (MB)", "peak RSS warm (MB)"]
    if args.baseline:
        header += ["baseline first step (s)", "baseline peak RSS (MB)"]
    print("\n| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in results:
        cells = [f"{r['rows']:,}", f"{r.get('check_rows_s_0', float('nan')):.0f}",
                 f"{r.get(f'check_rows_s_{args.workers}', float('nan')):.0f}",
                 f"{r['cold_s']:.1f}", f"{r['warm_s']:.1f}", f"{r['cold_s'] / r['warm_s']:.1f}x",
                 f"{r['cold_rss']:.0f}", f"{r['warm_rss']:.0f}"]
        if args.baseline:
            cells += [f"{r['base_s']:.1f}", f"{r['base_rss']:.0f}"]
        print("| " + " | ".join(cells) + " |")
    (folder / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
