"""What a query's parts do to its ranking, measured by re-encoding (no gradients, no guesses).

    influence = phrase_influence(encoder, caption, phrases, gallery, targets, InfluenceConfig(k=10))
    variants = score_variants(encoder, prompt_variants(caption, phrases, shapes=True), gallery, ideal)
    counts = shapes_makeup(top_paths, triplets)   # or folder_makeup(top_paths)

`encoder(captions)` -> [C, E] float32 embeddings of one query image with each caption, in one
batch (`QueryEncoder`); `gallery` is a `Gallery` (embeddings [N, E], paths [N]). Ranks are 1-based
over the whole gallery by inner product: 1 + the number of images scoring strictly higher.

CLI (JSON on stdout):
    python -m cir.explain influence --image Q.png --caption "..." [--target T.png] [--k 10]
    python -m cir.explain variants --image Q.png --caption "..." --ideal A.png [--ideal B.png] [--llm-url URL --llm-model M]
    python -m cir.explain makeup --image Q.png --caption "..." [--examples triplets.jsonl]
    python -m cir.explain project [--index INDEX_DIR] [--image Q.png --caption "..."]
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

from cir.cli import add_device_flags, parse_first, positive_int, run_cli
from cir.errors import UserError

VARIANTS_MAX = 10  # prompt variants scored besides the caption


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cir.explain", allow_abbrev=False,
                                description="Measure what a composed query's phrases, rewordings and results are; "
                                            "JSON on stdout.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, what in [("influence", "each noun phrase masked in turn: the target's (or top-1's) rank and score "
                                     "change and the top-k overlap"),
                       ("variants", "prompt variants (each phrase dropped, operations reordered, CIR-Shapes "
                                    "template synonyms) scored by NDCG@k and MRR against ideal images"),
                       ("makeup", "what the top k contain: shapes, colours and positions (CIR-Shapes) and folders"),
                       ("project", "the 2D projection of the gallery (stored beside the index), and the query's point")]:
        s = sub.add_parser(name, help=what, description=what, allow_abbrev=False)
        s.add_argument("--checkpoint", default=None, help="model checkpoint (default: the shipped one)")
        s.add_argument("--index", default=None, help="gallery index folder (default: the demo index assets/demo/index)")
        s.add_argument("--examples", default=None,
                       help="triplet JSONL whose queries give targets, gold phrases and scenes "
                            "(default: the demo examples with the demo index)")
        s.add_argument("--image", required=name != "project", help="the query image")
        s.add_argument("--caption", required=name != "project", help="the modification text")
        s.add_argument("--k", type=positive_int, default=10, help="top k compared and counted (default 10)")
        s.add_argument("--phrase", action="append", default=None,
                       help="a noun phrase of the caption (repeatable; default: an example's gold phrases, else spaCy's)")
        add_device_flags(s)
        if name == "influence":
            s.add_argument("--target", action="append", default=None,
                           help="a ground-truth target image (repeatable; default: the example's, else the top-1)")
        if name == "variants":
            s.add_argument("--ideal", action="append", required=True, help="an image marked ideal (repeatable)")
            s.add_argument("--max-variants", type=positive_int, default=VARIANTS_MAX,
                           help=f"at most this many variants besides the caption (default {VARIANTS_MAX})")
            s.add_argument("--llm-url", default=None,
                           help="an OpenAI-compatible server (as python -m cir.synth --base-url): also score its rewrites")
            s.add_argument("--llm-model", default=None, help="the model the server runs (with --llm-url)")
            s.add_argument("--llm-key-env", default="OPENAI_API_KEY",
                           help="environment variable holding the server's API key (default OPENAI_API_KEY)")
        if name == "project":
            s.add_argument("--method", choices=["auto", "pca", "umap"], default="auto",
                           help="auto: UMAP where umap-learn is installed, else PCA (default auto)")
            s.add_argument("--seed", type=int, default=0, help="random seed of the projection (default 0)")
    a = p.parse_args(argv)
    if a.command == "variants" and (a.llm_url is None) != (a.llm_model is None):
        raise UserError("give --llm-url and --llm-model together")
    if a.command == "project" and (a.image is None) != (a.caption is None):
        raise UserError("give --image and --caption together (the query to project), or neither")
    return a


parse_first(__name__, parse_args)

import numpy as np  # noqa: E402  (heavy imports after the command line is parsed)
import torch  # noqa: E402

from cir.data.shapes.captions import HELDOUT_TEMPLATES, JOINS, RESIZE_WORDS, TEMPLATES  # noqa: E402
from cir.data.shapes.scene import BACKGROUNDS, CELLS, COLORS, SHAPES, SIZES, Operation, Scene, apply_all  # noqa: E402
from cir.precision import autocast  # noqa: E402

Encoder = Callable[[list[str]], np.ndarray]  # captions [C] -> query embeddings [C, E] float32


class Gallery(NamedTuple):
    embeddings: np.ndarray  # [N, E] float32, rows L2-normalised
    paths: list[str]  # [N]


@dataclass
class InfluenceConfig:
    k: int = 10  # top k whose overlap is compared


@dataclass
class VariantConfig:
    k: int = 10  # NDCG@k
    max_variants: int = VARIANTS_MAX  # variants besides the caption itself
    shapes: bool = False  # add CIR-Shapes template synonyms


@dataclass
class QueryEncoder:
    """`encoder(captions)` -> [C, E] float32: `model.encode_query` of `pixels` [3, S, S] with each
    caption, one forward, under evaluation's autocast. `lock`: held during the forward (the app's model lock)."""

    model: torch.nn.Module
    pixels: torch.Tensor
    device: torch.device | str = "cpu"
    lock: object = field(default=None, repr=False)

    def __call__(self, captions: list[str]) -> np.ndarray:
        pixels = self.pixels[None].expand(len(captions), *self.pixels.shape).to(self.device)
        with self.lock or contextlib.nullcontext(), torch.no_grad(), autocast(self.device):
            return self.model.encode_query(pixels, list(captions)).float().cpu().numpy()


# ---------------------------------------------------------------------------- ranks
def ranks_of(scores: np.ndarray, rows: list[int]) -> np.ndarray:
    """scores [C, N], gallery rows [R] -> each row's rank under each caption [C, R] (1-based)."""
    chosen = scores[:, rows]  # [C, R]
    return (scores[:, None, :] > chosen[:, :, None]).sum(-1) + 1


