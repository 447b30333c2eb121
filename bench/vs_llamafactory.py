"""The same small LoRA job through qwenvl-ft and through LLaMA-Factory, on CPU, alternating A B A B.

    python bench/vs_llamafactory.py [--venv /tmp/lf-venv] [--pairs 2] [--variants padded,packed] [--rows 128]

Installs LLaMA-Factory's release (--lf-version, default 0.9.5, the latest on 2026-12-06) into its own venv at --venv
when `llamafactory-cli` is not there yet; pip reads the machine's pip.conf, so /etc/xdg/pip/constraints.txt (which
caps torch) applies to it. The job, for both stacks:

  model     the tiny random Qwen2-VL of conf/model/tiny.yaml, written once by qwenvl-ft's `materialize` (weights,
            config, tokenizer, processor, chat template in one HF folder) and loaded from that folder by both
  data      --rows generated caption rows (bench/cpu_throughput.py's `caption_rows`: one PNG of 4 to 36 visual
            tokens and a 3-30 word caption, 40-110 tokens a row) in one LLaVA/ShareGPT JSON file; qwenvl-ft reads it
            with data=llava, LLaMA-Factory through a dataset_info.json entry (formatting sharegpt, columns
            messages=conversations, images=image)
  training  LoRA r=8 alpha=16 dropout=0.05 on the language model's q_proj/v_proj (vision tower and merger frozen),
            batch 8, one epoch, fp32, AdamW (adamw_torch) lr 2e-4 constant, no warm-up, weight decay 0, grad-norm
            clip 1.0, no gradient checkpointing (model=tiny's setting; LLaMA-Factory turns it on unless
            disable_gradient_checkpointing), max length --max-length, seed 42, no evaluation, one checkpoint at the
            end (see below) and
            the final adapter,
            logging every 5 steps, no tracker, HF_HUB_OFFLINE=1, one process on the CPU
  variants  padded: batches of 8 rows padded to the longest; packed: qwenvl-ft data.packing=true (one padding-free
            row of at most 8 x max-length tokens per step), LLaMA-Factory packing + neat_packing (8 packed rows of at
            most max-length tokens per step, each sample attending only to itself)

End to end is the wall time of the command (`python -m qwenvl_ft train ...` / `llamafactory-cli train cfg.yaml`),
imports and model loading included. The training loop is the `train_runtime` each stack's Trainer reports
(qwenvl-ft: summary.json / metrics.json; LLaMA-Factory: train_results.json). Each pair runs qwenvl-ft then
LLaMA-Factory (A B), pairs repeat (A B A B ...), medians are taken per stack and variant; `os.getloadavg()` is
recorded before and after every run, because the machine is shared.

Differences that could not be removed (each stack's own way of doing the same thing):
- Packing: qwenvl-ft packs one padding-free sequence per step (M-RoPE positions per sample, block-diagonal mask
  with sdpa); LLaMA-Factory packs into cutoff_len-long rows, batch 8 of them, with neat_packing's 4-D mask. The
  token budget per step is the same (8 x max length); the number of steps may differ by a step or two.
- Data preparation: LLaMA-Factory tokenises the whole set up front with `datasets.map` (preprocessing_num_workers
  1); qwenvl-ft checks every row first (its data check renders and tokenises every row and stores the token ids
  with it); both collators open, resize and process the images inside the loop. Both stacks cache that work
  across runs by default (LLaMA-Factory: datasets' cache, `overwrite_cache: false`; qwenvl-ft: its per-user data
  cache). --data-cache cold (the default) makes both redo it every run (`overwrite_cache: true`,
  `data.cache=refresh`); --data-cache warm leaves both caches on, each filled by one untimed run per variant first
  (qwenvl-ft's in data.cache_dir under --work; LLaMA-Factory's in HF_DATASETS_CACHE under --work).
- Checkpoints: transformers saves a checkpoint at the last step whatever save_steps is; qwenvl-ft has no
  "never" strategy (a run must be resumable), so LLaMA-Factory gets save_strategy steps with the same huge
  save_steps: both write one checkpoint (adapter + optimizer state) at the end, then the final adapter.
- qwenvl-ft's end-of-run extras that cannot be switched off: the result and performance lines, run_info.json,
  the model card in final/. LLaMA-Factory writes its trainer_log.jsonl and, with plot_loss false, no plot.
- Image sizes: both use the Qwen2-VL image processor saved in the model folder (min/max pixels as saved);
  LLaMA-Factory also applies its own image_max_pixels / image_min_pixels, set here to the processor's values.
- The label mask: both train on the assistant turn only; LLaMA-Factory's qwen2_vl template and qwenvl-ft's chat
  template (the family's) give the same text (the default system prompt in both).
- Trainers: qwenvl-ft runs TRL's SFTTrainer (entropy and token accuracy each step; on a CPU with this small
  vocabulary its loss from the label positions' logits, qwenvl_ft/modeling/cpu_lm_head.py, TRL's chunked log-prob
  head elsewhere) with its own callbacks (telemetry, divergence guard); LLaMA-Factory runs its subclass of transformers'
  Seq2SeqTrainer. Each stack's venv holds the versions it pins or supports: LLaMA-Factory 0.9.5 caps
  transformers <= 5.6.0, peft <= 0.18.1, trl <= 0.24.0, accelerate <= 1.11.0, datasets <= 4.0.0 (all installable
  under the machine's torch cap, torch 2.14.1 in both); qwenvl-ft runs transformers 5.25, peft 0.21, trl 1.16.
- Labels: LLaMA-Factory's qwen2_vl template also trains on the newline after the answer's <|im_end|>; qwenvl-ft
  stops at <|im_end|> (one token a row of difference).
- Dataloader workers: qwenvl-ft uses none on CPU-only runs (data.num_workers=auto); LLaMA-Factory's
  dataloader_num_workers is set to 0 too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

BATCH, LR, SEED, LOGGING_STEPS = 8, 2e-4, 42, 5


def install(venv: Path, version: str) -> None:
    """LLaMA-Factory in its own venv (pip's config, with the machine's constraints file, applies)."""
    if (venv / "bin" / "llamafactory-cli").exists():
        return
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"llamafactory=={version}"], check=True)


def model_folder() -> Path:
    from qwenvl_ft.config.compose import compose, validate
    from qwenvl_ft.modeling.random_init import materialize

    typed = validate(compose(["model=tiny"], output_dir="/tmp/unused"))
    m = typed.model  # the arguments qwenvl_ft/modeling/build.py passes, so that both load the same folder
    return materialize(m.architecture, m.dtype.value, m.family.value)


def write_data(folder: Path, rows: int) -> Path:
    """The rows as a LLaVA/ShareGPT JSON file with PNG images, and LLaMA-Factory's dataset_info.json beside it."""
    from cpu_throughput import caption_rows

    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for index, row in enumerate(caption_rows(rows)):
        name = f"images/{index:04d}.png"
        row["images"][0].save(folder / name)
        caption = row["messages"][1]["content"][0]["text"]
        records.append({"image": [name], "conversations": [
            {"from": "human", "value": "<image>Describe the image."}, {"from": "gpt", "value": caption}]})
    (folder / "train.json").write_text(json.dumps(records, indent=1))
    info = {"bench": {"file_name": "train.json", "formatting": "sharegpt",
                      "columns": {"messages": "conversations", "images": "image"}}}
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=1))
    return folder / "train.json"


