"""The explorer's model, gallery index and example queries, with the app's work as plain methods.

    ex = Explorer.load()                          # shipped checkpoint + assets/demo index and examples
    hits = ex.retrieve("query.png", "make the circle red", k=10)   # [Hit(path, score, rank, is_target)]
    maps = ex.phrase_maps("query.png", caption, ex.noun_phrases(caption))
    other = ex.with_checkpoint("b.safetensors")  # another model over the same gallery images and examples

Retrieval is evaluation's: query = model.encode_query(preprocess(image), [caption]) under the same
autocast as `cir.evaluate` (concurrent queries in one batch: `cir.ui.batching`), searched in a
`cir.index.GalleryIndex` (reference image kept).
"""
from __future__ import annotations

import hashlib
import os
import sys
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from cachetools import LRUCache, cached
from PIL import Image

from cir.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
from cir.data.triplets import Triplet, image_problem, read_gallery, read_triplets
from cir.errors import UserError
from cir.retrieval.evaluate import embed_gallery
from cir.index import GalleryIndex
from cir.retrieval.milvus import PREFIX as MILVUS, MilvusIndex, MilvusTarget
from cir.retrieval.pathlist import PathList
from cir.retrieval.search import resident_memory
from cir.losses import concept_consistency_loss
from cir.text.phrases import extract_noun_phrases
from cir.ui.batching import QueryBatcher
from cir.ui.decoded import decoded
from cir.ui.heatmaps import select

DEMO_DIR = Path(__file__).resolve().parents[2] / "assets" / "demo"
DEFAULT_INDEX, DEFAULT_EXAMPLES = DEMO_DIR / "index", DEMO_DIR / "examples.jsonl"
DEFAULT_GALLERY = DEMO_DIR / "gallery.txt"  # the demo index's images
ATTENTION_KEPT = 8  # queries whose phrase attention is kept, so the Why panel's controls redraw without a forward


class Hit(NamedTuple):
    path: str
    score: float
    rank: int  # 1-based
    is_target: bool


@dataclass
class PhraseResult:
    """One phrase's maps [g, g] (None when the phrase was cut by the context length) and CC term;
    `heads`: its in-context maps of every layer and head [L, H, g, g]."""

    text: str
    start: int
    end: int
    in_context: np.ndarray | None
    isolated: np.ndarray | None
    cc: float | None
    heads: np.ndarray | None = None


def as_image(image: str | os.PathLike | Image.Image) -> Image.Image:
    """An RGB image from a path (decoded once while cached: `cir.ui.decoded`; do not modify it) or
    a PIL image (converted, a copy)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if image is None or not os.path.isfile(image):
        raise UserError(f"image not found: {image}" if image else "choose a query image first")
    try:
        return decoded(str(image))
    except UserError:  # BadImage: already one line naming the file
        raise
    except OSError as e:
        raise UserError(f"cannot read image {image}: {e}") from None


def phrase_spans(caption: str, rows) -> list[dict]:
    """Phrases {"text", "start", "end"} from rows [text, start, end] (start/end may be blank).

    A row whose span still holds its text keeps it; otherwise the text's first occurrence in the
    caption is used. Blank rows are dropped; a text that is not in the caption is an error."""
    out = []
    for row in rows or []:
        text = str(row[0] or "").strip() if row else ""
        if not text:
            continue
        try:
            start, end = int(row[1]), int(row[2])
        except (IndexError, TypeError, ValueError, OverflowError):
            start = end = -1
        if not (0 <= start < end <= len(caption) and caption[start:end] == text):
            start = caption.find(text)
            if start < 0:
                raise UserError(f"phrase {text!r} does not occur in the caption")
            end = start + len(text)
        out.append({"text": text, "start": start, "end": end})
    return out


def _readable(paths: list[str], gallery) -> list[str]:
    """The paths `load_rgb` reads; the others are named on stderr (an error when none is left)."""
    problems = {p: why for p in paths if (why := image_problem(p)) is not None}
    for why in list(problems.values())[:20]:
        print(f"skipped: {why}", file=sys.stderr)
    if len(problems) > 20:
        print(f"skipped {len(problems) - 20} more unreadable images", file=sys.stderr)
    good = [p for p in paths if p not in problems]
    if not good:
        raise UserError(f"cannot embed the gallery {gallery}: no image can be read ({next(iter(problems.values()))})")
    return good


def grounding_boxes(t: Triplet) -> dict[tuple[int, int], list[float]]:
    """{(start, end): box} of a triplet's grounded phrases (meta "grounding", boxes in reference pixels)."""
    out = {}
    for g in t.meta.get("grounding") or []:
        try:
            out[int(g["start"]), int(g["end"])] = [float(v) for v in g["box"]][:4]
        except (KeyError, TypeError, ValueError):
            continue
    return {span: box for span, box in out.items() if len(box) == 4}


