"""`auto` settings (qwenvl_ft/estimate/autofit.py): the chooser against the estimate at given memory sizes (just
above and just below each boundary), the schema accepting auto and refusing other values, what `estimate` and a run
print, and a tiny CPU run with everything on auto."""

import json
import logging

import pytest
from omegaconf import OmegaConf

from qwenvl_ft.commands.estimate import estimate
from qwenvl_ft.config.compose import compose, validate
from qwenvl_ft.errors import ConfigError
from qwenvl_ft.estimate import autofit
from qwenvl_ft.estimate.autofit import CUDA_CONTEXT, SATURATING_TOKENS, MemoryAvailable, choose, gpu_memory
from qwenvl_ft.estimate.counts import meta_model
from qwenvl_ft.estimate.memory import GiB, estimate_memory

LORA_2B = ["recipe=lora_2b_coco", "data.path=/unused.json", "data.max_length=2048"]


def _typed(*overrides):
    return validate(compose(list(overrides), output_dir="/tmp/unused"))


def _peak(cfg, model, **settings):
    """The estimate of `cfg` with these settings, as the estimate command would print it (bytes, tokens)."""
    keys = {"batch_size": "trainer.batch_size", "gradient_checkpointing": "model.gradient_checkpointing",
            "max_tokens_per_batch": "data.max_tokens_per_batch",
            "gradient_accumulation_steps": "trainer.gradient_accumulation_steps"}
    result = estimate_memory(autofit.resolved(cfg, {keys[k]: v for k, v in settings.items()}), model)
    return result.total, result.budget.tokens


def _memory_fitting(peak: int) -> MemoryAvailable:
    """The smallest GPU whose usable memory holds `peak` bytes (one byte less would not)."""
    total = int((peak + CUDA_CONTEXT) / autofit.USABLE)
    while MemoryAvailable(total, "test").usable < peak:
        total += 1
    while MemoryAvailable(total - 1, "test").usable >= peak:
        total -= 1
    return MemoryAvailable(total, f"{total} bytes")


@pytest.fixture(scope="module")
def lora_2b():
    cfg = _typed(*LORA_2B, "trainer.batch_size=auto", "model.gradient_checkpointing=true")
    return cfg, meta_model(cfg.model)


def test_batch_auto_takes_the_largest_batch_that_fits(lora_2b):
    cfg, model = lora_2b
    peak4, _ = _peak(cfg, model, batch_size=4, gradient_checkpointing=True)
    fits = _memory_fitting(peak4)
    chosen = choose(cfg, fits, model=model)
    assert chosen.settings == {"trainer.batch_size": 4}
    assert chosen.predicted == peak4
    below = MemoryAvailable(fits.total - 1, "one byte less")
    assert below.usable < peak4
    assert choose(cfg, below, model=model).settings == {"trainer.batch_size": 2}


def test_batch_auto_stops_at_its_cap(lora_2b):
    cfg, model = lora_2b
    chosen = choose(cfg, MemoryAvailable(10 ** 6 * GiB, "a huge GPU"), model=model)
    assert chosen.settings == {"trainer.batch_size": autofit.MAX_BATCH_ROWS}
    assert "(the largest tried)" in chosen.reasons[-1]


def test_nothing_fits_is_a_config_error_naming_the_key(lora_2b):
    cfg, model = lora_2b
    peak1, _ = _peak(cfg, model, batch_size=1, gradient_checkpointing=True)
    with pytest.raises(ConfigError, match=r"trainer.batch_size=auto: even a batch of 1 row .* over the"):
        choose(cfg, MemoryAvailable(_memory_fitting(peak1).total - 1, "a small GPU"), model=model)


def test_checkpointing_auto_is_off_when_a_saturating_batch_fits_without_it():
    cfg = _typed(*LORA_2B, "trainer.batch_size=auto", "model.gradient_checkpointing=auto")
    model = meta_model(cfg.model)
    rows = SATURATING_TOKENS // 2048  # rows of data.max_length=2048 that make a saturating batch
    off, tokens = _peak(cfg, model, batch_size=rows, gradient_checkpointing=False)
    assert tokens == SATURATING_TOKENS
    chosen = choose(cfg, _memory_fitting(off), model=model)
    assert chosen.settings == {"trainer.batch_size": rows, "model.gradient_checkpointing": False}
    assert any(line.startswith("model.gradient_checkpointing=auto -> false") for line in chosen.reasons)
    # one byte less: without checkpointing only half that batch fits, and with it a larger one does: on
    chosen = choose(cfg, MemoryAvailable(_memory_fitting(off).total - 1, "less"), model=model)
    assert chosen.settings["model.gradient_checkpointing"] is True
    assert chosen.settings["trainer.batch_size"] > rows // 2
    assert any("model.gradient_checkpointing=auto -> true: without it only a batch of" in line
               for line in chosen.reasons)


