"""Tier 1: several data files in one run (data.sources): each read, checked and reported on its own, held-out rows
taken from each, the training rows concatenated or drawn by weight, the mixture reported; the same for preference
pairs and GRPO prompts; .tsv files; duplicate ids reported, dropped or refused as data.on_duplicate_id says."""

import json
from collections import Counter

import pytest

from qwenvl_ft.config.data import DataConfig, DataFormat, DuplicateIds, SourceConfig
from qwenvl_ft.data.check import check_data
from qwenvl_ft.data.kinds import rows_of
from qwenvl_ft.errors import ConfigError
from qwenvl_ft.errors import DataError

from data_helpers import llava, write_image, write_jsonl


def _source_file(folder, name, count, bad=0, answer="x"):
    write_image(folder / "a.png", size=(56, 56))
    rows = [llava("a.png", answer=f"{answer} {i}", id=f"{name}-{i}") for i in range(count)]
    rows += [llava("missing.png", id=f"{name}-bad-{i}") for i in range(bad)]
    return write_jsonl(folder / f"{name}.jsonl", rows)


def _cfg(sources, **overrides):
    return DataConfig(format=DataFormat.llava, sources=[SourceConfig(**s) for s in sources], **overrides)


def _origins(rows, *names):
    counts = Counter(row["source"].rsplit(":", 1)[0] for row in rows)
    return [counts[name] for name in names]


def test_sources_are_checked_held_out_and_concatenated_each_on_its_own(tiny_processor, tmp_path):
    general = _source_file(tmp_path, "general", 20, bad=2)
    domain = _source_file(tmp_path, "domain", 8)
    cfg = _cfg([{"path": str(general)}, {"path": str(domain), "max_rows": 6}], eval_size=0.25, skip_invalid=True)
    checked = check_data(cfg, tiny_processor, batch_size=2)
    report = checked.report
    by_name = {s.name: s for s in report.sources}
    # general: 22 rows, 2 invalid (missing image), 6 of 22 held out (a quarter, rounded); domain: 6 of 8 read
    assert (by_name[str(general)].read, by_name[str(general)].invalid, by_name[str(general)].held_out) == (22, 2, 6)
    assert (by_name[str(domain)].held_out, by_name[str(domain)].train_rows) == (2, 4)
    held = _origins([checked.eval[i] for i in range(len(checked.eval))], str(general), str(domain))
    assert held[1] == 2 and held[0] + by_name[str(general)].train_rows == 20  # the 20 valid rows of general
    train = [checked.train[i] for i in range(len(checked.train))]
    assert sum(_origins(train, str(general), str(domain))) == len(train) == by_name[str(general)].train_rows + 4
    text = report.text()
    assert f"  {general}: 22 read, 2 invalid, 0 dropped, 6 held out" in text
    assert "mixture: 2 sources concatenated" in text and f"  {domain}: 4 rows" in text


def test_weights_draw_the_training_rows_in_proportion_and_repeat_a_small_source(tiny_processor, tmp_path):
    general = _source_file(tmp_path, "general", 30)
    domain = _source_file(tmp_path, "domain", 5, answer="y")
    sources = [{"path": str(general), "weight": 0.5}, {"path": str(domain), "weight": 0.5}]
    # no repeats: as many rows as the smaller share allows (5 + 5)
    checked = check_data(_cfg(sources), tiny_processor)
    train = [checked.train[i] for i in range(len(checked.train))]
    assert _origins(train, str(general), str(domain)) == [5, 5]
    assert [(s.drawn, s.available) for s in checked.report.mixture.shares] == [(5, 30), (5, 5)]
    # 40 rows asked for: 20 each, the domain rows four times over
    checked = check_data(_cfg(sources, mixture_rows=40), tiny_processor)
    train = [checked.train[i] for i in range(len(checked.train))]
    assert _origins(train, str(general), str(domain)) == [20, 20]
    assert max(Counter(r["source"] for r in train if r["source"].startswith(str(domain))).values()) == 4
    lines = "\n".join(checked.report.mixture.lines())
    assert "interleaved by weight, 40 training rows" in lines and "of 5, each row x4.00" in lines
    assert checked.report.summary()["mixture"]["sources"][1]["share"] == 0.5


def test_source_settings_are_checked_when_the_config_is_composed():
    with pytest.raises(ConfigError, match="give every source a weight"):
        _cfg([{"path": "a.jsonl", "weight": 1.0}, {"path": "b.jsonl"}])
    with pytest.raises(ConfigError, match="data.path and data.sources are alternatives"):
        _cfg([{"path": "a.jsonl"}], path="b.jsonl")
    with pytest.raises(ConfigError, match=r"data.sources\[1\].format=llava_preference"):
        _cfg([{"path": "a.jsonl"}, {"path": "b.jsonl", "format": DataFormat.llava_preference}])
    with pytest.raises(ConfigError, match="data.mixture_rows .* needs weights"):
        _cfg([{"path": "a.jsonl"}], mixture_rows=10)


