"""Tier 1: `qwenvl-ft data-check` and the check training runs first: every bad row reported once with its file,
row, field and reason, no traceback, status 2 unless data.skip_invalid; the numbers in the report are right."""

import json

import pytest
from PIL import Image

from qwenvl_ft.commands.cli import main
from qwenvl_ft.data.check import check_data, expected_padding, load_checked_splits
from qwenvl_ft.errors import DataError

from data_helpers import data_cfg, llava, write_image, write_jsonl


def _bad_dataset(tmp_path):
    """Good rows in every image mode, and one row for each way a row can be bad. Returns (path, expected
    (line, fragment) pairs)."""
    write_image(tmp_path / "ok.jpg", size=(100, 80))
    write_image(tmp_path / "grey.png", mode="L", colour=90)
    write_image(tmp_path / "alpha.png", mode="RGBA", colour=(0, 0, 255, 128))
    write_image(tmp_path / "cmyk.jpg", mode="CMYK", colour=(0, 255, 255, 0))
    Image.new("P", (30, 30), 3).save(tmp_path / "palette.png")
    Image.new("I;16", (30, 30), 40000).save(tmp_path / "deep.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("not an image")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "ok.jpg").read_bytes()[:200])
    write_image(tmp_path / "huge.png", size=(3000, 2000))
    write_image(tmp_path / "thin.png", size=(2010, 10))
    good = [llava(name) for name in ("ok.jpg", "grey.png", "alpha.png", "cmyk.jpg", "palette.png", "deep.png")]
    good.append(llava(None, question="Text only"))
    bad = [
        (llava("missing.jpg"), "image file", "missing.jpg not found"),
        (llava("empty.jpg"), "images[0]", "empty (0-byte) file"),
        (llava("notes.jpg"), "images[0]", "cannot be decoded (UnidentifiedImageError"),
        (llava("cut.jpg"), "images[0]", "cut.jpg cannot be decoded"),
        (llava("huge.png"), "images[0]", "decompression-bomb guard"),
        (llava("thin.png"), "images[0]", "aspect ratio of 201:1"),
        (llava(["ok.jpg", "ok.jpg"]), "field 'images'", "1 image placeholder(s) in the text but 2 image(s)"),
        ({"conversations": [{"from": "human", "value": "A"}, {"from": "human", "value": "B"}]}, "turn 1",
         "must alternate"),
        ({"conversations": [{"from": "human", "value": "A"}, {"from": "gpt", "value": "B"},
                            {"from": "human", "value": "C"}]}, "", "ends on a user turn"),
        (llava(None, answer=""), "messages[1]", "the assistant text is empty"),
        ('{"conversations": [', "", "invalid JSON"),
        ({"conversations": [{"from": "bot", "value": "A"}, {"from": "gpt", "value": "B"}]}, "field 'from'",
         "unknown role 'bot'"),
    ]
    lines = [json.dumps(r) for r in good] + [r if isinstance(r, str) else json.dumps(r) for r, _, _ in bad]
    raw = "\n".join(lines).encode() + b'\n{"conversations": [{"from": "human", "value": "caf\xe9"}]}\n'
    (tmp_path / "train.jsonl").write_bytes(raw)
    expected = [(len(good) + i + 1, f"{field}", fragment) for i, (_, field, fragment) in enumerate(bad)]
    expected.append((len(good) + len(bad) + 1, "", "not valid UTF-8"))
    return tmp_path / "train.jsonl", expected


def test_check_reports_every_bad_row_and_keeps_the_good_ones(tiny_processor, tmp_path):
    path, expected = _bad_dataset(tmp_path)
    checked = check_data(data_cfg(path, max_image_pixels=5_000_000), tiny_processor, batch_size=2)
    report = checked.report
    assert len(checked.train) == 7 and report.splits["train"].rows == 7 + 6
    assert len(report.problems) == len(expected)
    for problem, (line, field, fragment) in zip(report.problems, expected):  # in file order
        assert problem.source == f"{path}:line {line}"
        assert problem.message.startswith(problem.source) and field in problem.message \
            and fragment in problem.message, problem.message
    stats = report.splits["train"].stats
    assert sorted(s.image_sizes[0] for s in stats if s.image_sizes)[-1] == (100, 80)
    assert sum(1 for s in stats if not s.image_tokens) == 1  # the text-only row
    text = report.text()
    for fragment in ("rows: 20 read, 13 invalid", "visual tokens per image", "sequence length", "padding:",
                     "invalid rows (13):", "most common image sizes: 64x48 (3), 30x30 (2), 100x80 (1)"):
        assert fragment in text, fragment
    summary = report.summary()
    assert summary["invalid_rows"] == 13 and summary["train"]["images"] == 6
    with pytest.raises(DataError, match=r"13 invalid row\(s\):\n  .*line 8: images\[0\]: image file") as info:
        raise report.error()
    assert "set data.skip_invalid=true" in str(info.value)


def test_overlength_rows_are_counted_truncated_or_dropped(tiny_processor, tmp_path):
    write_image(tmp_path / "ok.jpg", size=(56, 56))
    long = " ".join(["word"] * 60)
    write_jsonl(tmp_path / "t.jsonl", [llava("ok.jpg"), llava("ok.jpg", answer=long),
                                       llava("ok.jpg", question=long, answer="x")])
    cut = check_data(data_cfg(tmp_path / "t.jsonl", max_length=48), tiny_processor).report
    assert cut.splits["train"].truncated == 1 and len(cut.splits["train"].dropped) == 1
    assert "every assistant token" in cut.splits["train"].dropped[0].message and not cut.problems
    assert max(s.length for s in cut.splits["train"].stats) == 48
    dropped = check_data(data_cfg(tmp_path / "t.jsonl", max_length=48, overlength="drop"), tiny_processor)
    assert len(dropped.train) == 1 and len(dropped.report.splits["train"].dropped) == 2
    strict = check_data(data_cfg(tmp_path / "t.jsonl", max_length=48, overlength="error"), tiny_processor)
    assert len(strict.report.problems) == 2 and "data.overlength=error" in strict.report.problems[0].message


def test_workers_give_the_same_report(tiny_processor, tmp_path):
    path, _ = _bad_dataset(tmp_path)
    cfg = dict(max_image_pixels=5_000_000)
    alone = check_data(data_cfg(path, **cfg), tiny_processor).report
    pooled = check_data(data_cfg(path, num_workers=2, **cfg), tiny_processor).report
    assert [p.message for p in pooled.problems] == [p.message for p in alone.problems]
    assert [s.length for s in pooled.splits["train"].stats] == [s.length for s in alone.splits["train"].stats]


def test_expected_padding():
    cfg = data_cfg(format="shapes")
    assert expected_padding([10, 10, 10, 10], cfg, 2, seed=0)[0] == 0.0
    fraction, layout = expected_padding([10, 30], cfg, 2, seed=0)
    assert fraction == pytest.approx(1 - 40 / 60) and layout == "random batches of 2"
    assert expected_padding([10, 30], cfg, 1, seed=0)[0] == 0.0


def test_train_refuses_invalid_data_before_loading_the_model(tmp_path, monkeypatch):
    from qwenvl_ft.config.compose import compose
    from qwenvl_ft.commands.train import train

    path, _ = _bad_dataset(tmp_path)

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr("qwenvl_ft.modeling.build.build_base_model", must_not_load)
    cfg = compose(["recipe=demo", "data=llava", f"data.path={path}", "data.max_image_pixels=5000000"],
                  output_dir=str(tmp_path / "run"))
    with pytest.raises(DataError, match=r"13 invalid row\(s\):") as info:
        train(cfg)
    assert f"{path}:line 8: images[0]: image file" in str(info.value)
    assert (tmp_path / "run" / "data_check.json").exists()


def test_load_checked_splits_with_skip_invalid(tiny_processor, tmp_path, caplog):
    path, _ = _bad_dataset(tmp_path)
    cfg = data_cfg(path, skip_invalid=True, eval_size=2, max_image_pixels=5_000_000)
    train, held_out, report = load_checked_splits(cfg, tiny_processor, batch_size=2)
    assert len(train) + len(held_out) == 7 and len(report.problems) == 13
    assert "13 invalid row(s) left out" in caplog.text
    assert set(train.column_names) >= {"messages", "images", "videos", "source"}


# ----------------------------------------------------------------------------------------------------------------
# the command


def test_data_check_command_fails_with_one_line_per_bad_row(tmp_path, capsys):
    path, expected = _bad_dataset(tmp_path)
    status = main(["data-check", "data=llava", f"data.path={path}", "data.max_image_pixels=5000000",
                   f"hydra.run.dir={tmp_path / 'run'}"])
    out, err = capsys.readouterr()
    assert status == 2
    assert "Traceback" not in err and "Traceback" not in out
    for line, field, fragment in expected:
        assert f"{path}:line {line}: " in out and fragment in out, fragment
    assert "rows: 20 read, 13 invalid" in out and "sequence length" in out
    assert "13 invalid row(s), listed above and in " in err and "data.skip_invalid=true" in err
    report = json.loads((tmp_path / "run" / "data_check.json").read_text())
    assert len(report["problems"]) == 13 and report["summary"]["train"]["rows_kept"] == 7


def test_data_check_command_passes_with_skip_invalid_and_on_clean_data(tmp_path, capsys):
    path, _ = _bad_dataset(tmp_path)
    status = main(["data-check", "data=llava", f"data.path={path}", "data.skip_invalid=true",
                   "data.max_image_pixels=5000000", f"hydra.run.dir={tmp_path / 'skip'}"])
    out, err = capsys.readouterr()
    assert status == 0 and "13 invalid row(s) would be left out" in out
    clean = write_jsonl(tmp_path / "clean.jsonl", [llava("ok.jpg"), llava(None, question="Hi")])
    status = main(["data-check", "data=llava", f"data.path={clean}", "data.eval_size=1",
                   f"hydra.run.dir={tmp_path / 'clean'}"])
    out, err = capsys.readouterr()
    assert status == 0 and "rows: 2 read, 0 invalid; train: 1 kept" in out and "eval: 1 kept" in out


def test_data_check_command_on_a_missing_file(tmp_path, capsys):
    status = main(["data-check", "data=llava", f"data.path={tmp_path / 'nope.jsonl'}",
                   f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert status == 2 and f"{tmp_path / 'nope.jsonl'}: data file not found" in err and "Traceback" not in err


@pytest.mark.slow
def test_training_with_skip_invalid_on_images_videos_and_text(tmp_path):
    from qwenvl_ft.config.compose import compose
    from qwenvl_ft.commands.train import train

    from data_helpers import write_video

    write_image(tmp_path / "a.jpg", size=(60, 40))
    write_video(tmp_path / "clip.mp4", frames=8, fps=4)
    rows = [llava("a.jpg"), llava(None, question="<video>\nWhat happens?", video="clip.mp4"),
            llava(None, question="Just text"), llava("a.jpg", answer="Red."), llava("missing.jpg"),
            llava(None, answer="")] * 2
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    cfg = compose(["recipe=demo", "data=llava", f"data.path={path}", "data.skip_invalid=true",
                   "data.video_min_pixels=784", "data.video_max_pixels=3136", "trainer.max_steps=2",
                   "trainer.batch_size=4", "trainer.eval_generation=false", "trainer.disable_tqdm=true",
                   "trainer.report_to=[none]"], output_dir=str(tmp_path / "run"))
    metrics = train(cfg)
    assert metrics["global_step"] == 2
    report = json.loads((tmp_path / "run" / "data_check.json").read_text())
    assert len(report["problems"]) == 4 and report["summary"]["train"]["videos"] == 2


def test_data_check_names_pairs_that_cannot_teach_and_text_that_is_not_utf8(tmp_path, capsys):
    """A preference pair whose answers are the same, and a Latin-1 CSV: named with file and line; data.encoding
    reads the CSV."""
    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.png")
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"image": "a.png", "prompt": "<image>\nWhat is it?", "chosen": "a red square", "rejected": "a blue square"},
        {"image": "a.png", "prompt": "<image>\nWhat is it?", "chosen": "a red square", "rejected": "a red square"}])
    status = main(["data-check", "recipe=dpo_demo", "data=llava_preference", f"data.path={pairs}",
                   f"hydra.run.dir={tmp_path / 'pairs'}"])
    out, err = capsys.readouterr()
    assert status == 2 and "Traceback" not in out + err
    assert f"{pairs}:line 2: fields 'chosen' and 'rejected' are the same answer ('a red square')" in out
    table = 'image,question,answer\na.png,"Qu\'est-ce?","Un carr\u00e9 rouge."\n'.encode("latin-1")
    (tmp_path / "t.csv").write_bytes(table)
    command = ["data-check", "data=columns", f"data.path={tmp_path / 't.csv'}"]
    status = main(command + [f"hydra.run.dir={tmp_path / 'csv'}"])
    out, err = capsys.readouterr()
    assert status == 2 and "Traceback" not in out + err
    assert f"{tmp_path / 't.csv'}:line 2: text is not valid UTF-8 (byte 0xe9 at byte offset {table.index(233)})" \
           in err and "data.encoding" in err
    assert main(command + ["data.encoding=latin-1", f"hydra.run.dir={tmp_path / 'csv2'}"]) == 0
    assert "rows: 1 read, 0 invalid" in capsys.readouterr().out
