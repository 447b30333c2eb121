"""data/grounding.py: a row's objects read from any record, checked with the file, row and field, and written where
its text says <objects> in the trained family's convention for the size each image is shown at."""

import pytest

from qwenvl_ft.config.data import BoxCoords, GroundingConfig
from qwenvl_ft.data.check import check_data
from qwenvl_ft.data.grounding import read_objects
from qwenvl_ft.errors import DataError

from data_helpers import data_cfg, llava, write_image, write_jsonl


def grounded(image, objects, answer="<objects>", **extra):
    return llava(image, question="Where is the cat?", answer=answer, objects=objects, **extra)


def test_data_check_names_every_bad_box_and_reports_the_boxes(tiny_processor, tmp_path):
    write_image(tmp_path / "cat.jpg", size=(200, 100))
    good = [grounded("cat.jpg", [{"label": "cat", "bbox": [10, 20, 110, 90]}]),
            grounded("cat.jpg", [{"label": "cat", "bbox": [0, 0, 200, 100]}, {"label": "eye", "point": [50, 40]}]),
            grounded("cat.jpg", [{"bbox": [100, 50, 102, 52]}]),  # valid, but under one patch once resized
            grounded("cat.jpg", '[{"label": "cat", "bbox": [5, 5, 50, 50]}]')]  # JSON text (a CSV column)
    bad = [
        (grounded("cat.jpg", [{"label": "cat", "bbox": [10, 20, 300, 90]}]), "objects[0]", "lies outside its image"),
        (grounded("cat.jpg", [{"bbox": [110, 20, 10, 90]}]), "objects[0].bbox", "is inverted"),
        (grounded("cat.jpg", [{"bbox": [10, 20, 10, 90]}]), "objects[0].bbox", "empty (no area)"),
        (grounded("cat.jpg", [{"bbox": [0.1, 0.2, 0.5, 0.9]}]), "objects[0].bbox", "looks relative"),
        (grounded("cat.jpg", [{"bbox": [1, 2, 3]}]), "objects[0].bbox", "must be 4 finite numbers"),
        (grounded("cat.jpg", [{"bbox": [1, 2, 3, 4], "point": [1, 2]}]), "objects[0]", "exactly one of bbox"),
        (grounded("cat.jpg", [{"bbox": [1, 2, 3, 4], "image": 1}]), "objects[0].image", "one of the row's 1"),
        (grounded("cat.jpg", {"cat": 1}), "field 'objects'", "must be a list of objects"),
        (grounded("cat.jpg", [{"bbox": [1, 2, 30, 40]}], answer="a cat"), "field 'objects'",
         "no message says <objects>"),
    ]
    path = write_jsonl(tmp_path / "boxes.jsonl", good + [row for row, _, _ in bad])
    report = check_data(data_cfg(path), tiny_processor).report
    assert len(report.problems) == len(bad)
    for problem, (index, (_, field, fragment)) in zip(report.problems, enumerate(bad, start=len(good) + 1)):
        assert problem.source == f"{path}:line {index}" and field in problem.message \
            and fragment in problem.message, problem.message
    text = report.text()
    assert "boxes: 4 in 4 rows" in text
    assert f"boxes under data.grounding.min_box_patches=1 patch once resized: 1 rows ({path}:line 3)" in text
    assert report.summary()["train"]["boxes"] == 4


def test_relative_coordinates_over_one_are_refused():
    cfg = GroundingConfig(coords=BoxCoords.relative)
    with pytest.raises(DataError, match=r"t:1: field 'objects\[0\].bbox' .* values over 1.*coords=pixels"):
        read_objects({"objects": [{"bbox": [10, 20, 30, 40]}]}, "t:1", cfg, images=1)
    assert read_objects({"objects": [{"bbox": [0.1, 0.2, 0.3, 0.4]}]}, "t:1", cfg, images=1)[0]["values"] == \
        [0.1, 0.2, 0.3, 0.4]
    assert read_objects({"other": 1}, "t:1", cfg, images=1) is None


def test_ms_swift_objects_are_read():
    objects = read_objects({"objects": {"ref": ["cat", "dog"], "bbox": [[1, 2, 30, 40], [5, 6, 70, 80]]}}, "t:1",
                           GroundingConfig(), images=1)
    assert [(o["label"], o["values"]) for o in objects] == [("cat", [1, 2, 30, 40]), ("dog", [5, 6, 70, 80])]


@pytest.mark.parametrize("max_pixels", [56 * 56, 112 * 112])
def test_resized_pixel_families_follow_the_resize(processor_of, max_pixels, tmp_path):
    """Qwen2.5-VL writes pixels of the image as shown: the numbers change with data.max_pixels, the box they mean
    does not."""
    from qwenvl_ft.config.compose import compose, validate
    from qwenvl_ft.data.collate import VisionChatCollator
    from qwenvl_ft.modeling.build import build_processor

    write_image(tmp_path / "cat.jpg", size=(224, 112))
    typed = validate(compose(["recipe=demo", "model=tiny_qwen2_5_vl", "data.format=llava",
                              f"data.path={tmp_path / 'x.jsonl'}", f"data.max_pixels={max_pixels}",
                              "data.max_length=null"], output_dir=str(tmp_path)))
    collator = VisionChatCollator(build_processor(typed.model, typed.data), typed.data)
    row = {"messages": [{"role": "user", "content": [{"type": "image", "text": None},
                                                     {"type": "text", "text": "Where?"}]},
                        {"role": "assistant", "content": [{"type": "text", "text": "<objects>"}]}],
           "images": [str(tmp_path / "cat.jpg")], "videos": [], "source": "t:1",
           "objects": [{"label": "cat", "values": [56.0, 28.0, 168.0, 84.0], "image": 0}]}
    height, width = collator.image_hw(224, 112, "t:1")
    sx, sy = width / 224, height / 112
    want = f'{{"bbox_2d": [{round(56 * sx)}, {round(28 * sy)}, {round(168 * sx)}, {round(84 * sy)}], "label": "cat"}}'
    assert want in collator.reference(row)
    text = collator.tokenizer.decode(collator.encode(row)["input_ids"])
    assert want in text


def test_grpo_prompt_rows_get_their_objects_as_the_solution(processor_of):
    """A grounding prompt row's solution is its objects in the family's convention for the image as shown, in the
    batches TRL gets (PromptImages) and in the held-out checks (with_solutions); a completion repeating it scores
    IoU 1."""
    from qwenvl_ft.config.data import ShapesConfig, ShapesTask
    from qwenvl_ft.data.prompts import PromptImages, generate_prompts, with_solutions
    from qwenvl_ft.rewards.boxes import iou_reward

    train, _ = generate_prompts(ShapesConfig(num_train=3, num_eval=0, image_size=84, task=ShapesTask.grounding))
    assert all(row["solution"] is None and row["objects"] for row in train)
    cfg = data_cfg(format="shapes_prompt", max_length=None)
    batch = PromptImages(processor_of("tiny"), cfg)(train)
    held_out = with_solutions(train, processor_of("tiny"), cfg)
    assert [row["solution"] for row in batch] == [row["solution"] for row in held_out]
    assert all(row["solution"].startswith("<|box_start|>(") for row in batch)  # Qwen2-VL's box tokens
    completions = [[{"role": "assistant", "content": row["solution"]}] for row in batch]
    assert iou_reward(completions=completions, solution=[row["solution"] for row in batch]) == [1.0, 1.0, 1.0]
