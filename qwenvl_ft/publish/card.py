"""Model cards for `final/` (after training) and `merged/` (after `qwenvl-ft merge`).

PEFT writes an empty template README into every adapter folder and transformers writes none for a full model, so a
result pushed to the Hub would say nothing about itself. The card built here holds the Hub's metadata (base_model,
library_name, pipeline_tag, datasets, tags, model-index) and, in its text, the base model, data, method, the
before/after metrics, a loss-curve summary, how to load the result, the hardware and time used, the launch command
and the full resolved config.

It is built with huggingface_hub's ModelCard / ModelCardData and checked before it is written (`check_card`:
metadata the Hub would refuse, found offline). The facts come as a `RunRecord` (qwenvl_ft/publish/run_record.py):
in memory when the training run writes `final/`, read back from the run folder (config.yaml, metrics.json,
log_history.json, run_info.json) when `merge` writes `merged/`.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Dict, List, Optional

from qwenvl_ft.config.adapter import AdapterMethod
from qwenvl_ft.config.schema import TrainConfig
from qwenvl_ft.publish.run_record import RunRecord

PIPELINE_TAG = "image-text-to-text"
LIBRARY = {"adapter": "peft", "model": "transformers", "merged": "transformers"}  # kind of folder -> library_name
CARD = "README.md"
_METRIC_NAMES = {"exact_match": "exact match", "bleu": "BLEU", "rouge_l": "ROUGE-L", "mean_iou": "mean IoU",
                 "iou_50": "IoU@0.5 accuracy", "point_in_box": "point in box", "reward_accuracy":
                 "reward accuracy", "reward_margin": "reward margin", "loss": "loss",
                 "reward": "mean reward (GRPO's reward functions, weighted)"}


# ----------------------------------------------------------------------------------------------------------------
# the card


def build_card(record: RunRecord, kind: str, where: str, merge_info: Optional[Dict] = None,
               serving: Optional[str] = None):
    """The ModelCard of a folder of `kind` 'adapter', 'model' (a full fine-tune) or 'merged'. `where` is how a
    reader loads it: the Hub repository id when it is pushed, else the folder. `serving`: whether vLLM can serve
    the adapter unmerged (publish/serving.py), for an adapter and for what was merged from one."""
    from huggingface_hub import ModelCard

    data = card_data(record, kind, where)
    sections = [_title(record, kind, where), _model_section(record, kind, merge_info, serving), _data_section(record),
                _results_section(record), _loss_section(record.log_history), _usage_section(record, kind, where),
                _launch_section(record, merge_info), _hardware_section(record), _config_section(record)]
    body = "\n\n".join(s for s in sections if s) + "\n"
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def hub_id(name: Optional[str]) -> Optional[str]:
    """`name` when it is a Hub repository id rather than a local path (only those may go into the metadata)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name or Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def card_data(record: RunRecord, kind: str, where: str):
    from huggingface_hub import EvalResult, ModelCardData

    cfg = record.config
    base = None if cfg.model.random_init else hub_id(cfg.model.name_or_path)
    dataset = hub_id(cfg.data.path)
    extra = {"base_model_relation": "adapter" if kind == "adapter" else "finetune"} if base else {}
    results = [EvalResult(task_type=PIPELINE_TAG, dataset_type=dataset or cfg.data.format.value,
                          dataset_name=_data_name(cfg), dataset_split="held-out", metric_type=metric,
                          metric_name=f"{_METRIC_NAMES.get(metric, metric)} after fine-tuning", metric_value=value)
               for metric, value in _after_metrics(record.metrics).items()]
    return ModelCardData(
        base_model=base, library_name=LIBRARY[kind], pipeline_tag=PIPELINE_TAG, datasets=[dataset] if dataset else None,
        tags=_tags(cfg, kind), model_name=_name(record, where) if results else None,
        eval_results=results or None, **extra)


def _name(record: RunRecord, where: str) -> str:
    """The repository's name when the card is for the Hub, else the run's name."""
    return where.split("/")[-1] if hub_id(where) else record.config.run_name


