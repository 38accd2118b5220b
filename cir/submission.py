"""Test-server submission files for CIRR and CIRCO, from rankings of `cir.retrieval.evaluate.ranked`.

CIRR (https://cirr.cecs.anu.edu.au/, the CIRR repository's Test-split_server.md) takes two JSON
files, each {"version": "rc2", "metric": M, "<pairid>": [image names]} over every pairid of the
split: M = "recall" with the top 50 of the ranking (reference removed), M = "recall_subset" with
the top 3 of the query's img_set members (reference removed). CIRCO (https://circo.micc.unifi.it/)
takes {"<query id>": [top 50 COCO image ids as integers]} over every query of the split. Names
and ids are unique within a list. Files are written compactly (CIRR's server accepts up to 5 MB;
test1's 4148 queries x 50 names take about 4.2 MB) and atomically.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from cir.atomic import write_text
from cir.data.circo import coco_id
from cir.data.triplets import Triplet

CIRR_VERSION = "rc2"
RECALL_DEPTH, SUBSET_DEPTH = 50, 3  # names per query in the recall and recall_subset files


def cirr_submissions(triplets: list[Triplet], rankings: list[list[str]], members: list[list[str]],
                     names: dict[str, str]) -> dict[str, dict]:
    """{"recall": ..., "recall_subset": ...}: the two CIRR submission objects. `rankings[i]` is query
    i's gallery paths best first without its reference, `members[i]` its img_set members without
    the reference in the same order, `names` maps each path to its CIRR image name."""
    out = {}
    for metric, lists, depth in (("recall", rankings, RECALL_DEPTH), ("recall_subset", members, SUBSET_DEPTH)):
        out[metric] = {"version": CIRR_VERSION, "metric": metric} | {
            str(t.meta["pairid"]): [names[p] for p in _unique(ranked, t.reference)[:depth]]
            for t, ranked in zip(triplets, lists)}
    return out


def circo_submission(triplets: list[Triplet], rankings: list[list[str]]) -> dict[str, list[int]]:
    """{"<query id>": [the top 50 COCO ids of its ranking]} (the reference is kept, as CIRCO ranks it)."""
    return {t.id: [coco_id(p) for p in _unique(ranked)[:RECALL_DEPTH]] for t, ranked in zip(triplets, rankings)}


def write_submission(out_dir: str | os.PathLike, dataset: str, split: str, triplets: list[Triplet],
                     rankings: list[list[str]], members: list[list[str]], names: dict[str, str] | None = None
                     ) -> list[Path]:
    """Write `dataset`'s submission files of `split` into `out_dir`: cirr-<split>-recall.json and
    cirr-<split>-recall_subset.json (CIRR; `names` required), or circo-<split>.json. -> their paths."""
    if dataset == "cirr":
        files = {Path(out_dir) / f"cirr-{split}-{metric}.json": obj
                 for metric, obj in cirr_submissions(triplets, rankings, members, names).items()}
    else:
        files = {Path(out_dir) / f"circo-{split}.json": circo_submission(triplets, rankings)}
    for path, obj in files.items():
        write_text(path, json.dumps(obj, separators=(",", ":")))
    return list(files)


def _unique(paths: list[str], drop: str | None = None) -> list[str]:
    """`paths` in order without repeats and without `drop`."""
    return [p for p in dict.fromkeys(paths) if p != drop]
