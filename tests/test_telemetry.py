"""Run telemetry (qwenvl_ft/training/telemetry.py), model FLOPs (qwenvl_ft/estimate/flops.py) and DataLoader workers
(qwenvl_ft/data/workers.py), on the tiny random models on CPU.

The claims: the FLOPs formulas equal what torch.utils.flop_counter counts in the real model code; the token, sample
and patch counts equal those of the batches the collator produced; the data-wait fraction rises when the collator
is slow; the figures reach log_history, TensorBoard and metrics/summary; 0 and 2 workers give the same batches.
"""

import json
import time

import pytest
import torch
from PIL import Image

from qwenvl_ft.config.compose import compose, validate
from qwenvl_ft.errors import ConfigError
from qwenvl_ft.estimate.flops import StepWork, forward_flops, training_flops, vision_attention_pairs

QUICK = ["recipe=demo", "trainer.logging_steps=2", "trainer.disable_tqdm=true", "trainer.eval_generation=false",
         "optimizer.scheduler=constant", "optimizer.warmup_ratio=0", "trainer.save_steps=1000"]


def _typed(*overrides, output_dir="/tmp/unused"):
    return validate(compose(QUICK + list(overrides), output_dir=output_dir))


# ----------------------------------------------------------------------------------------------------------------
# model FLOPs against torch's FLOP counter


