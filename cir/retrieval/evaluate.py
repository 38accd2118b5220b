"""Scoring a model on triplets and a gallery: one ranking (cosine similarity descending, ties in
gallery order, the reference dropped or kept as a hard negative), the benchmark's metrics over it
(Recall@K, Recall_subset@K, mAP@K, by number of operations and by operation, what the first results
are) and the grounding of the phrase maps (cir.grounding). `python -m cir.evaluate` is its command
line; the metrics are described there.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from tqdm import tqdm

from cir.data.datasets import image_batches
from cir.data.images import load_rgb
from cir.data.triplets import Triplet
from cir.errors import UserError
from cir.grounding import box_energy, box_share, distinct_peaks, pointing_hits
from cir.losses import reduce_maps
from cir.metrics import map_at_k, recall_at_k, recall_subset_at_k
from cir.models.base import ComposedRetrieval, isolated_maps, span_maps
from cir.precision import autocast

RECALL_KS = (1, 5, 10, 50)
CIRCO_RECALL_KS = (5, 10, 25, 50)
SUBSET_KS = (1, 2, 3)
MAP_KS = (5, 10, 25, 50)
RANK_DEPTH = 50  # gallery images ranked per query: the largest K, and the depth of the submission files
SCORE_BLOCK = 1 << 24  # query x gallery scores sorted at once


@torch.no_grad()
def embed_gallery(model: ComposedRetrieval, paths: list[str], preprocess, device, batch_size: int = 128,
                  workers: int = 0, progress: bool = False) -> torch.Tensor:
    """f(image, "") for every path: [N, E] float32 on `device`."""
    out = []
    for images in tqdm(image_batches(paths, preprocess, batch_size, workers, pin=torch.device(device).type == "cuda"),
                       desc="gallery", unit="batch", disable=not progress):
        with autocast(device):
            out.append(model.encode_gallery(images.to(device, non_blocking=True)).float())
    return torch.cat(out) if out else torch.zeros(0, model.config.embed_dim, device=device)


@torch.no_grad()
def embed_queries(model: ComposedRetrieval, triplets: list[Triplet], preprocess, device, batch_size: int = 128,
                  progress: bool = False) -> torch.Tensor:
    """f(reference, caption) for every triplet: [Q, E] float32."""
    out = []
    for i in tqdm(range(0, len(triplets), batch_size), desc="queries", unit="batch", disable=not progress):
        chunk = triplets[i:i + batch_size]
        images = torch.stack([preprocess(load_rgb(t.reference)) for t in chunk]).to(device)
        with autocast(device):
            out.append(model.encode_query(images, [t.caption for t in chunk]).float())
    return torch.cat(out)


def default_keep_reference(triplets: list[Triplet]) -> bool:
    """CIRR removes the reference from the ranking; CIRCO and CIR-Shapes keep it."""
    return not any(t.meta.get("dataset") == "cirr" for t in triplets)


def ranked(query_emb: torch.Tensor, gallery_emb: torch.Tensor, gallery: list[str], triplets: list[Triplet],
           keep_reference: bool, k: int) -> tuple[list[list[str]], list[list[str]]]:
    """(top-k gallery paths per query, its subset members in gallery minus its reference) from one
    ranking: cosine similarity descending, ties broken by position in `gallery` (by path for the
    benchmark readers and gallery folders). The reference is dropped from the top-k unless kept (a
    row then holds min(k, N - 1) paths); the members are that same ranking restricted to them, so
    Recall_subset and Recall agree on ties. query_emb [Q, E], gallery_emb [N, E]."""
    pos = {p: i for i, p in enumerate(gallery)}
    step = max(1, SCORE_BLOCK // max(1, len(gallery)))
    top, members = [], []
    for start in range(0, len(triplets), step):
        scores = query_emb[start:start + step] @ gallery_emb.T  # [B, N]
        order = scores.sort(dim=1, descending=True, stable=True).indices[:, :k + 1].tolist()
        for row, t, s in zip(order, triplets[start:start + step], scores):
            drop = None if keep_reference else pos.get(t.reference)
            top.append([gallery[i] for i in row if i != drop][:k])
            own = sorted({pos[m] for m in t.subset or [] if m in pos} - {pos.get(t.reference)})
            by_score = s[own].sort(descending=True, stable=True).indices.tolist() if own else []
            members.append([gallery[own[j]] for j in by_score])
    return top, members


def rank(query_emb: torch.Tensor, gallery_emb: torch.Tensor, gallery: list[str], triplets: list[Triplet],
         keep_reference: bool, k: int) -> list[list[str]]:
    """The top-k gallery paths per query of `ranked`."""
    return ranked(query_emb, gallery_emb, gallery, triplets, keep_reference, k)[0]


@torch.no_grad()
def grounding(model: ComposedRetrieval, preprocess, triplets: list[Triplet], device, batch_size: int = 64) -> dict | None:
    """Grounding of the phrases in meta.grounding (cir.grounding), maps averaged over layers and heads,
    in context and isolated. Returns None without such phrases, else {"count", "in_context",
    "isolated" (pointing game over all phrases, percent), "per_layer_head": {"in_context",
    "isolated"} ([L][H] percent, each head's own map), "grid", "objects": {"count", "pointing",
    "energy" (each {"in_context", "isolated"}; energy also "chance"), "distinct": {"captions",
    "in_context", "isolated"}}} where "objects" counts only phrases naming an object of the
    reference image (kind "object") and "distinct" the captions with two of them on disjoint boxes."""
    items = [t for t in triplets if t.meta.get("grounding")]
    if not items:
        return None
    L, H = model.config.fusion_layers, model.config.fusion_heads
    names = ("in_context", "isolated")
    hits = dict.fromkeys(names, 0)
    head_hits = {name: torch.zeros(L, H) for name in names}
    obj = {"count": 0, "pointing": dict.fromkeys(names, 0.0), "energy": dict.fromkeys((*names, "chance"), 0.0),
           "distinct": {"captions": 0, **dict.fromkeys(names, 0)}}
    count = 0
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        pil = [load_rgb(t.reference) for t in chunk]
        images = torch.stack([preprocess(im) for im in pil]).to(device)
        img_tok = model.image_tokens(images)
        fused = model.fuse(img_tok, model.text_tokens(model.tokenizer([t.caption for t in chunk]).to(device)))
        rows, positions, texts, phrases = [], [], [], []
        for b, t in enumerate(chunk):
            for g in t.meta["grounding"]:
                pos = model.tokenizer.span_to_token_positions(t.caption, g["start"], g["end"])
                if pos:
                    rows.append(b)
                    positions.append(pos)
                    texts.append(t.caption[g["start"]:g["end"]])
                    phrases.append(g)
        if not rows:
            continue
        rows_t = torch.tensor(rows, device=device)
        maps = {"in_context": span_maps(fused.attention, rows_t, positions),  # [N, L, H, P]
                "isolated": isolated_maps(model, img_tok, rows_t, texts)}
        objects = [n for n, g in enumerate(phrases) if g.get("kind", "object") == "object"]
        obj["count"] += len(objects)
        for n in objects:
            obj["energy"]["chance"] += box_share(pil[rows[n]].size, phrases[n]["box"])
        for name, m in maps.items():
            mean = reduce_maps(m)  # [N, P]
            peaks = mean.float().argmax(1).tolist()
            for n in range(len(rows)):
                size, box = pil[rows[n]].size, phrases[n]["box"]
                hit = pointing_hits(torch.cat([mean[n:n + 1], m[n].flatten(0, 1)]), model.grid, size, box)
                hits[name] += int(hit[0])
                head_hits[name] += hit[1:].view(L, H).float().cpu()
                if n in objects:
                    obj["pointing"][name] += int(hit[0])
                    obj["energy"][name] += float(box_energy(mean[n:n + 1], model.grid, size, box)[0])
            for b in range(len(chunk)):
                mine = [n for n in objects if rows[n] == b]
                distinct = distinct_peaks([peaks[n] for n in mine], [phrases[n]["box"] for n in mine])
                if distinct is not None:
                    obj["distinct"]["captions"] += name == "in_context"
                    obj["distinct"][name] += distinct
        count += len(rows)
    pct = lambda v, n: 100.0 * v / n if n else float("nan")
    objects_out = {"count": obj["count"],
                   "pointing": {k: pct(v, obj["count"]) for k, v in obj["pointing"].items()},
                   "energy": {k: pct(v, obj["count"]) for k, v in obj["energy"].items()},
                   "distinct": {"captions": obj["distinct"]["captions"],
                                **{k: pct(obj["distinct"][k], obj["distinct"]["captions"]) for k in names}}}
    return ({name: 100.0 * h / count for name, h in hits.items()} | {"count": count, "grid": model.grid}
            | {"per_layer_head": {name: (100.0 * h / count).tolist() for name, h in head_hits.items()}}
            | {"objects": objects_out})


def retrieve(model: ComposedRetrieval, preprocess, triplets: list[Triplet], gallery: list[str], device="cpu",
             keep_reference: bool | None = None, batch_size: int = 128, progress: bool = False,
             gallery_emb: torch.Tensor | None = None) -> tuple[list[list[str]], list[list[str]], bool]:
    """(top RANK_DEPTH paths per query, its subset members, keep_reference) as `ranked` gives them.
    The gallery is embedded once, unless `gallery_emb` [N, E] (L2-normalised rows) is given."""
    model.eval()
    if keep_reference is None:
        keep_reference = default_keep_reference(triplets)
    if gallery_emb is None:
        gallery_emb = embed_gallery(model, gallery, preprocess, device, batch_size, progress=progress)
    q = embed_queries(model, triplets, preprocess, device, batch_size, progress=progress)
    top, members = ranked(q, gallery_emb.to(q.device), gallery, triplets, keep_reference, RANK_DEPTH)
    return top, members, keep_reference


def protocol_metrics(triplets: list[Triplet], rankings: list[list[str]], members: list[list[str]]) -> dict:
    """{"recall", ["recall_subset"], ["map"]} (each {"k": percent}) as the triplets' benchmark defines them.

    CIRCO (meta.dataset "circo"): mAP@5/10/25/50 over all ground truths, Recall@5/10/25/50 on
    target_img_id (each triplet's first target) alone. Otherwise Recall@1/5/10/50 on any target,
    Recall_subset@1/2/3 on `members` when triplets carry subsets, mAP@5/10/25/50 when some query
    has several targets. A UserError when no query has a target (a test split has none)."""
    if not any(t.targets for t in triplets):
        raise UserError(f"none of the {len(triplets)} queries has a target (a test split?), so nothing can be "
                        "scored; write the test-server files with --submission OUT_DIR")
    targets = [set(t.targets) for t in triplets]
    if any(t.meta.get("dataset") == "circo" for t in triplets):
        return {"recall": _str_keys(recall_at_k(rankings, [t.targets[:1] for t in triplets], CIRCO_RECALL_KS)),
                "map": _str_keys(map_at_k(rankings, targets, MAP_KS))}
    res = {"recall": _str_keys(recall_at_k(rankings, targets, RECALL_KS))}
    if any(t.subset for t in triplets):
        res["recall_subset"] = _str_keys(recall_subset_at_k(members, targets, [t.subset or [] for t in triplets],
                                                            [t.reference for t in triplets], SUBSET_KS))
    if any(len(t.targets) > 1 for t in triplets):
        res["map"] = _str_keys(map_at_k(rankings, targets, MAP_KS))
    return res


def evaluate(model: ComposedRetrieval, preprocess, triplets: list[Triplet], gallery: list[str], device="cpu",
             keep_reference: bool | None = None, batch_size: int = 128, with_grounding: bool = True,
             progress: bool = False, gallery_emb: torch.Tensor | None = None) -> dict:
    """All metrics of the module docstring, as the `--json` dict (percent values)."""
    rankings, members, keep_reference = retrieve(model, preprocess, triplets, gallery, device, keep_reference,
                                                 batch_size, progress, gallery_emb)
    return evaluate_rankings(model, preprocess, triplets, rankings, members, keep_reference, device, with_grounding)


def evaluate_rankings(model: ComposedRetrieval, preprocess, triplets: list[Triplet], rankings: list[list[str]],
                      members: list[list[str]], keep_reference: bool, device="cpu", with_grounding: bool = True
                      ) -> dict:
    """The `--json` dict of `evaluate` from the rankings of `retrieve`."""
    targets = [set(t.targets) for t in triplets]
    res: dict = protocol_metrics(triplets, rankings, members) | {"count": len(triplets),
                                                                 "keep_reference": keep_reference}
    by_count, by_operation, by_aspect = defaultdict(list), defaultdict(list), defaultdict(list)
    for i, t in enumerate(triplets):
        if "num_modifications" in t.meta:
            by_count[str(t.meta["num_modifications"])].append(i)
        for op_type in {op.get("type") for op in t.meta.get("operations", []) if isinstance(op, dict)} - {None}:
            by_operation[str(op_type)].append(i)
        for aspect in dict.fromkeys(t.meta.get("semantic_aspects", [])):
            by_aspect[str(aspect)].append(i)
    for name, groups in (("by_num_modifications", by_count), ("by_operation", by_operation)):
        if groups:
            res[name] = {k: {"recall": _str_keys(recall_at_k([rankings[i] for i in idx], [targets[i] for i in idx],
                                                             RECALL_KS)), "count": len(idx)}
                         for k, idx in sorted(groups.items())}
    if by_aspect and "map" in res:  # CIRCO's semantic mAP@10
        res["by_semantic_aspect"] = {k: {"map": _str_keys(map_at_k([rankings[i] for i in idx],
                                                                   [targets[i] for i in idx], [10])),
                                         "count": len(idx)} for k, idx in sorted(by_aspect.items())}
    if any(t.meta.get("partials") for t in triplets):
        res["top1"] = top1_outcomes(rankings, triplets)
    if with_grounding and (g := grounding(model, preprocess, triplets, device)) is not None:
        res["grounding"] = g
    return res


def top1_outcomes(rankings: list[list[str]], triplets: list[Triplet]) -> dict:
    """What each query's first result is (CIR-Shapes): a target, the query's own reference, one of its
    own partial fulfilments (meta.partials: the reference with only some operations applied), or
    another image. -> counts {"target", "partial", "reference", "other"}."""
    out = dict.fromkeys(("target", "partial", "reference", "other"), 0)
    for ranking, t in zip(rankings, triplets):
        first = ranking[0] if ranking else None
        partials = [p["path"] for p in t.meta.get("partials", []) if isinstance(p, dict) and "path" in p]
        if first in t.targets:
            out["target"] += 1
        elif first == t.reference:
            out["reference"] += 1
        elif first is not None and any(first == p or first.endswith("/" + p) for p in partials):
            out["partial"] += 1
        else:
            out["other"] += 1
    return out


def _str_keys(d: dict) -> dict:
    return {str(k): v for k, v in d.items()}


def format_results(res: dict) -> str:
    lines = [f"queries: {res['count']} (reference {'kept as a negative' if res['keep_reference'] else 'removed'})"]
    fmt = lambda d, name: "  ".join(f"{name}@{k} {v:6.2f}" for k, v in d.items())
    lines.append(fmt(res["recall"], "R"))
    if "recall_subset" in res:
        lines.append(fmt(res["recall_subset"], "Rs"))
    if "map" in res:
        lines.append(fmt(res["map"], "mAP"))
    for k, g in res.get("by_num_modifications", {}).items():
        lines.append(f"  {k} modification(s), {g['count']} queries: " + fmt(g["recall"], "R"))
    for k, g in res.get("by_operation", {}).items():
        lines.append(f"  with {k}, {g['count']} queries: " + fmt(g["recall"], "R"))
    for k, g in res.get("by_semantic_aspect", {}).items():
        lines.append(f"  aspect {k}, {g['count']} queries: " + fmt(g["map"], "mAP"))
    if "top1" in res:
        lines.append("first result: " + ", ".join(f"{v} {k}" for k, v in res["top1"].items())
                     + " (partial = the query's own reference with only some of its operations applied)")
    if "grounding" in res:
        g = res["grounding"]
        lines.append(f"grounding ({g['grid']} x {g['grid']} patches), pointing game over {g['count']} phrases: "
                     f"in context {g['in_context']:.2f}  isolated {g['isolated']:.2f}")
        o = g["objects"]
        lines.append(f"  phrases naming a reference object ({o['count']}): pointing {o['pointing']['in_context']:.2f} / "
                     f"{o['pointing']['isolated']:.2f}  energy {o['energy']['in_context']:.2f} / "
                     f"{o['energy']['isolated']:.2f} (chance {o['energy']['chance']:.2f})  (in context / isolated)")
        d = o["distinct"]
        lines.append(f"  distinctness ({d['captions']} captions with phrases on disjoint objects): peaks differ in "
                     f"{d['in_context']:.2f} / {d['isolated']:.2f}")
        for name, table in g["per_layer_head"].items():
            lines.append(f"  per head, {name.replace('_', ' ')}: "
                         + " | ".join(f"layer {l + 1}: " + " ".join(f"{v:.0f}" for v in row) for l, row in enumerate(table)))
    return "\n".join(lines)