def top_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """scores [C, N] -> the k best gallery rows per caption [C, k], best first."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, 1), axis=1, kind="stable")
    return np.take_along_axis(part, order, 1)


def rows_of(gallery: Gallery, paths) -> list[int]:
    """Gallery rows of `paths` (those in the gallery, in order)."""
    pos = {p: i for i, p in enumerate(gallery.paths)}
    return [pos[p] for p in paths if p in pos]


# ---------------------------------------------------------------------------- phrase influence
def masked(caption: str, start: int, end: int) -> str:
    """`caption` with characters [start, end) replaced by spaces (the other phrases keep their offsets)."""
    return caption[:start] + " " * (end - start) + caption[end:]


def phrase_influence(encoder: Encoder, caption: str, phrases: list[dict], gallery: Gallery, targets=(),
                     config: InfluenceConfig = InfluenceConfig()) -> dict:
    """Each phrase {"text", "start", "end"} masked in turn, the caption and every masked one encoded in
    one batch -> {"subject", "subject_path", "rank", "score", "k", "phrases": [{"phrase", "start", "end",
    "caption", "rank", "rank_change", "score", "score_change", "overlap", "overlap_change"}]}.
    The subject is the best-ranked target of `targets` in the gallery, else the caption's top-1;
    its rank and score are re-measured under each masked caption (rank_change > 0: it moved down).
    overlap: how many of the caption's top k stay in the masked caption's top k (change: overlap - k)."""
    captions = [caption] + [masked(caption, p["start"], p["end"]) for p in phrases]
    scores = encoder(captions) @ gallery.embeddings.T  # [1 + P, N]
    rows = rows_of(gallery, targets)
    kind = "target" if rows else "top-1"
    if rows:
        subject = rows[int(ranks_of(scores[:1], rows)[0].argmin())]
    else:
        subject = int(scores[0].argmax())
    rank = ranks_of(scores, [subject])[:, 0]  # [1 + P]
    tops = top_rows(scores, config.k)
    k = tops.shape[1]
    base = set(tops[0].tolist())
    out = []
    for i, p in enumerate(phrases, 1):
        overlap = len(base & set(tops[i].tolist()))
        out.append({"phrase": p["text"], "start": p["start"], "end": p["end"], "caption": captions[i],
                    "rank": int(rank[i]), "rank_change": int(rank[i] - rank[0]),
                    "score": float(scores[i, subject]), "score_change": float(scores[i, subject] - scores[0, subject]),
                    "overlap": overlap, "overlap_change": overlap - k})
    return {"subject": kind, "subject_path": gallery.paths[subject], "rank": int(rank[0]),
            "score": float(scores[0, subject]), "k": k, "phrases": out}


# ---------------------------------------------------------------------------- prompt variants
def dropped(caption: str, start: int, end: int) -> str:
    """`caption` without characters [start, end), runs of spaces made one, none before punctuation."""
    return re.sub(r"\s+([.,;])", r"\1", re.sub(r"\s+", " ", caption[:start] + caption[end:])).strip()


JOIN_PATTERN = re.compile("|".join(re.escape(j) for j in sorted(set(JOINS), key=len, reverse=True)))


def operations(caption: str) -> list[str]:
    """The caption's clauses, split at the CIR-Shapes joins (" and ", ", then ", "; ", ...), without a final "."."""
    return [c.strip().rstrip(".").strip() for c in JOIN_PATTERN.split(caption) if c.strip().rstrip(".")]


