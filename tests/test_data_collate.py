"""Tier 1: the collation path. Samples equal what the processor makes, labels cover assistant turns only, images,
videos and text-only rows mix in one batch the model accepts, max_length never cuts a vision span, and the
collator runs in DataLoader workers with each image decoded once."""

import pickle

import re

import pytest
import torch
from PIL import Image

from qwenvl_ft.data.collate import IGNORE_INDEX, RowDropped, VisionChatCollator
from qwenvl_ft.errors import DataError

from data_helpers import assistant, data_cfg, frame_level, user, write_image, write_video
from family_models import DEFAULT_MODEL, TEST_MODELS

SMALL_VIDEO = dict(video_min_pixels=28 * 28, video_max_pixels=56 * 56)


def _collator(processor, **overrides):
    return VisionChatCollator(processor, data_cfg(format="shapes", **{"max_length": None, **overrides}))


def _noise(width, height, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 255, (height, width, 3), generator=generator, dtype=torch.uint8).numpy())


def _row(messages, images=(), videos=(), source="t:0"):
    return {"messages": messages, "images": list(images), "videos": list(videos), "source": source}


def _runs(labels, tokenizer):
    """Decoded contiguous runs of trained positions."""
    runs, current = [], []
    for label in labels.tolist() + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs


def test_the_image_processor_is_the_fast_torchvision_one(tiny_processor):
    from transformers.image_processing_backends import TorchvisionBackend

    assert isinstance(tiny_processor.image_processor, TorchvisionBackend)
    assert tiny_processor.image_processor.backend == "torchvision"


@pytest.mark.parametrize("option", TEST_MODELS)
def test_encode_equals_the_processor_on_the_same_row(processor_of, option):
    from transformers.video_utils import VideoMetadata

    processor = processor_of(option)
    collator = _collator(processor, **SMALL_VIDEO)
    frames = [_noise(80, 64, seed=s) for s in range(3)]
    row = _row([user("What?", images=1, videos=1), assistant("stuff"), user("And?", images=1), assistant("more")],
               images=[_noise(130, 90), _noise(60, 60, seed=1)], videos=[frames])
    sample = collator.encode(row)
    # The data check's stored text (train.arrow's text_ids and label_mask) gives the same sample as rendering it
    stats = collator.measure(row)
    stored = collator.encode(dict(row, text_ids=stats.text_ids, label_mask=stats.label_mask))
    assert stored.keys() == sample.keys() and all(torch.equal(stored[k], sample[k]) for k in sample)
    # Images: the processor given the original images resizes them itself; ours resized first, with its resize.
    image_row = _row([user("What?", images=2), assistant("x")], images=row["images"])
    reference = processor(text=[collator.render(image_row["messages"])], images=row["images"], return_tensors="pt")
    ours = collator.encode(image_row)
    for key in ("input_ids", "mm_token_type_ids"):
        assert torch.equal(ours[key], reference[key][0]), key
    for key in ("pixel_values", "image_grid_thw"):
        assert torch.equal(ours[key], reference[key]), key
    # Video (frames sampled and resized by us, as qwen-vl-utils would, with the metadata qwen-vl-utils gives a
    # frame list: positions at the sampling rate): the processor's own token expansion, timestamps and timing.
    visuals = collator.load_visuals(row)
    fps = visuals.video_fps[0]
    metadata = VideoMetadata(total_num_frames=len(visuals.videos[0]), fps=fps,
                             frames_indices=list(range(len(visuals.videos[0]))))
    reference = processor(text=[collator.render(row["messages"])], images=visuals.images, videos=visuals.videos,
                          video_metadata=[metadata], fps=fps, do_resize=False, do_sample_frames=False,
                          return_tensors="pt")
    for key in ("input_ids", "mm_token_type_ids"):
        assert torch.equal(sample[key], reference[key][0]), key
    assert set(sample) - {"labels"} == set(reference) - {"attention_mask"}
    for key in set(sample) - {"labels", "input_ids", "mm_token_type_ids"}:
        assert torch.equal(sample[key], reference[key]), key
    t, h, w = sample["video_grid_thw"][0].tolist()
    assert t == 2  # 3 frames padded to 4
    assert (sample["mm_token_type_ids"] == 2).sum() == t * h * w // 4
    if option == DEFAULT_MODEL:
        assert [h, w] == [2, 4]  # 80x64 -> 56x28 (<= 56*56)