def test_checkpointing_auto_with_a_fixed_batch_is_off_exactly_when_that_batch_fits():
    cfg = _typed(*LORA_2B, "trainer.batch_size=2", "model.gradient_checkpointing=auto")
    model = meta_model(cfg.model)
    off, _ = _peak(cfg, model, gradient_checkpointing=False)
    on, _ = _peak(cfg, model, gradient_checkpointing=True)
    assert on < off
    assert choose(cfg, _memory_fitting(off), model=model).settings == {"model.gradient_checkpointing": False}
    below = MemoryAvailable(_memory_fitting(off).total - 1, "less")
    assert choose(cfg, below, model=model).settings == {"model.gradient_checkpointing": True}


def test_token_budget_auto_for_packed_rows():
    cfg = _typed(*LORA_2B, "data.packing=true", "data.max_tokens_per_batch=auto")
    model = meta_model(cfg.model)
    peak, tokens = _peak(cfg, model, max_tokens_per_batch=8 * 2048)
    assert tokens == 8 * 2048
    chosen = choose(cfg, _memory_fitting(peak), model=model)
    assert chosen.settings == {"data.max_tokens_per_batch": 8 * 2048}
    assert chosen.reasons[-1].startswith(f"data.max_tokens_per_batch=auto -> {8 * 2048}: a token budget of")
    below = MemoryAvailable(_memory_fitting(peak).total - 1, "less")
    assert choose(cfg, below, model=model).settings == {"data.max_tokens_per_batch": 4 * 2048}
    both = _typed(*LORA_2B, "data.packing=true", "data.max_tokens_per_batch=auto", "trainer.batch_size=auto")
    chosen = choose(both, _memory_fitting(peak), model=model)
    assert chosen.settings == {"trainer.batch_size": 1, "data.max_tokens_per_batch": 8 * 2048}
    assert chosen.reasons[-1] == "trainer.batch_size=auto -> 1: unused, data.max_tokens_per_batch sets the batch"


def test_effective_batch_size_is_kept_by_gradient_accumulation():
    cfg = _typed(*LORA_2B, "trainer.batch_size=auto", "trainer.effective_batch_size=24",
                 "trainer.gradient_accumulation_steps=1")
    model = meta_model(cfg.model)
    peak, _ = _peak(cfg, model, batch_size=6)
    # over 2 devices each takes 12 rows per step: 6 fits, 12 does not (the divisors of 12 are tried, not powers of 2)
    chosen = choose(cfg, _memory_fitting(peak), world_size=2, model=model)
    assert chosen.settings == {"trainer.batch_size": 6, "trainer.gradient_accumulation_steps": 2}
    assert "to keep trainer.effective_batch_size=24 over 2 device(s)" in chosen.reasons[-1]
    with pytest.raises(ConfigError, match="not a multiple of the 5 devices"):
        choose(cfg, _memory_fitting(peak), world_size=5, model=model)


def test_effective_batch_size_with_a_fixed_batch_is_checked_against_the_devices():
    cfg = _typed("recipe=demo", "trainer.effective_batch_size=32", "trainer.gradient_accumulation_steps=2")
    assert choose(cfg, None, world_size=2).settings == {}  # 8 x 2 x 2 devices
    with pytest.raises(ConfigError, match=r"= 8 x 2 x 1 = 16: set trainer.batch_size=auto"):
        choose(cfg, None, world_size=1)


def test_a_sharded_engine_is_sized_per_gpu():
    from qwenvl_ft.distributed import memory
    from qwenvl_ft.estimate.per_gpu import single_process_parts

    cfg = _typed(*LORA_2B, "dist=zero3", "dist.num_processes=4", "trainer.batch_size=auto")
    model = meta_model(cfg.model)
    concrete = autofit.resolved(cfg, {"trainer.batch_size": 4})
    result = estimate_memory(concrete, model)
    per_gpu = memory.per_gpu("zero3", 4, single_process_parts(concrete, result, model)).gpu
    assert per_gpu < result.total
    chosen = choose(cfg, _memory_fitting(per_gpu), world_size=4, model=model)
    assert chosen.settings == {"trainer.batch_size": 4} and chosen.predicted == per_gpu
    assert "per GPU under dist zero3 over 4 processes" in chosen.reasons[0]


