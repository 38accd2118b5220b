"""ConText-CIR Explorer (placeholder page until the explorer app lands): python app.py [--port N]."""
import argparse

import gradio as gr

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
p.add_argument("--share", action="store_true", help="create a public Gradio share link")
a = p.parse_args()
with gr.Blocks(title="ConText-CIR Explorer") as demo:
    gr.Markdown("# ConText-CIR Explorer\nThe retrieval app is being built; see README.md.")
demo.launch(server_name="127.0.0.1", server_port=a.port, share=a.share)