def _tags(cfg: TrainConfig, kind: str) -> List[str]:
    tags = ["qwenvl-ft", cfg.model.family.value.replace("_", "-"), "vision-language", "trl",
            cfg.trainer.kind.value, cfg.adapter.method.value]
    if kind == "merged":
        tags.append("merged-adapter")
    return tags


def _after_metrics(metrics: Dict) -> Dict[str, float]:
    """Held-out metrics of the fine-tuned model: `eval_X_after` (SFT's before/after check), else `eval_X` (DPO)."""
    after = {k[len("eval_"):-len("_after")]: v for k, v in metrics.items()
             if k.startswith("eval_") and k.endswith("_after") and isinstance(v, (int, float))}
    if after:
        return after
    return {k[len("eval_"):]: v for k, v in metrics.items()
            if k.startswith("eval_") and not k.endswith("_before") and isinstance(v, (int, float))}


def _data_name(cfg: TrainConfig) -> str:
    d = cfg.data
    if d.format.is_generated:
        return f"generated {d.format.value} ({d.shapes.num_train} training rows, {d.shapes.num_eval} held out)"
    return f"{d.path} ({d.format.value})"


_METHOD_NAMES = {"lora": "LoRA", "dora": "DoRA", "qlora": "QLoRA", "full": "full fine-tuning"}


def _method(cfg: TrainConfig) -> str:
    """What was trained: the adapter and where it sits, what PEFT trains in full (modules_to_save), what is frozen
    (as modeling/build.py sets it up)."""
    a, m = cfg.adapter, cfg.model
    parts = {"vision tower": m.freeze_vision_tower, "merger": m.freeze_merger,
             "language model": m.freeze_language_model}
    frozen = [name for name, is_frozen in parts.items() if is_frozen]
    if not a.is_peft:
        return "full fine-tuning" + (f"; frozen: {', '.join(frozen)}" if frozen else "")
    targets = ([] if m.freeze_language_model else list(a.target_modules)) + (["vision blocks"] if a.vision_lora
                                                                              else [])
    quant = f"; base in 4-bit {a.bnb_4bit_quant_type}" if a.load_in_4bit else ""
    whole = [name for name in ("vision tower", "merger") if not parts[name]
             and not (name == "vision tower" and a.vision_lora)]
    return (f"{_METHOD_NAMES[a.method.value]} r={a.r}, alpha={a.alpha}, dropout={a.dropout:g} on "
            f"{', '.join(targets)}{quant}" + (f"; trained in full: {', '.join(whole)}" if whole else "")
            + (f"; frozen: {', '.join(frozen)}" if frozen else ""))


def _base_name(cfg: TrainConfig) -> str:
    m = cfg.model
    if m.random_init:
        return f"random-weight {m.family.value} built by qwenvl-ft from model.architecture (model={m.name_or_path})"
    return m.name_or_path


def _title(record: RunRecord, kind: str, where: str) -> str:
    cfg = record.config
    method = _METHOD_NAMES[cfg.adapter.method.value]
    what = {"adapter": f"a {method} adapter for", "model": "a full fine-tune of",
            "merged": f"a {method} adapter merged into"}[kind]
    kind_name = cfg.trainer.kind.value
    trainer = {"sft": "supervised fine-tuning (SFT)", "dpo": "direct preference optimisation (DPO)"}.get(
        kind_name, kind_name.upper())
    return (f"# {_name(record, where)}\n\n"
            f"This is {what} `{_base_name(cfg)}`, trained with {trainer} on {_data_name(cfg)} with qwenvl-ft "
            f"(TRL, PEFT and transformers underneath).")


def _table(rows) -> str:
    lines = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows if v not in (None, "")]
    return "\n".join(lines)