CACHE = {"warm": False}  # --data-cache warm: both stacks keep their data caches between runs


def qwenvl_command(variant: str, data: Path, out: Path, max_length: int):
    return [sys.executable, "-m", "qwenvl_ft", "train", "model=tiny", "data=llava", "adapter=lora",
            f"data.path={data}", f"data.max_length={max_length}", "data.eval_size=0",
            f"data.packing={'true' if variant == 'packed' else 'false'}",
            "model.freeze_vision_tower=true", "model.freeze_merger=true", "model.dtype=float32",
            "adapter.r=8", "adapter.alpha=16", "adapter.dropout=0.05", "adapter.target_modules=[q_proj,v_proj]",
            f"trainer.batch_size={BATCH}", "trainer.epochs=1", "trainer.precision=fp32",
            f"trainer.logging_steps={LOGGING_STEPS}", "trainer.save_steps=100000", "trainer.report_to=[]",
            "trainer.eval_generation=false", "trainer.disable_tqdm=true",
            f"optimizer.lr={LR}", "optimizer.scheduler=constant", f"seed={SEED}", f"hydra.run.dir={out}",
            f"data.cache={'on' if CACHE['warm'] else 'refresh'}", f"data.cache_dir={out.parent / 'qwenvl-data-cache'}"]


