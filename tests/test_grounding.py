"""qwenvl_ft/grounding: each family's box convention through every resize the run applies (the sizes come from the
collator that shows the model its images), the answer text both ways, and the geometry."""

import math

import pytest
from PIL import Image

from qwenvl_ft import families
from qwenvl_ft.grounding import coords
from qwenvl_ft.grounding.convention import BoxConvention
from qwenvl_ft.grounding.geometry import iou, matched_iou, point_in_box, well_formed
from qwenvl_ft.grounding.text import Mark, parse, write
from data_helpers import assistant, user
from family_models import TEST_MODELS, family_of_option

# (width, height) of original images, with data settings: the default bounds, a small max_pixels, a fixed size,
# an extreme aspect ratio, and an image under min_pixels (scaled up).
RESIZES = [
    ((640, 480), {}),
    ((1280, 720), {"max_pixels": 64 * 64}),
    ((500, 333), {"resized_height": 112, "resized_width": 224}),
    ((3000, 40), {}),
    ((12, 9), {}),
]


_BUILT = {}


def run_parts(option, settings):
    """(processor, collator) as a run with these data settings builds them: the processor gets the run's bounds
    (build_processor), the collator reads them from it."""
    from qwenvl_ft.config.compose import compose, validate
    from qwenvl_ft.data.collate import VisionChatCollator
    from qwenvl_ft.modeling.build import build_processor

    key = (option, tuple(sorted(settings.items())))
    if key not in _BUILT:
        overrides = [f"data.{name}={value}" for name, value in settings.items()]
        typed = validate(compose(["recipe=demo", f"model={option}", "data.max_length=null", *overrides],
                                 output_dir="/tmp/unused"))
        processor = build_processor(typed.model, typed.data)
        _BUILT[key] = processor, VisionChatCollator(processor, typed.data)
    return _BUILT[key]


def resized_size(collator, original):
    height, width = collator.image_hw(*original, where="test")
    return width, height


def boxes_in(original):
    width, height = original
    return [(0, 0, width, height), (width * 0.1, height * 0.2, width * 0.55, height * 0.9),
            (width / 3, height / 7, width / 3 + max(width / 50, 1), height / 7 + max(height / 50, 1))]


@pytest.mark.parametrize("option", TEST_MODELS)
@pytest.mark.parametrize("original, settings", RESIZES)
def test_round_trip_through_the_answer_text_is_exact_to_rounding(option, original, settings):
    """pixels -> the family's numbers -> its answer text -> parsed -> original pixels."""
    convention = family_of_option(option).box_convention
    resized = resized_size(run_parts(option, settings)[1], original)
    tolerance = coords.rounding_error(original, resized, convention)
    for box in boxes_in(original):
        written = coords.to_family(box, original, resized, convention)
        (mark,) = parse(write([Mark("thing", written)], convention))
        assert mark.label == "thing" and mark.values == written
        back = coords.to_original(mark.values, original, resized, convention)
        for i, (got, want) in enumerate(zip(back, box)):
            assert abs(got - want) <= tolerance[i % 2] + 1e-9, (box, written, back)


@pytest.mark.parametrize("original, settings", RESIZES)
def test_qwen2_5_vl_writes_pixels_of_the_image_its_processor_makes(original, settings):
    """Qwen2.5-VL's numbers are the box scaled by the size of the image the model is given (image_grid_thw x patch
    size of the batch the collator hands the model, the processor's own output on that row) -- not by the original
    size, and not by qwen-vl-utils' resize alone (the processor may resize again: an image under min_pixels)."""
    processor, collator = run_parts(families.get("qwen2_5_vl").test_model, settings)
    row = {"messages": [user("Where is it?", images=1), assistant("there")], "images": [Image.new("RGB", original)],
           "videos": [], "source": "t:0"}
    grid = collator([row])["image_grid_thw"][0]
    patch = processor.image_processor.patch_size
    processor_size = (int(grid[2]) * patch, int(grid[1]) * patch)
    assert resized_size(collator, original) == processor_size
    box = boxes_in(original)[1]
    scaled = [round(v * processor_size[i % 2] / original[i % 2]) for i, v in enumerate(box)]
    assert coords.to_family(box, original, processor_size, QWEN2_5_VL) == tuple(scaled)


QWEN2_VL = BoxConvention(frame="relative", grid=1000, top=999, text="box_tokens")  # [0, 1000), box tokens
QWEN2_5_VL = BoxConvention(frame="resized", text="json")  # pixels of the resized image
QWEN3_VL = BoxConvention(frame="relative", grid=1000, top=1000, text="json")  # [0, 1000]


