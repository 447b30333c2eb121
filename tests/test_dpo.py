"""DPO with images: preference data (both formats, the generated set, errors), the preference collator, and the
tiny random Qwen2-VL trained with TRL's DPOTrainer on CPU (LoRA, QLoRA, full, precomputed reference)."""

import gc
import json
import math

import pytest
import torch

from qwenvl_ft.config.compose import compose, validate
from qwenvl_ft.config.data import DataConfig, DataFormat, Overlength
from qwenvl_ft.data.preference import load_pair_splits, shapes_preference_rows
from qwenvl_ft.data.shapes import COLOURS, SHAPES, draw
from qwenvl_ft.errors import ConfigError
from qwenvl_ft.errors import DataError
from qwenvl_ft.methods.dpo import DpoLossType

QUICK = ["recipe=dpo_demo", "data.shapes.num_train=64", "data.shapes.num_eval=8", "trainer.max_steps=8",
         "trainer.logging_steps=1", "trainer.disable_tqdm=true", "trainer.report_to=[none]"]


def _image_file(tmp_path, name, colour="red", shape="circle"):
    import random

    path = tmp_path / name
    draw(colour, shape, 56, random.Random(0)).save(path)
    return path


def _data_cfg(fmt, path, **kwargs):
    return DataConfig(format=DataFormat(fmt), path=str(path), shuffle=False, **kwargs)


def _texts(messages):
    return [item["text"] for m in messages for item in m["content"] if item["type"] == "text"]


# ----------------------------------------------------------------------------------------------------------------
# data


