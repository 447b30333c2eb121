"""Model cards of `final/` and `merged/`, and the upload to the Hub, on the tiny model and offline.

One tiny LoRA run (2 steps, before/after check on 4 held-out rows) is trained through the command line with
hub.push=true while HF_HUB_OFFLINE=1: the upload must fail with a plain message and leave everything in place.
"""

import contextlib
import io
import json

import pytest

from qwenvl_ft.commands.cli import main
from qwenvl_ft.config.compose import compose, validate
from qwenvl_ft.errors import ConfigError

RUN = ["recipe=demo", "adapter=lora", "run_name=exp1", "data.shapes.num_train=16", "data.shapes.num_eval=4",
       "trainer.max_steps=2", "trainer.logging_steps=1", "trainer.disable_tqdm=true", "trainer.save_steps=1000"]
PUSH = ["hub.push=true", "hub.repo_id=someone/tiny-demo"]


def _cli(*args):
    """`qwenvl-ft ARGS` in this process: (exit status, what it printed on stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(list(args))
    return status, err.getvalue()


@pytest.fixture(scope="module")
def pushed_run(tmp_path_factory):
    """`qwenvl-ft train ... hub.push=true` offline, in <root>/outputs/demo/exp1."""
    root = tmp_path_factory.mktemp("hub")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("HF_HUB_OFFLINE", "1")
        status, err = _cli("train", *RUN, *PUSH)
    return root / "outputs" / "demo" / "exp1", status, err


# ---------------------------------------------------------------------------------------------------------------
# tier 1


@pytest.mark.parametrize("overrides, message", [
    (["hub.push=true"], "hub.push=true needs hub.repo_id"),
    (["hub.repo_id=me/bad--name"], "is not a Hub repository id"),
    (["hub.repo_id=a/b/c"], "is not a Hub repository id"),
])
def test_hub_settings_are_checked_at_compose_time(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose(["recipe=demo"] + overrides, output_dir="/tmp/out")


def test_card_metadata_of_a_hub_base_and_dataset():
    from omegaconf import OmegaConf

    from qwenvl_ft.publish.card import build_card, check_card
    from qwenvl_ft.publish.run_record import RunRecord

    cfg = compose(["recipe=qlora_7b_amazon"], output_dir="/tmp/out")
    text = OmegaConf.to_yaml(cfg, resolve=True)
    record = RunRecord(config=validate(cfg), config_yaml=text, metrics={"eval_exact_match_before": 0.25,
                                                                        "eval_exact_match_after": 0.75})
    card = build_card(record, "adapter", "me/qwen2-vl-amazon")
    check_card(card)
    data = card.data
    assert data.base_model == "Qwen/Qwen2-VL-7B-Instruct" and data.base_model_relation == "adapter"
    assert data.datasets == ["philschmid/amazon-product-descriptions-vlm"]
    assert (data.library_name, data.pipeline_tag) == ("peft", "image-text-to-text")
    assert {"qlora", "sft", "qwen2-vl", "qwenvl-ft"} <= set(data.tags)
    assert [(r.metric_type, r.metric_value) for r in data.eval_results] == [("exact_match", 0.75)]
    assert "| exact match | 25.0% | 75.0% |" in card.text
    assert 'PeftModel.from_pretrained(base, "me/qwen2-vl-amazon")' in card.text

    data.base_model = "not a repo id"
    with pytest.raises(ValueError, match="base_model"):
        check_card(card)


# ---------------------------------------------------------------------------------------------------------------
# tier 2: a tiny run


@pytest.mark.slow
def test_offline_push_fails_plainly_and_keeps_the_run(pushed_run):
    run, status, err = pushed_run
    assert status == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 8, err
    assert "uploading" in err and "someone/tiny-demo" in err and "offline mode" in err
    assert "Nothing is lost" in err and f"hf upload someone/tiny-demo {run / 'final'} . --private" in err
    final = run / "final"
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= {p.name for p in final.iterdir()}
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 2
    assert json.loads((run / "summary.json").read_text())["status"] == "failed"

    # The same command again only retries the upload (hub.* may change without counting as a new config).
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(run.parent.parent.parent)
        mp.setenv("HF_HUB_OFFLINE", "1")
        again, err = _cli("train", *RUN, *PUSH, "hub.private=false")
    assert again == 2 and "offline mode" in err and "--no-private" in err, err
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 2


@pytest.mark.slow
def test_final_card_holds_the_run(pushed_run):
    from huggingface_hub import ModelCard

    from qwenvl_ft.publish.card import check_card

    run, _, _ = pushed_run
    card = ModelCard.load(run / "final" / "README.md")  # the Hub's own parser
    check_card(card)
    metrics = json.loads((run / "metrics.json").read_text())
    info = json.loads((run / "run_info.json").read_text())
    data = card.data
    assert data.base_model is None  # a random-weight base is not a Hub model
    assert (data.library_name, data.pipeline_tag) == ("peft", "image-text-to-text")
    assert {"lora", "sft", "qwenvl-ft"} <= set(data.tags)
    after = {r.metric_type: r.metric_value for r in data.eval_results}
    assert after == {m: metrics[f"eval_{m}_after"] for m in ("exact_match", "bleu", "rouge_l")}
    text = card.text
    assert "[More Information Needed]" not in text  # PEFT's template is gone
    before, after_match = metrics["eval_exact_match_before"], metrics["eval_exact_match_after"]
    assert f"| exact match | {before:.1%} | {after_match:.1%} |" in text
    assert f"{metrics['first_logged_loss']:.4g} at step 1" in text
    assert info["command"].startswith("qwenvl-ft train recipe=demo") and info["command"] in text
    assert (run / "config.yaml").read_text().rstrip() in text
    assert info["hardware"] in text and "training time" in text
    assert 'PeftModel.from_pretrained(base, "someone/tiny-demo")' in text


@pytest.mark.slow
def test_merged_folder_gets_its_own_card_and_push(pushed_run):
    from huggingface_hub import ModelCard

    from qwenvl_ft.publish.card import check_card

    run, _, _ = pushed_run
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(run.parent.parent.parent)
        mp.setenv("HF_HUB_OFFLINE", "1")
        status, err = _cli("merge", "recipe=demo", "adapter=lora", "run_name=exp1", "hub.push=true",
                           "hub.repo_id=someone/tiny-demo-merged")
    assert status == 2 and "someone/tiny-demo-merged" in err and "Traceback" not in err, err
    card = ModelCard.load(run / "merged" / "README.md")
    check_card(card)
    assert card.data.library_name == "transformers" and "merged-adapter" in card.data.tags
    assert "AutoModelForImageTextToText.from_pretrained(\"someone/tiny-demo-merged\"" in card.text
    assert "qwenvl-ft merge recipe=demo" in card.text  # how it was merged
    assert json.loads((run / "run_info.json").read_text())["command"] in card.text  # how it was trained
    assert (run / "merged" / "model.safetensors").is_file()
