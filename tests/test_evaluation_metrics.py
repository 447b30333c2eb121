"""evaluation/metrics.py: the held-out metrics, on the answer of a completion that reasons first."""

import pytest

from qwenvl_ft.evaluation.metrics import compute, final_answer


def test_a_completion_that_reasons_is_scored_on_its_answer():
    assert final_answer("</think>\n\na red circle") == "a red circle"
    assert final_answer("the colour is red\n</think>\n\nA red circle.") == "A red circle."
    assert final_answer("a red circle") == "a red circle"  # no reasoning: the whole completion
    metrics = compute(["</think>\n\na red circle", "a blue square"], ["a red circle", "a green square"])
    assert metrics["exact_match"] == 0.5


def test_grounding_metrics_score_rows_with_boxes_and_are_left_out_otherwise():
    references = ['[{"bbox_2d": [0, 0, 100, 100], "label": "cat"}]', "(0,0),(100,100)", "a cat", "(0,0),(10,10)"]
    predictions = ['[{"bbox_2d": [0, 0, 100, 100]}]', "(50,0),(150,100)", "a cat", "nothing"]
    got = compute(predictions, references)
    assert got["mean_iou"] == pytest.approx((1 + 1 / 3 + 0) / 3)  # the three rows with a reference box
    assert got["iou_50"] == pytest.approx(1 / 3)
    assert "point_in_box" not in got  # no prediction holds a point
    assert got["exact_match"] == pytest.approx(1 / 4)
    points = compute(['[{"point_2d": [5, 5]}]', '[{"point_2d": [50, 5]}]'], ["(0,0),(10,10)", "(0,0),(10,10)"])
    assert points["point_in_box"] == 0.5
    assert set(compute(["a"], ["a"])) == {"exact_match", "bleu", "rouge_l"}  # no box anywhere: as before
