"""Evaluate a checkpoint on triplets and a gallery, or on CIRR and CIRCO in their official layouts.

    python -m cir.evaluate --checkpoint CKPT --triplets test.jsonl --gallery gallery_test.txt [--json OUT]
    python -m cir.evaluate --checkpoint CKPT --dataset cirr --root ROOT --split val [--images DIR] [--index DIR]
    python -m cir.evaluate --checkpoint CKPT --dataset cirr --root ROOT --split test1 --submission OUT_DIR
    python -m cir.evaluate --checkpoint CKPT --dataset circo --root ROOT --split val|test [--submission OUT_DIR]

Prints Recall@1/5/10/50, Recall_subset@1/2/3 (when triplets carry subsets), mAP@5/10/25/50 (when
some query has several targets), the breakdowns by meta.num_modifications and by operation type
(meta.operations), what the first results are (target, own reference, own partial fulfilment,
other; when meta.partials exist) and, when meta carries grounding boxes, how the phrase maps
ground them (cir.grounding; maps averaged over layers and heads): the pointing game over all
phrases with a table for every layer and head, and for phrases naming a reference object the
pointing game, energy (map mass inside the box, with its chance level) and distinctness (captions
whose phrases on disjoint objects peak on different patches). The reference image is removed from the
ranking for CIRR (its protocol) and kept as a hard negative otherwise (`--reference`).

The benchmarks follow their official protocols. CIRR (cir.data.cirr): Recall@1/5/10/50 with the
reference removed and Recall_subset@1/2/3 over the query's img_set members minus the reference,
taken from the same ranking. CIRCO (cir.data.circo): mAP@5/10/25/50 over all ground truths,
Recall@5/10/25/50 on target_img_id alone, mAP@10 per semantic aspect; the reference stays in the
ranking. The test splits (CIRR test1, CIRCO test) have no public ground truth: they are never
scored, `--submission` writes the files their servers take (cir.submission). One ranking serves
every number and file: cosine similarity descending, equal scores in gallery order (the CIRR and
CIRCO readers and gallery folders sort by path; a gallery list file keeps its order). The gallery
is embedded once per run, or taken from an index of `cir.index`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from cir.cli import add_data_flags, parse_first, read_data, run_cli
from cir.data.benchmarks import SPLITS, TEST_SPLITS, read_benchmark
from cir.errors import UserError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m cir.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None,
                   help="model checkpoint (.safetensors); default: the one --index was built with, else the "
                        "shipped one in assets/")
    add_data_flags(p, required=False)
    p.add_argument("--dataset", choices=sorted(SPLITS), default=None,
                   help="evaluate a benchmark in its official layout under --root instead of --triplets/--gallery")
    p.add_argument("--root", default=None,
                   help="the dataset folder: CIRR's (captions/, image_splits/, img_raw/ or CLIP4Cir's cirr/, dev/, "
                        "...) or CIRCO's (annotations/, COCO2017_unlabeled/unlabeled2017/)")
    p.add_argument("--split", default=None,
                   help="cirr: train, val or test1; circo: val or test (default val); the test splits need --submission")
    p.add_argument("--images", default=None,
                   help="image folder, if not where the layout puts it: CIRR's folder holding train/, dev/ and test1/ "
                        "(default ROOT/img_raw or ROOT), CIRCO's folder of COCO jpgs (default "
                        "ROOT/COCO2017_unlabeled/unlabeled2017)")
    p.add_argument("--index", default=None,
                   help="gallery index folder from python -m cir.index build: its stored embeddings are used "
                        "instead of embedding the gallery (it must hold every gallery image, built with the checkpoint)")
    p.add_argument("--submission", default=None,
                   help="write the test-server submission files of --split into this folder (CIRR: "
                        "cirr-SPLIT-recall.json and cirr-SPLIT-recall_subset.json; CIRCO: circo-SPLIT.json)")
    p.add_argument("--no-grounding", action="store_true", help="skip the pointing-game grounding measure")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    a = p.parse_args(argv)
    _check_flags(a)
    return a


def _check_flags(a: argparse.Namespace) -> None:
    """Either --dataset with --root, or --triplets with --gallery; --submission only with --dataset."""
    if a.dataset is None:
        if a.triplets is None or a.gallery is None:
            raise UserError("give --triplets and --gallery, or --dataset cirr|circo with --root")
        for flag in ("root", "split", "images", "submission"):
            if getattr(a, flag) is not None:
                raise UserError(f"--{flag} needs --dataset cirr|circo")
        return
    if a.root is None:
        raise UserError(f"--dataset {a.dataset} needs --root, the folder holding the dataset")
    if a.triplets is not None or a.gallery is not None:
        raise UserError(f"--dataset {a.dataset} reads --root; --triplets and --gallery are for triplet JSONL files")
    a.split = a.split or "val"
    if a.split == TEST_SPLITS[a.dataset] and (a.submission is None or a.json is not None):
        raise UserError(f"{a.dataset} {a.split} has no public ground truth, so it cannot be scored here; "
                        "pass --submission OUT_DIR (not --json) to write the files its test server takes")
    if a.dataset == "cirr" and a.submission is not None and a.reference == "keep":
        raise UserError("--reference keep: CIRR's server takes rankings without the reference")


parse_first(__name__, parse_args)  # `python -m cir.evaluate`: --help and argument errors before torch loads

import torch

from cir.atomic import sha256_file, write_json
from cir.checkpoint import DEFAULT_CHECKPOINT
from cir.data.cirr import cirr_image_names
from cir.retrieval.evaluate import evaluate_rankings, format_results, retrieve


def main(argv: list[str] | None = None) -> int:
    from cir.checkpoint import load_checkpoint
    from cir.index import embeddings_of, read_resolved_manifest
    from cir.submission import write_submission

    a = parse_args(argv)
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if a.dataset is None:
        triplets, gallery, keep = read_data(a)
    else:
        triplets, gallery = read_benchmark(a.dataset, a.root, a.split, a.images)
        keep = None if a.reference == "auto" else a.reference == "keep"
    checkpoint = a.checkpoint
    if a.index is not None and checkpoint is None:
        checkpoint = read_resolved_manifest(Path(a.index))["checkpoint"]["path"]
    model, preprocess, _ = load_checkpoint(checkpoint, a.device)
    gallery_emb = None
    if a.index is not None:
        gallery_emb = torch.from_numpy(embeddings_of(a.index, gallery, checkpoint or DEFAULT_CHECKPOINT))
    rankings, members, keep = retrieve(model, preprocess, triplets, gallery, a.device, keep, a.batch_size,
                                       progress=True, gallery_emb=gallery_emb)
    if a.submission is not None:
        names = cirr_image_names(a.root, a.split, a.images) if a.dataset == "cirr" else None
        for path in write_submission(a.submission, a.dataset, a.split, triplets, rankings, members, names):
            print(f"wrote {path}")
    if any(t.targets for t in triplets):
        res = evaluate_rankings(model, preprocess, triplets, rankings, members, keep, a.device, not a.no_grounding)
        print(format_results(res))
        if a.json:
            source = {"triplets": a.triplets} if a.dataset is None else {"dataset": a.dataset, "split": a.split}
            write_json(a.json, res | {"evaluated": {"checkpoint": str(checkpoint or DEFAULT_CHECKPOINT),
                                                    "checkpoint_sha256": sha256_file(checkpoint or DEFAULT_CHECKPOINT),
                                                    **source, "gallery_images": len(gallery)}})
    return 0


if __name__ == "__main__":
    run_cli(main)