def _model_section(record: RunRecord, kind: str, merge_info: Optional[Dict], serving: Optional[str] = None) -> str:
    cfg, t, o = record.config, record.config.trainer, record.config.optimizer
    steps = record.metrics.get("global_step", "?")
    length = f"{steps} optimizer steps" if t.max_steps > 0 else f"{t.epochs:g} epochs ({steps} optimizer steps)"
    rows = [("base model", f"`{_base_name(cfg)}` ({cfg.model.dtype.value})"),
            ("method", f"{t.kind.value.upper()}, {_method(cfg)}"),
            ("training", f"{length}; batch {t.batch_size} x accumulation {t.gradient_accumulation_steps} per "
                         f"device; precision {t.precision.value}"),
            ("optimizer", f"{o.name}, lr {o.lr:g} ({o.scheduler.value}, warmup {o.warmup_ratio:g}), weight decay "
                          f"{o.weight_decay:g}")]
    if t.kind.value == "dpo" and getattr(t, "dpo", None) is not None:
        rows.append(("DPO", f"beta {t.dpo.beta:g}, loss {', '.join(x.value for x in t.dpo.loss_type)}"))
    if t.kind.value == "grpo" and getattr(t, "grpo", None) is not None:
        g = t.grpo
        rewards = ", ".join(f"{r.name or r.function} ({r.function}) x {r.weight:g}" for r in g.rewards)
        rows.append(("GRPO", f"{g.num_generations} completions per prompt of at most {g.max_completion_length} "
                             f"tokens, temperature {g.temperature:g}, beta {g.beta:g}, loss {g.loss_type.value}; "
                             f"rewards: {rewards}"))
    if merge_info:
        rows.append(("merge", f"adapter folded into the base in {merge_info.get('dtype')} on "
                              f"{merge_info.get('merged_at')}" + (" (QLoRA: into the unquantised base, not the 4-bit "
                                                                  "one it trained on)" if cfg.adapter.method ==
                                                                  AdapterMethod.qlora else "")))
    if serving and kind == "merged":
        rows.append(("serving", f"vLLM serves this merged folder as a plain model (the adapter unmerged: {serving})"))
    elif serving:
        rows.append(("serving", serving))
    return "## Model\n\n" + _table(rows)


def _data_section(record: RunRecord) -> str:
    d = record.config.data
    rows = [("format", f"`{d.format.value}`"), ("source", _data_name(record.config))]
    for split, label in (("train", "training rows"), ("eval", "held-out rows")):
        kept = record.data_summary.get(split, {}).get("rows_kept") if isinstance(record.data_summary.get(split),
                                                                                 dict) else None
        rows.append((label, kept))
    held_out = d.eval_path or (f"{d.eval_size:g} of the rows (seed {d.seed})" if d.eval_size else None)
    rows += [("held out", held_out), ("max length", d.max_length),
             ("image size", _image_size(d)),
             ("system message", d.system_message)]
    return "## Data\n\n" + _table(rows)


def _image_size(d) -> str:
    if d.resized_height is not None:
        return f"resized to {d.resized_height} x {d.resized_width}"
    if d.min_pixels is None and d.max_pixels is None:
        return "the processor's default pixel bounds"
    return f"{d.min_pixels or 'default'} to {d.max_pixels or 'default'} pixels"


def _results_section(record: RunRecord) -> str:
    """Before/after pairs side by side, then metrics measured once (DPO's held-out rewards)."""
    m = record.metrics
    pairs = sorted({k[len("eval_"):-len("_before")] for k in m if k.startswith("eval_") and k.endswith("_before")})
    lines = []
    if pairs:
        lines += ["| held-out metric | base model | fine-tuned |", "|---|---|---|"]
        lines += [f"| {_METRIC_NAMES.get(p, p)} | {_number(p, m.get(f'eval_{p}_before'))} | "
                  f"{_number(p, m.get(f'eval_{p}_after'))} |" for p in pairs]
    else:
        singles = _after_metrics(m)
        if singles:
            lines += ["| held-out metric | fine-tuned |", "|---|---|"]
            lines += [f"| {_METRIC_NAMES.get(k, k)} | {_number(k, v)} |" for k, v in singles.items()]
    if not lines:
        return ("## Results\n\nNo held-out metrics were recorded for this run (data.eval_size or data.eval_path "
                "adds them).")
    return "## Results\n\n" + "\n".join(lines)


