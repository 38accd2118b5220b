"""ConText-CIR Explorer: retrieve with a query image + modification text, see why (per-noun-phrase
attention in context vs isolated), and review triplet files.

    python app.py                                   # shipped checkpoint + demo gallery, no downloads
    python app.py --checkpoint CKPT --gallery FOLDER_OR_LIST [--examples triplets.jsonl]
    python app.py --checkpoint CKPT --index INDEX_DIR  # an index from `python -m cir.index build`
"""
import argparse

import torch

from cir.cli import run_cli
from cir.errors import UserError
from cir.ui.access import FileAccess
from cir.ui.app import CONCURRENCY, build_demo
from cir.ui.limits import MAX_FILE_SIZE
from cir.ui.explorer import Explorer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="model checkpoint (.safetensors); default: the shipped one in assets/")
    p.add_argument("--index", default=None,
                   help="gallery index folder built with this checkpoint; default: assets/demo/index (unless --gallery)")
    p.add_argument("--gallery", default=None,
                   help="a folder of images or a text file of paths, embedded into an in-memory index at start "
                        "(instead of --index)")
    p.add_argument("--examples", default=None,
                   help="triplet JSONL of example queries; default: assets/demo/examples.jsonl with the demo index")
    p.add_argument("--twin", default=None, metavar="CKPT",
                   help="a second checkpoint whose phrase maps the Why panel can show beside the first's (e.g. the "
                        "lambda = 0 twin of a CC model); default: the shipped twin, with the shipped checkpoint")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda if available)")
    p.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    p.add_argument("--share", action="store_true", help="also create a public Gradio share link")
    p.add_argument("--review-dir", action="append", default=[], metavar="DIR",
                   help="a folder whose triplet files the Review tab may open, write review logs beside, and show "
                        "images from (repeatable; default none: visitors upload the files they review)")
    a = p.parse_args(argv)
    explorer = Explorer.load(a.checkpoint, a.index, a.gallery, a.examples, a.device, a.twin)
    access = FileAccess(a.review_dir, explorer.index.paths)
    demo = build_demo(explorer, access).queue(default_concurrency_limit=CONCURRENCY)
    try:
        demo.launch(server_name="127.0.0.1", server_port=a.port, share=a.share, max_file_size=MAX_FILE_SIZE)
    except OSError as e:  # the port is taken
        raise UserError(f"cannot serve on port {a.port}: {e}") from None
    return 0


if __name__ == "__main__":
    run_cli(main)
