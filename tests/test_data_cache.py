"""Tier 1: every row is measured once. The data check's lengths are what packing, token budgets and length grouping use;
its results are cached in the per-user cache and reused by the next start with the same data and settings (a new run,
`data-check`; a multi-machine launch keeps them in its run folder), and a changed file or setting measures again; the
estimate uses the measured lengths; the check shows progress. The training rows carry the text the check tokenised,
and collating them gives the batches that rendering again gives."""

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from qwenvl_ft.config.data import CacheMode
from qwenvl_ft.data.check import check_data, load_checked_splits
from qwenvl_ft.data.collate import VisionChatCollator

from data_helpers import data_cfg, llava, write_image, write_jsonl


@pytest.fixture
def dataset(tmp_path):
    write_image(tmp_path / "a.png", size=(56, 56))
    write_image(tmp_path / "b.png", size=(112, 56))
    rows = [llava("a.png" if i % 2 else "b.png", answer="word " * (1 + i % 5)) for i in range(12)]
    return write_jsonl(tmp_path / "t.jsonl", rows)


@pytest.fixture
def measure_calls(monkeypatch):
    """How often VisionChatCollator.measure runs (in this process)."""
    calls = []
    original = VisionChatCollator.measure

    def counted(self, row):
        calls.append(row["source"])
        return original(self, row)

    monkeypatch.setattr(VisionChatCollator, "measure", counted)
    return calls


def test_the_batch_layouts_use_the_lengths_the_check_measured(tiny_processor, dataset, tmp_path, measure_calls):
    from qwenvl_ft.data.batching import row_lengths, training_batches

    cfg = data_cfg(dataset, eval_size=2, packing=True, max_length=256, max_tokens_per_batch=256)
    train, held_out, report = load_checked_splits(cfg, tiny_processor, batch_size=2, output_dir=tmp_path / "run")
    assert sorted(measure_calls) == sorted(f"{dataset}:line {i}" for i in range(1, 13)), "each row once"
    collator = VisionChatCollator(tiny_processor, cfg)
    measure_calls.clear()
    for layout in (cfg, replace(cfg, packing=False), replace(cfg, packing=False, max_tokens_per_batch=None,
                                                               group_by_length=True)):
        batches = training_batches(layout, 2, collator, train, seed=0)
        assert len(batches.dataset) > 0
    assert measure_calls == [], "packing, token budgets and length grouping measured again"
    # the stored lengths are what encode produces
    assert row_lengths(collator, train) == [collator.encode(train[i])["input_ids"].numel() for i in range(len(train))]


def user_cache() -> Path:
    return Path(os.environ["QWENVL_FT_CACHE"]) / "data"  # each test's own (tests/conftest.py)


def test_the_cache_is_reused_and_a_changed_file_or_setting_measures_again(tiny_processor, dataset, tmp_path,
                                                                           measure_calls):
    run = tmp_path / "run"
    cfg = data_cfg(dataset, eval_size=2)
    first = check_data(cfg, tiny_processor, batch_size=2, output_dir=run)
    assert len(measure_calls) == 12 and "12 rows measured in" in first.report.cache
    assert f"stored in {user_cache()}" in first.report.cache
    entries = list(user_cache().iterdir())
    assert len(entries) == 1 and (entries[0] / "meta.json").is_file()

    measure_calls.clear()
    again = check_data(cfg, tiny_processor, batch_size=2, output_dir=run)
    assert measure_calls == [] and "data check read from" in again.report.cache
    assert again.report.summary() == first.report.summary()
    assert [again.train[i] for i in range(len(again.train))] == [first.train[i] for i in range(len(first.train))]

    # a setting that changes what is measured: a new entry
    check_data(replace(cfg, max_length=40), tiny_processor, batch_size=2, output_dir=run)
    assert len(measure_calls) == 12
    # one that does not (the batch layout, the workers) reuses it
    measure_calls.clear()
    check_data(replace(cfg, packing=True, num_workers=1), tiny_processor, batch_size=2, output_dir=run)
    assert measure_calls == []
    # the file changes: measured again
    with dataset.open("a") as handle:
        handle.write(json.dumps(llava("a.png", answer="one more")) + "\n")
    changed = check_data(cfg, tiny_processor, batch_size=2, output_dir=run)
    assert len(measure_calls) == 13 and changed.report.sources[0].read == 13
    # touched without a change of content: the modification time is part of the key too
    measure_calls.clear()
    os.utime(dataset, ns=(1, 1))
    check_data(cfg, tiny_processor, batch_size=2, output_dir=run)
    assert len(measure_calls) == 13
    # data.cache=refresh measures again and replaces the entry; off neither reads nor writes
    measure_calls.clear()
    check_data(replace(cfg, cache=CacheMode.refresh), tiny_processor, batch_size=2, output_dir=run)
    check_data(replace(cfg, cache=CacheMode.off), tiny_processor, batch_size=2, output_dir=tmp_path / "off")
    assert len(measure_calls) == 26 and not (tmp_path / "off").exists()


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_the_stored_text_gives_the_batches_rendering_gives_without_rendering(tiny_processor, dataset, tmp_path,
                                                                           monkeypatch, train_on_prompt):
    from qwenvl_ft.data.packing import PackingCollator

    cfg = data_cfg(dataset, eval_size=2, max_length=256, train_on_prompt=train_on_prompt)
    train, held_out, _ = load_checked_splits(cfg, tiny_processor, batch_size=2, output_dir=tmp_path / "run")
    stored = [train[i] for i in range(len(train))] + [held_out[i] for i in range(len(held_out))]
    assert all(row["text_ids"] and len(row["label_mask"]) == len(row["text_ids"]) for row in stored)
    assert all(any(row["label_mask"]) and not all(row["label_mask"]) for row in stored)  # some tokens trained
    collator = VisionChatCollator(tiny_processor, cfg)
    rendered = [{k: v for k, v in row.items() if k not in ("text_ids", "label_mask")} for row in stored]
    expected = {"padded": collator(rendered), "packed": PackingCollator(collator)(rendered)}

    class NotAgain:
        pad_token_id = collator.tokenizer.pad_token_id  # padding needs it

        def __call__(self, *args, **kwargs):
            raise AssertionError("a stored row was rendered or tokenised again")

    monkeypatch.setattr(collator, "render", NotAgain())
    monkeypatch.setattr(collator, "tokenizer", NotAgain())
    for layout, batch in {"padded": collator(stored), "packed": PackingCollator(collator)(stored)}.items():
        assert batch.keys() == expected[layout].keys(), layout
        for key, value in batch.items():
            same = torch.equal(value, expected[layout][key]) if torch.is_tensor(value) else \
                value == expected[layout][key]  # a packed batch's longest sample length
            assert same, (layout, key)