def _number(metric: str, value) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    return f"{value:.1%}" if metric in ("exact_match", "reward_accuracy", "rouge_l") else f"{value:.2f}"


def _loss_section(log_history: List[Dict], points: int = 8) -> str:
    """First, last and lowest logged loss, a sparkline, and a few evenly spaced points of the curve (NaN and inf
    losses, of steps trainer.on_nonfinite skipped or let through, are counted, not drawn)."""
    every = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    logged = [(step, value) for step, value in every if math.isfinite(value)]
    if not logged:
        return ""
    low_step, low = min(logged, key=lambda p: p[1])
    picks = sorted({round(i * (len(logged) - 1) / (points - 1)) for i in range(points)}) if len(logged) > 1 else [0]
    evals = {e["step"]: e["eval_loss"] for e in log_history if "eval_loss" in e}
    lines = [f"## Training loss\n\n`{_sparkline([v for _, v in logged])}` {logged[0][1]:.4g} at step {logged[0][0]} "
             f"-> {logged[-1][1]:.4g} at step {logged[-1][0]} (lowest {low:.4g} at step {low_step}; "
             f"{len(logged)} logged values{_nonfinite_count(len(every) - len(logged))})", "",
             "| step | training loss |" + (" held-out loss |" if evals else ""),
             "|---|---|" + ("---|" if evals else "")]
    if evals:
        best_step = min(evals, key=evals.get)
        first_step, last_step = min(evals), max(evals)
        lines.insert(1, f"\nHeld-out loss during training: {evals[first_step]:.4g} at step {first_step} -> "
                        f"{evals[last_step]:.4g} at step {last_step} (lowest {evals[best_step]:.4g} at step "
                        f"{best_step}).")
    for i in picks:
        step, value = logged[i]
        lines.append(f"| {step} | {value:.4g} |" + (f" {evals[step]:.4g} |" if step in evals else
                                                     (" |" if evals else "")))
    return "\n".join(lines)


def _nonfinite_count(count: int) -> str:
    return f", {count} non-finite left out" if count else ""


def _sparkline(values: List[float], width: int = 40) -> str:
    blocks = "▁▂▃▄▅▆▇█"
    if len(values) > width:  # mean of equal slices
        size = len(values) / width
        values = [sum(values[int(i * size):int((i + 1) * size)]) / max(1, int((i + 1) * size) - int(i * size))
                  for i in range(width)]
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(blocks[int((v - low) / span * (len(blocks) - 1))] for v in values)


def _usage_section(record: RunRecord, kind: str, where: str) -> str:
    cfg = record.config
    # A random-weight base exists only as qwenvl-ft builds it: the snippet names a placeholder (see the note).
    base = "PATH/TO/RANDOM/BASE" if cfg.model.random_init else cfg.model.name_or_path
    if kind == "adapter":
        load = ('from peft import PeftModel\n'
                'from transformers import AutoModelForImageTextToText, AutoProcessor\n\n'
                f'base = AutoModelForImageTextToText.from_pretrained("{base}", dtype="auto", device_map="auto")\n'
                f'model = PeftModel.from_pretrained(base, "{where}")\n')
    else:
        load = ('from transformers import AutoModelForImageTextToText, AutoProcessor\n\n'
                f'model = AutoModelForImageTextToText.from_pretrained("{where}", dtype="auto", device_map="auto")\n')
    load += (f'processor = AutoProcessor.from_pretrained("{where}")\n\n'
             'messages = [{"role": "user", "content": [{"type": "image", "url": "photo.jpg"},\n'
             '                                         {"type": "text", "text": "Describe the image."}]}]\n'
             'inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,\n'
             '                                       return_dict=True, return_tensors="pt").to(model.device)\n'
             'output = model.generate(**inputs, max_new_tokens=128)\n'
             'print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))')
    notes = []
    if cfg.model.random_init and kind == "adapter":
        notes.append("The base has random weights made by qwenvl-ft (no Hub model): load the adapter through "
                     f"qwenvl-ft with the same `model={cfg.model.name_or_path}` option (`qwenvl-ft chat`, `infer`, "
                     "`eval`).")
    if kind == "adapter":
        notes.append("A plain transformers model without PEFT: `model = model.merge_and_unload()`, or "
                     f"`{_command('merge', record)}` (writes `merged/` with its own card).")
    chat = _command("chat", record) + (" chat.model_path=PATH/TO/merged" if kind == "merged" else "")
    notes.append(f"Chat with it in the browser: `{chat}`.")
    return "## How to use\n\n```python\n" + load + "\n```\n\n" + "\n".join(f"- {n}" for n in notes)


