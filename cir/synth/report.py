"""Quality report of generated triplets.

Per triplet: does the caption mention every changed object of its pair? The changes come from the
CIR-Shapes scenes when the triplet carries them (`meta.pair_meta` or `meta`: reference_scene,
target_scene; independent of the generator), else from the generator's step 2-3 outputs. An object
counts as mentioned when one of its names ("red circle" from scenes, the object's "name" from the
stages, before or after the change) occurs in the caption as whole words. With a checkpoint, also
the rank of the true target among the gallery under that model.
"""
from __future__ import annotations

import re
import statistics

from cir.data.shapes.scene import Scene
from cir.data.triplets import Triplet, read_gallery
from cir.errors import UserError
from cir.synth.backends import scene_changes


def changed_objects(t: Triplet) -> tuple[str, list[tuple[str, ...]]]:
    """("scene" | "stages", the names of each changed object of the triplet's pair)."""
    scenes = t.meta.get("pair_meta") or t.meta
    if "reference_scene" in scenes and "target_scene" in scenes:
        return "scene", scene_changes(Scene.from_json(scenes["reference_scene"]), Scene.from_json(scenes["target_scene"]))
    if "stages" not in t.meta:
        raise UserError(f"triplet {t.id!r} carries neither CIR-Shapes scenes nor cir.synth stage outputs in meta")
    s = t.meta["stages"]
    return "stages", [tuple(dict.fromkeys(lst[i]["name"] for lst, i in ((s["reference_objects"], d["reference_index"]),
                                                                        (s["target_objects"], d["target_index"])) if i is not None))
                      for d in s["differences"]]


def mentions(caption: str, names: tuple[str, ...]) -> bool:
    return any(re.search(rf"(?<!\w){re.escape(n)}(?!\w)", caption, re.IGNORECASE) for n in names)


def target_ranks(triplets: list[Triplet], checkpoint: str, gallery: str | None, device: str) -> tuple[list[int], int]:
    """1-based rank of each triplet's first target by the model (the targets are added to the
    gallery; default gallery: every reference and target of the triplets). Returns (ranks, gallery size)."""
    from cir.checkpoint import load_checkpoint
    from cir.retrieval.evaluate import default_keep_reference, embed_gallery, embed_queries, rank

    images = read_gallery(gallery) if gallery else [p for t in triplets for p in (t.reference, *t.targets)]
    images = list(dict.fromkeys(images + [t.targets[0] for t in triplets]))
    model, preprocess, _ = load_checkpoint(checkpoint, device)
    ranking = rank(embed_queries(model, triplets, preprocess, device), embed_gallery(model, images, preprocess, device),
                   images, triplets, default_keep_reference(triplets), len(images))
    return [row.index(t.targets[0]) + 1 for row, t in zip(ranking, triplets)], len(images)


def report(triplets: list[Triplet], checkpoint: str | None = None, gallery: str | None = None, device: str = "cpu") -> dict:
    """{"summary": {...}, "triplets": [{"id", "num_conditions", "source", "changed", "missing", "complete", ["rank"]}]}."""
    if not triplets:
        raise UserError("no triplets to report on")
    rows = []
    for t in triplets:
        if not t.targets:
            raise UserError(f"triplet {t.id!r} has no target")
        source, changed = changed_objects(t)
        missing = [" / ".join(names) for names in changed if not mentions(t.caption, names)]
        rows.append({"id": t.id, "num_conditions": t.meta.get("num_modifications"), "source": source,
                     "changed": len(changed), "missing": missing, "complete": not missing})
    pct = lambda rs: round(100 * sum(r["complete"] for r in rs) / len(rs), 2)
    by_k = {}
    for r in rows:
        by_k.setdefault(str(r["num_conditions"]), []).append(r)
    summary = {"triplets": len(rows), "sources": {s: sum(r["source"] == s for r in rows) for s in ("scene", "stages")},
               "complete_pct": pct(rows), "complete_pct_by_conditions": {k: pct(v) for k, v in sorted(by_k.items())}}
    if checkpoint:
        ranks, size = target_ranks(triplets, checkpoint, gallery, device)
        for r, k in zip(rows, ranks):
            r["rank"] = k
        summary["rank"] = {"gallery": size, "median": statistics.median(ranks), "mean": round(statistics.fmean(ranks), 2),
                           **{f"R@{k}": round(100 * sum(x <= k for x in ranks) / len(ranks), 2) for k in (1, 5, 10)}}
    return {"summary": summary, "triplets": rows}


def format_summary(summary: dict) -> str:
    s = summary
    lines = [f"{s['triplets']} triplets (changes from scenes: {s['sources']['scene']}, from stage outputs: {s['sources']['stages']})",
             f"caption mentions every changed object: {s['complete_pct']}% ("
             + ", ".join(f"{k} condition(s): {v}%" for k, v in s["complete_pct_by_conditions"].items()) + ")"]
    if "rank" in s:
        r = s["rank"]
        lines.append(f"rank of the true target among {r['gallery']} images: median {r['median']}, mean {r['mean']}, "
                     f"R@1 {r['R@1']}, R@5 {r['R@5']}, R@10 {r['R@10']}")
    return "\n".join(lines)