def _alternatives(words) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


# what each template slot may hold (other slots: any text)
SLOT_PATTERNS = {"color": _alternatives(COLORS), "bg": _alternatives(BACKGROUNDS), "size": _alternatives(SIZES),
                 "cell": "the (?:" + _alternatives(CELLS) + ")", "shape_np": "an? (?:" + _alternatives(SHAPES) + ")",
                 "bg_np": "the background", "obj": "(?:the|a|an) .+?", "new": "(?:the|a|an) .+?",
                 "bigger": _alternatives(w for pair in RESIZE_WORDS.values() for w in pair[0]),
                 "resize_verb": _alternatives(w for pair in RESIZE_WORDS.values() for w in pair[1])}


def _template_regex(template: str) -> re.Pattern:
    """A template ("make {obj} {color}") as a full-match regex with one named group per slot."""
    parts = re.split(r"\{(\w+)\}", template)
    return re.compile("".join(re.escape(t) if i % 2 == 0 else f"(?P<{t}>{SLOT_PATTERNS.get(t, '.+?')})"
                              for i, t in enumerate(parts)) + "$")


def synonyms(clause: str) -> list[str]:
    """The clause said with each other CIR-Shapes template of its operation (training and held-out)
    whose slots it fills, e.g. "make the red circle blue" -> "paint the red circle blue", ..."""
    for kind, templates in TEMPLATES.items():
        for template in templates:
            m = _template_regex(template).match(clause)
            if m is None:
                continue
            slots = m.groupdict()
            others = [t for t in templates + HELDOUT_TEMPLATES[kind] if t != template]
            return [t.format(**slots) for t in others if set(re.findall(r"\{(\w+)\}", t)) <= set(slots)]
    return []


def prompt_variants(caption: str, phrases: list[dict], config: VariantConfig = VariantConfig()) -> list[dict]:
    """[{"name", "caption"}]: the caption, then (at most `config.max_variants`, distinct) each phrase
    dropped, the operations in every other order (joined by " and "), and, with `config.shapes`, each
    clause said with its other CIR-Shapes templates."""
    out = [{"name": "original", "caption": caption}]
    for p in phrases:
        out.append({"name": f"drop “{p['text']}”", "caption": dropped(caption, p["start"], p["end"])})
    clauses = operations(caption)
    for order in itertools.islice(itertools.permutations(range(len(clauses))), 1, config.max_variants + 1):
        out.append({"name": "order " + ",".join(str(i + 1) for i in order),
                    "caption": " and ".join(clauses[i] for i in order)})
    if config.shapes:
        for i, clause in enumerate(clauses):
            for said in synonyms(clause):
                reworded = clauses[:i] + [said] + clauses[i + 1:]
                out.append({"name": f"synonym: {said}", "caption": " and ".join(reworded)})
    seen, unique = set(), []
    for v in out:
        if v["caption"] and v["caption"] not in seen:
            seen.add(v["caption"])
            unique.append(v)
    return unique[:config.max_variants + 1]


