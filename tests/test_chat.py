"""`qwenvl-ft chat` on the tiny random Qwen2-VL with a random LoRA adapter (no training: the adapter only has to
change the answers), through the engine, gradio_client and a real headless Chromium.

The browser test needs Debian's chromium and chromium-driver (`apt-get install chromium chromium-driver`) and
skips, saying so, without them.
"""

import importlib.util
import shutil
import threading
import time
import urllib.request

import pytest

from qwenvl_ft.chat.engine import BASE, TUNED, Turn, conversation_row, user_turn
from qwenvl_ft.config.commands import GenerationSettings
from qwenvl_ft.config.compose import compose, validate
from qwenvl_ft.errors import ConfigError
from qwenvl_ft.errors import DataError
from data_helpers import write_image, write_video

# Checked without importing Gradio (seconds): collecting the suite must stay cheap.
needs_gradio = pytest.mark.skipif(importlib.util.find_spec("gradio") is None,
                                  reason="needs the ui extra: pip install '.[ui]'")

GREEDY = GenerationSettings(max_new_tokens=8)
QUESTION = "What is in the image?"


def _chat_config(adapter, *overrides):
    return compose(["recipe=demo", f"chat.model_path={adapter}", "chat.port=null",
                    "chat.generation.max_new_tokens=8", *overrides], config_name="chat", output_dir="/tmp/unused")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A LoRA adapter with random (non-zero) weights on the tiny model, saved as a run's final/ would be."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2VLForConditionalGeneration

    from qwenvl_ft.modeling.random_init import materialize

    typed = validate(compose(["recipe=demo"], output_dir="/tmp/unused"))
    base = Qwen2VLForConditionalGeneration.from_pretrained(materialize(typed.model.architecture))
    torch.manual_seed(0)
    lora = LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
                      init_lora_weights=False)
    folder = tmp_path_factory.mktemp("run") / "final"
    get_peft_model(base, lora).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def engine(adapter):
    from qwenvl_ft.chat.engine import ChatEngine

    return ChatEngine.load(validate(_chat_config(adapter)))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    return [write_image(folder / "red.png", size=(56, 56)), write_image(folder / "blue.png", size=(84, 56),
                                                                           colour=(20, 40, 220))]


@pytest.fixture(scope="module")
def served(engine, adapter):
    from qwenvl_ft.commands.chat import build_app, serve

    typed = validate(_chat_config(adapter))
    app = build_app(engine, typed.chat)
    url = serve(app, typed.chat)
    yield url
    app.close()


# ---------------------------------------------------------------------------------------------------------------
# tier 1: conversations become the collator's rows


def test_turns_become_the_collators_rows():
    first = user_turn("  What is this? ", ["a.PNG", "b.jpg", "clip.mp4"])
    assert (first.text, first.images, first.videos) == ("What is this?", ["a.PNG", "b.jpg"], ["clip.mp4"])
    first.answers = {TUNED: "a red circle", BASE: ""}
    second = Turn(text="And its colour?")
    row = conversation_row([first, second], TUNED, system_message="Be brief.")
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert [i["type"] for i in row["messages"][1]["content"]] == ["image", "image", "video", "text"]
    assert row["messages"][2]["content"][0]["text"] == "a red circle"
    assert row["messages"][-1]["content"][0]["text"] == ""  # the open answer: left out of the prompt
    assert (row["images"], row["videos"]) == (["a.PNG", "b.jpg"], ["clip.mp4"])
    # A view that was not asked a turn does not see an answer to it.
    assert [m["role"] for m in conversation_row([Turn("hi")], BASE)["messages"]] == ["user", "assistant"]
    with pytest.raises(DataError, match="notes.txt: not a supported image"):
        user_turn("read this", ["notes.txt"])
    with pytest.raises(DataError, match="the message is empty"):
        user_turn("  ", [])


def test_a_missing_model_folder_fails_before_loading(tmp_path):
    from qwenvl_ft.chat.engine import ChatEngine

    with pytest.raises(ConfigError, match="chat.model_path=.*no such folder.*chat.model_path=null"):
        ChatEngine.load(validate(_chat_config(tmp_path / "outputs" / "demo" / "nope" / "final")))


def test_chat_without_gradio_names_the_extra(monkeypatch):
    import sys

    from qwenvl_ft.commands.chat import chat

    monkeypatch.setitem(sys.modules, "gradio", None)  # find_spec("gradio") answers None: not installed
    # the same message as every optional package's (training/preflight.py check_optional_packages)
    with pytest.raises(ConfigError, match=r'qwenvl-ft chat needs Gradio, which is not installed: pip install '
                                          r'"qwenvl-ft\[ui\]"'):
        chat(_chat_config("/nonexistent"))


# ---------------------------------------------------------------------------------------------------------------
# tier 2: the tiny model


