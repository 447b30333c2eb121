"""Tier 1: every supported layout becomes canonical rows; every structural problem is one message naming the file,
the row and the field; splits are seeded."""

import base64
import json

import pytest
from PIL import Image

from qwenvl_ft.config.data import ColumnsConfig
from qwenvl_ft.data.arrow import to_dataset
from qwenvl_ft.data.records import load_rows
from qwenvl_ft.data.splitting import load_split_rows, split_rows
from qwenvl_ft.errors import DataError

from data_helpers import data_cfg, llava, write_jsonl


def _kinds(row):
    return [[item["type"] for item in m["content"]] for m in row["messages"]]


# ----------------------------------------------------------------------------------------------------------------
# layouts


def test_llava_json_and_jsonl_with_one_image_a_list_and_a_folder(tmp_path):
    records = [llava("a.jpg"),
               llava(["a.jpg", "b.jpg"], placeholder="<image>\n<image>\n", question="Same?"),
               llava(None, question="Just text"),
               {"conversations": [{"from": "system", "value": "Be brief."},
                                  {"from": "human", "value": "<image>\nOne?"}, {"from": "gpt", "value": "Yes."},
                                  {"from": "human", "value": "Two?"}, {"from": "gpt", "value": "No."}],
                "image": "a.jpg"}]
    (tmp_path / "train.json").write_text(json.dumps(records))
    write_jsonl(tmp_path / "train.jsonl", records)
    array = load_rows(data_cfg(tmp_path / "train.json"), str(tmp_path / "train.json"))
    lines = load_rows(data_cfg(tmp_path / "train.jsonl", image_folder="/images"), str(tmp_path / "train.jsonl"))
    assert [r["messages"] for r in array] == [r["messages"] for r in lines]
    assert array[0]["images"] == [str(tmp_path / "a.jpg")] and lines[0]["images"] == ["/images/a.jpg"]
    assert array[0]["source"] == f"{tmp_path / 'train.json'}:row 0"
    assert lines[1]["source"] == f"{tmp_path / 'train.jsonl'}:line 2"
    assert _kinds(array[1])[0] == ["image", "image", "text"] and len(array[1]["images"]) == 2
    assert array[2]["images"] == [] and _kinds(array[2]) == [["text"], ["text"]]
    assert [m["role"] for m in array[3]["messages"]] == ["system", "user", "assistant", "user", "assistant"]


def test_llava_video_as_a_path_or_as_frames(tmp_path):
    records = [llava(None, question="<video>\nWhat happens?", video="clip.mp4"),
               dict(llava(None, question="<video>\n<image>\nCompare.", video=[["f0.jpg", "f1.jpg"]]), image="p.jpg")]
    write_jsonl(tmp_path / "v.jsonl", records)
    rows = load_rows(data_cfg(tmp_path / "v.jsonl"), str(tmp_path / "v.jsonl"))
    assert rows[0]["videos"] == [str(tmp_path / "clip.mp4")] and _kinds(rows[0])[0] == ["video", "text"]
    assert rows[1]["videos"] == [[str(tmp_path / "f0.jpg"), str(tmp_path / "f1.jpg")]]
    assert _kinds(rows[1])[0] == ["video", "image", "text"] and rows[1]["images"] == [str(tmp_path / "p.jpg")]


def test_a_reasoning_field_is_folded_in_front_of_the_answer(tmp_path):
    """reasoning_content / reasoning / thinking on an assistant message become `<think>...</think>` before its
    answer, the form the thinking templates parse; on any other message it is an error naming the place."""
    records = [
        {"messages": [{"role": "user", "content": "Q"},
                      {"role": "assistant", "content": "A", "reasoning_content": " because \n"}]},
        {"messages": [{"role": "user", "content": "Q"},
                      {"role": "assistant", "content": [{"type": "text", "text": "B"}], "thinking": "so"}]},
    ]
    write_jsonl(tmp_path / "m.jsonl", records)
    rows = load_rows(data_cfg(tmp_path / "m.jsonl", format="messages"), str(tmp_path / "m.jsonl"))
    assert rows[0]["messages"][1]["content"] == [{"type": "text", "text": "<think>\nbecause\n</think>\n\nA"}]
    assert rows[1]["messages"][1]["content"][0]["text"] == "<think>\nso\n</think>\n\nB"
    write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "Q", "reasoning": "x"},
                                                       {"role": "assistant", "content": "A"}]}])
    with pytest.raises(DataError, match=r"bad.jsonl:line 1: messages\[0\]: field 'reasoning' must be a string on an "
                                        r"assistant message"):
        load_rows(data_cfg(tmp_path / "bad.jsonl", format="messages"), str(tmp_path / "bad.jsonl"))


