"""`qwenvl-ft eval`, `infer` and `merge`, and evaluation during training, on the tiny random models (merge on every
family).

Tier 1 (no model): metrics, the command configs and their validation. Tier 2 (@slow): short tiny runs trained once
per module, then evaluated, queried and merged.
"""

import json
import os
import sys

import pytest
import torch

from qwenvl_ft.commands.cli import main
from qwenvl_ft.config.commands import EVAL_METRICS, GROUNDING_METRICS
from qwenvl_ft.config.compose import compose, validate
from qwenvl_ft.errors import ConfigError
from qwenvl_ft.evaluation import metrics

from family_models import DEFAULT_MODEL, TEST_MODELS, lora_settings

# 64 generated training rows, 8 held out; no before/after check (the eval command does that here).
DATA = ["recipe=demo", "data.shapes.num_train=64", "data.shapes.num_eval=8"]
QUICK = DATA + ["trainer.logging_steps=4", "trainer.eval_generation=false", "trainer.disable_tqdm=true",
                "optimizer.scheduler=constant", "optimizer.warmup_ratio=0", "trainer.save_steps=1000"]
# Adapters on every projection with a high lr, so that a few steps move the outputs measurably.
ADAPTER_FAST = ["optimizer.lr=3e-2", "adapter.r=16", "adapter.alpha=32",
                "adapter.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"]


# ---------------------------------------------------------------------------------------------------------------
# tier 1


def test_generation_shows_progress_labelled_by_what_it_generates(tiny_processor, tmp_path, capsys, monkeypatch):
    """The before/after check, eval and infer generate through generate_answers, with a tqdm bar on stderr when it
    is a terminal."""
    from transformers import Qwen2VLForConditionalGeneration

    from qwenvl_ft.data.collate import VisionChatCollator
    from qwenvl_ft.data.shapes import make_rows
    from qwenvl_ft.evaluation.generate import generate_answers
    from qwenvl_ft.modeling.random_init import materialize

    typed = validate(compose(DATA, output_dir=str(tmp_path)))
    model = Qwen2VLForConditionalGeneration.from_pretrained(materialize(typed.model.architecture))
    rows = make_rows(2, 56, 0, "eval")
    collator = VisionChatCollator(tiny_processor, typed.data)
    generate_answers(model, collator, rows, 2, max_new_tokens=2, progress="held-out predictions before")
    assert "held-out" not in capsys.readouterr().err  # stderr redirected (a log, CI): no bar
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    answers = generate_answers(model, collator, rows, 2, max_new_tokens=2, progress="held-out predictions before")
    assert len(answers) == 2 and "held-out predictions before" in capsys.readouterr().err
    generate_answers(model, collator, rows, 2, max_new_tokens=2, progress="")
    assert "held-out" not in capsys.readouterr().err


def test_metrics_on_known_answers():
    assert metrics.exact_match(["A red circle.", "a blue square"], ["a red circle", "a red square"]) == 0.5
    assert metrics.bleu(["a red circle", "a blue square"], ["a red circle", "a blue square"]) == pytest.approx(100)
    # Three-word answers have no 4-grams: plain BLEU-4 would be 0 here; effective order scores the overlap.
    partial = metrics.bleu(["a red circle", "a blue square"], ["a red circle", "a blue triangle"])
    assert 30 < partial < 100
    assert metrics.bleu(["", ""], ["a red circle", "a blue triangle"]) == 0.0
    assert metrics.rouge_l(["a red circle"], ["a red square"]) == pytest.approx(2 / 3)
    assert metrics.rouge_l(["the cats sat"], ["the cat sat"]) == pytest.approx(1.0)  # stemming
    assert set(metrics.METRICS) == set(EVAL_METRICS)


