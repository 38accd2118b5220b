"""Periodic validation of a training run: retrieval and grounding on the validation triplets,
printed and appended to the run's val.jsonl."""
from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from cir.data.triplets import Triplet
from cir.retrieval.evaluate import evaluate


def validate(model, preprocess, val: list[Triplet], gallery: list[str], device, step: int, path: Path) -> dict:
    """Retrieval and grounding on the validation triplets at `step`: printed, appended to `path`
    (val.jsonl) and returned as {"step", "val_recall", "val_grounding"} for the checkpoint."""
    res = evaluate(model, preprocess, val, gallery, device)
    model.train()
    metrics = {"step": step, "val_recall": res["recall"]}
    if "grounding" in res:
        metrics["val_grounding"] = {k: v for k, v in res["grounding"].items() if k != "per_layer_head"}
    tqdm.write(f"step {step}: val R@1 {res['recall']['1']:.2f}  R@5 {res['recall']['5']:.2f}  "
               f"R@10 {res['recall']['10']:.2f}" + grounding_text(res.get("grounding")))
    with open(path, "a") as f:
        f.write(json.dumps(metrics) + "\n")
    return metrics


def grounding_text(g: dict | None) -> str:
    """The validation's grounding in one line: pointing in context / isolated, energy and distinct
    peaks per caption over the phrases naming a reference object ("" without grounding boxes)."""
    if not g or not g.get("objects", {}).get("count"):
        return ""
    o = g["objects"]
    return (f"  pointing {o['pointing']['in_context']:.1f} / {o['pointing']['isolated']:.1f}"
            f"  energy {o['energy']['in_context']:.1f}  distinct {o['distinct']['in_context']:.1f}")