def test_generated_pairs_prefer_the_right_description():
    rows = shapes_preference_rows(60, 56, seed=0, split="train")
    again = shapes_preference_rows(60, 56, seed=0, split="train")
    descriptions = {f"a {c} {s}" for c in COLOURS for s in SHAPES}
    for row, same in zip(rows, again):
        chosen, rejected = _texts(row["chosen"])[0], _texts(row["rejected"])[0]
        assert chosen in descriptions and rejected in descriptions and chosen != rejected
        assert (chosen, rejected) == (_texts(same["chosen"])[0], _texts(same["rejected"])[0])
        assert row["prompt"][-1]["role"] == "user" and len(row["images"]) == 1
    colour, shape = _texts(rows[0]["chosen"])[0].split()[1:]
    image = rows[0]["images"][0]
    assert image.getpixel((image.width // 2, image.height // 2)) == COLOURS[colour], "chosen must describe the image"
    # neither answer is predictable without the image: wrong colours, wrong shapes and both occur
    kinds = set()
    for row in rows:
        c, r = _texts(row["chosen"])[0].split()[1:], _texts(row["rejected"])[0].split()[1:]
        kinds.add((c[0] != r[0], c[1] != r[1]))
    assert kinds == {(True, False), (False, True), (True, True)}


def test_llava_preference_json_loads(tmp_path):
    _image_file(tmp_path, "a.png")
    _image_file(tmp_path, "b.png", "blue", "square")
    records = [
        {"image": "a.png", "prompt": "<image>\nWhat is in the image?", "chosen": "a red circle",
         "rejected": "a blue circle"},
        {"image": ["a.png", "b.png"], "question": "Compare <image> and <image>.", "chosen": "red, blue",
         "rejected": "blue, red"},
        {"image": "b.png", "prompt": "What shape?", "chosen": "a square", "rejected": "a circle"},
    ]
    path = tmp_path / "prefs.json"
    path.write_text(json.dumps(records))
    train, held_out = load_pair_splits(_data_cfg("llava_preference", path, system_message="Be brief."))
    assert held_out is None and len(train) == 3
    first, second, third = train[0], train[1], train[2]
    assert [m["role"] for m in first["prompt"]] == ["system", "user"]
    assert [i["type"] for i in first["prompt"][1]["content"]] == ["image", "text"]
    assert first["images"] == [str(tmp_path / "a.png")]
    assert _texts(first["chosen"]) == ["a red circle"] and _texts(first["rejected"]) == ["a blue circle"]
    assert [i["type"] for i in second["prompt"][1]["content"]] == ["text", "image", "text", "image", "text"]
    assert len(second["images"]) == 2
    # no <image> placeholder: the image goes before the text
    assert [i["type"] for i in third["prompt"][1]["content"]] == ["image", "text"]


def test_messages_preference_jsonl_loads(tmp_path):
    _image_file(tmp_path, "a.png")
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}
    records = [
        {"images": ["a.png"], "prompt": [user],
         "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "a red circle"}]}],
         "rejected": [{"role": "assistant", "content": "a green circle"}]},
        # string content: the image goes before the first user text, as TRL does
        {"images": ["a.png"], "prompt": [{"role": "user", "content": "Describe it."}],
         "chosen": [{"role": "assistant", "content": "red"}], "rejected": [{"role": "assistant", "content": "blue"}]},
        # implicit prompt: the shared leading turns of chosen and rejected
        {"images": ["a.png"], "chosen": [user, {"role": "assistant", "content": "a red circle"}],
         "rejected": [user, {"role": "assistant", "content": "a red square"}]},
    ]
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    train, _ = load_pair_splits(_data_cfg("messages_preference", path))
    assert len(train) == 3
    for row in train:
        assert row["prompt"][-1]["role"] == "user" and row["images"] == [str(tmp_path / "a.png")]
        assert [i["type"] for i in row["prompt"][0]["content"]][0] == "image"
        assert len(row["chosen"]) == len(row["rejected"]) == 1
    assert _texts(train[0]["rejected"]) == ["a green circle"]
    assert _texts(train[2]["prompt"]) == ["What is in the image?"] and _texts(train[2]["chosen"]) == ["a red circle"]


@pytest.mark.parametrize("fmt, record, message", [
    ("llava_preference", {"image": "a.png", "prompt": "<image>\nq", "chosen": "yes"}, "field 'rejected' is missing"),
    ("llava_preference", {"image": "a.png", "prompt": "<image>\nq", "chosen": 3, "rejected": "no"},
     "field 'chosen' must be str"),
    ("llava_preference", {"image": ["a.png", "a.png"], "prompt": "<image>\nq", "chosen": "yes", "rejected": "no"},
     "1 image placeholder(s) in the text but 2 image(s)"),
    ("llava_preference", {"image": "a.png", "prompt": "q", "chosen": " ", "rejected": "no"},
     "the assistant text is empty (checking prompt + chosen)"),
    ("messages_preference", {"images": [], "prompt": [{"role": "user", "content": "q"}],
                             "chosen": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}],
                             "rejected": [{"role": "assistant", "content": "c"}]},
     "field 'chosen' must be exactly one assistant message"),
    ("messages_preference", {"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": []},
     "field 'chosen' must be a list of messages"),
    ("messages_preference", {"prompt": [{"role": "user", "content": [{"type": "audio"}]}],
                             "chosen": [{"role": "assistant", "content": "a"}],
                             "rejected": [{"role": "assistant", "content": "b"}]},
     "prompt[0].content[0]: content item type must be"),
    # a pair that cannot teach: DPO's loss would sit at log 2 on it
    ("llava_preference", {"image": "a.png", "prompt": "<image>\nq", "chosen": "a cat", "rejected": " a cat "},
     "fields 'chosen' and 'rejected' are the same answer ('a cat'): the pair teaches nothing"),
    ("messages_preference", {"images": ["a.png"], "prompt": [{"role": "user", "content": [{"type": "image"}]}],
                             "chosen": [{"role": "assistant", "content": "same"}],
                             "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "same"}]}]},
     "fields 'chosen' and 'rejected' are the same answer ('same')"),
])
def test_bad_rows_name_file_row_and_field(tmp_path, fmt, record, message):
    _image_file(tmp_path, "a.png")
    good = {"image": "a.png", "prompt": "<image>\nq", "chosen": "yes", "rejected": "no"}
    if fmt == "messages_preference":
        good = {"images": ["a.png"], "prompt": [{"role": "user", "content": [{"type": "image"}]}],
                "chosen": [{"role": "assistant", "content": "yes"}],
                "rejected": [{"role": "assistant", "content": "no"}]}
    path = tmp_path / "prefs.json"
    path.write_text(json.dumps([good, record]))
    with pytest.raises(DataError) as err:
        load_pair_splits(_data_cfg(fmt, path))
    assert f"{path}:row 1" in str(err.value) and message in str(err.value)
    # data.skip_invalid leaves the bad row out instead
    train, _ = load_pair_splits(_data_cfg(fmt, path, skip_invalid=True))
    assert len(train) == 1


