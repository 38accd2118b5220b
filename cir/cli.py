"""Helpers shared by the `python -m cir.<tool>` entry points.

This module and the tools' argument parsers import nothing heavy: a tool calls `parse_first` above
its torch imports, so --help and argument errors answer in well under a second.
"""
from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from typing import Callable

from cir.errors import UserError


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1, written in digits only (no sign, spaces or "_")."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


@contextmanager
def one_line_errors():
    """A UserError -> its one-line message on stderr and exit code 2; Ctrl-C -> "interrupted", 130."""
    try:
        yield
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run `main(argv)`, turning a UserError into a one-line message on stderr and exit code 2."""
    with one_line_errors():
        code = main(argv)
    sys.exit(code or 0)


def parse_first(module: str, parse_args: Callable[[list[str] | None], argparse.Namespace]) -> None:
    """Called by a tool above its heavy imports with its `__name__`: run as a program (`__main__`),
    its command line is parsed there, so --help and argument errors (argparse's and the UserErrors
    of `parse_args`) come before torch loads; its main parses it again."""
    if module == "__main__":
        with one_line_errors():
            parse_args(None)


def add_device_flags(p: argparse.ArgumentParser) -> None:
    """--device, --threads."""
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for torch (default: all cores; 1 is steadier on a machine shared with other work)")


def add_training_flags(p: argparse.ArgumentParser, steps: int, batch: int, lr: float, warmup: int,
                       weight_decay: float) -> None:
    """The flags of `cir.train.fit` runs (data, run folder, schedule, optimizer, seed) and the device flags."""
    p.add_argument("--data", default=None, help="folder with train.jsonl (as written by python -m cir.data.shapes)")
    p.add_argument("--train", default=None, help="training triplets JSONL (default DATA/train.jsonl)")
    p.add_argument("--out", required=True, help="run folder: checkpoint (.safetensors + .json) and log.jsonl")
    p.add_argument("--steps", type=positive_int, default=steps, help=f"optimizer steps (default {steps})")
    p.add_argument("--batch-size", type=positive_int, default=batch, help=f"training examples per step (default {batch})")
    p.add_argument("--lr", type=float, default=lr, help=f"peak learning rate after warm-up (default {lr:g})")
    p.add_argument("--min-lr", type=float, default=lr / 100, help=f"learning rate at the end of the cosine (default {lr / 100:g})")
    p.add_argument("--warmup", type=int, default=warmup, help=f"linear warm-up steps (default {warmup})")
    p.add_argument("--weight-decay", type=float, default=weight_decay,
                   help=f"AdamW weight decay of weight matrices (default {weight_decay:g})")
    p.add_argument("--clip-grad", type=float, default=1.0, help="gradient-norm clipping, 0 = off (default 1.0)")
    p.add_argument("--workers", type=int, default=1, help="image-loading processes (default 1; 0 = in the main process)")
    p.add_argument("--seed", type=int, default=0, help="random seed: initialisation, data order, phrasing (default 0)")
    add_device_flags(p)


def differing_flags(a: argparse.Namespace, trained: dict, names: tuple[str, ...]) -> list[str]:
    """Flags among `names` whose value in `a` differs from a saved run's `trained` args, each as
    "--flag SAVED (not GIVEN)", for a one-line refusal to resume or continue that run."""
    return [f"--{k.replace('_', '-')} {trained.get(k)} (not {getattr(a, k)})" for k in names
            if trained.get(k) != getattr(a, k)]


def add_data_flags(p: argparse.ArgumentParser, required: bool = True) -> None:
    """The flags every evaluation command shares: what to evaluate on and how to rank."""
    p.add_argument("--triplets", required=required, help="triplet JSONL file to evaluate")
    p.add_argument("--gallery", required=required, help="gallery: a folder of images or a text file of paths")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    p.add_argument("--reference", choices=["auto", "keep", "remove"], default="auto",
                   help="keep the reference image in the ranking as a negative, or remove it (auto: remove for CIRR only)")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) bad triplet lines instead of stopping")
    p.add_argument("--batch-size", type=int, default=128, help="images per forward pass (default 128)")


def read_data(a: argparse.Namespace) -> tuple[list, list[str], bool | None]:
    """(triplets, gallery paths, keep_reference or None for auto) from the flags of add_data_flags."""
    from cir.data.triplets import read_gallery, read_triplets

    triplets, problems = read_triplets(a.triplets, skip_bad=a.skip_bad)
    if problems:
        print(f"skipped {len(problems)} bad line(s); first: {problems[0]}")
    if not triplets:
        raise UserError(f"no usable triplets in {a.triplets}")
    gallery = read_gallery(a.gallery)
    if not gallery:
        raise UserError(f"the gallery {a.gallery} holds no images")
    return triplets, gallery, None if a.reference == "auto" else a.reference == "keep"