def _row(index, size=(56, 56), words=3):
    answer = " ".join(["red", "green", "blue", "circle", "square"][(index + k) % 5] for k in range(words))
    return {"messages": [{"role": "user", "content": [{"type": "image", "text": None},
                                                      {"type": "text", "text": "What is in the image?"}]},
                         {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
            "images": [Image.new("RGB", size, (40 * index % 255, 120, 200))], "source": f"test:{index}"}


def _model_and_batch(typed, rows):
    from qwenvl_ft.data.collate import VisionChatCollator
    from qwenvl_ft.modeling.build import build_model, build_processor

    processor = build_processor(typed.model, typed.data)
    model = build_model(typed.model, typed.adapter)
    return model, VisionChatCollator(processor, typed.data)(rows)


def _work(batch, model) -> StepWork:
    """The work of a batch of one row (no padding), counted by hand from its shapes."""
    length = batch["input_ids"].shape[1]
    grid = batch["image_grid_thw"]
    frames, windows = vision_attention_pairs(grid, model.config.vision_config)
    return StepWork(length, length ** 2, int(grid.prod(-1).sum()), int(frames), int(windows))


def _counted(run) -> dict:
    """FLOPs torch.utils.flop_counter counts while `run()` runs, by operator name. Attention runs on SDPA's math
    backend, as the matmuls the counter sees in every torch version (torch 2.14's counter has no formula for the
    fused CPU kernel, and counts a fused backward as 5 matmuls where the model FLOPs count 4: twice the forward's,
    what autograd of the math backend's two matmuls does)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        run()
    counts = {}
    for op, flops in counter.get_flop_counts()["Global"].items():
        counts[str(op)] = counts.get(str(op), 0) + flops
    return counts


@pytest.mark.parametrize("overrides", [
    ["adapter=full"],  # everything trains: 6N everywhere
    ["adapter=full", "model=tiny_qwen2_5_vl"],  # window and full-attention ViT blocks, gated MLP
    ["adapter=lora", "model=tiny_qwen3_vl"],  # learned positions, DeepStack mergers, q/k norms; ViT and mergers train
    ["adapter=lora", "model.freeze_vision_tower=true"],  # LoRA on q/v, frozen ViT, trained merger
], ids=["full", "qwen2_5_vl", "qwen3_vl", "lora"])
def test_training_flops_equal_the_flop_counter(overrides):
    typed = _typed(*overrides)
    model, batch = _model_and_batch(typed, [_row(0, size=(112, 112))])
    model.train()

    def step():
        model(**batch).loss.backward()

    counted = sum(_counted(step).values())
    assert training_flops(typed).step(_work(batch, model)) == counted


def test_reference_forward_flops_equal_the_flop_counter():
    typed = _typed("adapter=lora", "model.freeze_vision_tower=true")
    model, batch = _model_and_batch(typed, [_row(1, size=(84, 56), words=7)])

    def forward():
        with torch.no_grad(), model.disable_adapter():
            model(**batch)

    assert forward_flops(typed).step(_work(batch, model)) == sum(_counted(forward).values())
    # DPO's step = the policy's forward + backward + the reference forward; precomputed log-probs drop the latter
    dpo = _typed("trainer=dpo", "data=shapes_preference", "adapter=lora", "model.freeze_vision_tower=true")
    expected = training_flops(typed) + forward_flops(typed)
    assert training_flops(dpo).as_tuple() == pytest.approx(expected.as_tuple())
    precomputed = _typed("trainer=dpo", "data=shapes_preference", "adapter=lora", "model.freeze_vision_tower=true",
                         "trainer.dpo.precompute_ref_log_probs=true")
    assert training_flops(precomputed).as_tuple() == pytest.approx(training_flops(typed).as_tuple())


def test_estimate_prints_flops_per_token(capsys):
    from qwenvl_ft.commands.estimate import estimate

    metrics = estimate(compose(["recipe=qlora_7b_amazon"], output_dir="/tmp/unused"))
    assert "GFLOP per token" in capsys.readouterr().out
    # the 7B under QLoRA: its ~7B language-model matmul weights at 4 FLOPs each (frozen), plus attention and images
    assert 4 * 7.0e9 < metrics["model_flops_per_token"] < 4 * 7.0e9 * 1.5


# ----------------------------------------------------------------------------------------------------------------
# the telemetry of a training run


class SlowCollator:
    def __init__(self, inner, delay):
        self.inner, self.delay = inner, delay

    def __call__(self, items):
        time.sleep(self.delay)
        return self.inner(items)


class KeepBatches:
    """Keeps the batches the training loop received (accelerate's loader collates one batch ahead, so the
    collator's own output can hold one more)."""

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self.received = getattr(self, "received", []) + batches
        return batches, items


ROWS = [_row(i, size=[(56, 56), (84, 56), (112, 84)][i % 3], words=1 + i % 6) for i in range(16)]


def _trainer(tmp_path, *overrides, delay=0.0):
    """A tiny SFT trainer built as the run builds it (the telemetry is one of the trainer class's mixins), also
    keeping the batches the loop received."""
    from qwenvl_ft.data.arrow import to_dataset
    from qwenvl_ft.data.collate import VisionChatCollator
    from qwenvl_ft.modeling.build import build_model, build_processor
    from qwenvl_ft.trainers.base import standalone_parts
    from qwenvl_ft.trainers.sft import TRAINING, build_trainer

    typed = _typed("data.num_workers=0", *overrides, output_dir=str(tmp_path))
    processor = build_processor(typed.model, typed.data)
    model = build_model(typed.model, typed.adapter)
    collator, rows = VisionChatCollator(processor, typed.data), to_dataset(ROWS)
    parts = standalone_parts(TRAINING, typed, model, processor, collator, rows, None)
    parts.trainer_mixins += (KeepBatches,)
    trainer = build_trainer(typed, model, processor, collator, rows, None, parts)
    if delay:
        trainer.data_collator = SlowCollator(trainer.data_collator, delay)
    return trainer


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_telemetry_counts_the_collated_batches(tmp_path, layout):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from qwenvl_ft.training.finish import write_history
    from qwenvl_ft.training.telemetry import COUNTS, find_telemetry

    extra = ["data.packing=true", "data.max_tokens_per_batch=256"] if layout == "packed" else []
    trainer = _trainer(tmp_path, "trainer.batch_size=3", "trainer.gradient_accumulation_steps=2",
                       "trainer.max_steps=4", *extra)
    trainer.train()
    telemetry = find_telemetry(trainer)
    counted = dict(zip(COUNTS, telemetry.total.counts.tolist()))
    batches = trainer.received
    if layout == "packed":
        from qwenvl_ft.data.packing import sample_boundaries

        assert "attention_mask" not in batches[0]
        real = sum(b["input_ids"].numel() for b in batches)
        samples = sum(len(sample_boundaries(b["position_ids"])) for b in batches)
    else:
        real = sum(int(b["attention_mask"].sum()) for b in batches)
        samples = sum(b["input_ids"].shape[0] for b in batches)
        assert real < sum(b["input_ids"].numel() for b in batches), "the rows differ in length: there is padding"
    assert counted["tokens"] == real and counted["samples"] == samples
    assert counted["tensor_tokens"] == sum(b["input_ids"].numel() for b in batches)
    assert counted["patches"] == sum(int(b["image_grid_thw"].prod(-1).sum()) for b in batches)
    assert telemetry.total.steps == 4 and len(batches) >= 5  # 4 optimizer steps of up to 2 micro-batches

    summary = telemetry.summary
    assert summary["padding_fraction"] == pytest.approx(1 - real / counted["tensor_tokens"])
    assert summary["tokens_per_s"] == pytest.approx(real / telemetry.total.step_s)
    assert 0 < summary["data_wait_fraction"] < 1 and summary["peak_rss_gib"] > 0
    assert summary["model_tflops_per_s_per_device"] > 0 and "mfu" not in summary  # no GPU, no MFU
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3 and all("perf/tokens_per_s" in entry for entry in logged)  # steps 1, 2 and 4
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert {"train/perf/tokens_per_s", "train/perf/data_wait_fraction"} <= set(events.Tags()["scalars"])
    metrics = {}
    write_history(trainer, tmp_path, metrics)
    assert metrics["performance"]["tokens_per_s"] == pytest.approx(summary["tokens_per_s"], rel=1e-5)
    assert json.loads((tmp_path / "metrics.json").read_text())["performance"] == metrics["performance"]


@pytest.mark.slow
def test_data_wait_rises_with_a_slow_collator(tmp_path):
    from qwenvl_ft.training.telemetry import find_telemetry

    delay, runs = 0.3, {}
    for name, wait in (("fast", 0.0), ("slow", delay)):
        trainer = _trainer(tmp_path / name, "trainer.batch_size=4", "trainer.max_steps=4",
                           delay=wait)
        trainer.train()
        runs[name] = find_telemetry(trainer).total
    fast, slow = runs["fast"], runs["slow"]
    assert slow.wait_s >= 4 * delay  # the loop waited for every slow batch (no workers: collated in the loop)
    assert slow.wait_s / slow.step_s > fast.wait_s / fast.step_s


def test_batch_counts_of_preference_pairs(tiny_processor):
    from qwenvl_ft.config.data import DataConfig, DataFormat
    from qwenvl_ft.data.collate_preference import VisionPreferenceCollator
    from qwenvl_ft.data.preference import shapes_preference_rows, to_pair_dataset
    from qwenvl_ft.training.telemetry import COUNTS, batch_counts

    pairs = to_pair_dataset(shapes_preference_rows(3, 56, seed=0, split="train"))
    batch = VisionPreferenceCollator(tiny_processor, DataConfig(format=DataFormat.shapes_preference))(
        [pairs[i] for i in range(3)])
    counted = dict(zip(COUNTS, batch_counts(batch, pairs=True).tolist()))
    # 3 pairs = 6 sequences; each pair's image is in the batch twice and encoded once
    assert counted["samples"] == 3 and counted["tokens"] == int(batch["attention_mask"].sum())
    assert counted["patches"] * 2 == int(batch["image_grid_thw"].prod(-1).sum())


def test_the_filler_of_a_fixed_length_pack_counts_as_padding(tiny_processor):
    """model.compile pads every pack to the token budget with a sample without labels (data/packing.py): the
    telemetry counts it as padding, not as a sample or as real tokens."""
    from qwenvl_ft.config.data import DataConfig
    from qwenvl_ft.data.collate import VisionChatCollator
    from qwenvl_ft.data.packing import PackingCollator
    from qwenvl_ft.data.shapes import make_rows
    from qwenvl_ft.training.telemetry import COUNTS, batch_counts

    collator = VisionChatCollator(tiny_processor, DataConfig())
    samples = [collator.encode(row) for row in make_rows(3, 56, seed=0, split="train")]
    free = PackingCollator(collator).pack(samples)
    fixed = PackingCollator(collator, pad_to=free["input_ids"].numel() + 50).pack(samples)
    unpadded, padded = (dict(zip(COUNTS, batch_counts(b).tolist())) for b in (free, fixed))
    assert padded["tensor_tokens"] == unpadded["tensor_tokens"] + 50 == unpadded["tokens"] + 50
    assert {k: v for k, v in padded.items() if k != "tensor_tokens"} == \
        {k: v for k, v in unpadded.items() if k != "tensor_tokens"}
    assert padded["samples"] == 3


# ----------------------------------------------------------------------------------------------------------------
# workers


def test_auto_workers():
    from qwenvl_ft.data.workers import CPU_ONLY_WORKERS, GPU_WORKER_CAP, loader_workers

    one_gpu = loader_workers("auto", cuda=True, cpus=16)
    assert (one_gpu.num_workers, one_gpu.persistent, one_gpu.prefetch_factor) == (GPU_WORKER_CAP, True, 2)
    assert loader_workers("auto", cuda=True, cpus=16, ranks=8).num_workers == 1  # 2 CPUs per rank, one is its own
    assert loader_workers("auto", cuda=True, cpus=4).num_workers == 3
    assert loader_workers("auto", cuda=False, cpus=2).num_workers == CPU_ONLY_WORKERS
    # the Trainer fetches a whole optimizer step's micro-batches at once: that many must be ready
    assert loader_workers(1, cuda=True, cpus=2, accumulation=8).prefetch_factor == 8
    assert loader_workers("auto", cuda=True, cpus=16, accumulation=8).prefetch_factor == 2
    none = loader_workers(0, cuda=True, cpus=16)
    assert (none.num_workers, none.persistent, none.prefetch_factor) == (0, False, None)
    assert validate(compose(["recipe=demo"], output_dir="/tmp/unused")).data.num_workers == "auto"
    with pytest.raises(ConfigError, match="data.num_workers must be auto or a number"):
        validate(compose(["recipe=demo", "data.num_workers=many"], output_dir="/tmp/unused"))


@pytest.mark.slow
def test_zero_and_two_workers_give_the_same_batches(tmp_path):
    loaded = {}
    for workers in (0, 2):
        trainer = _trainer(tmp_path / str(workers), "trainer.batch_size=3",
                           f"data.num_workers={workers}")
        assert trainer.args.dataloader_num_workers == workers
        loaded[workers] = list(trainer.get_train_dataloader())
    assert len(loaded[0]) == len(loaded[2]) == 6
    for one, other in zip(loaded[0], loaded[2]):
        assert one.keys() == other.keys()
        assert all(torch.equal(one[key], other[key]) for key in one)


def test_rows_without_tokens_report_time_and_memory_only():
    """GRPO's loader yields prompt rows (tokens exist only after generation): no token figures, no FLOPs."""
    from types import SimpleNamespace

    from qwenvl_ft.training.telemetry import RunTelemetry, Window, batch_counts, performance_line

    assert batch_counts([{"prompt": "p", "image": None}]) is None
    telemetry = RunTelemetry(_typed())
    telemetry.window = Window(counts=None, wait_s=0.5, step_s=2.0, steps=2)
    figures = telemetry.close_run(SimpleNamespace(num_processes=1, device=torch.device("cpu")))
    assert figures["step_time_s"] == 1.0 and figures["data_wait_fraction"] == 0.25 and figures["peak_rss_gib"] > 0
    assert not {"tokens_per_s", "samples_per_s", "padding_fraction", "model_tflops_per_s_per_device"} & set(figures)
    assert performance_line(figures).startswith("performance: step 1.000 s, data wait 25.0%, peak RSS ")


def test_startup_budget_adds_up_phases():
    from qwenvl_ft.training.startup import StartupBudget

    budget = StartupBudget(since_process_start=True)
    for phase in ("imports", "data check", "imports"):  # a phase marked twice adds up
        time.sleep(0.01)
        budget.mark(phase)
    assert list(budget.phases) == ["interpreter, CLI and config", "imports", "data check"]
    assert budget.phases["imports"][0] >= 0.02 and budget.phases["interpreter, CLI and config"][0] > 0
    assert budget.total == pytest.approx(sum(wall for wall, _ in budget.phases.values()))
    report = budget.report().splitlines()
    assert report[0].startswith(f"start-up: {budget.total:.1f} s before training begins")
    assert [line.split()[0] for line in report[2:]] == ["interpreter,", "imports", "data"]
    assert "first_step_s" not in budget.metrics()
    budget.first_step_done()
    metrics = budget.metrics()
    assert metrics["first_step_s"] >= 0 and set(metrics["startup_s"]) == set(metrics["startup_cpu_s"]) == set(
        budget.phases)


def test_device_peak_lookup():
    from qwenvl_ft.training.telemetry import device_peak_tflops

    # torch.cuda.get_device_name() strings: a name contained in another must not shadow it
    assert device_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert device_peak_tflops("NVIDIA H100 80GB HBM3") == device_peak_tflops("NVIDIA H200") == 989.0
    assert device_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0 and device_peak_tflops("NVIDIA A10") == 125.0
    assert device_peak_tflops("NVIDIA L40S") == 362.0 and device_peak_tflops("NVIDIA L4") == 121.0
    assert device_peak_tflops("Some Future GPU") is None
    assert device_peak_tflops("NVIDIA H100 PCIe", override=500.0) == 500.0
