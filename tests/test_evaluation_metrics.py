"""evaluation/metrics.py: the held-out metrics, on the answer of a completion that reasons first."""

from qwenvl_ft.evaluation.metrics import compute, final_answer


def test_a_completion_that_reasons_is_scored_on_its_answer():
    assert final_answer("</think>\n\na red circle") == "a red circle"
    assert final_answer("the colour is red\n</think>\n\nA red circle.") == "A red circle."
    assert final_answer("a red circle") == "a red circle"  # no reasoning: the whole completion
    metrics = compute(["</think>\n\na red circle", "a blue square"], ["a red circle", "a green square"])
    assert metrics["exact_match"] == 0.5