METHOD_NAMES = {"context-cir": "ConText-CIR", "tmcir": "TMCIR"}  # a config's "method" -> what the app calls it


def model_name(manifest: dict) -> str:
    """How the app names a checkpoint's model: its method and, for ConText-CIR, its CC weight when
    training recorded it ("ConText-CIR λ = 0.08", "TMCIR")."""
    method = (manifest.get("config") or {}).get("method", "context-cir")
    name = METHOD_NAMES.get(method, str(method))
    lam = (manifest.get("args") or {}).get("lambda_cc")
    if method == "context-cir" and isinstance(lam, (int, float)) and not isinstance(lam, bool):
        return f"{name} λ = {lam:g}"
    return name


def embedded_index(model, preprocess, paths: list[str], device, gallery) -> GalleryIndex:
    """An in-memory index of the images `paths` (of `gallery`, as named in messages) embedded with
    `model` as evaluation embeds a gallery (progress on stderr); unreadable images are skipped and
    named on stderr."""
    print(f"embedding the gallery {gallery} ({len(paths)} images)", flush=True)
    try:
        emb = embed_gallery(model, paths, preprocess, device, progress=True)
    except OSError:  # a missing or unreadable image: skip those (named on stderr), embed the rest
        paths = _readable(paths, gallery)
        emb = embed_gallery(model, paths, preprocess, device, progress=True)
    return GalleryIndex.from_embeddings(emb.cpu().numpy(), paths, device=device)


def attention_key(pixels: torch.Tensor, caption: str, spans: tuple[tuple[int, int], ...]) -> tuple:
    """A query of `Explorer._attention` as its cache knows it: a digest of the preprocessed pixels,
    the caption and the phrase spans."""
    return hashlib.blake2b(pixels.numpy().tobytes(), digest_size=16).digest(), caption, spans