@pytest.mark.slow
def test_streamed_answers_equal_generate_and_base_is_the_adapter_switched_off(engine, adapter, images, tmp_path):
    from qwenvl_ft.evaluation.generate import generate_answers
    from qwenvl_ft.modeling.load import load_base

    typed = validate(_chat_config(adapter))
    video = write_video(tmp_path / "clip.mp4", frames=8, fps=4, size=(56, 56))
    turn = user_turn(QUESTION, [str(images[0]), str(images[1]), str(video)])  # several images and a video
    settings = GREEDY.kwargs()
    tuned = engine.answer(conversation_row([turn], TUNED), GREEDY, TUNED)
    assert tuned == generate_answers(engine.model, engine.collator, [conversation_row([turn], TUNED)], 1,
                                     generation=settings)[0]
    base_model = load_base(typed.model, typed.adapter)  # a separate copy, only to check against
    base = engine.answer(conversation_row([turn], BASE), GREEDY, BASE)
    assert base == generate_answers(base_model, engine.collator, [conversation_row([turn], BASE)], 1,
                                    generation=settings)[0]
    assert tuned and tuned != base, "the adapter should change the answer"
    assert engine.answer(conversation_row([turn], TUNED), GREEDY, TUNED) == tuned  # switched back on

    # Streaming: the answer grows piece by piece (sampled, so that it has word boundaries to stream at).
    import torch

    torch.manual_seed(0)
    sampled = GenerationSettings(max_new_tokens=24, do_sample=True, temperature=1.5, top_k=0)
    pieces = list(engine.stream(conversation_row([user_turn(QUESTION, [str(images[0])])], TUNED), sampled))
    growing = [p for i, p in enumerate(pieces) if p and (i == 0 or p != pieces[i - 1])]
    assert len(growing) >= 2, pieces
    assert all(pieces[-1].startswith(p) for p in growing)


def test_an_answer_with_boxes_is_drawn_on_the_latest_image(engine, images, tmp_path):
    """The answer's boxes, in the family's convention for the image as the model saw it, drawn on that image."""
    from PIL import Image

    from qwenvl_ft.commands.chat import _messages

    turn = user_turn("Where is it?", [str(images[1])])  # 84 x 56
    row = conversation_row([turn], TUNED)
    assert engine.annotate(row, "no box here", tmp_path) is None
    drawn = engine.annotate(row, "(0,0),(499,998)", tmp_path)  # Qwen2-VL: the left half, on its 0-999 grid
    picture = Image.open(drawn)
    assert picture.size == (84, 56)
    assert picture.getpixel((20, 0)) != Image.open(images[1]).convert("RGB").getpixel((20, 0))  # the top edge
    turn.answers[TUNED], turn.annotated[TUNED] = "(0,0),(499,998)", drawn
    assert _messages([turn], TUNED)[-1] == {"role": "assistant", "content": {"path": drawn}}


@pytest.mark.slow
@needs_gradio
def test_gradio_client_side_by_side_multi_turn_and_streaming(served, engine, images):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(served, verbose=False)
    first = {"text": QUESTION, "files": [handle_file(str(images[0]))]}
    tuned_chat, base_chat, _ = client.predict(message=first, mode="side by side", api_name="/chat")
    turn = user_turn(QUESTION, [str(images[0])])
    expected = {view: engine.answer(conversation_row([turn], view), GREEDY, view) for view in (BASE, TUNED)}
    assert _last_answer(tuned_chat) == expected[TUNED]
    assert _last_answer(base_chat) == (expected[BASE] or "(empty answer)")

    # A second turn carries the first: each view continues its own conversation.
    job = client.submit(message={"text": "And the colour?", "files": []}, mode="side by side", api_name="/chat")
    tuned_chat, base_chat, _ = job.result(timeout=120)
    turn.answers = dict(expected)
    follow_up = Turn(text="And the colour?")
    assert _last_answer(tuned_chat) == engine.answer(conversation_row([turn, follow_up], TUNED), GREEDY, TUNED)
    assert len(tuned_chat) == 5  # image, question, answer, question, answer
    assert len(job.outputs()) >= 3  # streamed: the question shown first, then the answers as they grow

    # An image type Gradio lets through but the model cannot read: the page says so, the server goes on.
    drawing = images[0].with_name("drawing.svg")
    drawing.write_text('<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"/>')
    with pytest.raises(AppError, match="drawing.svg: not a supported image"):
        client.predict(message={"text": "read", "files": [handle_file(str(drawing))]}, mode="fine-tuned",
                       api_name="/chat")


def _last_answer(messages):
    return "".join(item["text"] for item in messages[-1]["content"] if item.get("type") == "text")