def test_config_ties_dpo_to_preference_data():
    typed = validate(compose(["recipe=dpo_demo"], output_dir="/tmp/o"))
    assert typed.trainer.kind.value == "dpo" and typed.data.format == DataFormat.shapes_preference
    assert typed.adapter.is_peft and typed.trainer.dpo.loss_type == [DpoLossType.sigmoid]
    seven = validate(compose(["recipe=dpo_qlora_7b"], output_dir="/tmp/o"))
    assert seven.model.name_or_path == "Qwen/Qwen2-VL-7B-Instruct" and seven.adapter.load_in_4bit
    assert seven.data.format == DataFormat.messages_preference
    two = validate(compose(["recipe=dpo_lora_2b", "data.path=/d.json"], output_dir="/tmp/o"))
    assert two.model.name_or_path == "Qwen/Qwen2-VL-2B-Instruct" and two.adapter.method.value == "lora"
    assert two.data.format == DataFormat.llava_preference
    for overrides, message in [(["recipe=demo", "trainer=dpo"], "trainer=dpo needs preference pairs"),
                               (["recipe=dpo_demo", "trainer=sft"], "train it with trainer=dpo"),
                               (["recipe=dpo_demo", "trainer.dpo.beta=0"], "trainer.dpo.beta must be > 0"),
                               (["recipe=dpo_demo", "trainer.dpo.loss_type=[exo_pair]"], "label_smoothing > 0"),
                               (["recipe=dpo_demo", "trainer.dpo.loss_type=[sigmoid,sft]",
                                 "trainer.dpo.loss_weights=[1.0]"], "one weight per loss_type"),
                               (["recipe=dpo_demo", "data.group_by_length=true"],
                                "DPO batches are trainer.batch_size pairs"),
                               (["recipe=dpo_demo", "trainer.dpo.loss_type=[nope]"], "loss_type")]:
        with pytest.raises(ConfigError, match=message):
            compose(overrides, output_dir="/tmp/o")


# ----------------------------------------------------------------------------------------------------------------
# collator


def _pairs_and_collator(tiny_processor, **data):
    from qwenvl_ft.data.collate_preference import VisionPreferenceCollator
    from qwenvl_ft.data.preference import to_pair_dataset

    cfg = DataConfig(format=DataFormat.shapes_preference, **data)
    dataset = to_pair_dataset(shapes_preference_rows(3, 56, seed=0, split="train"))  # images stored as bytes
    return [dataset[i] for i in range(3)], VisionPreferenceCollator(tiny_processor, cfg)


def test_collator_builds_chosen_then_rejected_with_images(tiny_processor):
    rows, collator = _pairs_and_collator(tiny_processor, max_length=256)
    batch = collator(rows)
    tokenizer = tiny_processor.tokenizer
    assert batch["input_ids"].shape[0] == 6 and batch["image_grid_thw"].shape[0] == 6
    assert batch["pixel_values"].shape[0] == int(batch["image_grid_thw"].prod(dim=1).sum())
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    # M-RoPE: the image tokens, and only they, are marked as image tokens
    assert torch.equal(batch["mm_token_type_ids"] == 1, batch["input_ids"] == image_pad)
    for index in range(6):
        row, name = rows[index % 3], "chosen" if index < 3 else "rejected"
        answer = tokenizer.decode(batch["input_ids"][index][batch["completion_mask"][index].bool()])
        assert answer.startswith(_texts(row[name])[0] + "<|im_end|>")
        prompt = tokenizer.decode(batch["input_ids"][index][batch["attention_mask"][index].bool()])
        assert "What is in the image?" in prompt and prompt.count("<|vision_start|>") == 1


