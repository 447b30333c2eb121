"""evaluation/held_out.py: the check before training scores BLEU and ROUGE-L once training has ended (rouge-score
imports nltk, half a second of start-up and more), with the values an immediate scoring gives; training/speed.py: a
small model trains and generates on one torch thread on a CPU. That a run's start-up imports no nltk is checked in
a fresh interpreter (tests/test_optional_packages.py, the LoRA run)."""

from qwenvl_ft.config.compose import compose, validate
from qwenvl_ft.evaluation import generate
from qwenvl_ft.training import speed
from qwenvl_ft.evaluation.held_out import SCORED_LATER, held_out_generation, score_later

PREDICTIONS = ["a red circle", "the cats sat", "", "a blue squares"]
REFERENCES = ["a red circle", "the cat sat", "a green circle", "a blue square"]


def rows():
    return [{"messages": [{"role": "user", "content": [{"type": "text", "text": "What is in the image?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": reference}]}]}
            for reference in REFERENCES]


def test_bleu_and_rouge_l_scored_later_are_those_scored_at_once(tiny_processor, tmp_path, monkeypatch):
    monkeypatch.setattr(generate, "generate_answers", lambda *args, **kwargs: list(PREDICTIONS))
    cfg = validate(compose(["recipe=demo"], output_dir=str(tmp_path)))
    at_once = held_out_generation(None, tiny_processor, rows(), cfg, "before")
    later = {}
    now = held_out_generation(None, tiny_processor, rows(), cfg, "before", later=later)
    assert set(SCORED_LATER) == {"bleu", "rouge_l"}
    assert now == {key: value for key, value in at_once.items() if key not in ("eval_bleu_before",
                                                                               "eval_rouge_l_before")}
    assert score_later(later) == {"eval_bleu_before": at_once["eval_bleu_before"],
                                  "eval_rouge_l_before": at_once["eval_rouge_l_before"]}
    assert 0 < at_once["eval_rouge_l_before"] < 1 and score_later({}) == {}


def test_a_small_model_trains_and_generates_on_one_thread_on_a_cpu(monkeypatch, caplog):
    import torch

    small, large = torch.nn.Linear(2, 2), torch.nn.Linear(4, 4)  # 6 and 20 parameters
    monkeypatch.setattr(speed, "ONE_THREAD_BELOW_PARAMETERS", 10)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # as without OMP_NUM_THREADS on 2 cores (pytest's workers run one thread each)
    try:
        with caplog.at_level("INFO", logger="qwenvl_ft"):
            with speed.small_model_threads(small, torch.device("cpu"), say="training"):
                assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        assert "training: one torch thread" in caplog.text  # the run log says a user's thread count is not used
        with speed.small_model_threads(large, torch.device("cpu")):
            assert torch.get_num_threads() == 2
        with speed.small_model_threads(small, torch.device("cuda")):
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