def test_each_family_declares_its_convention():
    assert families.get("qwen2_vl").box_convention == QWEN2_VL
    assert families.get("qwen2_5_vl").box_convention == QWEN2_5_VL
    assert families.get("qwen3_vl").box_convention == QWEN3_VL
    assert families.get("qwen3_5").box_convention == QWEN3_VL
    assert all(isinstance(f.box_convention, BoxConvention) for f in families.all_families())
    with pytest.raises(ValueError, match="frame must be one of"):
        BoxConvention(frame="absolute")


def test_relative_grids_top_out_where_the_family_does():
    size = (640, 480)
    full = (0, 0, 640, 480)
    assert coords.to_family(full, size, size, QWEN2_VL) == (0, 0, 999, 999)  # [0, 1000)
    assert coords.to_family(full, size, size, QWEN3_VL) == (0, 0, 1000, 1000)  # [0, 1000]
    assert coords.to_family(full, size, (448, 336), QWEN2_5_VL) == (0, 0, 447, 335)  # clipped to the last pixel
    assert coords.to_family((320, 240), size, size, QWEN3_VL) == (500, 500)  # a point


@pytest.mark.parametrize("declared, values, want", [
    ("pixels", (64, 48, 128, 96), (64, 48, 128, 96)),
    ("relative", (0.1, 0.1, 0.2, 0.2), (64, 48, 128, 96)),
    ("qwen", (100, 100, 200, 200), (64, 48, 128, 96)),
])
def test_dataset_coordinates_are_read_in_their_declared_frame(declared, values, want):
    got = coords.dataset_to_original(values, declared, (640, 480), (320, 240), QWEN3_VL)
    assert got == pytest.approx(want)
    with pytest.raises(ValueError, match="one of"):
        coords.dataset_to_original(values, "percent", (640, 480), (320, 240), QWEN3_VL)


@pytest.mark.parametrize("text, marks", [
    ("<|object_ref_start|>cat<|object_ref_end|><|box_start|>(1,2),(30,40)<|box_end|>", [("cat", (1, 2, 30, 40))]),
    ("cat(1,2),(30,40) and a dog (5, 6),(7, 8)", [(None, (1, 2, 30, 40)), (None, (5, 6, 7, 8))]),  # tags stripped
    ('```json\n[\n\t{"bbox_2d": [1, 2, 30, 40], "label": "a \\"cat\\""},\n\t{"point_2d": [5, 6], "label": "dog"}\n]'
     '\n```', [('a "cat"', (1, 2, 30, 40)), ("dog", (5, 6))]),
    ('[{"bbox_2d": [1, 2, 30, 40]}, {"bbox_2d": [5, 6, 7', [(None, (1, 2, 30, 40))]),  # cut off mid-object
    ('{"bbox_2d": [1, 2, 3], "label": "x"}', []),  # three numbers are no box
    ("no box here", []),
])
def test_parse_reads_either_form(text, marks):
    assert [(m.label, m.values) for m in parse(text)] == marks


def test_write_uses_the_family_text_form():
    marks = [Mark("red circle", (10, 20, 30, 40)), Mark("dot", (5, 6))]
    assert write(marks, QWEN2_VL) == ("<|object_ref_start|>red circle<|object_ref_end|><|box_start|>(10,20),(30,40)"
                                      "<|box_end|>\n<|object_ref_start|>dot<|object_ref_end|><|box_start|>(5,6)"
                                      "<|box_end|>")
    assert write(marks, QWEN3_VL) == ('```json\n[\n\t{"bbox_2d": [10, 20, 30, 40], "label": "red circle"},\n'
                                      '\t{"point_2d": [5, 6], "label": "dot"}\n]\n```')


def test_geometry():
    a, b = (0, 0, 10, 10), (5, 0, 15, 10)
    assert iou(a, a) == 1.0 and iou(a, b) == pytest.approx(1 / 3) and iou(a, (20, 20, 30, 30)) == 0.0
    assert matched_iou([a], [a]) == 1.0
    assert matched_iou([a, b], [a]) == pytest.approx(0.5)  # an extra box halves it
    assert matched_iou([b, a], [a, b]) == pytest.approx(1.0)  # matched one to one, in any order
    assert matched_iou([], [a]) == 0.0 and matched_iou([a], []) == 0.0
    assert point_in_box((5, 5), a) and not point_in_box((11, 5), a)
    assert well_formed(a) and not well_formed((10, 0, 0, 10)) and not well_formed((0, 0, math.nan, 1))
