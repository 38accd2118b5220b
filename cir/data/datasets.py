"""PyTorch datasets over galleries and triplets: decoding (cir.data.images), preprocessing, tokenising."""
from __future__ import annotations

import random
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from cir.data.images import load_rgb
from cir.data.triplets import Triplet


class ImageDataset(Dataset):
    """Preprocessed images of a list of paths: item i -> [3, S, S]."""

    def __init__(self, paths: list[str], preprocess):
        self.paths, self.preprocess = paths, preprocess

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.preprocess(load_rgb(self.paths[i]))


def image_batches(paths: list[str], preprocess, batch_size: int = 128, workers: int = 0, pin: bool = False):
    """Iterate preprocessed image batches [b, 3, S, S] in order."""
    return DataLoader(ImageDataset(paths, preprocess), batch_size=batch_size, num_workers=workers,
                      pin_memory=pin, shuffle=False)


class TripletDataset(Dataset):
    """Training items: reference and first target image, caption tokens, noun-phrase token spans,
    and optionally hard negative images.

    `phrases[i]` lists the noun phrases of triplet i as {"text", "start", "end"}. `hard_negatives`
    (triplet, rng) -> list of PIL images draws negatives for a triplet (e.g. CIR-Shapes partial
    fulfilments); its rng is seeded by (`seed`, `epoch`, index), so a resumed run draws the same ones.

    With `cache` (a cir.image_cache.ImageCache of these triplets) the images come as the frozen image
    tower's outputs [F] fp16 instead, and the hard negatives as `cached_partials` partial
    fulfilments drawn from the cache's pool. `cc_targets` (maps [N, P], offsets [len + 1]: triplet
    i's phrases' rows offsets[i]:offsets[i + 1], one per phrase of `phrases[i]`) adds each kept
    phrase's fixed CC target map to the item."""

    def __init__(self, triplets: list[Triplet], phrases: list[list[dict]], preprocess, tokenizer,
                 hard_negatives: Callable[[Triplet, random.Random], list[Image.Image]] | None = None, seed: int = 0,
                 cache=None, cached_partials: int = 0, cc_targets: tuple[np.ndarray, np.ndarray] | None = None):
        self.triplets, self.phrases = triplets, phrases
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.hard_negatives, self.seed, self.epoch = hard_negatives, seed, 0
        self.cache, self.cached_partials, self.cc_targets = cache, cached_partials, cc_targets

    def __len__(self):
        return len(self.triplets)

    def __getitem__(self, i):
        t = self.triplets[i]
        spans = [(p["text"], self.tokenizer.span_to_token_positions(t.caption, p["start"], p["end"]))
                 for p in self.phrases[i]]
        rng = random.Random(f"{self.seed}/{self.epoch}/{i}")
        if self.cache is None:
            reference, target = self.preprocess(load_rgb(t.reference)), self.preprocess(load_rgb(t.targets[0]))
            hard = [self.preprocess(img) for img in self.hard_negatives(t, rng)] if self.hard_negatives else []
        else:
            c = self.cache
            hard_rows = c.partials(i, self.cached_partials, rng) if self.cached_partials else []
            reference, target, *hard = c.rows([c.reference[i], c.target[i], *hard_rows])
        item = {"reference": reference, "target": target,
                "tokens": self.tokenizer([t.caption])[0],
                "phrases": [(text, pos) for text, pos in spans if pos],
                "hard": hard}
        if self.cc_targets is not None:
            maps, offsets = self.cc_targets
            kept = [k for k, (_, pos) in enumerate(spans) if pos]
            item["cc_targets"] = torch.from_numpy(maps[offsets[i]:offsets[i + 1]][kept].astype(np.float32))
        return item


def collate_triplets(items: list[dict]) -> dict:
    """Stack a batch; phrases become flat lists: rows [N] (batch index), positions, texts, and with
    fixed CC targets "cc_targets" [N, P]. Hard negatives: "hard" [M, ...] (images or cached tower
    outputs, as the references), all items' in batch order, "hard_rows" [M] their batch indices."""
    rows, positions, texts = [], [], []
    for b, it in enumerate(items):
        for text, pos in it["phrases"]:
            rows.append(b)
            positions.append(pos)
            texts.append(text)
    hard = [(b, img) for b, it in enumerate(items) for img in it.get("hard", [])]
    ref = torch.stack([it["reference"] for it in items])
    batch = {"reference": ref,
             "target": torch.stack([it["target"] for it in items]),
             "tokens": torch.stack([it["tokens"] for it in items]),
             "phrase_rows": torch.tensor(rows, dtype=torch.long), "phrase_positions": positions,
             "phrase_texts": texts,
             "hard": torch.stack([img for _, img in hard]) if hard else ref.new_zeros((0, *ref.shape[1:])),
             "hard_rows": torch.tensor([b for b, _ in hard], dtype=torch.long)}
    if "cc_targets" in items[0]:
        batch["cc_targets"] = torch.cat([it["cc_targets"] for it in items])
    return batch