@pytest.mark.slow
@needs_gradio
def test_chat_command_serves_on_localhost_and_prints_the_url(adapter, capsys):
    import gradio as gr

    from qwenvl_ft.commands.chat import chat

    result = {}
    thread = threading.Thread(target=lambda: result.update(chat(_chat_config(adapter))), daemon=True)
    thread.start()
    printed, deadline = "", time.time() + 120
    while "serving on" not in printed and time.time() < deadline and thread.is_alive():
        time.sleep(0.2)
        printed += capsys.readouterr().out
    assert "serving on http://127.0.0.1:" in printed, printed
    url = printed.split("serving on ")[1].split()[0]
    assert urllib.request.urlopen(url, timeout=30).status == 200
    for app in gr.Blocks.get_instances():  # what Ctrl+C does; gr.close_all would also stop the `served` app
        if app.is_running and app.local_url == url:
            app.close(verbose=False)
    thread.join(timeout=30)
    assert result == {"url": url}


def _browser():
    """A headless Chromium driven by Debian's chromedriver, or the reason there is none."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("needs Debian's chromium and chromium-driver packages (apt-get install chromium "
                    "chromium-driver) for the browser test")
    pytest.importorskip("selenium", reason="needs selenium (the test extra)")
    import tempfile

    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1280,900",
                 f"--user-data-dir={tempfile.mkdtemp(prefix='qwenvl-ft-chromium-')}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.mark.slow
@needs_gradio
def test_page_in_a_real_browser(served, engine, images, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    expected = engine.answer(conversation_row([user_turn(QUESTION, [str(images[0])])], TUNED), GREEDY, TUNED)
    browser = _browser()
    try:
        browser.get(served)
        wait = WebDriverWait(browser, 60)
        text_box = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#message textarea")))
        browser.find_element(By.CSS_SELECTOR, "#message input[type=file]").send_keys(str(images[0]))
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#message .thumbnail-item img")))  # uploaded
        text_box.send_keys(QUESTION, Keys.ENTER)
        answer = (By.CSS_SELECTOR, "#chat-tuned [data-testid=bot]")
        wait.until(lambda b: b.find_elements(*answer) and b.find_elements(*answer)[-1].text == expected)
        user = browser.find_elements(By.CSS_SELECTOR, "#chat-tuned [data-testid=user]")
        assert any(QUESTION in u.text for u in user)
        assert browser.find_elements(By.CSS_SELECTOR, "#chat-tuned [data-testid=user] img")  # the image shown
        browser.save_screenshot(str(tmp_path / "chat.png"))
    finally:
        browser.quit()
    assert (tmp_path / "chat.png").stat().st_size > 10_000


@pytest.fixture(scope="module")
def thinking_adapter(tmp_path_factory):
    """A random LoRA adapter on the tiny Qwen3.5 (a thinking template, Gated DeltaNet layers)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from qwenvl_ft.modeling.build import model_class, model_source

    typed = validate(compose(["recipe=demo", "model=tiny_qwen3_5"], output_dir="/tmp/unused"))
    base = model_class(typed.model).from_pretrained(model_source(typed.model))
    torch.manual_seed(0)
    lora = LoraConfig(r=8, lora_alpha=32, init_lora_weights=False,
                      target_modules=["q_proj", "v_proj", "in_proj_qkv", "out_proj", "up_proj", "down_proj"])
    folder = tmp_path_factory.mktemp("qwen3_5_run") / "final"
    get_peft_model(base, lora).save_pretrained(str(folder))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("enable_thinking, prompt_end", [(None, "<think>\n"), (True, "<think>\n"),
                                                         (False, "<think>\n\n</think>\n\n")])
def test_chat_on_qwen3_5_with_enable_thinking(thinking_adapter, images, enable_thinking, prompt_end):
    """Chat on the tiny Qwen3.5: data.enable_thinking opens or closes the think block of the prompt (unset: the
    template's default, which thinks); answers equal generate's, the base is the adapter switched off, and a
    second turn carries the first answer."""
    from qwenvl_ft.chat.engine import ChatEngine
    from qwenvl_ft.evaluation.generate import generate_answers

    switch = [] if enable_thinking is None else [f"data.enable_thinking={str(enable_thinking).lower()}"]
    engine = ChatEngine.load(validate(_chat_config(thinking_adapter, "model=tiny_qwen3_5", *switch)))
    turn = user_turn(QUESTION, [str(images[0])])
    row = conversation_row([turn], TUNED)
    prompt = engine.collator.render(row["messages"][:-1], add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n" + prompt_end)
    tuned = engine.answer(row, GREEDY, TUNED)
    assert tuned == generate_answers(engine.model, engine.collator, [row], 1, generation=GREEDY.kwargs())[0]
    assert tuned != engine.answer(conversation_row([turn], BASE), GREEDY, BASE)
    turn.answers[TUNED] = tuned
    again = conversation_row([turn, user_turn("And the colour?", [])], TUNED)
    assert engine.answer(again, GREEDY, TUNED) == generate_answers(engine.model, engine.collator, [again], 1,
                                                                   generation=GREEDY.kwargs())[0]