def _command(name: str, record: RunRecord) -> str:
    """`qwenvl-ft NAME` for this run: the training command's recipe and run name (placeholders when unknown)."""
    words = (record.info.get("command") or "").split()
    keep = [w for w in words if w.startswith(("recipe=", "run_name="))]
    return " ".join(["qwenvl-ft", name] + (keep or ["recipe=NAME", f"run_name={record.config.run_name}"]))


def _launch_section(record: RunRecord, merge_info: Optional[Dict]) -> str:
    command = record.info.get("command") or "(composed in Python: no command line)"
    lines = [f"## Launch\n\n```bash\n{command}\n```"]
    if merge_info and merge_info.get("command"):
        lines.append(f"merged with\n\n```bash\n{merge_info['command']}\n```")
    return "\n\n".join(lines)


def _hardware_section(record: RunRecord) -> str:
    info, m = record.info, record.metrics
    runtime = m.get("train_runtime_s")
    rows = [("hardware", info.get("hardware")),
            ("training time", _duration(runtime) if isinstance(runtime, (int, float)) else None),
            ("wall time of the run", _duration(info["wall_time_s"]) if info.get("wall_time_s") else None),
            ("finished", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["finished_at"]))
             if info.get("finished_at") else None),
            ("software", ", ".join(f"{k} {v}" for k, v in info.get("software", {}).items()) +
             (f", Python {info['python']}" if info.get("python") else ""))]
    return "## Hardware and time\n\n" + _table(rows)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else (f"{minutes} min {secs:02d} s" if minutes else f"{secs} s")


def _config_section(record: RunRecord) -> str:
    return ("## Full config\n\n<details><summary>config.yaml (resolved)</summary>\n\n```yaml\n"
            f"{record.config_yaml.rstrip()}\n```\n\n</details>")


# ----------------------------------------------------------------------------------------------------------------
# checking and writing


def check_card(card) -> None:
    """Offline checks of what the Hub validates (RepoCard.validate needs the network): the text parses back into
    ModelCardData, the model-index is well formed, base_model and datasets are repository ids, and the library and
    pipeline tag are known ones. Raises ValueError naming the field."""
    from huggingface_hub import ModelCard
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    data = ModelCard(str(card)).data  # raises on an invalid model-index
    for name in ("base_model", "datasets"):
        value = data.get(name)
        for repo in ([value] if isinstance(value, str) else value or []):
            try:
                validate_repo_id(repo)
            except HFValidationError as err:
                raise ValueError(f"model card {name}: {repo!r} is not a Hub repository id ({err})") from None
    if data.library_name not in set(LIBRARY.values()):
        raise ValueError(f"model card library_name {data.library_name!r}: expected one of "
                         f"{sorted(set(LIBRARY.values()))}")
    if data.pipeline_tag != PIPELINE_TAG:
        raise ValueError(f"model card pipeline_tag {data.pipeline_tag!r}: expected {PIPELINE_TAG!r}")
    if not data.tags or not all(isinstance(t, str) and t for t in data.tags):
        raise ValueError("model card tags must be a list of non-empty strings")


def write_card(folder: Path, card) -> Path:
    """README.md of `folder`, replacing PEFT's template; written under a temporary name and renamed."""
    check_card(card)
    path = folder / CARD
    partial = folder / f".{CARD}.partial"
    card.save(partial)
    os.replace(partial, path)
    return path