def test_without_a_gpu_the_cpu_defaults_and_the_log_says_so():
    cfg = _typed("recipe=demo", "trainer.batch_size=auto", "model.gradient_checkpointing=auto")
    memory = gpu_memory(cfg)
    assert memory.total is None  # the CPU test machine
    chosen = choose(cfg, memory)
    assert chosen.settings == {"trainer.batch_size": 4, "model.gradient_checkpointing": False}
    assert chosen.reasons[0].startswith("no CUDA GPU and no dist.gpu_memory_gib: the CPU defaults")
    assert gpu_memory(_typed("recipe=demo", "dist.gpu_memory_gib=80")).total == 80 * GiB


def test_nothing_auto_changes_nothing():
    cfg = _typed("recipe=demo")
    assert autofit.auto_keys(cfg) == []
    assert choose(cfg, MemoryAvailable(None, "none")).settings == {}


# ---------------------------------------------------------------------------------------------------------------
# the schema


def test_compose_accepts_auto_and_plain_values():
    cfg = _typed("recipe=demo", "trainer.batch_size=auto", "model.gradient_checkpointing=auto",
                 "data.packing=true", "data.max_tokens_per_batch=auto")
    assert autofit.auto_keys(cfg) == ["trainer.batch_size", "data.max_tokens_per_batch",
                                      "model.gradient_checkpointing"]
    plain = _typed("recipe=demo", "trainer.batch_size=3", "model.gradient_checkpointing=false",
                   "data.max_tokens_per_batch=4096")
    assert (plain.trainer.batch_size, plain.model.gradient_checkpointing, plain.data.max_tokens_per_batch) == \
        (3, False, 4096)


@pytest.mark.parametrize("override, message", [
    ("trainer.batch_size=big", "trainer.batch_size must be auto or a number > 0, not 'big'"),
    ("trainer.batch_size=0", "trainer.batch_size must be auto or a number > 0, not 0"),
    ("model.gradient_checkpointing=sometimes", "model.gradient_checkpointing must be true, false or auto, not "
                                               "'sometimes'"),
    ("data.max_tokens_per_batch=lots", "data.max_tokens_per_batch must be auto, a number > 0 or null, not 'lots'"),
    ("trainer.effective_batch_size=36", "trainer.effective_batch_size=36 is not a multiple of trainer.batch_size x "
                                        "gradient_accumulation_steps = 8 x 1: set trainer.batch_size=auto"),
])
def test_compose_refuses_other_values_listing_the_choices(override, message):
    with pytest.raises(ConfigError) as err:
        _typed("recipe=demo", override)
    assert message in str(err.value)


def test_methods_that_cannot_take_auto_say_so_at_compose_time():
    with pytest.raises(ConfigError, match="trainer.batch_size=auto is for trainer=sft and trainer=dpo"):
        _typed("recipe=grpo_demo", "trainer.batch_size=auto")
    with pytest.raises(ConfigError, match="data.max_tokens_per_batch and data.group_by_length plan padded batches"):
        _typed("recipe=dpo_demo", "data.max_tokens_per_batch=auto")
    with pytest.raises(ConfigError, match="trainer.effective_batch_size counts rows of padded batches"):
        _typed("recipe=demo", "trainer.batch_size=auto", "trainer.effective_batch_size=16", "data.packing=true")


# ---------------------------------------------------------------------------------------------------------------
# what estimate and a run print


def test_estimate_prints_the_choice_a_run_makes(capsys):
    overrides = LORA_2B + ["trainer.batch_size=auto", "model.gradient_checkpointing=auto", "dist.gpu_memory_gib=80"]
    out = estimate(compose(overrides, output_dir="/tmp/unused"))
    printed = capsys.readouterr().out
    cfg = _typed(*overrides)
    chosen = choose(cfg, gpu_memory(cfg))
    assert out["auto"] == {"settings": chosen.settings, "reasons": chosen.reasons}
    assert [line[len("auto: "):] for line in printed.splitlines() if line.startswith("auto: ")] == chosen.reasons
    on = "on" if chosen.settings["model.gradient_checkpointing"] else "off"
    assert f"gradient checkpointing {on}" in printed
    assert out["predicted_peak_gib"] == round(chosen.predicted / GiB, 2)