def test_sources_from_the_command_line_and_a_tsv_file(tmp_path, capsys):
    from qwenvl_ft.commands.cli import main

    general = _source_file(tmp_path, "general", 6)
    write_image(tmp_path / "a.png", size=(56, 56))
    (tmp_path / "domain.tsv").write_text("image\tquestion\tanswer\n" +
                                         "".join(f"a.png\tWhat, here?\tred {i}\n" for i in range(4)))
    status = main(["data-check", "data=llava", f"data.sources=[{{path: {general}}}, {{path: {tmp_path / 'domain.tsv'}, "
                   f"format: columns}}]", f"hydra.run.dir={tmp_path / 'run'}"])
    out = capsys.readouterr().out
    assert status == 0 and "rows: 10 read, 0 invalid" in out and f"  {tmp_path / 'domain.tsv'}: 4 read" in out


@pytest.mark.parametrize("kind", ["pairs", "prompts"])
def test_preference_pairs_and_prompts_mix_the_same_way(tiny_processor, tmp_path, kind):
    """DPO pairs and GRPO prompts: the same sources, weights and report, read as lists (the method's reader) and
    through the data check's store."""
    write_image(tmp_path / "a.png", size=(56, 56))
    for name, count in (("p1", 6), ("p2", 2)):
        rows = [{"image": "a.png", "prompt": "<image>\nWhat?", **({"chosen": f"{name} yes {i}", "rejected": "no"}
                                                                 if kind == "pairs" else {"solution": f"{name} {i}"})}
                for i in range(count)]
        (tmp_path / f"{name}.json").write_text(json.dumps(rows))
    fmt = DataFormat.llava_preference if kind == "pairs" else DataFormat.llava_prompt
    cfg = DataConfig(format=fmt, sources=[
        SourceConfig(path=str(tmp_path / "p1.json"), weight=3.0), SourceConfig(path=str(tmp_path / "p2.json"),
                                                                              weight=1.0)])
    expected = {str(tmp_path / "p1.json"): 6, str(tmp_path / "p2.json"): 2}
    train, held_out = rows_of(fmt.method).read_rows(cfg)
    assert held_out == [] and Counter(row["source"].rsplit(":", 1)[0] for row in train) == expected
    checked = check_data(cfg, tiny_processor)
    stored = Counter(checked.train[i]["source"].rsplit(":", 1)[0] for i in range(len(checked.train)))
    assert stored == expected and checked.report.settings["method"] == ("dpo" if kind == "pairs" else "grpo")
    assert "mixture" in checked.report.summary() and f"  {tmp_path / 'p2.json'}: 2 read" in checked.report.text()


@pytest.mark.parametrize("policy", ["warn", "drop", "error"])
def test_duplicate_ids_are_reported_with_their_lines(tiny_processor, tmp_path, policy):
    write_image(tmp_path / "a.png", size=(56, 56))
    rows = [llava("a.png", answer=f"a {i}", id=i % 4) for i in range(6)]  # ids 0 and 1 twice
    path = write_jsonl(tmp_path / "dup.jsonl", rows)
    cfg = DataConfig(format=DataFormat.llava, path=str(path), on_duplicate_id=DuplicateIds(policy))
    checked = check_data(cfg, tiny_processor)
    report = checked.report
    assert [d.message() for d in report.duplicates] == [f"id '0': {path}:line 1, and again at {path}:line 5",
                                                       f"id '1': {path}:line 2, and again at {path}:line 6"]
    assert f"duplicate ids (2, data.on_duplicate_id={policy}" in report.text()
    kept = {"warn": 6, "drop": 4, "error": 4}[policy]
    assert len(checked.train) == kept
    invalid = [p.message for p in report.problems]
    assert invalid == ([] if policy != "error" else [
        f"{path}:line 5: duplicate id '0', first at {path}:line 1 (data.on_duplicate_id=error; 'drop' keeps the "
        f"first, 'warn' keeps both)",
        f"{path}:line 6: duplicate id '1', first at {path}:line 2 (data.on_duplicate_id=error; 'drop' keeps the "
        f"first, 'warn' keeps both)"])


def test_duplicate_ids_of_pairs_without_the_check(tmp_path, caplog):
    from qwenvl_ft.data.preference import load_pair_splits

    write_image(tmp_path / "a.png", size=(56, 56))
    (tmp_path / "p.json").write_text(json.dumps(
        [{"id": "same", "image": "a.png", "prompt": "<image>\nQ?", "chosen": "y", "rejected": "n"}] * 2))
    load_pair_splits(DataConfig(format=DataFormat.llava_preference, path=str(tmp_path / "p.json")))
    assert f"id 'same': {tmp_path / 'p.json'}:row 0, and again at {tmp_path / 'p.json'}:row 1" in caplog.text
    with pytest.raises(DataError, match="duplicate id 'same'"):
        load_pair_splits(DataConfig(format=DataFormat.llava_preference, path=str(tmp_path / "p.json"),
                                    on_duplicate_id=DuplicateIds.error))
