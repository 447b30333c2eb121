"""`qwenvl-ft chat`: engine.py (conversation -> rows, streamed generation, adapter on/off); the Gradio page and the
command are qwenvl_ft/commands/chat.py. Gradio is the optional `ui` extra and is imported only by that file's
functions."""