REWRITE_PROMPT = (
    "Rewrite this instruction for editing an image in {n} different ways. Each rewrite must ask for exactly the "
    "same changes to the same objects; vary the wording and the order of the changes only.\n"
    "Instruction: {caption}\n"
    'Answer with JSON only: {{"rewrites": ["...", "..."]}}')


def llm_rewrites(backend, caption: str, n: int) -> list[dict]:
    """[{"name", "caption"}]: up to `n` rewrites of `caption` by an LLM (`backend.complete`, e.g.
    `cir.synth.backends.OpenAIBackend`, the good4cir pipeline's client); a UserError when its answer
    holds no JSON list of rewrites."""
    from cir.synth.backends import BadAnswer, PairFailed, Request

    try:
        answer = backend.complete(Request("rewrite", REWRITE_PROMPT.format(n=n, caption=caption), (), {}))
        rewrites = json.loads(answer[answer.index("{"):answer.rindex("}") + 1])["rewrites"]
    except (BadAnswer, PairFailed, ValueError, KeyError, TypeError) as e:
        raise UserError(f"the LLM gave no rewrites ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    texts = [" ".join(r.split()) for r in rewrites if isinstance(r, str) and r.strip()] if isinstance(rewrites, list) else []
    if not texts:
        raise UserError("the LLM gave no rewrites (an empty or malformed list)")
    return [{"name": f"LLM rewrite {i}", "caption": t} for i, t in enumerate(texts[:n], 1)]


def ndcg_at_k(ranks: np.ndarray, k: int) -> float:
    """Binary-relevance NDCG@k of the ideal images at `ranks` [R] (1-based)."""
    dcg = sum(1 / math.log2(r + 1) for r in ranks if r <= k)
    ideal = sum(1 / math.log2(j + 1) for j in range(1, min(k, len(ranks)) + 1))
    return dcg / ideal if ideal else 0.0


def score_variants(encoder: Encoder, variants: list[dict], gallery: Gallery, ideal,
                   config: VariantConfig = VariantConfig()) -> dict:
    """Every variant encoded in one batch and ranked -> {"ideal": [paths], "k", "variants": [{"name",
    "caption", "ndcg", "mrr", "ranks": [rank of each ideal image], "rank_change": [vs the first
    variant]}]}. MRR: 1 / the best ideal rank."""
    rows = rows_of(gallery, ideal)
    if not rows:
        raise UserError("mark at least one result (an image of the gallery) as ideal")
    scores = encoder([v["caption"] for v in variants]) @ gallery.embeddings.T  # [V, N]
    ranks = ranks_of(scores, rows)  # [V, R]
    return {"ideal": [gallery.paths[r] for r in rows], "k": config.k, "variants": [
        {**v, "ndcg": ndcg_at_k(ranks[i], config.k), "mrr": 1.0 / int(ranks[i].min()),
         "ranks": ranks[i].tolist(), "rank_change": (ranks[i] - ranks[0]).tolist()} for i, v in enumerate(variants)]}


# ---------------------------------------------------------------------------- make-up of the results
def shapes_scenes(triplets) -> dict[str, dict]:
    """{image file name: its CIR-Shapes scene (JSON)}: each triplet's reference, its target (one target)
    and its partial fulfilments (the reference scene with their operations applied)."""
    out = {}
    for t in triplets:
        meta = t.meta or {}
        ref, tgt = meta.get("reference_scene"), meta.get("target_scene")
        if ref is not None:
            out[os.path.basename(t.reference)] = ref
            ops = [Operation.from_json(o) for o in meta.get("operations") or []]
            for partial in meta.get("partials") or []:
                scene = apply_all(Scene.from_json(ref), [ops[i] for i in partial["operations"]])
                out[os.path.basename(partial["path"])] = scene.to_json()
        if tgt is not None and len(t.targets) == 1:
            out[os.path.basename(t.targets[0])] = tgt
    return out


def shapes_makeup(paths: list[str], scenes: dict[str, dict]) -> dict:
    """Counts over the objects of the images `paths` (scenes from `shapes_scenes`) -> {"shape": {...},
    "colour": {...}, "position": {...}, "size": {...}, "background": {...}, "images": n, "unknown": m}
    (unknown: images without a scene)."""
    counts = {key: Counter() for key in ("shape", "colour", "position", "size", "background")}
    known = [scenes[os.path.basename(p)] for p in paths if os.path.basename(p) in scenes]
    for scene in known:
        counts["background"][scene["background"]] += 1
        for o in scene["objects"]:
            counts["shape"][o["shape"]] += 1
            counts["colour"][o["color"]] += 1
            counts["position"][o.get("cell_name", str(o["cell"]))] += 1
            counts["size"][o["size"]] += 1
    return {**{k: dict(c.most_common()) for k, c in counts.items()}, "images": len(known),
            "unknown": len(paths) - len(known)}


def folder_makeup(paths: list[str]) -> dict[str, int]:
    """{folder name: images of `paths` in it}, most first."""
    return dict(Counter(os.path.basename(os.path.dirname(p)) or "/" for p in paths).most_common())


# ---------------------------------------------------------------------------- CLI
def _setup(a: argparse.Namespace):
    """(explorer, its gallery, query encoder, phrases, targets from the example) of the parsed flags."""
    from cir.ui.explorer import Explorer, as_image, phrase_spans

    if a.threads:
        torch.set_num_threads(a.threads)
    ex = Explorer.load(a.checkpoint, a.index, examples=a.examples, device=a.device)
    gallery = Gallery(np.asarray(ex.index.embeddings, dtype=np.float32), ex.index.paths)
    if a.image is None:
        return ex, gallery, None, [], []
    image = os.path.abspath(a.image)
    encoder = QueryEncoder(ex.model, ex.preprocess(as_image(image)), ex.device)
    if a.phrase:
        phrases = phrase_spans(a.caption, [[p] for p in a.phrase])
    else:
        phrases = ex.caption_phrases(a.caption)[0]
    example = ex.example_of(image, a.caption)
    return ex, gallery, encoder, phrases, example.targets if example is not None else []


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    ex, gallery, encoder, phrases, targets = _setup(a)
    if a.command == "influence":
        targets = [os.path.abspath(t) for t in a.target] if a.target else targets
        out = phrase_influence(encoder, a.caption, phrases, gallery, targets, InfluenceConfig(a.k))
    elif a.command == "variants":
        config = VariantConfig(a.k, a.max_variants, shapes=bool(shapes_scenes(ex.examples)))
        variants = prompt_variants(a.caption, phrases, config)
        if a.llm_url:
            from cir.synth.backends import OpenAIBackend
            backend = OpenAIBackend(a.llm_url, a.llm_model, os.environ.get(a.llm_key_env) or None)
            variants += llm_rewrites(backend, a.caption, a.max_variants)
        out = score_variants(encoder, variants, gallery, [os.path.abspath(p) for p in a.ideal], config)
    elif a.command == "makeup":
        top = [gallery.paths[i] for i in top_rows(encoder([a.caption]) @ gallery.embeddings.T, a.k)[0]]
        out = {"top": top, "folders": folder_makeup(top), "shapes": shapes_makeup(top, shapes_scenes(ex.examples))}
    else:
        from cir.projection import ProjectionConfig, projection_of

        projection = projection_of(ex.index, a.index, ProjectionConfig(a.method, a.seed))
        out = {"method": projection.method, "file": projection.file, "points": projection.points.round(5).tolist()}
        if encoder is not None:
            out["query"] = projection.transform(encoder([a.caption]))[0].round(5).tolist()
    print(json.dumps(out, ensure_ascii=False, indent=1))
    return 0


if __name__ == "__main__":
    run_cli(main)
