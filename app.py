"""ConText-CIR Explorer: retrieve with a query image + modification text, see why (per-noun-phrase
attention in context vs isolated, beside another model's), and review triplet files.

    python app.py                                   # shipped models + demo gallery, no downloads
    python app.py --checkpoint CKPT --gallery FOLDER_OR_LIST [--examples triplets.jsonl]
    python app.py --checkpoint CKPT --index INDEX_DIR  # an index from `python -m cir.index build`
    python app.py --checkpoint A --index INDEX_DIR --checkpoint B   # two models to choose and compare
    python app.py --host 0.0.0.0 --port 8080        # reachable from other machines (a container, a Space)

Every --checkpoint is a model of the page's Model selector; the first one's index or gallery is the
gallery, which another model embeds with its own encoder the first time it is selected.

The address defaults come from GRADIO_SERVER_NAME and GRADIO_SERVER_PORT (or PORT) when they are set,
as Hugging Face Spaces and most container hosts set them; otherwise 127.0.0.1:7860.
"""
import argparse
import os
import signal
import sys

from cir.cli import run_cli
from cir.errors import UserError

HOST_ENV, PORT_ENVS = "GRADIO_SERVER_NAME", ("GRADIO_SERVER_PORT", "PORT")


def port_number(text: str) -> int:
    """argparse type: a TCP port, 1 to 65535."""
    if not text.strip().isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 1 to 65535, got {text!r}")
    return int(text)


def default_port() -> int:
    """The first of PORT_ENVS that is set, else 7860; a set value that is no port is a UserError."""
    for name in PORT_ENVS:
        if os.environ.get(name):
            try:
                return port_number(os.environ[name])
            except argparse.ArgumentTypeError as e:
                raise UserError(f"the environment variable {name} (the default of --port): {e}") from None
    return 7860


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--checkpoint", action="append", default=None, metavar="CKPT",
                   help="a model checkpoint (.safetensors); repeatable: each further one is another model to select "
                        "and compare, over the first one's gallery (embedded when first selected); default: the "
                        "shipped model, plus the shipped lambda = 0 and TMCIR models in assets/ when present")
    p.add_argument("--index", default=None,
                   help="gallery index folder built with the first checkpoint; default: assets/demo/index "
                        "(unless --gallery)")
    p.add_argument("--gallery", default=None,
                   help="a folder of images or a text file of paths, embedded into an in-memory index at start "
                        "(instead of --index)")
    p.add_argument("--examples", default=None,
                   help="triplet JSONL of example queries; default: assets/demo/examples.jsonl with the demo index")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--host", default=os.environ.get(HOST_ENV) or "127.0.0.1",
                   help=f"address to serve on: 0.0.0.0 for every interface (default: ${HOST_ENV}, else 127.0.0.1, "
                        "this machine only)")
    p.add_argument("--port", type=port_number, default=None,
                   help="port to serve on, 1 to 65535 (default: $GRADIO_SERVER_PORT, else $PORT, else 7860)")
    p.add_argument("--share", action="store_true", help="also create a public Gradio share link")
    p.add_argument("--review-dir", action="append", default=[], metavar="DIR",
                   help="a folder whose triplet files the Review tab may open, write review stores beside, and show "
                        "images from (repeatable; default none: visitors upload the files they review)")
    a = p.parse_args(argv)
    a.port = a.port or default_port()
    return a


def launch(demo, host: str, port: int, share: bool, options: dict) -> None:
    """demo.launch with `options` (cir.ui.edge.launch_options), its start-up failures told in terms
    of this app's flags."""
    try:
        demo.launch(server_name=host, server_port=port, share=share, **options)
    except OSError:  # the port is taken, or the address is not one of this machine's
        raise UserError(f"cannot serve on {host}:{port}: the port is in use or {host} is not an address of this "
                        "machine; choose another with --port or --host") from None
    except ValueError as e:
        if "share" not in str(e):
            raise
        raise UserError(f"the app cannot reach itself at http://{host}:{port}/ (a proxy setting such as http_proxy "
                        "without no_proxy=localhost?); fix that, or start it with --share") from None


def exit_on_sigterm() -> None:
    """Make SIGTERM (a Space or container stopping) exit as Ctrl-C does, with status 143, so the
    atexit removal of the visitors' files (cir.ui.cleanup) runs. Only `python app.py` does this; a
    process that calls `main` (a test runner) keeps its own signal handling."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    from cir.ui.access import FileAccess
    from cir.ui.edge import launch_options
    from cir.ui.models import Models
    from cir.ui.server import build_demo

    models = Models.load(a.checkpoint, a.index, a.gallery, a.examples, a.device)
    access = FileAccess(a.review_dir, models.primary.index.paths)
    launch(build_demo(models, access), a.host, a.port, a.share, launch_options())
    return 0


if __name__ == "__main__":
    exit_on_sigterm()
    run_cli(main)