class Explorer:
    """Model, preprocessing, gallery index and example triplets; every method takes plain values."""

    def __init__(self, model, preprocess, index: GalleryIndex, examples: list[Triplet] = (), device="cpu",
                 name: str | None = None, checkpoint: str | None = None, manifest: dict | None = None):
        """`checkpoint` and `manifest`: the model's file and what training recorded (the page's model
        card); `name`: how the page names the model (default: `model_name` of the manifest)."""
        self.model, self.preprocess, self.index = model.eval(), preprocess, index
        self.checkpoint, self.manifest = checkpoint, manifest or {}
        self.name = name or model_name(self.manifest)
        self.examples, self.device = list(examples), torch.device(device)
        self.layers, self.heads = model.config.fusion_layers, model.config.fusion_heads
        self.root = index.paths.root
        # one forward at a time: concurrent forwards would only contend for the same cores
        self.lock = threading.Lock()
        self.batcher = QueryBatcher(self.model, self.device, self.lock)  # concurrent queries share forwards
        self._gallery_embeddings = lru_cache(maxsize=4)(self._embed_paths)
        self._attention = cached(LRUCache(ATTENTION_KEPT), key=attention_key, condition=threading.Condition())(
            self._attend)

    @classmethod
    def load(cls, checkpoint=None, index=None, gallery=None, examples=None, device=None,
             name: str | None = None) -> "Explorer":
        """Load a checkpoint (default: the shipped one) and the gallery: an index folder, or a folder /
        list file of images embedded now (progress on stderr). Neither: the shipped demo index (its
        images embedded now by a checkpoint other than the shipped one), and then the shipped
        examples unless `examples` names others. `name`: as in `Explorer`."""
        if index is not None and gallery is not None:
            raise UserError("give --index or --gallery, not both (--gallery builds an index in memory)")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        checkpoint = Path(checkpoint or DEFAULT_CHECKPOINT)
        model, preprocess, manifest = load_checkpoint(checkpoint, device)
        if index is None and gallery is None:
            examples = examples or (DEFAULT_EXAMPLES if DEFAULT_EXAMPLES.is_file() else None)
            if not (DEFAULT_INDEX / "manifest.json").is_file():
                raise UserError(f"the demo index {DEFAULT_INDEX} is missing; build it with: "
                                "python scripts/build_demo_assets.py, or pass --index or --gallery")
            # the demo index holds the shipped model's embeddings; another model embeds its images now
            same = checkpoint.resolve() == Path(DEFAULT_CHECKPOINT).resolve()
            index, gallery = (DEFAULT_INDEX, None) if same else (None, DEFAULT_GALLERY)
        triplets = read_triplets(examples)[0] if examples else []
        if gallery is not None:
            paths = read_gallery(gallery)
            if not paths:
                raise UserError(f"the gallery {gallery} holds no images")
            loaded = embedded_index(model, preprocess, paths, device, gallery)
        else:
            loaded = (MilvusIndex(MilvusTarget.parse(index), checkpoint) if str(index).startswith(MILVUS)
                      else GalleryIndex.load(index, checkpoint_path=checkpoint, device=device))
            rss = resident_memory()
            print(f"index {index}: {loaded.describe()}; the app's resident memory: {rss['private'] / 1e6:,.0f} MB "
                  f"private, {rss['mapped'] / 1e6:,.0f} MB of mapped files", file=sys.stderr)
        return cls(model, preprocess, loaded, triplets, device, name, str(checkpoint), manifest)

    def with_checkpoint(self, checkpoint, name: str | None = None) -> "Explorer":
        """Another checkpoint's Explorer over this one's gallery images and example queries, the
        gallery embedded now with that model's own `encode_gallery` (progress on stderr)."""
        model, preprocess, manifest = load_checkpoint(checkpoint, self.device)
        index = embedded_index(model, preprocess, self.index.paths, self.device, f"with {checkpoint}")
        return Explorer(model, preprocess, index, self.examples, self.device, name, str(checkpoint), manifest)

    # ------------------------------------------------------------------ retrieval
    def encode(self, image, caption: str) -> torch.Tensor:
        """The query embedding [1, E] float32, as `cir.retrieval.evaluate.embed_queries` computes it (concurrent
        calls are encoded in one batch: `cir.ui.batching`)."""
        return self.batcher(self.preprocess(as_image(image)), caption)

    def retrieve(self, image, caption: str, k: int = 10, targets=(), query: torch.Tensor | None = None) -> list[Hit]:
        """Top-k gallery images for (image, caption), best first; `is_target` marks paths in `targets`.
        `query`: its embedding, when already encoded."""
        query = self.encode(image, caption) if query is None else query
        scores, ids = self.index.search(query, int(k))
        targets = set(targets)
        return [Hit(self.index.paths[i], float(s), r, self.index.paths[i] in targets)
                for r, (s, i) in enumerate(zip(scores[0], ids[0]), 1) if i >= 0]

    def target_rank(self, image, caption: str, targets, gallery: list[str] | None = None,
                    query: torch.Tensor | None = None) -> tuple[int, int] | None:
        """(rank of the best-ranked target, gallery size) over `gallery` paths (default: the index);
        None when no target is in that gallery. `query`: its embedding, when already encoded."""
        if gallery is None:
            paths, emb = self.index.paths, self.index.embeddings
        else:
            paths, emb = PathList(gallery), self._gallery_embeddings(tuple(gallery))
        rows = [r for t in targets if (r := paths.find(t)) is not None]
        if not rows:
            return None
        query = self.encode(image, caption) if query is None else query
        scores = np.asarray(emb) @ query.cpu().numpy()[0]
        return int((scores > scores[rows].max()).sum()) + 1, len(paths)

    def _embed_paths(self, paths: tuple[str, ...]) -> np.ndarray:
        with self.lock:
            try:
                return embed_gallery(self.model, list(paths), self.preprocess, self.device, progress=True).cpu().numpy()
            except OSError as e:
                raise UserError(f"cannot embed the file's images: {e}") from None

    # ------------------------------------------------------------------ browsing
    def browse(self, text: str = "", page: int = 0, per_page: int = 24) -> tuple[list[str], int, int, int]:
        """Gallery paths whose file name contains `text` (case-insensitive), one page of them:
        (paths, page clamped to range, pages, matches)."""
        text = (text or "").strip().lower()
        found = [p for p in self.index.paths if text in os.path.basename(p).lower()] if text else self.index.paths
        pages = max(1, -(-len(found) // per_page))
        page = min(max(0, int(page)), pages - 1)
        return found[page * per_page:(page + 1) * per_page], page, pages, len(found)

    def label(self, path: str) -> str:
        """A path as shown to users: relative to the gallery's common folder when inside it."""
        rel = os.path.relpath(path, self.root)
        return path if rel.startswith("..") else rel

    def example_of(self, image: str | None = None, caption: str | None = None) -> Triplet | None:
        """The first example query whose reference is `image` (same file) and, when given, whose
        caption is `caption`; or, with only `caption`, the first example with that caption."""
        real = os.path.realpath(image) if isinstance(image, (str, os.PathLike)) else None
        for t in self.examples:
            if (image is None or os.path.realpath(t.reference) == real) and caption in (None, t.caption):
                return t
        return None

    # ------------------------------------------------------------------ phrases and attention
    @staticmethod
    def noun_phrases(caption: str) -> list[dict]:
        """The caption's noun phrases (spaCy), as the training pipeline extracts them."""
        return extract_noun_phrases([caption])[0] if caption.strip() else []

    def caption_phrases(self, caption: str) -> tuple[list[dict], str]:
        """(noun phrases, where they come from): an example's gold ones when `caption` is an example's
        caption that carries them, else spaCy's."""
        t = self.example_of(caption=caption) if caption.strip() else None
        if t is not None and t.noun_phrases:
            return [dict(p) for p in t.noun_phrases], "gold"
        return self.noun_phrases(caption), "spaCy"

    def boxes(self, image, caption: str) -> dict[tuple[int, int], list[float]]:
        """{(start, end) of a phrase: its box [x0, y0, x1, y1] in `image`'s pixels}, from the grounding
        of the example whose reference is `image` and whose caption is `caption` ({} when none)."""
        t = self.example_of(image, caption) if image is not None else None
        return grounding_boxes(t) if t is not None else {}

    def phrase_maps(self, image, caption: str, phrases: list[dict], layer: int | None = None,
                    head: int | None = None, eps: float = 0.005) -> list[PhraseResult]:
        """Per phrase: the in-context and isolated maps of one layer/head (None, or one the model
        lacks: the mean over them) over `image`, and its CC term sum_p ReLU(|A_ctx - A_iso| - eps)
        (`cir.losses.concept_consistency_loss`)."""
        if not phrases:
            return []
        spans = tuple((p["start"], p["end"]) for p in phrases)
        maps = self._attention(self.preprocess(as_image(image)), caption, spans)
        layer = None if layer is None or layer >= self.layers else layer
        head = None if head is None or head >= self.heads else head
        out = []
        for m in maps:
            ctx, iso = select(m.in_context, layer, head), select(m.isolated, layer, head)
            if ctx.isnan().any():
                out.append(PhraseResult(m.text, m.start, m.end, None, None, None))
                continue
            cc = float(concept_consistency_loss(ctx.flatten()[None], iso.flatten()[None], eps))
            out.append(PhraseResult(m.text, m.start, m.end, ctx.numpy().copy(), iso.numpy().copy(), cc,
                                    m.in_context.numpy().copy()))
        return out

    def _attend(self, pixels: torch.Tensor, caption: str, spans: tuple[tuple[int, int], ...]) -> list:
        """`phrase_attention` of the model for `spans` of `caption` over preprocessed `pixels`; as
        `_attention`, the ATTENTION_KEPT latest queries are kept (`attention_key`), so another
        layer, head or slack of the same query needs no forward."""
        with self.lock, torch.no_grad():
            return self.model.phrase_attention(pixels.to(self.device), caption, list(spans))
