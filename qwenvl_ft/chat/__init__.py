"""`qwenvl-ft chat`: engine.py (conversation -> rows, streamed generation, adapter on/off) and app.py (the Gradio
page and the command). Gradio is the optional `ui` extra and is imported only by app.py's functions."""
