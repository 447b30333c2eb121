"""`qwenvl-ft chat`: a Gradio page over the base, base + adapter, or a merged model, served on localhost.

Messages take text, images (several at once) and videos; conversations are multi-turn; answers stream token by
token; the generation settings sit in the page. With an adapter, "side by side" answers every message twice, with
the adapter off (the base) and on (fine-tuned), from the same weights.

The page's submit event is also the API endpoint `/chat` (gradio_client: `Client(url).predict(message=..., mode=...,
api_name="/chat")`); the conversation lives in the session's state.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Dict, List

from omegaconf import DictConfig

from qwenvl_ft.chat.engine import BASE, TUNED, ChatEngine, Turn, conversation_row, user_turn
from qwenvl_ft.config.commands import ChatConfig, GenerationSettings
from qwenvl_ft.config.compose import validate
from qwenvl_ft.config.saved_run import with_saved_run
from qwenvl_ft.config.schema import ChatRunConfig
from qwenvl_ft.errors import ConfigError
from qwenvl_ft.errors import UserFacingError
from qwenvl_ft.training.preflight import check_optional_packages

log = logging.getLogger("qwenvl_ft")
# Gradio sends usage statistics unless told not to; a local tool should not phone home.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

MODES = {"fine-tuned": [TUNED], "base": [BASE], "side by side": [BASE, TUNED]}  # page label -> views answering
LABELS = {TUNED: "fine-tuned (adapter on)", BASE: "base (adapter off)"}


def chat(composed: DictConfig) -> Dict:
    cfg: ChatRunConfig = validate(with_saved_run(composed))  # the named run's config.yaml, overrides on top
    check_optional_packages(cfg, "chat")  # Gradio (the ui extra): before the model loads
    engine = ChatEngine.load(cfg)
    app = build_app(engine, cfg.chat, cfg.data.system_message)
    url = serve(app, cfg.chat)
    print(f"qwenvl-ft chat: {engine.description}\n  serving on {url}  (Ctrl+C stops it)", flush=True)
    try:
        app.block_thread()  # until Ctrl+C
    finally:
        app.close()
    return {"url": url}


def serve(app, chat_cfg: ChatConfig) -> str:
    """Start the server without blocking; the local URL."""
    import gradio as gr

    try:
        app.queue(default_concurrency_limit=1).launch(
            server_name=chat_cfg.host, server_port=chat_cfg.port, prevent_thread_lock=True, quiet=True,
            show_error=True, theme=gr.themes.Default())
    except OSError as err:  # Gradio: "Cannot find empty port in range ..."
        raise ConfigError(f"chat: cannot serve on {chat_cfg.host}:{chat_cfg.port} ({err}); pick another "
                          f"chat.port, or chat.port=null for the first free one") from None
    return app.local_url


def build_app(engine: ChatEngine, chat_cfg: ChatConfig, system_message: str = None):
    import gradio as gr

    g = chat_cfg.generation
    modes = list(MODES) if engine.has_adapter else ["fine-tuned"]
    with gr.Blocks(title="qwenvl-ft chat", analytics_enabled=False) as app:
        gr.Markdown(f"## qwenvl-ft chat\n{engine.description}")
        mode = gr.Radio(modes, value=modes[0], label="Answer with", visible=engine.has_adapter,
                        info="side by side: the base model (adapter off) and the fine-tuned one (adapter on), "
                             "same weights")
        with gr.Row():
            chatbots = {BASE: gr.Chatbot(label=LABELS[BASE], visible=False, height=420, elem_id="chat-base"),
                        TUNED: gr.Chatbot(label=LABELS[TUNED] if engine.has_adapter else "model", height=420,
                                          elem_id="chat-tuned")}
        message = gr.MultimodalTextbox(placeholder="Ask about an image or a video (attach several with the clip)",
                                       file_types=["image", "video"], file_count="multiple", show_label=False,
                                       stop_btn=True, elem_id="message")
        clear = gr.Button("Clear conversation", size="sm")
        with gr.Accordion("Generation settings", open=False):
            system = gr.Textbox(system_message or "", label="System message", lines=1)
            with gr.Row():
                max_new_tokens = gr.Slider(1, 2048, value=g.max_new_tokens, step=1, label="max new tokens")
                do_sample = gr.Checkbox(g.do_sample, label="sample (otherwise greedy)")
                repetition_penalty = gr.Slider(0.8, 2.0, value=g.repetition_penalty, step=0.01,
                                               label="repetition penalty")
            with gr.Row():
                temperature = gr.Slider(0.05, 2.0, value=g.temperature, step=0.05, label="temperature")
                top_p = gr.Slider(0.05, 1.0, value=g.top_p, step=0.01, label="top p")
                top_k = gr.Slider(0, 200, value=g.top_k, step=1, label="top k (0: off)")
        turns = gr.State([])

        # answers' boxes drawn on their image, shown under the answer (a folder of the app's own)
        respond = _responder(engine, chat_cfg.max_files, Path(tempfile.mkdtemp(prefix="qwenvl-ft-chat-")))
        settings = [system, max_new_tokens, do_sample, temperature, top_p, top_k, repetition_penalty]
        message.submit(respond, [message, turns, mode] + settings,
                       [chatbots[TUNED], chatbots[BASE], turns, message], api_name="chat")
        shown = [chatbots[TUNED], chatbots[BASE], turns]
        mode.change(_switch, mode, shown, api_name=False)
        clear.click(lambda: ([], [], []), None, shown, api_name="clear")
    return app


def _switch(mode: str):
    """A new mode starts a new conversation: the views' histories differ."""
    import gradio as gr

    views = MODES[mode]
    return gr.update(value=[], visible=TUNED in views), gr.update(value=[], visible=BASE in views), []