def test_collator_equals_trls_preference_collator(tiny_processor, tmp_path):
    """Same batch as TRL's DataCollatorForVisionPreference given the same (resized) images: pairs with one image of
    different sizes, two images, none, and answers of different lengths."""
    from torchvision.transforms.v2 import functional as tvF
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    from qwenvl_ft.data.collate_preference import VisionPreferenceCollator

    from PIL import Image

    Image.new("RGB", (120, 90), (200, 30, 30)).save(tmp_path / "wide.png")
    Image.new("RGB", (40, 70), (30, 30, 200)).save(tmp_path / "tall.png")
    records = [
        {"image": "wide.png", "prompt": "<image>\nWhat is in the image?", "chosen": "a red rectangle, wide",
         "rejected": "blue"},
        {"image": ["wide.png", "tall.png"], "prompt": "Compare <image> and <image>.", "chosen": "red, then blue",
         "rejected": "they are the same colour and the same size, both squares"},
        {"prompt": "Say hello.", "chosen": "hello", "rejected": "goodbye"},
        {"image": "tall.png", "prompt": "What colour?", "chosen": "blue", "rejected": "a red one"},
    ]
    path = tmp_path / "prefs.json"
    path.write_text(json.dumps(records))
    cfg = _data_cfg("llava_preference", path, system_message="Be brief.", max_pixels=100 * 28 * 28)
    rows, _ = load_pair_splits(cfg)
    rows = [rows[i] for i in range(len(rows))]
    collator = VisionPreferenceCollator(tiny_processor, cfg)
    ours = collator(rows)
    resized = [[tvF.to_pil_image(pixels) for pixels in collator.images.load_visuals(row).images] for row in rows]
    theirs = DataCollatorForVisionPreference(processor=tiny_processor, max_length=None)(
        [{"images": images, "prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}
         for images, row in zip(resized, rows)])
    assert set(ours) == set(theirs) - {"token_type_ids"}
    assert ours["attention_mask"].float().mean() < 0.9, "the batch should have padding"
    for key in ("input_ids", "attention_mask", "completion_mask", "mm_token_type_ids", "image_grid_thw"):
        assert torch.equal(ours[key], theirs[key]), key
    assert torch.allclose(ours["pixel_values"], theirs["pixel_values"], atol=1e-6)


def test_collator_length_policy(tiny_processor):
    rows, collator = _pairs_and_collator(tiny_processor, max_length=256)
    full = collator(rows)
    prompt_length = int((full["completion_mask"][0] == 0).sum())
    # a cut in the answer text: the sequences are cut, every pair keeps answer tokens
    rows, collator = _pairs_and_collator(tiny_processor, max_length=prompt_length + 2)
    cut = collator(rows)
    assert cut["input_ids"].shape[1] == prompt_length + 2 and cut["completion_mask"].sum(dim=1).min() > 0
    # a cut inside the image drops the pair; when every pair goes the batch cannot be built
    rows, collator = _pairs_and_collator(tiny_processor, max_length=16)
    with pytest.raises(DataError, match="every pair of a batch was dropped"):
        collator(rows)
    rows, collator = _pairs_and_collator(tiny_processor, max_length=prompt_length + 2, overlength=Overlength.error)
    with pytest.raises(DataError, match=r"shapes:train:0 \(chosen\): \d+ tokens, over data.max_length"):
        collator(rows)


# ----------------------------------------------------------------------------------------------------------------
# training (tier 2)


def _history(out, key):
    return [e[key] for e in json.loads((out / "log_history.json").read_text()) if key in e and "loss" in e]


@pytest.mark.slow
def test_dpo_on_shapes_raises_reward_accuracy_and_margin(tmp_path):
    from qwenvl_ft.commands.train import train

    out = tmp_path / "run"
    cfg = compose(["recipe=dpo_demo", "data.shapes.num_train=384", "data.shapes.num_eval=32",
                   "trainer.logging_steps=4", "trainer.disable_tqdm=true"], output_dir=str(out))
    metrics = train(cfg)
    accuracy, margin = _history(out, "rewards/accuracies"), _history(out, "rewards/margins")
    assert len(accuracy) >= 12
    early_accuracy, late_accuracy = sum(accuracy[1:4]) / 3, sum(accuracy[-3:]) / 3
    early_margin, late_margin = sum(margin[1:4]) / 3, sum(margin[-3:]) / 3
    assert late_accuracy >= 0.75 and late_accuracy > early_accuracy + 0.1, accuracy
    assert late_margin > early_margin + 0.3, margin
    assert metrics["eval_reward_accuracy"] >= 0.75 and metrics["eval_reward_margin"] > 0.3
    assert metrics["reference"] == "the base with the adapter disabled"
    # the same layout as SFT
    assert (out / "config.yaml").read_text().startswith("model:")
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
    final = out / "final"
    assert (final / "adapter_model.safetensors").exists() and (final / "processor_config.json").exists()
    assert not (final / "ref").exists(), "TRL made a 'ref' adapter copy instead of disabling the adapter"
    assert json.loads((out / "metrics.json").read_text())["global_step"] == metrics["global_step"] == 96


def _completion_logps(model, batch):
    """Sum of log-probabilities of the completion tokens, from plain logits (no TRL code)."""
    inputs = {k: v for k, v in batch.items() if k not in ("completion_mask",)}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    targets = batch["input_ids"][:, 1:]
    logps = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (logps * batch["completion_mask"][:, 1:]).sum(dim=1)


@pytest.mark.slow
def test_lora_reference_is_the_base_with_the_adapter_disabled(tmp_path):
    from transformers import PreTrainedModel, Qwen2VLForConditionalGeneration

    from qwenvl_ft.data.collate_preference import VisionPreferenceCollator
    from qwenvl_ft.modeling.build import build_base_model, build_lora_config, build_processor
    from qwenvl_ft.modeling.random_init import materialize
    from qwenvl_ft.trainers.dpo import build_trainer

    typed = validate(compose(QUICK + ["optimizer.lr=1e-2"], output_dir=str(tmp_path / "run")))
    processor = build_processor(typed.model, typed.data)
    train_rows, eval_rows = load_pair_splits(typed.data)
    base = build_base_model(typed.model, typed.adapter)
    gc.collect()
    models_before = {id(o) for o in gc.get_objects() if isinstance(o, PreTrainedModel)}
    trainer = build_trainer(typed, base, build_lora_config(base, typed.model, typed.adapter), processor,
                            VisionPreferenceCollator(processor, typed.data), train_rows, eval_rows)
    gc.collect()
    created = [o for o in gc.get_objects() if isinstance(o, PreTrainedModel) and id(o) not in models_before]
    assert created == [], "DPOTrainer built a second model"
    assert trainer.ref_model is None and list(trainer.model.peft_config) == ["default"]
    assert trainer.model.get_base_model() is base

    trainer.train()
    batch = trainer.data_collator([eval_rows[i] for i in range(4)])
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    fresh = Qwen2VLForConditionalGeneration.from_pretrained(materialize(typed.model.architecture)).eval()
    expected = _completion_logps(fresh, batch)
    assert torch.allclose(torch.cat([ref_chosen, ref_rejected]), expected, atol=1e-3)
    trainer.model.eval()
    policy = _completion_logps(trainer.model, batch)
    assert (policy - expected).abs().max() > 0.05, "the adapter did not change the policy"


@pytest.mark.slow
def test_qlora_dpo_runs_on_cpu(tmp_path):
    from safetensors.torch import load_file

    from qwenvl_ft.commands.train import train

    out = tmp_path / "run"
    # vision tower and merger frozen: everything but the LoRA adapters is 4-bit
    metrics = train(compose(QUICK + ["adapter=qlora", "model.freeze_vision_tower=true", "model.freeze_merger=true",
                                     "adapter.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
                                     "optimizer.lr=1e-2"], output_dir=str(out)))
    assert metrics["reference"] == "the base with the adapter disabled" and metrics["global_step"] == 8
    losses = _history(out, "loss")
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    assert any(m != 0 for m in _history(out, "rewards/margins")[1:]), "the policy never moved from the reference"
    adapter = load_file(str(out / "final" / "adapter_model.safetensors"))
    assert all(".language_model." in k for k in adapter)
    assert all(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_precomputed_reference_gives_the_same_training(tmp_path, adapter):
    from qwenvl_ft.commands.train import train

    common = QUICK + [f"adapter={adapter}", "optimizer.lr=3e-3", "trainer.max_steps=6"]
    runs = {}
    for precompute in (False, True):
        out = tmp_path / f"precompute_{precompute}"
        metrics = train(compose(common + [f"trainer.dpo.precompute_ref_log_probs={precompute}"],
                                output_dir=str(out)))
        runs[precompute] = (metrics, _history(out, "rewards/margins"), _history(out, "loss"))
    (plain, plain_margins, plain_losses), (pre, pre_margins, pre_losses) = runs[False], runs[True]
    expected = "the base with the adapter disabled" if adapter == "lora" else "a frozen copy of the starting model"
    assert plain["reference"] == expected and pre["reference"] == f"log-probabilities of {expected}, precomputed"
    assert any(abs(m) > 1e-3 for m in plain_margins[1:]), "nothing trained"
    assert pre_margins == pytest.approx(plain_margins, abs=1e-4)
    assert pre_losses == pytest.approx(plain_losses, abs=1e-4)
    assert pre["eval_reward_margin"] == pytest.approx(plain["eval_reward_margin"], abs=1e-4)


@pytest.mark.slow
def test_train_command_dispatches_on_trainer_kind(tmp_path):
    from qwenvl_ft.commands.train import train as train_any_kind

    metrics = train_any_kind(compose(QUICK + ["trainer.max_steps=2"], output_dir=str(tmp_path / "run")))
    assert "first_logged_reward_accuracy" in metrics and metrics["global_step"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["llava_preference", "messages_preference"])
def test_dpo_trains_from_either_file_format(tmp_path, fmt):
    """Generated shape images written as PNGs, pairs written as JSON in each format, two steps of DPO."""
    from qwenvl_ft.commands.train import train

    records = []
    for index, row in enumerate(shapes_preference_rows(12, 56, seed=1, split="train")):
        row["images"][0].save(tmp_path / f"{index}.png")
        chosen, rejected = _texts(row["chosen"])[0], _texts(row["rejected"])[0]
        if fmt == "llava_preference":
            records.append({"image": f"{index}.png", "prompt": "<image>\nWhat is in the image?", "chosen": chosen,
                            "rejected": rejected})
        else:
            records.append({"images": [f"{index}.png"], "prompt": [{"role": "user", "content": [
                {"type": "image"}, {"type": "text", "text": "What is in the image?"}]}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}]})
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(records))
    metrics = train(compose(QUICK + [f"data={fmt}", f"data.path={path}", "data.eval_size=4", "trainer.max_steps=2",
                                     "trainer.batch_size=4"], output_dir=str(tmp_path / "run")))
    assert metrics["global_step"] == 2 and math.isfinite(metrics["eval_loss"])
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_vision_and_merger_learning_rates_apply_to_the_wrapped_model(tmp_path):
    from qwenvl_ft.data.collate_preference import VisionPreferenceCollator
    from qwenvl_ft.modeling.build import build_base_model, build_lora_config, build_processor, model_parts
    from qwenvl_ft.trainers.dpo import build_trainer

    typed = validate(compose(QUICK + ["optimizer.lr=1e-3", "optimizer.vision_lr=1e-5", "optimizer.merger_lr=1e-4"],
                             output_dir=str(tmp_path / "run")))
    processor = build_processor(typed.model, typed.data)
    train_rows, eval_rows = load_pair_splits(typed.data)
    base = build_base_model(typed.model, typed.adapter)
    trainer = build_trainer(typed, base, build_lora_config(base, typed.model, typed.adapter), processor,
                            VisionPreferenceCollator(processor, typed.data), train_rows, eval_rows)
    trainer.create_optimizer()  # what train() calls first: the groups are built on the model as trained
    parts = model_parts(trainer.model)
    trained = {id(p) for p in trainer.model.parameters() if p.requires_grad}
    merger_ids = {id(p) for projector in parts.projectors for p in projector.parameters() if p.requires_grad}
    vision_ids = {id(p) for p in parts.vision.parameters() if p.requires_grad} - merger_ids
    lrs = {id(p): group["lr"] for group in trainer.optimizer.param_groups for p in group["params"]}
    assert set(lrs) == trained and merger_ids and vision_ids, "the groups must hold exactly the trained parameters"
    assert {lrs[i] for i in vision_ids} == {1e-5} and {lrs[i] for i in merger_ids} == {1e-4}
    assert {lrs[i] for i in trained - vision_ids - merger_ids} == {1e-3}
    trainer.train()
    assert trainer.state.global_step == 8