def test_another_rank_or_sweep_job_reads_the_entry_instead_of_measuring(tiny_processor, dataset, tmp_path,
                                                                         measure_calls, monkeypatch):
    shared = tmp_path / "shared"
    cfg = data_cfg(dataset, cache_dir=str(shared))
    check_data(cfg, tiny_processor, output_dir=tmp_path / "job0")
    measure_calls.clear()
    monkeypatch.setenv("RANK", "1")
    later = check_data(cfg, tiny_processor, output_dir=tmp_path / "job1")
    assert measure_calls == [] and later.report.cache.startswith(f"data check read from {shared}")


def test_a_new_run_reads_the_entry_an_earlier_run_stored(tiny_processor, dataset, tmp_path, measure_calls):
    """The cache is the user's, not the run's: a second run with a fresh run folder measures nothing."""
    cfg = data_cfg(dataset, eval_size=2)
    first = check_data(cfg, tiny_processor, batch_size=2, output_dir=tmp_path / "run1")
    measure_calls.clear()
    later = check_data(cfg, tiny_processor, batch_size=2, output_dir=tmp_path / "run2")
    assert measure_calls == [] and later.report.cache.startswith(f"data check read from {user_cache()}")
    assert later.report.summary() == first.report.summary()
    assert not any((tmp_path / run / "data_cache").exists() for run in ("run1", "run2"))


def test_data_check_then_train_measures_once(tmp_path, measure_calls):
    from qwenvl_ft.commands.cli import main
    from qwenvl_ft.config.compose import compose, validate
    from qwenvl_ft.modeling.build import build_processor

    write_image(tmp_path / "a.png", size=(56, 56))
    path = write_jsonl(tmp_path / "t.jsonl", [llava("a.png", answer="word " * (i + 1)) for i in range(4)])
    common = ["recipe=demo", "data=llava", f"data.path={path}"]
    assert main(["data-check", *common, f"hydra.run.dir={tmp_path / 'check'}"]) == 0
    assert len(measure_calls) == 4
    measure_calls.clear()
    typed = validate(compose(common, output_dir=str(tmp_path / "run")))
    processor = build_processor(typed.model, typed.data)  # as `train` builds it (the random model's own path)
    _, _, report = load_checked_splits(typed.data, processor, batch_size=2, output_dir=tmp_path / "run")
    assert measure_calls == [] and report.cache.startswith(f"data check read from {user_cache()}")