def lf_config(variant: str, model: Path, dataset_dir: Path, out: Path, max_length: int) -> dict:
    processor = json.loads((model / "processor_config.json").read_text())
    image = processor.get("image_processor", processor)
    pixels = image.get("size", {})
    packing = variant == "packed"
    return {
        "model_name_or_path": str(model), "trust_remote_code": False,
        "stage": "sft", "do_train": True, "finetuning_type": "lora", "lora_rank": 8, "lora_alpha": 16,
        "lora_dropout": 0.05, "lora_target": "q_proj,v_proj",
        "freeze_vision_tower": True, "freeze_multi_modal_projector": True,
        "disable_gradient_checkpointing": True,  # LLaMA-Factory's default is on; model=tiny trains without
        "dataset": "bench", "dataset_dir": str(dataset_dir), "media_dir": str(dataset_dir), "template": "qwen2_vl",
        "cutoff_len": max_length, "overwrite_cache": not CACHE["warm"], "preprocessing_num_workers": 1,
        "dataloader_num_workers": 0, "packing": packing, "neat_packing": packing,
        "image_max_pixels": pixels.get("longest_edge", 12845056), "image_min_pixels": pixels.get("shortest_edge", 3136),
        "output_dir": str(out), "logging_steps": LOGGING_STEPS, "save_strategy": "steps", "save_steps": 100000,
        "plot_loss": False,
        "overwrite_output_dir": True, "report_to": "none", "disable_tqdm": True,
        "per_device_train_batch_size": BATCH, "gradient_accumulation_steps": 1, "learning_rate": LR,
        "num_train_epochs": 1.0, "lr_scheduler_type": "constant", "warmup_ratio": 0.0, "weight_decay": 0.0,
        "max_grad_norm": 1.0, "optim": "adamw_torch", "seed": SEED, "bf16": False, "fp16": False,
        "use_cpu": True, "ddp_timeout": 180000000,
    }


THREADS: dict = {}  # {"OMP_NUM_THREADS": "1"} with --threads 1, for both stacks


def timed(command, env, log: Path, cwd=None):
    """Wall and CPU seconds (user + system, all threads) of `command`, with the load average before and after."""
    env = dict(env, **THREADS)
    before = os.getloadavg()[0]
    cpu_start = _children_cpu()
    start = time.perf_counter()
    with open(log, "w") as sink:
        done = subprocess.run(command, env=env, stdout=sink, stderr=subprocess.STDOUT, cwd=cwd)
    wall = time.perf_counter() - start
    cpu = _children_cpu() - cpu_start
    after = os.getloadavg()[0]
    if done.returncode != 0:
        tail = log.read_text().splitlines()[-30:]
        raise SystemExit(f"{command[0]} failed ({done.returncode}); last lines of {log}:\n" + "\n".join(tail))
    return wall, cpu, before, after


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_qwenvl(variant, data, work: Path, index, max_length):
    out = work / f"qwenvl-{variant}-{index}"
    shutil.rmtree(out, ignore_errors=True)  # a run folder left by an earlier call would resume, not train
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    command = qwenvl_command(variant, data, out, max_length)
    wall, cpu, before, after = timed(command, env, work / f"{out.name}.log", ROOT)
    runtime = json.loads((out / "summary.json").read_text())["metrics"]["train_runtime_s"]
    return {"wall": wall, "cpu": cpu, "loop": float(runtime), "load": (before, after)}


def run_lf(variant, venv: Path, model, dataset_dir, work: Path, index, max_length):
    import yaml

    out = work / f"lf-{variant}-{index}"
    shutil.rmtree(out, ignore_errors=True)
    config = work / f"{out.name}.yaml"
    config.write_text(yaml.safe_dump(lf_config(variant, model, dataset_dir, out, max_length)))
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", DISABLE_VERSION_CHECK="1",
               HF_DATASETS_CACHE=str(work / "hf-datasets-cache"))
    env.pop("PYTHONPATH", None)
    command = [str(venv / "bin" / "llamafactory-cli"), "train", str(config)]
    wall, cpu, before, after = timed(command, env, work / f"{out.name}.log", work)
    runtime = json.loads((out / "train_results.json").read_text())["train_runtime"]
    return {"wall": wall, "cpu": cpu, "loop": float(runtime), "load": (before, after)}