def _responder(engine: ChatEngine, max_files: int, annotated: Path):
    import gradio as gr

    def respond(message: dict, turns: List[Turn], mode: str, system: str, max_new_tokens: float, do_sample: bool,
                temperature: float, top_p: float, top_k: float, repetition_penalty: float):
        """Answer the message with each view of the mode in turn, streaming the text."""
        files = [f if isinstance(f, str) else f["path"] for f in (message or {}).get("files", [])]
        try:
            if len(files) > max_files:
                raise ConfigError(f"{len(files)} files in one message; at most chat.max_files={max_files}")
            settings = GenerationSettings(max_new_tokens=int(max_new_tokens), do_sample=bool(do_sample),
                                          temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                                          repetition_penalty=float(repetition_penalty))
            turns = list(turns or []) + [user_turn((message or {}).get("text", ""), files)]
            cleared = {"text": "", "files": []}
            yield _shown(turns) + (turns, cleared)
            for view in MODES[mode] if engine.has_adapter else [TUNED]:
                row = conversation_row(turns, view, system.strip() or None)
                for text in engine.stream(row, settings, view):
                    turns[-1].answers[view] = text
                    yield _shown(turns) + (turns, cleared)
                turns[-1].answers.setdefault(view, "")
                drawn = engine.annotate(row, turns[-1].answers[view], annotated)
                if drawn:
                    turns[-1].annotated[view] = drawn
                yield _shown(turns) + (turns, cleared)
        except UserFacingError as err:  # a bad message or setting: shown in the page, the server goes on
            raise gr.Error(str(err)) from None

    return respond


def _shown(turns: List[Turn]) -> tuple:
    return _messages(turns, TUNED), _messages(turns, BASE)


def _messages(turns: List[Turn], view: str) -> List[dict]:
    """Gradio's message list of one view: files as their own user messages, then the text, then the answer."""
    out = []
    for turn in turns:
        out += [{"role": "user", "content": {"path": path}} for path in turn.images + turn.videos]
        if turn.text:
            out.append({"role": "user", "content": turn.text})
        if view in turn.answers:
            out.append({"role": "assistant", "content": turn.answers[view] or "(empty answer)"})
        if view in turn.annotated:  # the answer's boxes drawn on the image
            out.append({"role": "assistant", "content": {"path": turn.annotated[view]}})
    return out