def test_messages_with_an_images_column_inline_images_openai_urls_and_videos(tmp_path):
    records = [
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "A box."}]}], "images": ["a.png"]},
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "data:image/png;base64,AAAA"},
                                                   {"type": "image_url", "image_url": {"url": "https://x/y.jpg"}},
                                                   {"type": "text", "text": "Both?"}]},
                      {"role": "assistant", "content": "Yes."}]},
        {"messages": [{"role": "user", "content": [{"type": "video", "video": "clip.mp4"},
                                                   {"type": "text", "text": "Moves?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "Left."}]}]},
        {"messages": [{"role": "user", "content": "Plain text."}, {"role": "assistant", "content": "Ok."}],
         "images": []},
    ]
    write_jsonl(tmp_path / "m.jsonl", records)
    rows = load_rows(data_cfg(tmp_path / "m.jsonl", format="messages"), str(tmp_path / "m.jsonl"))
    assert rows[0]["images"] == [str(tmp_path / "a.png")]
    assert rows[1]["images"] == ["data:image/png;base64,AAAA", "https://x/y.jpg"]
    assert _kinds(rows[1]) == [["image", "image", "text"], ["text"]]
    assert rows[2]["videos"] == [str(tmp_path / "clip.mp4")] and _kinds(rows[2])[0] == ["video", "text"]
    assert rows[3]["messages"][0]["content"] == [{"type": "text", "text": "Plain text."}]


def test_self_llm_caption_layout(tmp_path):
    record = {"id": "1", "conversations": [
        {"from": "user", "value": "COCO Yes: <|vision_start|>imgs/1.jpg<|vision_end|>"},
        {"from": "assistant", "value": "A man on a bike."}]}
    (tmp_path / "data_vl.json").write_text(json.dumps([record]))
    row = load_rows(data_cfg(tmp_path / "data_vl.json", format="self_llm"), str(tmp_path / "data_vl.json"))[0]
    assert row["images"] == [str(tmp_path / "imgs/1.jpg")]
    assert row["messages"][0]["content"] == [{"type": "image", "text": None}, {"type": "text", "text": "COCO Yes:"}]


def test_auto_detects_the_layout_per_row(tmp_path):
    records = [llava("a.jpg"),
               {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
               {"conversations": [{"from": "user", "value": "<|vision_start|>x.jpg<|vision_end|>Caption:"},
                                  {"from": "assistant", "value": "A cat."}]},
               {"question": "?", "answer": "!"}]
    write_jsonl(tmp_path / "mixed.jsonl", records)
    problems = []
    rows = load_rows(data_cfg(tmp_path / "mixed.jsonl", format="auto"), str(tmp_path / "mixed.jsonl"), problems)
    assert [r["images"] for r in rows] == [[str(tmp_path / "a.jpg")], [], [str(tmp_path / "x.jpg")]]
    assert len(problems) == 1 and "line 4: cannot tell the format" in problems[0].message


def test_column_formatter_and_the_amazon_preset(tmp_path):
    import datasets

    image = Image.new("RGB", (8, 8), (1, 2, 3))
    table = datasets.Dataset.from_dict({
        "Product Name": ["Lamp"], "Category": ["Home"], "description": ["A bright lamp."], "image": [image],
        "question": ["What is it?"], "answer": ["A lamp."]}, features=datasets.Features({
            "Product Name": datasets.Value("string"), "Category": datasets.Value("string"),
            "description": datasets.Value("string"), "image": datasets.Image(), "question": datasets.Value("string"),
            "answer": datasets.Value("string")}))
    table.save_to_disk(str(tmp_path / "products"))
    path = str(tmp_path / "products")

    amazon = load_rows(data_cfg(path, format="amazon", system_message="You write copy.",
                                prompt="Name: {product_name} / {Category}"), path)[0]
    assert [m["role"] for m in amazon["messages"]] == ["system", "user", "assistant"]
    assert amazon["messages"][1]["content"][1]["text"] == "Name: Lamp / Home"
    assert amazon["messages"][2]["content"][0]["text"] == "A bright lamp."
    assert isinstance(amazon["images"][0], dict) and amazon["images"][0]["bytes"]  # undecoded until the collator

    plain = load_rows(data_cfg(path, format="columns"), path)[0]  # defaults: image / question / answer
    assert plain["messages"][0]["content"][1]["text"] == "What is it?"
    assert plain["messages"][1]["content"][0]["text"] == "A lamp."
    with pytest.raises(DataError, match=r"row 0: data.prompt uses \{colour\}, which is not a column"):
        load_rows(data_cfg(path, format="columns", prompt="{colour}?"), path)


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face datasets on disk


def _messages_table():
    import datasets

    record = {"messages": [{"role": "user", "content": [{"type": "image", "text": None},
                                                          {"type": "text", "text": "What?"}]},
                           {"role": "assistant", "content": [{"type": "text", "text": "Red."}]}]}
    return datasets.Dataset.from_list([dict(record, images=[Image.new("RGB", (4, 4), "red")]) for _ in range(3)])


def test_save_to_disk_parquet_arrow_and_a_folder_of_files(tmp_path):
    import datasets

    table = _messages_table()
    table.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": table, "test": table.select([0])}).save_to_disk(str(tmp_path / "dict"))
    table.to_parquet(str(tmp_path / "t.parquet"))
    (tmp_path / "shards").mkdir()
    table.to_parquet(str(tmp_path / "shards" / "part-0.parquet"))
    arrow_file = next((tmp_path / "single").glob("*.arrow"))
    for path, split, count in [(tmp_path / "single", "train", 3), (tmp_path / "dict", "test", 1),
                               (tmp_path / "t.parquet", "train", 3), (arrow_file, "train", 3),
                               (tmp_path / "shards", "train", 3)]:
        rows = load_rows(data_cfg(path, format="messages", split=split), str(path))
        assert len(rows) == count, path
        assert rows[0]["images"][0]["bytes"] and rows[0]["source"] == f"{path}:row 0"
    with pytest.raises(DataError, match=r"no split 'validation' \(splits: train, test\); set data.split"):
        load_rows(data_cfg(tmp_path / "dict", format="messages", split="validation"), str(tmp_path / "dict"))


def test_csv_table_with_the_column_formatter(tmp_path):
    (tmp_path / "t.csv").write_text('file,caption,title\na.jpg,"A red box.",Box\nb.jpg,"A cup.",Cup\n')
    cfg = data_cfg(tmp_path / "t.csv", format="columns", prompt="Caption the {title}.",
                   columns=ColumnsConfig(images="file", answer="caption", prompt=None))
    rows = load_rows(cfg, str(tmp_path / "t.csv"))
    assert [r["images"] for r in rows] == [[str(tmp_path / "a.jpg")], [str(tmp_path / "b.jpg")]]
    assert rows[1]["messages"][0]["content"][1]["text"] == "Caption the Cup."
    assert rows[1]["messages"][1]["content"][0]["text"] == "A cup."


def test_a_file_that_is_not_utf8_is_named_with_its_line_and_byte_and_data_encoding_reads_it(tmp_path):
    from qwenvl_ft.config.compose import compose

    text = 'file,caption,title\na.jpg,"A red box.",Box\nb.jpg,"Un caf\u00e9.",Cup\n'
    (tmp_path / "t.csv").write_bytes(text.encode("latin-1"))
    columns = ColumnsConfig(images="file", answer="caption", prompt=None)
    cfg = data_cfg(tmp_path / "t.csv", format="columns", prompt="Caption the {title}.", columns=columns)
    offset = text.encode("latin-1").index(b"\xe9")
    with pytest.raises(DataError) as err:
        load_rows(cfg, str(tmp_path / "t.csv"))
    assert str(err.value) == (f"{tmp_path / 't.csv'}:line 3: text is not valid UTF-8 (byte 0xe9 at byte offset "
                              f"{offset}): re-save the file as UTF-8, or set data.encoding to its encoding (e.g. "
                              f"data.encoding=latin-1 or cp1252)")
    rows = load_rows(data_cfg(tmp_path / "t.csv", format="columns", prompt="Caption the {title}.", columns=columns,
                              encoding="latin-1"), str(tmp_path / "t.csv"))
    assert rows[1]["messages"][1]["content"][0]["text"] == "Un caf\u00e9."
    # JSON and JSONL the same way: a whole document names its line too, data.encoding reads it
    document = json.dumps([llava(None, question="q"), llava(None, question="caf\u00e9")], indent=1,
                          ensure_ascii=False).encode("latin-1")
    (tmp_path / "rows.json").write_bytes(document)
    at = document.index(b"\xe9")
    line = document[:at].count(b"\n") + 1
    with pytest.raises(DataError, match=rf"rows\.json:line {line}: text is not valid UTF-8 \(byte 0xe9 at byte "
                                        rf"offset {at}\)"):
        load_rows(data_cfg(tmp_path / "rows.json"), str(tmp_path / "rows.json"))
    rows = load_rows(data_cfg(tmp_path / "rows.json", encoding="cp1252"), str(tmp_path / "rows.json"))
    assert "caf\u00e9" in rows[1]["messages"][0]["content"][-1]["text"]
    with pytest.raises(Exception, match=r"data.encoding=klingon: not an encoding Python knows"):
        compose(["recipe=demo", "data.encoding=klingon"], output_dir="/tmp/o")


def test_missing_local_data_and_an_unreachable_hub_id(tmp_path):
    with pytest.raises(DataError, match=r"nope\.parquet: data file or folder not found"):
        load_rows(data_cfg(tmp_path / "nope.parquet", format="messages"), str(tmp_path / "nope.parquet"))
    with pytest.raises(DataError, match=r"nope\.jsonl: data file not found"):
        load_rows(data_cfg(tmp_path / "nope.jsonl"), str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match=r"someone/not-a-dataset: cannot load dataset"):  # offline in the tests
        load_rows(data_cfg("someone/not-a-dataset", format="messages"), "someone/not-a-dataset")


# ----------------------------------------------------------------------------------------------------------------
# structural problems


def test_empty_file_and_whole_file_problems_raise(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.jsonl: the data file is empty"):
        load_rows(data_cfg(tmp_path / "empty.jsonl"), str(tmp_path / "empty.jsonl"))
    (tmp_path / "broken.json").write_text('[{"conversations": []},\n {"oops"}]')
    with pytest.raises(DataError, match=r"broken\.json:line 2: invalid JSON"):
        load_rows(data_cfg(tmp_path / "broken.json"), str(tmp_path / "broken.json"))


BAD_ROWS = [
    ('{"conversations": [{"from": "human", "value": "Hi"}', "line 1: invalid JSON"),
    (llava("a.jpg", placeholder=""), "0 image placeholder(s) in the text but 1 image(s) in the row (field 'images')"),
    (llava(["a.jpg", "b.jpg"]), "1 image placeholder(s) in the text but 2 image(s)"),
    (llava(None, question="<video>\nWhat?"), "1 video placeholder(s) in the text but 0 video(s) in the row"),
    ({"conversations": [{"from": "human", "value": "A"}, {"from": "human", "value": "B"},
                        {"from": "gpt", "value": "C"}]}, "turn 1 is 'user' where 'assistant' was expected"),
    ({"conversations": [{"from": "human", "value": "A"}, {"from": "gpt", "value": "B"},
                        {"from": "human", "value": "C"}]}, "ends on a user turn"),
    (llava(None, answer="  "), "messages[1]: the assistant text is empty"),
    ({"conversations": [{"from": "narrator", "value": "A"}, {"from": "gpt", "value": "B"}]},
     "conversations[0]: field 'from': unknown role 'narrator'"),
    ({"conversations": [{"from": "human"}, {"from": "gpt", "value": "B"}]},
     "conversations[0]: field 'value' is missing"),
    (llava(None, question="Say <|im_end|> now"), "the text contains the control token <|im_end|>"),
    ({"image": "a.jpg"}, "field 'conversations' is missing (fields: image)"),
    ([1, 2], "a row must be a JSON object, got list"),
]


def test_every_bad_row_is_reported_with_its_line_and_the_good_rows_stay(tmp_path):
    lines = [r if isinstance(r, str) else json.dumps(r) for r, _ in BAD_ROWS]
    latin1 = json.dumps(llava(None, question="caf\u00e9"), ensure_ascii=False).encode("latin-1")  # not UTF-8
    raw = "\n".join(lines + [json.dumps(llava("a.jpg"))]).encode() + b"\n" + latin1 + b"\n"
    (tmp_path / "bad.jsonl").write_bytes(raw)
    problems = []
    rows = load_rows(data_cfg(tmp_path / "bad.jsonl"), str(tmp_path / "bad.jsonl"), problems)
    assert len(rows) == 1 and rows[0]["source"].endswith(f":line {len(BAD_ROWS) + 1}")
    assert len(problems) == len(BAD_ROWS) + 1
    for number, ((_, expected), problem) in enumerate(zip(BAD_ROWS, problems), start=1):
        assert problem.source == f"{tmp_path / 'bad.jsonl'}:line {number}"
        assert problem.message.startswith(problem.source) and expected in problem.message, problem.message
    assert "line 14: text is not valid UTF-8 (byte 0xe9 at byte offset" in problems[-1].message
    with pytest.raises(DataError, match=r"bad\.jsonl:line 1: invalid JSON"):  # without a list: the first one raises
        load_rows(data_cfg(tmp_path / "bad.jsonl"), str(tmp_path / "bad.jsonl"))


# ----------------------------------------------------------------------------------------------------------------
# splits


def _numbered(tmp_path, count):
    write_jsonl(tmp_path / "n.jsonl", [llava(None, question=f"q{i}", answer=f"a{i}") for i in range(count)])
    return tmp_path / "n.jsonl"


def _answers(rows):
    return [r["messages"][-1]["content"][0]["text"] for r in rows]


def test_eval_split_by_fraction_count_or_file_with_a_seeded_shuffle(tmp_path):
    path = _numbered(tmp_path, 20)
    train, held = load_split_rows(data_cfg(path, eval_size=0.25, seed=7))
    assert (len(train), len(held)) == (15, 5)
    assert sorted(_answers(train + held)) == sorted(f"a{i}" for i in range(20))  # disjoint, nothing lost
    again, held_again = load_split_rows(data_cfg(path, eval_size=0.25, seed=7))
    assert _answers(again) == _answers(train) and _answers(held_again) == _answers(held)
    other, _ = load_split_rows(data_cfg(path, eval_size=0.25, seed=8))
    assert _answers(other) != _answers(train)
    ordered, last = load_split_rows(data_cfg(path, eval_size=3, shuffle=False))
    assert _answers(last) == ["a17", "a18", "a19"] and len(ordered) == 17
    write_jsonl(tmp_path / "held.jsonl", [llava(None, answer="held")])
    train, held = load_split_rows(data_cfg(path, eval_path=str(tmp_path / "held.jsonl"), max_samples=4))
    assert len(train) == 4 and _answers(held) == ["held"]
    with pytest.raises(DataError, match="data.eval_size=20 leaves no training rows"):
        split_rows(load_rows(data_cfg(path), str(path)), data_cfg(path), 20)


def test_to_dataset_keeps_images_videos_and_sources(tmp_path):
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "text": None},
                                                       {"type": "video", "text": None}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "x"}]}],
             "images": [Image.new("RGB", (4, 4), "red")], "videos": [["f0.png", "f1.png"]], "source": "s:0"},
            {"messages": [{"role": "user", "content": [{"type": "video", "text": None}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "y"}]}],
             "images": [base64.b64encode(b"x" * 80).decode()], "videos": ["clip.mp4"], "source": "s:1"}]
    dataset = to_dataset(rows)
    assert dataset[0]["videos"] == [{"path": None, "frames": ["f0.png", "f1.png"]}]
    assert dataset[1]["videos"] == [{"path": "clip.mp4", "frames": None}]
    assert dataset[0]["images"][0]["bytes"] and dataset[1]["images"][0]["path"] == rows[1]["images"][0]
    assert dataset[1]["source"] == "s:1"