def test_where_the_cache_lives(dataset, tmp_path, monkeypatch):
    from qwenvl_ft.data.cache import cache_root

    run = tmp_path / "run"
    cfg = data_cfg(dataset)
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    assert cache_root(cfg, run) == user_cache()
    assert cache_root(data_cfg(dataset, cache_dir=str(tmp_path / "mine")), run) == tmp_path / "mine"
    assert cache_root(data_cfg(dataset, cache=CacheMode.off), run) is None
    monkeypatch.delenv("QWENVL_FT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root(cfg, run) == tmp_path / "home" / ".cache" / "qwenvl_ft" / "data"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root(cfg, run) == tmp_path / "xdg" / "qwenvl_ft" / "data"
    # ranks on one machine share the user's cache ...
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert cache_root(cfg, run) == tmp_path / "xdg" / "qwenvl_ft" / "data"
    # ... a launch over several machines keeps the run folder, which they all see (a home folder may not be shared)
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert cache_root(cfg, run) == run / "data_cache"
    monkeypatch.delenv("LOCAL_WORLD_SIZE")  # machines unknown: the run folder too
    assert cache_root(cfg, run) == run / "data_cache"


def test_a_launch_over_several_machines_stores_and_reads_in_the_run_folder(tiny_processor, dataset, tmp_path,
                                                                          measure_calls, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    run = tmp_path / "run"
    first = check_data(data_cfg(dataset), tiny_processor, output_dir=run)
    assert f"stored in {run / 'data_cache'}" in first.report.cache and not user_cache().exists()
    measure_calls.clear()
    monkeypatch.setenv("RANK", "2")  # a rank of the second machine
    later = check_data(data_cfg(dataset), tiny_processor, output_dir=run)
    assert measure_calls == [] and later.report.cache.startswith(f"data check read from {run / 'data_cache'}")


def test_the_estimate_uses_the_measured_lengths(tiny_processor, tmp_path, capsys):
    from qwenvl_ft.commands.cli import main
    from qwenvl_ft.config.compose import compose, validate

    write_image(tmp_path / "a.png", size=(56, 56))
    path = write_jsonl(tmp_path / "t.jsonl", [llava("a.png") for _ in range(4)])
    common = ["recipe=demo", "data=llava", f"data.path={path}"]
    typed = validate(compose(common, output_dir=str(tmp_path / "run")))
    load_checked_splits(typed.data, tiny_processor, batch_size=2, output_dir=tmp_path / "run")  # as training does
    assert main(["estimate", *common, f"hydra.run.dir={tmp_path / 'run'}"]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "run" / "data_check.json").read_text())
    longest = int(report["summary"]["train"]["sequence_length"]["max"])
    assert f"with the measured data ({tmp_path / 'run' / 'data_check.json'}): longest row {longest} tokens" in out
    assert "predicted peak (measured)" in out


def test_the_check_shows_progress_on_a_terminal_only(tiny_processor, dataset, capsys, monkeypatch):
    check_data(data_cfg(dataset), tiny_processor)
    assert "data check" not in capsys.readouterr().err  # stderr redirected (a log, CI): no bar
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    check_data(data_cfg(dataset, cache=CacheMode.off), tiny_processor)
    assert "data check" in capsys.readouterr().err


@pytest.mark.parametrize("trainer", ["dpo", "grpo"])
def test_pairs_and_prompts_are_stored_measured_once_and_cached_too(tiny_processor, tmp_path, monkeypatch, trainer):
    """Each method's own rows go through the same store and cache, keyed by the method, with its own measurer."""
    from qwenvl_ft import methods
    from qwenvl_ft.data.kinds import rows_of

    write_image(tmp_path / "a.png", size=(56, 56))
    if trainer == "dpo":
        fmt, records = "llava_preference", [{"image": "a.png", "prompt": f"<image>\nq{i}", "chosen": "yes " * (i + 1),
                                             "rejected": "no"} for i in range(6)]
    else:
        fmt, records = "llava_prompt", [{"image": "a.png", "prompt": f"<image>\nq{i}", "solution": str(i),
                                         "difficulty": i % 3} for i in range(6)]
    path = write_jsonl(tmp_path / "rows.jsonl", records)
    method = rows_of(methods.get(trainer))
    calls = []
    original = method.measurer

    def counted(processor, cfg):
        measure = original(processor, cfg)
        return lambda row: calls.append(row["source"]) or measure(row)

    monkeypatch.setattr(type(method), "measurer", lambda self, processor, cfg: counted(processor, cfg))
    cfg = data_cfg(path, format=fmt, eval_size=1)
    train, held_out, report = load_checked_splits(cfg, tiny_processor, batch_size=2, output_dir=tmp_path / "run")
    assert len(calls) == 6 and len(train) == 5 and len(held_out) == 1
    assert report.settings["method"] == trainer and "stored in" in report.cache
    entry, = user_cache().iterdir()
    assert entry.name.startswith(f"{trainer}-")
    calls.clear()
    again, _, report = load_checked_splits(cfg, tiny_processor, batch_size=2, output_dir=tmp_path / "run")
    assert calls == [] and "data check read from" in report.cache
    first = again[0]
    assert "text_ids" not in again.column_names  # their measurers carry no text: no column for the collator
    if trainer == "dpo":  # the stored pair is what the collator takes, with its measured length
        assert first["length"] == report.splits["train"].stats.column("length")[0]
        assert method.collator(tiny_processor, cfg)([again[0], again[1]])["input_ids"].shape[0] == 4
    else:  # the row's other columns come back with their types, for the reward functions
        assert isinstance(first["difficulty"], int) and first["solution"].isdigit()
        assert "difficulty" in again.column_names and "length" not in again.column_names