def test_labels_are_every_assistant_turn_and_nothing_else(tiny_processor):
    collator = _collator(tiny_processor, **SMALL_VIDEO)
    frames = [_noise(64, 64, seed=s) for s in range(2)]
    row = _row([{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                user("Look", images=1, videos=1), assistant("a red square"), user("Again?"), assistant("yes"),
                user("Last"), assistant("done.")], images=[_noise(56, 56)], videos=[frames])
    sample = collator.encode(row)
    tok = tiny_processor.tokenizer
    assert _runs(sample["labels"], tok) == ["a red square<|im_end|>", "yes<|im_end|>", "done.<|im_end|>"]
    trained = sample["labels"] != IGNORE_INDEX
    assert torch.equal(sample["labels"][trained], sample["input_ids"][trained])
    assert not trained[sample["mm_token_type_ids"] != 0].any()


def test_video_files_are_sampled_by_fps_or_frame_count(tiny_processor, tmp_path):
    clip = write_video(tmp_path / "clip.mp4", frames=24, fps=4)  # 6 seconds
    no_count = write_video(tmp_path / "clip.mkv", frames=24, fps=4)  # container without a frame count
    row = _row([user("What happens?", videos=1), assistant("It brightens.")], videos=[str(clip)])
    for settings, frames, levels in [({"video_fps": 1.0}, 6, [0, 5, 9, 14, 18, 23]),
                                     ({"video_nframes": 4}, 4, [0, 8, 15, 23]),
                                     ({}, 12, None)]:  # qwen-vl-utils' default: 2 per second
        collator = _collator(tiny_processor, **SMALL_VIDEO, **settings)
        for path in (clip, no_count):
            visuals = collator.load_visuals(dict(row, videos=[str(path)]))
            video = visuals.videos[0]
            assert video.shape[0] == frames and visuals.video_sizes == [(24, 64, 48)]
            if levels:
                expected = torch.tensor([frame_level(i, 24) for i in levels], dtype=torch.float)
                assert (video[:, :, 10, 10].float().mean(dim=1) - expected).abs().max() < 6
        sample = collator.encode(row)
        assert sample["video_grid_thw"][0, 0] == frames // 2
    seconds = _collator(tiny_processor, **SMALL_VIDEO, video_fps=1.0)
    assert seconds.load_visuals(row).video_fps == [1.0]


@pytest.mark.parametrize("option", TEST_MODELS)
def test_images_videos_and_text_only_rows_mix_in_one_batch_the_model_accepts(processor_of, option, tmp_path):
    from qwenvl_ft.config.compose import compose, validate
    from qwenvl_ft.modeling.build import model_class, model_source

    tiny_processor = processor_of(option)
    collator = _collator(tiny_processor, **SMALL_VIDEO)
    clip = write_video(tmp_path / "clip.mp4", frames=8, fps=4)
    rows = [_row([user("Hi"), assistant("Hello")], source="t:0"),
            _row([user("What?", images=2), assistant("two dots")], images=[_noise(56, 84), _noise(40, 40, 1)],
                 source="t:1"),
            _row([user("Moves?", videos=1), assistant("left")], videos=[str(clip)], source="t:2"),
            _row([user("Both?", images=1, videos=1), assistant("yes")], images=[_noise(60, 30, 2)],
                 videos=[[_noise(50, 50, 3), _noise(50, 50, 4)]], source="t:3")]
    batch = collator(rows)
    assert batch["image_grid_thw"].shape[0] == 3 and batch["video_grid_thw"].shape[0] == 2
    # the rows' images in one processor call (encode_rows) give the samples of one call per row
    one_by_one = collator.pad([collator.encode(row) for row in rows])
    assert batch.keys() == one_by_one.keys() and all(torch.equal(batch[k], one_by_one[k]) for k in batch)
    merge = tiny_processor.image_processor.merge_size ** 2
    assert int((batch["mm_token_type_ids"] == 1).sum()) == int(batch["image_grid_thw"].prod(-1).sum()) // merge
    assert int((batch["mm_token_type_ids"] == 2).sum()) == int(batch["video_grid_thw"].prod(-1).sum()) // merge
    typed = validate(compose(["recipe=demo", f"model={option}"], output_dir=str(tmp_path)))
    model = model_class(typed.model).from_pretrained(model_source(typed.model))
    with torch.no_grad():
        loss = model(**batch).loss
    assert torch.isfinite(loss)


def test_max_length_never_cuts_a_vision_span(tiny_processor):
    long_answer = " ".join(["word"] * 40)
    row = _row([user("Describe.", images=1), assistant(long_answer)], images=[_noise(112, 112)])
    full = _collator(tiny_processor).encode(row)
    image_end = int((full["input_ids"] == tiny_processor.tokenizer.convert_tokens_to_ids("<|vision_end|>"))
                    .nonzero()[-1])
    first_answer = int((full["labels"] != IGNORE_INDEX).nonzero()[0])
    limit = first_answer + 3
    cut = _collator(tiny_processor, max_length=limit).encode(row)  # truncate_text is the default
    assert cut["input_ids"].numel() == limit and torch.equal(cut["input_ids"], full["input_ids"][:limit])
    assert int((cut["labels"] != IGNORE_INDEX).sum()) == 3 and torch.equal(cut["pixel_values"], full["pixel_values"])
    with pytest.raises(RowDropped, match="the cut would fall inside an image or video"):
        _collator(tiny_processor, max_length=image_end - 3).encode(row)
    with pytest.raises(RowDropped, match="the cut would remove every assistant token"):
        _collator(tiny_processor, max_length=first_answer).encode(row)
    with pytest.raises(RowDropped, match=r"t:0: \d+ tokens, over data.max_length=\d+: dropped \(data.overlength=drop"):
        _collator(tiny_processor, max_length=limit, overlength="drop").encode(row)
    with pytest.raises(DataError, match="data.overlength=error") as info:
        _collator(tiny_processor, max_length=limit, overlength="error").encode(row)
    assert not isinstance(info.value, RowDropped)
    measured = _collator(tiny_processor, max_length=limit).measure(row)
    assert measured.truncated and measured.length == limit and measured.full_length == full["input_ids"].numel()


def test_measure_agrees_with_encode(tiny_processor):
    collator = _collator(tiny_processor, **SMALL_VIDEO)
    row = _row([user("A?", images=2, videos=1), assistant("B")], images=[_noise(100, 70), _noise(28, 200, 1)],
               videos=[[_noise(64, 64, s) for s in range(4)]])
    sample, stats = collator.encode(row), collator.measure(row)
    assert stats.length == sample["input_ids"].numel()
    assert stats.image_tokens == (sample["image_grid_thw"].prod(-1) // 4).tolist()
    assert stats.video_tokens == (sample["video_grid_thw"].prod(-1) // 4).tolist()
    assert stats.image_sizes == [(100, 70), (28, 200)] and stats.video_sizes == [(4, 64, 64)]
    assert stats.label_tokens == int((sample["labels"] != IGNORE_INDEX).sum())
    assert stats.text_tokens == stats.length - sum(stats.image_tokens) - sum(stats.video_tokens)


def test_caps_on_images_visual_tokens_and_aspect_ratio(tiny_processor):
    two = _row([user("?", images=2), assistant("!")], images=[_noise(56, 56), _noise(56, 56, 1)])
    with pytest.raises(DataError, match=r"t:0: field 'images': 2 images, over data.max_images_per_row=1"):
        _collator(tiny_processor, max_images_per_row=1).encode(two)
    with pytest.raises(DataError, match=r"8 visual tokens, over data.max_visual_tokens=6"):
        _collator(tiny_processor, max_visual_tokens=6).encode(two)
    # A video shrinks its frames to fit what the images leave, and is refused when even its smallest frames cannot.
    frames = [_noise(224, 224, s) for s in range(4)]
    video_row = _row([user("?", images=1, videos=1), assistant("!")], images=[_noise(56, 56)], videos=[frames])
    unbounded = _collator(tiny_processor, video_min_pixels=28 * 28, video_max_pixels=224 * 224).measure(video_row)
    bounded = _collator(tiny_processor, video_min_pixels=28 * 28, video_max_pixels=224 * 224,
                        max_visual_tokens=40).measure(video_row)
    assert unbounded.video_tokens == [128] and bounded.video_tokens[0] <= 40 - 4
    with pytest.raises(DataError, match="does not fit in the 0 visual tokens left by data.max_visual_tokens"):
        _collator(tiny_processor, **SMALL_VIDEO, max_visual_tokens=4).measure(video_row)
    thin = _row([user("?", images=1), assistant("!")], images=[Image.new("RGB", (201, 1))])
    with pytest.raises(DataError, match=r"t:0: images\[0\]: image of 201x1 has an aspect ratio of 201:1"):
        _collator(tiny_processor).encode(thin)
    fine = _row([user("?", images=1), assistant("!")], images=[Image.new("RGB", (3000, 20))])  # 150:1 is allowed
    assert _collator(tiny_processor).encode(fine)["image_grid_thw"].shape == (1, 3)


def test_the_collator_pickles_and_runs_in_dataloader_workers(tiny_processor, tmp_path):
    from torch.utils.data import DataLoader

    paths = [write_image(tmp_path / f"{i}.png", size=(56 + 28 * i, 56), colour=(40 * i, 0, 0)) for i in range(4)]
    rows = [_row([user(f"n{i}?", images=1), assistant(f"{i}")], images=[str(p)], source=f"t:{i}")
            for i, p in enumerate(paths)]
    collator = _collator(tiny_processor)
    copy = pickle.loads(pickle.dumps(collator))
    assert torch.equal(copy(rows)["input_ids"], collator(rows)["input_ids"])
    loader = DataLoader(rows, batch_size=2, num_workers=1, collate_fn=collator)
    batches = list(loader)
    expected = [collator(rows[:2]), collator(rows[2:])]
    for got, want in zip(batches, expected):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_each_image_is_opened_and_decoded_once_per_sample(tiny_processor, tmp_path, monkeypatch):
    from PIL import ImageFile

    paths = [write_image(tmp_path / f"{i}.jpg", size=(300, 200)) for i in range(3)]
    row = _row([user("?", images=3), assistant("!")], images=[str(p) for p in paths])
    opened, decoded = [], []
    real_open, real_load = Image.open, ImageFile.ImageFile.load

    def counting_open(*args, **kwargs):
        opened.append(args[0])
        return real_open(*args, **kwargs)

    def counting_load(self):
        if self.tile:  # still undecoded: this call decodes
            decoded.append(self)
        return real_load(self)

    monkeypatch.setattr(Image, "open", counting_open)
    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    _collator(tiny_processor).encode(row)
    assert len(opened) == 3 and len(decoded) == 3


def test_helpers_for_other_consumers(tiny_processor):
    collator = _collator(tiny_processor, **SMALL_VIDEO)
    row = _row([user("?", images=1), assistant("!")], images=[_noise(100, 50)])
    short = _row([user("Hi"), assistant("!")])
    ours = collator.generation_batch([row, short])
    texts = [collator.render(r["messages"][:-1], add_generation_prompt=True) for r in (row, short)]
    reference = tiny_processor(text=texts, images=row["images"], padding=True, padding_side="left",
                               return_tensors="pt")
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"):
        assert torch.equal(ours[key], reference[key]), key
    video_row = _row([user("?", videos=1), assistant("!")], videos=[[_noise(56, 56, s) for s in range(2)]])
    batch = collator.generation_batch([row, video_row])
    assert batch["input_ids"].shape[0] == 2 and (batch["attention_mask"][:, -1] == 1).all()  # left-padded
    assert "pixel_values_videos" in batch and "pixel_values" in batch


def _thinking_option():
    from family_models import family_of_option

    return next(option for option in TEST_MODELS if "<think>" in family_of_option(option).added_tokens)


def test_reasoning_renders_as_the_template_renders_it_and_is_trained(processor_of):
    """A thinking template (Qwen3.5): a turn's reasoning, inline or as a reasoning_content field, renders exactly
    as the template renders reasoning_content; the last answer's think block (empty without reasoning) is a target,
    the turn before the last user query loses its reasoning, as the template does."""
    processor = processor_of(_thinking_option())
    collator = _collator(processor)
    inline = [user("Q1"), assistant("<think>\nfirst thought\n</think>\n\nA1"), user("Q2"),
              assistant("<think>\nsecond thought\n</think>\n\nA2")]
    fields = [user("Q1"), dict(assistant("A1"), reasoning_content="first thought"), user("Q2"),
              dict(assistant("A2"), reasoning_content="second thought")]
    assert collator.render(inline) == processor.apply_chat_template(fields, tokenize=False)
    tok = processor.tokenizer
    runs = _runs(collator.encode(_row(inline))["labels"], tok)
    assert runs == ["A1<|im_end|>", "<think>\nsecond thought\n</think>\n\nA2<|im_end|>"]
    plain = _runs(collator.encode(_row([user("Q"), assistant("A")]))["labels"], tok)
    assert plain == ["<think>\n\n</think>\n\nA<|im_end|>"]


def test_thinking_keep_renders_every_turn_as_the_template_renders_the_last(processor_of):
    """data.thinking=keep: the template renders reasoning after the last user query only; keep renders every
    assistant turn that way (its think block, empty without reasoning), and the think blocks are what differs from
    the template's own text. Each turn is compared with the template's rendering of it as the last turn."""
    processor = processor_of(_thinking_option())
    kept = _collator(processor, thinking="keep")

    def template(messages, prompt=False):
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)

    first = [user("Q1"), dict(assistant("A1"), reasoning_content="first thought")]
    second = [user("Q2"), dict(assistant("A2"), reasoning_content="second thought")]
    third = [user("Q3"), assistant("A3")]
    text = kept.render(first + second + third)
    # each turn as the template renders it when last: the first whole, then each user query and answer
    for before, turn in (([], first), (first, second), (first + second, third)):
        last = template(before + turn)[len(template(before + turn[:1])):]  # the answer, as the last turn
        assert last in text
    assert "<think>\nfirst thought\n</think>\n\nA1" in text and "<think>\n\n</think>\n\nA3" in text
    assert "first thought" not in template(first + second + third)  # what keep is for
    default = _collator(processor).render(first + second + third)
    think = re.compile(r"<think>\n.*?\n</think>\n\n", re.DOTALL)
    assert think.sub("", text) == think.sub("", default) and text != default
    tok = processor.tokenizer
    runs = _runs(kept.encode(_row(first + second))["labels"], tok)
    assert runs == ["<think>\nfirst thought\n</think>\n\nA1<|im_end|>",
                    "<think>\nsecond thought\n</think>\n\nA2<|im_end|>"]
    # one turn, and a generation prompt after earlier turns: as the template, earlier reasoning kept
    assert kept.render(first) == template(first)
    prompt = kept.render(first + [user("Q2")], add_generation_prompt=True)
    assert prompt.endswith(template([user("Q2")], prompt=True)) and "first thought" in prompt


def test_thinking_keep_refuses_a_template_it_cannot_cut(processor_of):
    """A template that renders more than think blocks differently (here: a made-up one numbering the turns from the
    end) cannot be kept: a ConfigError naming the setting, not a wrong text."""
    from qwenvl_ft.data.turns import every_reasoning_kept

    def numbered(messages, prompt=False):
        return "".join(f"{len(messages) - i}:{m['role']};" for i, m in enumerate(messages))

    from qwenvl_ft.errors import ConfigError

    with pytest.raises(ConfigError, match="data.thinking=keep"):
        every_reasoning_kept(numbered, [user("Q1"), assistant("A1"), user("Q2"), assistant("A2")])


def test_thinking_strip_and_enable_thinking(processor_of):
    processor = processor_of(_thinking_option())
    stripped = _collator(processor, thinking="strip")
    row = [user("Q"), assistant("<think>\nlong reasoning\n</think>\n\nA")]
    assert "long reasoning" not in stripped.render(row)
    assert stripped.render(row) == _collator(processor).render([user("Q"), assistant("A")])
    prompt = [user("Q")]
    assert _collator(processor).render(prompt, add_generation_prompt=True).endswith("<think>\n")
    closed = _collator(processor, enable_thinking=False).render(prompt, add_generation_prompt=True)
    assert closed.endswith("<think>\n\n</think>\n\n")


def test_a_batch_is_collated_on_one_torch_thread_with_the_same_values(tiny_processor, tmp_path, monkeypatch):
    paths = [write_image(tmp_path / f"{i}.png", size=(56 + 28 * i, 84), colour=(60 * i, 20, 0)) for i in range(3)]
    rows = [_row([user(f"n{i}?", images=1), assistant(f"answer {i}")], images=[str(p)], source=f"t:{i}")
            for i, p in enumerate(paths)]
    collator = _collator(tiny_processor)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = collator.pad([collator.encode(row) for row in rows])  # on torch's two threads
        seen = []
        encode_rows = collator.encode_rows  # the batch's rows, encoded together (one image-processor call)
        monkeypatch.setattr(collator, "encode_rows",
                            lambda rows: seen.append(torch.get_num_threads()) or encode_rows(rows))
        batch = collator(rows)
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert batch.keys() == expected.keys() and all(torch.equal(batch[k], expected[k]) for k in expected)


def test_the_label_mask_decodes_each_turn_header_once(tiny_processor):
    from qwenvl_ft.data.turns import assistant_label_mask

    collator = _collator(tiny_processor)
    tok = tiny_processor.tokenizer
    texts = [collator.render([user(f"q{i}"), assistant("word " * i), user("more"), assistant(f"{i}")])
             for i in range(4)]
    ids = [tok(text)["input_ids"] for text in texts]
    ids.append(ids[0][:-3])  # cut inside the last answer
    ids.append(ids[0][:ids[0].index(tok.convert_tokens_to_ids("<|im_start|>"), 5) + 2])  # cut inside a header
    decoded, calls = {}, []
    counting = type("Counting", (), {"convert_tokens_to_ids": tok.convert_tokens_to_ids,
                                     "decode": lambda self, t: calls.append(t) or tok.decode(t)})()
    for row_ids in ids:
        assert torch.equal(assistant_label_mask(row_ids, counting, decoded), assistant_label_mask(row_ids, tok))
    assert len(calls) == len(decoded) <= 10  # the system, user and assistant headers' prefixes, each decoded once