def versions(venv: Path) -> dict:
    probe = ("import importlib.metadata as m; print({p: m.version(p) for p in "
             "('llamafactory','transformers','peft','trl','torch','datasets','accelerate')})")
    lf = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True).stdout.strip()
    import importlib.metadata as m
    ours = {p: m.version(p) for p in ("transformers", "peft", "trl", "torch", "accelerate")}
    return {"llamafactory venv": lf, "qwenvl-ft venv": str(ours)}


def table(results: dict) -> str:
    lines = ["| variant | stack | runs | end to end (s, median) | CPU s (median) | training loop (s, median) | "
             "load 1-min before/after each run |", "|---|---|---|---|---|---|---|"]
    ratios = []
    for variant, stacks in results.items():
        medians = {}
        for stack, runs in stacks.items():
            wall = statistics.median(r["wall"] for r in runs)
            loop = statistics.median(r["loop"] for r in runs)
            cpu = statistics.median(r["cpu"] for r in runs)
            medians[stack] = (wall, loop)
            loads = ", ".join(f"{a:.1f}/{b:.1f}" for a, b in (r["load"] for r in runs))
            lines.append(f"| {variant} | {stack} | {len(runs)} | {wall:.1f} | {cpu:.1f} | {loop:.1f} | {loads} |")
        if len(medians) == 2:
            (qw, ql), (lw, ll) = medians["qwenvl-ft"], medians["LLaMA-Factory"]
            ratios.append(f"{variant}: LLaMA-Factory / qwenvl-ft = {lw / qw:.2f}x end to end, {ll / ql:.2f}x "
                          f"training loop (> 1: qwenvl-ft faster)")
    return "\n".join(lines + [""] + ratios)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=Path("/tmp/lf-venv"))
    parser.add_argument("--lf-version", default="0.9.5")
    parser.add_argument("--work", type=Path, default=Path("/tmp/vs-llamafactory"))
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--variants", default="padded,packed")
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS for both stacks (default: torch's, one per core). On a shared machine "
                             "1 keeps a busy neighbour from stalling every op at torch's thread barrier")
    parser.add_argument("--data-cache", choices=("cold", "warm"), default="cold",
                        help="cold: both stacks prepare the data every run; warm: both reuse their caches")
    args = parser.parse_args(argv)
    CACHE["warm"] = args.data_cache == "warm"
    if args.threads:
        THREADS["OMP_NUM_THREADS"] = str(args.threads)

    install(args.venv, args.lf_version)
    args.work.mkdir(parents=True, exist_ok=True)
    model = model_folder()
    data = write_data(args.work / "data", args.rows)
    results = {}
    for variant in args.variants.split(","):
        stacks = results.setdefault(variant, {"qwenvl-ft": [], "LLaMA-Factory": []})
        if CACHE["warm"]:  # one untimed run of each fills its cache
            run_qwenvl(variant, data, args.work, "warm-up", args.max_length)
            run_lf(variant, args.venv, model, data.parent, args.work, "warm-up", args.max_length)
        for index in range(args.pairs):
            stacks["qwenvl-ft"].append(run_qwenvl(variant, data, args.work, index, args.max_length))
            print(variant, "qwenvl-ft", stacks["qwenvl-ft"][-1], flush=True)
            stacks["LLaMA-Factory"].append(run_lf(variant, args.venv, model, data.parent, args.work, index,
                                                  args.max_length))
            print(variant, "LLaMA-Factory", stacks["LLaMA-Factory"][-1], flush=True)
    print(f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.machine()}, {os.cpu_count()} CPUs, "
          f"device CPU, torch threads {args.threads or 'default'}; {args.rows} rows, batch {BATCH}, "
          f"max length {args.max_length}, {args.pairs} pairs A B, data cache {args.data_cache}")
    for name, value in versions(args.venv).items():
        print(f"{name}: {value}")
    print()
    print(table(results))


if __name__ == "__main__":
    main()