def test_a_run_writes_the_choice_into_its_config_and_logs_why(caplog):
    from qwenvl_ft.training.start import fit_auto_settings

    composed = compose(LORA_2B + ["trainer.batch_size=auto", "model.gradient_checkpointing=auto",
                                  "dist.gpu_memory_gib=40"], output_dir="/tmp/unused")
    cfg = validate(composed)
    chosen = choose(cfg, gpu_memory(cfg))
    with caplog.at_level(logging.INFO, logger="qwenvl_ft"):
        fit_auto_settings(composed)
    said = [r.getMessage() for r in caplog.records if r.name == "qwenvl_ft"]
    assert said == [f"auto: {line}" for line in chosen.reasons]
    assert composed.trainer.batch_size == chosen.settings["trainer.batch_size"]
    assert composed.model.gradient_checkpointing is chosen.settings["model.gradient_checkpointing"]
    assert autofit.auto_keys(validate(composed)) == []


def test_data_check_pads_the_batch_auto_chooses(tmp_path, capsys):
    from qwenvl_ft.commands.data_check import data_check

    data_check(compose(["recipe=demo", "data.shapes.num_train=16", "data.shapes.num_eval=0",
                        "trainer.batch_size=auto"], output_dir=str(tmp_path / "run")))
    printed = capsys.readouterr().out
    assert "auto: no CUDA GPU and no dist.gpu_memory_gib: the CPU defaults trainer.batch_size=4" in printed
    report = json.loads((tmp_path / "run" / "data_check.json").read_text())
    assert report["settings"]["batch_size"] == 4


@pytest.mark.slow
def test_a_tiny_run_with_auto_settings_trains_with_plain_values(tmp_path, caplog):
    from qwenvl_ft.commands.train import train

    overrides = ["recipe=demo", "data.shapes.num_train=16", "data.shapes.num_eval=4", "trainer.max_steps=2",
                 "trainer.eval_generation=false", "trainer.disable_tqdm=true", "trainer.batch_size=auto",
                 "model.gradient_checkpointing=auto"]
    composed = compose(overrides, output_dir=str(tmp_path / "run"))
    with caplog.at_level(logging.INFO, logger="qwenvl_ft"):
        metrics = train(composed)
    assert metrics["global_step"] == 2
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("auto: ")]
    assert said and "the CPU defaults trainer.batch_size=4, model.gradient_checkpointing=false" in said[0]
    assert any("batch 4 rows x accumulation 1" in r.getMessage() for r in caplog.records)
    saved = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert saved.trainer.batch_size == 4 and saved.model.gradient_checkpointing is False
    history = json.loads((tmp_path / "run" / "log_history.json").read_text())
    assert any("loss" in entry for entry in history)
    # the same command again resolves to the same plain values: the run folder sees no config change (resume)
    from qwenvl_ft.training.resume import config_changes
    from qwenvl_ft.training.start import fit_auto_settings, record_world_size

    again = compose(overrides, output_dir=str(tmp_path / "run"))
    fit_auto_settings(again)
    record_world_size(again)
    assert config_changes(tmp_path / "run" / "config.yaml", again) == []
    unresolved = compose(overrides, output_dir=str(tmp_path / "run"))
    record_world_size(unresolved)
    assert config_changes(tmp_path / "run" / "config.yaml", unresolved) == ["model.gradient_checkpointing",
                                                                          "trainer.batch_size"]


@pytest.mark.gpu
def test_on_a_gpu_the_auto_choice_trains_within_what_it_was_sized_for(tmp_path):
    """A random-weight 2B LoRA run on auto, sized for a 24 GiB GPU: it trains, and its measured peak stays under the
    predicted one and the usable memory (the shapes rows are shorter than data.max_length, so well under)."""
    import torch

    from qwenvl_ft.commands.train import train

    overrides = ["recipe=demo", "model=qwen2_vl_2b", "model.random_init=true", "adapter=lora", "data.max_length=1024",
                 "data.shapes.num_train=64", "data.shapes.num_eval=0", "trainer.max_steps=3",
                 "trainer.eval_generation=false", "trainer.disable_tqdm=true", "trainer.precision=bf16",
                 "trainer.batch_size=auto", "model.gradient_checkpointing=auto", "dist.gpu_memory_gib=24"]
    composed = compose(overrides, output_dir=str(tmp_path / "run"))
    cfg = validate(composed)
    memory = gpu_memory(cfg)
    chosen = choose(cfg, memory)
    torch.cuda.reset_peak_memory_stats()
    metrics = train(composed)
    assert metrics["global_step"] == 3
    saved = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert saved.trainer.batch_size == chosen.settings["trainer.batch_size"]
    assert torch.cuda.max_memory_allocated() <= min(chosen.predicted, memory.usable)