def test_command_configs_default_to_the_named_runs_folders():
    ev = validate(compose(DATA, config_name="eval", output_dir="/r/outputs/demo/exp1/eval"))
    assert os.path.normpath(ev.eval.model_path) == "/r/outputs/demo/exp1/final"
    assert ev.eval.generation.max_new_tokens == ev.trainer.max_new_tokens == 8  # the recipe's setting
    mg = validate(compose(DATA, config_name="merge", output_dir="/r/outputs/demo/exp1/merge"))
    assert os.path.normpath(mg.merge.adapter_path) == "/r/outputs/demo/exp1/final"
    assert os.path.normpath(mg.merge.output_path) == "/r/outputs/demo/exp1/merged"
    inf = validate(compose(DATA + ["infer.images=[a.png]"], config_name="infer", output_dir="/r/x/infer"))
    assert list(inf.infer.images) == ["a.png"]
    # A recipe whose data group needs a path still validates for infer and merge, which do not read data.
    validate(compose(["recipe=lora_2b_coco"], config_name="merge", output_dir="/r/m"))


@pytest.mark.parametrize("config_name, override, message", [
    ("eval", "eval.generation.top_p=1.5", "generation.top_p must be in"),
    ("eval", "eval.metrics=[exact_match,cider]", "eval.metrics has ['cider']"),
    ("eval", "eval.num_samples=0", "eval.num_samples must be > 0"),
    ("infer", "infer.generation.num_beams=0", "generation.num_beams must be >= 1"),
    ("train", "trainer.early_stopping_patience=2", "needs trainer.eval_steps"),
    ("train", "trainer.load_best_model_at_end=true", "needs trainer.eval_steps"),
])
def test_command_config_range_checks(config_name, override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        compose(DATA + [override], config_name=config_name, output_dir="/tmp/o")


def test_load_best_needs_save_steps_to_be_a_multiple_of_eval_steps():
    with pytest.raises(ConfigError, match="multiple of trainer.eval_steps"):
        compose(DATA + ["trainer.eval_steps=3", "trainer.save_steps=10", "trainer.load_best_model_at_end=true"],
                output_dir="/tmp/o")


def test_typo_in_a_command_key_lists_that_commands_keys(capsys):
    assert main(["eval", "recipe=demo", "eval.modelpath=x"]) == 2
    err = capsys.readouterr().err
    assert "Did you mean 'eval.model_path'?" in err and "Valid keys of eval: model_path" in err
    assert main(["merge", "merge.output=x"]) == 2
    assert "Did you mean 'merge.output_path'?" in capsys.readouterr().err


def test_sampling_settings_reach_generate_only_when_sampling():
    ev = validate(compose(DATA + ["eval.generation.temperature=0.5"], config_name="eval", output_dir="/tmp/o"))
    assert "temperature" not in ev.eval.generation.kwargs()
    ev = validate(compose(DATA + ["eval.generation.do_sample=true", "eval.generation.temperature=0.5"],
                          config_name="eval", output_dir="/tmp/o"))
    assert ev.eval.generation.kwargs()["temperature"] == 0.5


# ---------------------------------------------------------------------------------------------------------------
# tier 2: tiny runs


def _train(out, *overrides):
    from qwenvl_ft.commands.train import train

    return train(compose(QUICK + list(overrides), output_dir=str(out)))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """A full fine-tune in <root>/outputs/demo/exp1, laid out as `qwenvl-ft train recipe=demo run_name=exp1`."""
    root = tmp_path_factory.mktemp("full")
    _train(root / "outputs" / "demo" / "exp1", "adapter=full", "trainer.max_steps=48")
    return root


@pytest.mark.slow
def test_eval_command_reports_base_and_tuned_side_by_side(full_run, monkeypatch, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # The command a user types after training with run_name=exp1, in the folder they trained in: model_path defaults
    # to that run's final/. In process (the CLI's main): a fresh interpreter would add its imports and prove nothing
    # more (the commands' own imports are checked in fresh interpreters by tests/test_peft_import.py).
    monkeypatch.chdir(full_run)
    status = main(["eval", *DATA, "run_name=exp1", "eval.num_examples=3"])
    out, err = capsys.readouterr()
    assert status == 0, err[-3000:]
    eval_dir = full_run / "outputs" / "demo" / "exp1" / "eval"
    report = json.loads((eval_dir / "eval_report.json").read_text())
    assert report["model_path"] == str((full_run / "outputs" / "demo" / "exp1" / "final").resolve())
    assert report["num_samples"] == 8
    base, tuned = report["metrics"]["base"], report["metrics"]["tuned"]
    assert set(base) == set(tuned) == set(EVAL_METRICS) - set(GROUNDING_METRICS)  # the shapes have no boxes
    assert tuned["rouge_l"] > base["rouge_l"] + 0.3, report["metrics"]
    assert tuned["bleu"] > base["bleu"] + 20, report["metrics"]
    assert tuned["exact_match"] >= base["exact_match"]
    assert len(report["examples"]) == 3
    assert {"reference", "base", "tuned", "source"} <= set(report["examples"][0])
    assert len((eval_dir / "predictions.jsonl").read_text().splitlines()) == 8
    assert "held-out evaluation on 8 rows" in err + out

    events = EventAccumulator(str(eval_dir / "tensorboard"), size_guidance={"images": 0, "tensors": 0}).Reload()
    tags = events.Tags()
    assert sorted(tags["images"]) == ["eval_examples/000", "eval_examples/001", "eval_examples/002"]
    card = events.Tensors("eval_examples/000/text_summary")[0].tensor_proto.string_val[0].decode()
    example = report["examples"][0]
    assert f"**reference:** {example['reference']}" in card and f"**tuned:** {example['tuned']}" in card
    assert events.Scalars("eval_tuned/rouge_l")[0].value == pytest.approx(tuned["rouge_l"], rel=1e-5)


def _shape_images(folder):
    from qwenvl_ft.data.shapes import draw

    import random

    folder.mkdir()
    rng = random.Random(0)
    # Different sizes give different numbers of vision tokens, so a batch needs left padding.
    for name, colour, shape, size in [("a.png", "red", "circle", 56), ("b.png", "blue", "square", 84),
                                      ("c.png", "green", "triangle", 112)]:
        draw(colour, shape, size, rng).save(folder / name)
    return folder


@pytest.mark.slow
def test_infer_batched_equals_one_by_one_and_writes_jsonl(full_run, tmp_path):
    from qwenvl_ft.commands.infer import infer

    images = _shape_images(tmp_path / "images")
    final = full_run / "outputs" / "demo" / "exp1" / "final"
    common = DATA + [f"infer.model_path={final}", "infer.prompt=What is in the image?"]
    batched = infer(compose(common + [f"infer.images=[{images}]", "infer.batch_size=3"], config_name="infer",
                            output_dir=str(tmp_path / "batched")))
    single = infer(compose(common + [f"infer.images=[{images / 'a.png'},{images / 'b.png'},{images / 'c.png'}]",
                                     "infer.batch_size=1", f"infer.output_file={tmp_path / 'single.jsonl'}"],
                           config_name="infer", output_dir=str(tmp_path / "single")))
    assert batched["num_predictions"] == single["num_predictions"] == 3
    rows = [json.loads(line) for line in (tmp_path / "batched" / "predictions.jsonl").read_text().splitlines()]
    assert [os.path.basename(r["image"]) for r in rows] == ["a.png", "b.png", "c.png"]
    assert all(r["prompt"] == "What is in the image?" and r["prediction"] for r in rows)
    one_by_one = [json.loads(line)["prediction"] for line in (tmp_path / "single.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in rows] == one_by_one
    # The tuned model answers in the trained form ("a <colour> <shape>").
    assert sum(r["prediction"].startswith("a ") for r in rows) >= 2, rows


@pytest.mark.slow
@pytest.mark.parametrize("enable_thinking", [False, True])
def test_infer_on_qwen3_5_with_enable_thinking(tmp_path, enable_thinking):
    """infer on the tiny Qwen3.5 (base weights): batched equals one by one, with the think block of the prompt
    closed or opened by data.enable_thinking."""
    from qwenvl_ft.commands.infer import infer

    images = _shape_images(tmp_path / "images")
    common = DATA + ["model=tiny_qwen3_5", f"data.enable_thinking={str(enable_thinking).lower()}",
                     "infer.model_path=null", "infer.prompt=What is in the image?", f"infer.images=[{images}]",
                     "infer.generation.max_new_tokens=6"]
    batched = infer(compose(common + ["infer.batch_size=3"], config_name="infer", output_dir=str(tmp_path / "b")))
    single = infer(compose(common + ["infer.batch_size=1"], config_name="infer", output_dir=str(tmp_path / "s")))
    assert batched["num_predictions"] == single["num_predictions"] == 3

    def predictions(folder):
        return [json.loads(line)["prediction"] for line in (folder / "predictions.jsonl").read_text().splitlines()]

    assert predictions(tmp_path / "b") == predictions(tmp_path / "s")


@pytest.mark.slow
def test_infer_rejects_missing_images(tmp_path):
    from qwenvl_ft.commands.infer import infer

    with pytest.raises(ConfigError, match="not found"):
        infer(compose(DATA + [f"infer.images=[{tmp_path / 'nope.png'}]", "infer.model_path=null"],
                      config_name="infer", output_dir=str(tmp_path)))


@pytest.mark.parametrize("option", ["tiny", "tiny_qwen2_5_vl"])
def test_infer_gives_boxes_in_the_original_pixels_and_draws_them(processor_of, option, tmp_path):
    """A prediction's boxes, in the family's convention for the image as shown, come back in the original image's
    pixels (relative grid or resized pixels alike), and an annotated copy is written."""
    from PIL import Image

    from qwenvl_ft.commands.infer import annotate_objects, prompt_rows
    from qwenvl_ft.data.collate import VisionChatCollator
    from qwenvl_ft.grounding.coords import to_family
    from data_helpers import data_cfg

    Image.new("RGB", (300, 150), (250, 250, 250)).save(tmp_path / "cat.png")
    collator = VisionChatCollator(processor_of(option), data_cfg(format="shapes", max_length=None))
    rows = prompt_rows([tmp_path / "cat.png"], "Where is the cat?")
    (original, shown), = collator.shown_sizes(collator.load_visuals(rows[0], resize=False))
    convention = collator.family.box_convention
    x1, y1, x2, y2 = to_family((30, 15, 150, 120), original, shown, convention)
    records = [{"image": str(tmp_path / "cat.png"), "prediction": f"cat ({x1},{y1}),({x2},{y2})"},
               {"image": str(tmp_path / "cat.png"), "prediction": "no box"}]
    annotate_objects(records, rows * 2, collator, tmp_path / "annotated")
    (found,) = records[0]["objects"]
    assert found["bbox"] == pytest.approx([30, 15, 150, 120], abs=max(300 / shown[0], 0.3) + 0.1)
    drawn = Image.open(records[0]["annotated"])
    assert drawn.size == (300, 150) and drawn.getpixel((90, 15)) != (250, 250, 250)  # the box's top edge
    assert "objects" not in records[1] and "annotated" not in records[1]


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits.float()


# Every adapter method on the default family; LoRA (with the vision tower and projectors trained in full) on every
# other family.
MERGE_CASES = [(DEFAULT_MODEL, method) for method in ("lora", "dora", "qlora")] + \
    [(option, "lora") for option in TEST_MODELS if option != DEFAULT_MODEL]


@pytest.mark.slow
@pytest.mark.parametrize("option, method", MERGE_CASES)
def test_merge_writes_a_plain_model_with_the_adapters_logits(tmp_path, option, method):
    from peft import PeftModel
    from transformers import AutoProcessor

    from qwenvl_ft.commands.merge import merge
    from qwenvl_ft.data.collate import VisionChatCollator
    from qwenvl_ft.data.shapes import make_rows
    from qwenvl_ft.modeling.build import model_class, model_source

    run = tmp_path / "outputs" / "demo" / "exp1"
    # LoRA/DoRA: vision tower and merger stay trainable (the tiny default), so the merge must carry LoRA on the
    # language model plus fully trained modules_to_save. QLoRA: both frozen, as 4-bit vision blocks cannot train.
    frozen = ["model.freeze_vision_tower=true", "model.freeze_merger=true"] if method == "qlora" else []
    settings = lora_settings(option)  # MoE: the MLP names adapt the experts, whose LoRA takes no dropout
    _train(run, f"model={option}", f"adapter={method}", "trainer.max_steps=6", *ADAPTER_FAST, *frozen, *settings)
    merge_cfg = compose(DATA + [f"model={option}", f"adapter={method}", *frozen, *settings], config_name="merge",
                        output_dir=str(run / "merge"))
    typed = validate(merge_cfg)
    merge(merge_cfg)
    merged_dir = run / "merged"
    names = {p.name for p in merged_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "merge_info.json"} <= names
    assert "adapter_config.json" not in names
    assert not [p for p in run.iterdir() if p.name.startswith(".merged")], "a staging folder was left behind"
    config = json.loads((merged_dir / "config.json").read_text())
    assert "quantization_config" not in config

    processor = AutoProcessor.from_pretrained(str(merged_dir))
    assert "<|im_start|>" in processor.chat_template
    cls = model_class(typed.model)
    merged = cls.from_pretrained(str(merged_dir)).eval()  # plain transformers
    base_path = model_source(typed.model)
    reference = PeftModel.from_pretrained(cls.from_pretrained(base_path), str(run / "final")).eval()
    base = cls.from_pretrained(base_path).eval()

    batch = VisionChatCollator(processor, typed.data)(make_rows(2, 56, seed=1, split="eval"))
    batch.pop("labels")
    got, want, untouched = _logits(merged, batch), _logits(reference, batch), _logits(base, batch)
    assert (want - untouched).abs().max() > 1e-2, "the adapter should change the outputs"
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    if option != DEFAULT_MODEL:
        return
    # Never overwritten by accident; replaced when asked (the same for every family).
    with pytest.raises(ConfigError, match="merge.overwrite=true"):
        merge(merge_cfg)
    merge(compose(DATA + [f"model={option}", f"adapter={method}", "merge.overwrite=true"], config_name="merge",
                  output_dir=str(run / "merge")))
    assert (merged_dir / "model.safetensors").exists()


@pytest.mark.slow
def test_merge_refuses_a_full_model(full_run, tmp_path):
    from qwenvl_ft.commands.merge import merge

    final = full_run / "outputs" / "demo" / "exp1" / "final"
    with pytest.raises(ConfigError, match="nothing to merge"):
        merge(compose(DATA + [f"merge.adapter_path={final}", f"merge.output_path={tmp_path / 'm'}"],
                      config_name="merge", output_dir=str(tmp_path)))


@pytest.mark.slow
def test_eval_during_training_with_best_checkpoint_and_early_stopping(tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    # greater_is_better=true on a falling loss makes the first evaluation (step 4) the best and the second (step 8)
    # no improvement, so with patience 1 training stops at step 8 of 40 and final/ must hold checkpoint-4, not the
    # last weights in memory.
    metrics_out = _train(out, "adapter=full", "trainer.max_steps=40", "trainer.eval_steps=4", "trainer.save_steps=4",
                         "trainer.load_best_model_at_end=true", "trainer.early_stopping_patience=1",
                         "trainer.greater_is_better=true", "trainer.eval_generation=true", "data.shapes.num_eval=4")
    assert metrics_out["global_step"] == 8
    history = json.loads((out / "log_history.json").read_text())
    eval_losses = {e["step"]: e["eval_loss"] for e in history if "eval_loss" in e}
    assert sorted(eval_losses) == [4, 8] and eval_losses[8] < eval_losses[4]
    state = json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())
    assert os.path.basename(state["best_model_checkpoint"]) == "checkpoint-4"
    best = load_file(str(out / "checkpoint-4" / "model.safetensors"))
    last = load_file(str(out / "checkpoint-8" / "model.safetensors"))
    final = load_file(str(out / "final" / "model.safetensors"))
    assert all(torch.equal(best[k], final[k]) for k in best), "final/ is not the best checkpoint"
    assert not all(torch.equal(last[k], final[k]) for k in last)
    # generation metrics on the held-out rows at the end
    assert {"eval_exact_match_after", "eval_bleu_after", "eval_rouge_l_after"} <= set(metrics_out)
