"""Tier 1: the in-process tokenizer behaves like Qwen2-VL's, and labels cover assistant turns only."""

import torch
from PIL import Image

from qwenvl_ft.config.data import DataConfig
from qwenvl_ft.data.collate import IGNORE_INDEX, VisionChatCollator
from qwenvl_ft.modeling.random_init import QWEN_SPECIAL_TOKENS


def _user(text, images=0):
    return {"role": "user", "content": [{"type": "image", "text": None}] * images + [{"type": "text", "text": text}]}


def _assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def test_special_tokens_keep_the_real_order(tiny_processor):
    tok = tiny_processor.tokenizer
    ids = tok.convert_tokens_to_ids(QWEN_SPECIAL_TOKENS)
    assert ids == list(range(ids[0], ids[0] + len(QWEN_SPECIAL_TOKENS)))  # real ids are 151643..151656
    for token in QWEN_SPECIAL_TOKENS:
        assert tok.encode(token, add_special_tokens=False) == [tok.convert_tokens_to_ids(token)]


def test_chat_template_matches_qwen2_vl(tiny_processor):
    render = tiny_processor.apply_chat_template
    text = render([_user("Hi", images=1), _assistant("Hello")], tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n"
                    "<|im_start|>assistant\nHello<|im_end|>\n")
    own_system = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, _user("Hi")]
    text = render(own_system, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\n")
    video = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    assert "<|vision_start|><|video_pad|><|vision_end|>What happens?" in render(video, tokenize=False)


def _image(colour):
    return Image.new("RGB", (56, 84), colour)


def test_labels_are_exactly_the_assistant_turns(tiny_processor):
    collator = VisionChatCollator(tiny_processor, DataConfig(max_length=None))
    rows = [
        {"messages": [_user("What is this?", images=1), _assistant("a red square"),
                      _user("And the background?"), _assistant("white, mostly.")],
         "images": [_image("red")], "source": "test:0"},
        {"messages": [{"role": "system", "content": [{"type": "text", "text": "Answer in one word."}]},
                      _user("Colour?", images=2), _assistant("blue")],
         "images": [_image("blue"), _image("green")], "source": "test:1"},
    ]
    batch = collator(rows)
    tok = tiny_processor.tokenizer
    expected = [["a red square<|im_end|>", "white, mostly.<|im_end|>"], ["blue<|im_end|>"]]
    for i, answers in enumerate(expected):
        labels = batch["labels"][i]
        # contiguous runs of unmasked positions, decoded
        runs, current = [], []
        for position, label in enumerate(labels.tolist()):
            if label != IGNORE_INDEX:
                current.append(label)
            elif current:
                runs.append(current)
                current = []
        if current:
            runs.append(current)
        assert [tok.decode(run) for run in runs] == answers
        # unmasked labels equal the input ids there; padding, image and prompt positions are masked
        keep = labels != IGNORE_INDEX
        assert torch.equal(labels[keep], batch["input_ids"][i][keep])
        assert not keep[batch["attention_mask"][i] == 0].any()
        image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
        assert not keep[batch["input_ids"][i] == image_pad].any()
    # every image's visual tokens are in the text: grid t*h*w / merge^2 per image
    merge = tiny_processor.image_processor.merge_size
    image_tokens = (batch["input_ids"] == tok.convert_tokens_to_ids("<|image_pad|>")).sum()
    assert int(image_tokens) == int((batch["image_grid_thw"].prod(-1) // merge**2).sum())
    assert batch["image_grid_thw"].shape[0] == 3


def test_text_only_and_image_rows_mix_in_one_batch(tiny_processor):
    collator = VisionChatCollator(tiny_processor, DataConfig(max_length=None))
    rows = [{"messages": [_user("Hi"), _assistant("Hello")], "images": [], "source": "t:0"},
            {"messages": [_user("What?", images=1), _assistant("a dot")], "images": [_image("red")],
             "source": "t:1"}]
    batch = collator(rows)
    assert batch["image_grid_thw"].shape[0] == 1
    assert batch["input_ids"].shape == batch["labels"].shape == batch["mm_token_type_ids"].shape


def test_random_models_are_stored_in_the_configured_dtype(tmp_path, monkeypatch):
    import json
    from pathlib import Path

    from safetensors import safe_open

    from qwenvl_ft.config.compose import compose, validate
    from qwenvl_ft.modeling.build import model_source
    from qwenvl_ft.modeling.random_init import materialize

    monkeypatch.setenv("QWENVL_FT_CACHE", str(tmp_path))
    typed = validate(compose(["recipe=demo", "model.dtype=bfloat16"], output_dir="/tmp/unused"))
    half = Path(model_source(typed.model))  # what training loads: the weights in model.dtype, half the bytes of fp32
    full = materialize(typed.model.architecture)
    assert half != full and materialize(typed.model.architecture, "bfloat16") == half  # cached per dtype
    for folder, dtype in ((half, "bfloat16"), (full, "float32")):
        with safe_open(f"{folder}/model.safetensors", "pt") as weights:
            assert {str(weights.get_tensor(name).dtype) for name in weights.keys()} == {f"torch.{dtype}"}
        assert json.loads(open(f"{folder}/config.json").read())["dtype"] == dtype
