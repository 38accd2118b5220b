"""PyTorch datasets over triplets and galleries (decoding, preprocessing, tokenising)."""
from __future__ import annotations

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from cir.data.triplets import Triplet


def load_rgb(path: str) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


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
    """Training items: reference and first target image, caption tokens, noun-phrase token spans.

    `phrases[i]` lists the noun phrases of triplet i as {"text", "start", "end"}."""

    def __init__(self, triplets: list[Triplet], phrases: list[list[dict]], preprocess, tokenizer):
        self.triplets, self.phrases = triplets, phrases
        self.preprocess, self.tokenizer = preprocess, tokenizer

    def __len__(self):
        return len(self.triplets)

    def __getitem__(self, i):
        t = self.triplets[i]
        spans = [(p["text"], self.tokenizer.span_to_token_positions(t.caption, p["start"], p["end"]))
                 for p in self.phrases[i]]
        return {"reference": self.preprocess(load_rgb(t.reference)),
                "target": self.preprocess(load_rgb(t.targets[0])),
                "tokens": self.tokenizer([t.caption])[0],
                "phrases": [(text, pos) for text, pos in spans if pos]}


def collate_triplets(items: list[dict]) -> dict:
    """Stack a batch; phrases become flat lists: rows [N] (batch index), positions, texts."""
    rows, positions, texts = [], [], []
    for b, it in enumerate(items):
        for text, pos in it["phrases"]:
            rows.append(b)
            positions.append(pos)
            texts.append(text)
    return {"reference": torch.stack([it["reference"] for it in items]),
            "target": torch.stack([it["target"] for it in items]),
            "tokens": torch.stack([it["tokens"] for it in items]),
            "phrase_rows": torch.tensor(rows, dtype=torch.long), "phrase_positions": positions,
            "phrase_texts": texts}
