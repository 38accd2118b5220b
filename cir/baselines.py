"""Baselines for the CIR-Shapes results table, on a CLIP trained here on CIR-Shapes.

    python -m cir.baselines train-clip --config cir-shapes-grid7 --data DATA_DIR --out RUN_DIR
    python -m cir.baselines train-combiner --clip RUN_DIR/clip.safetensors --data DATA_DIR --out RUN_DIR2
    python -m cir.baselines evaluate --clip CLIP_CKPT --triplets test.jsonl --gallery gallery_test.txt \\
        [--combiner RUN_DIR2/combiner.safetensors] [--json OUT]

No pretrained CLIP exists offline, so `train-clip` trains the towers of an open_clip config
(cir/configs/clip/) from scratch with the symmetric CLIP loss on (image, scene description) pairs:
every reference and target image of train.jsonl, described from its scene metadata in a new random
order and phrasing each epoch (cir.data.shapes.pretraining_texts.describe_scene); `--patch-weight` adds a dense loss that
classifies every patch embedding against the texts of the 84 possible cell contents, which aligns the
towers region by region (the pretraining ConText-CIR's towers start from, `cir.train --pretrained`).
`train-combiner` trains the Combiner
of CLIP4Cir (Baldrati et al.) on frozen CLIP features of (reference, caption) -> target, extracted
once (cached in its run folder). `evaluate` scores image-only, text-only, the training-free sum
normalize(image + text) and the Combiner against the CLIP image embeddings of the gallery through
cir.evaluate.evaluate: same protocol, metrics and printout; the JSON maps each method name to
cir.evaluate's result object. Checkpoints are safetensors with the manifest embedded and a .json
copy beside them, written atomically.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import random
from pathlib import Path

import open_clip
import safetensors
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from cir import precision
from cir.atomic import atomic_path, sha256_file, write_json
from cir.checkpoint import read_tensors, versions
from cir.cli import positive_int
from cir.data.images import load_rgb
from cir.data.shapes.pretraining_texts import CELL_CONTENTS, describe_scene, patch_contents, patch_distribution_of_box
from cir.data.shapes.scene import Scene
from cir.data.triplets import Triplet, read_triplets
from cir.errors import UserError
from cir.evaluate import add_data_flags, embed_gallery, evaluate, format_results, read_data
from cir.model import (CONFIG_DIR, EOT_ID, create_towers,  # importing cir.model registers cir/configs/clip
                       text_tower_projection, text_tower_states)
from cir.tokenizer import CaptionTokenizer
from cir.train import lr_at

CLIP_FORMAT = "cir-clip-checkpoint/1"
COMBINER_FORMAT = "cir-combiner-checkpoint/1"
METHODS = {"image": "image only", "text": "text only", "sum": "sum of image and text embeddings",
           "combiner": "CLIP4Cir Combiner"}


# ----------------------------------------------------------------------------- models

class Combiner(nn.Module):
    """CLIP4Cir's Combiner: ReLU projections of both features, concatenated; an MLP gives a residual
    and another a mixing weight lam in (0, 1); output normalize(lam * text + (1 - lam) * image + residual)."""

    def __init__(self, feature_dim: int, projection_dim: int, hidden_dim: int, dropout: float = 0.5):
        super().__init__()
        proj = lambda: nn.Sequential(nn.Linear(feature_dim, projection_dim), nn.ReLU(), nn.Dropout(dropout))
        self.text_proj, self.image_proj = proj(), proj()
        self.residual = nn.Sequential(nn.Linear(2 * projection_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout),
                                      nn.Linear(hidden_dim, feature_dim))
        self.mixing = nn.Sequential(nn.Linear(2 * projection_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout),
                                    nn.Linear(hidden_dim, 1), nn.Sigmoid())

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.text_proj(text), self.image_proj(image)], -1)
        lam = self.mixing(x)
        return F.normalize(self.residual(x) + lam * text + (1 - lam) * image, dim=-1)


class Baseline(nn.Module):
    """One method behind ConTextCIR's inference API (encode_query, encode_gallery), so that
    cir.evaluate scores it by exactly the same code. All embeddings are L2-normalised CLIP ones."""

    def __init__(self, clip: nn.Module, tokenizer, method: str, combiner: Combiner | None = None):
        super().__init__()
        self.clip, self.tokenizer, self.method, self.combiner = clip, tokenizer, method, combiner

    @torch.no_grad()
    def encode_gallery(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(images, normalize=True)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return self.clip.encode_text(self.tokenizer(texts).to(self.clip.logit_scale.device), normalize=True)

    @torch.no_grad()
    def encode_query(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        if self.method == "text":
            return self.encode_text(texts)
        img = self.encode_gallery(images)
        if self.method == "image":
            return img
        txt = self.encode_text(texts)
        return F.normalize(img + txt, dim=-1) if self.method == "sum" else self.combiner(img, txt)


def build_clip(name: str):
    """(CLIP, image preprocessing, tokenizer) of an open_clip config, randomly initialised."""
    if name not in open_clip.list_models():
        known = ", ".join(sorted(p.stem for p in (CONFIG_DIR / "clip").glob("*.json")))
        raise UserError(f"unknown open_clip config {name!r}; this project's: {known} (or any open_clip model name)")
    clip, _, preprocess = create_towers(name)
    return clip, preprocess, open_clip.get_tokenizer(name)


# ----------------------------------------------------------------------------- checkpoints

def save_weights(path: Path, module: nn.Module, manifest: dict, fmt: str) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    manifest = dict(manifest, format=fmt, versions=versions())
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"manifest": json.dumps(manifest)})
    write_json(path.with_suffix(".json"), dict(manifest, sha256=sha256_file(path)))


def load_weights(path: str, fmt: str, build) -> tuple[nn.Module, dict]:
    """Check the format, build the module from the manifest (`build(manifest)`) and load its weights."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        with safetensors.safe_open(str(path), "pt") as f:
            manifest = json.loads((f.metadata() or {}).get("manifest", "{}"))
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path}: not a complete safetensors file ({e})") from None
    if manifest.get("format") != fmt:
        raise UserError(f"{path} is not a {fmt} checkpoint (its format: {manifest.get('format')!r})")
    module = build(manifest)
    try:
        module.load_state_dict(read_tensors(path))
    except RuntimeError as e:
        raise UserError(f"checkpoint {path} does not fit the architecture its manifest names: {str(e)[:300]}") from None
    return module.eval(), manifest


def load_clip(path: str):
    """(CLIP, preprocess, tokenizer) from a `train-clip` checkpoint."""
    extras = {}

    def build(manifest):
        clip, extras["preprocess"], extras["tokenizer"] = build_clip(manifest["clip_model"])
        return clip

    clip, _ = load_weights(path, CLIP_FORMAT, build)
    return clip, extras["preprocess"], extras["tokenizer"]


def load_combiner(path: str, clip_path: str) -> Combiner:
    combiner, manifest = load_weights(path, COMBINER_FORMAT, lambda m: Combiner(**m["combiner"]))
    if manifest["clip"]["sha256"] != sha256_file(clip_path):
        raise UserError(f"{path} was trained on the features of {manifest['clip']['path']}, not of {clip_path}")
    return combiner


# ----------------------------------------------------------------------------- training

class ScenePairs(Dataset):
    """Per (image path, scene JSON): (preprocessed image, description tokens [C], what covers each
    patch [P] (CELL_CONTENTS index), token targets [C, P]: for each token of an object's or a cell's
    words in the description, the uniform distribution over the patches inside its box, else 0).
    The phrasing is drawn from `seed` and the item, so a run is reproducible."""

    def __init__(self, pairs: list[tuple[str, dict]], preprocess, tokenizer: CaptionTokenizer, grid: int, seed: int):
        self.pairs, self.preprocess, self.tokenizer, self.grid, self.seed = pairs, preprocess, tokenizer, grid, seed

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        path, scene = self.pairs[i]
        scene = Scene.from_json(scene)
        text, mentions = describe_scene(scene, random.Random(f"{self.seed}/{i}"))
        targets = torch.zeros(self.tokenizer.context_length, self.grid ** 2)
        for start, end, box in mentions:
            targets[self.tokenizer.span_to_token_positions(text, start, end)] = torch.tensor(
                patch_distribution_of_box(box, self.grid))
        return (self.preprocess(load_rgb(path)), self.tokenizer([text])[0],
                torch.tensor(patch_contents(scene, self.grid)), targets)


def train_triplets(a) -> tuple[Path, list[Triplet]]:
    path = Path(a.train) if a.train else Path(a.data) / "train.jsonl"
    triplets = read_triplets(path, check_images=False)[0]
    if not triplets:
        raise UserError(f"no triplets in {path}")
    return path, triplets


def optimize(module: nn.Module, batches, loss_of, a, out: Path, desc: str, after_step=None) -> float:
    """a.steps AdamW steps on `loss_of(batch)` -> (loss, {name: float} of its parts to log) over the
    endless iterator `batches`, with cir.train's warm-up + cosine schedule, gradient clipping and
    weight decay on weight matrices only; logs OUT/log.jsonl. Returns the last loss."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    decays = lambda n, p: p.ndim >= 2 and "token_embedding" not in n
    opt = torch.optim.AdamW([{"params": [p for n, p in named if decays(n, p)], "weight_decay": a.weight_decay},
                             {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.98), eps=1e-6)
    out.mkdir(parents=True, exist_ok=True)
    module.train()
    with open(out / "log.jsonl", "w") as log, tqdm(total=a.steps, desc=desc, unit="step") as bar:
        for step, batch in zip(range(a.steps), batches):
            lr = lr_at(step, a)
            for group in opt.param_groups:
                group["lr"] = lr
            loss, parts = loss_of(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in named], a.clip_grad if a.clip_grad > 0 else float("inf"))
            opt.step()
            if after_step:
                after_step()
            value = loss.item()
            log.write(json.dumps({"step": step + 1, "lr": lr, "loss": value, **parts}) + "\n")
            bar.set_postfix(loss=f"{value:.3f}", **{k: f"{v:.3f}" for k, v in parts.items()}, lr=f"{lr:.1e}")
            bar.update()
    module.eval()
    return value


def train_clip(a, device: torch.device) -> None:
    train_file, triplets = train_triplets(a)
    if not all("reference_scene" in t.meta and "target_scene" in t.meta for t in triplets):
        raise UserError(f"{train_file}: triplets lack meta.reference_scene / target_scene (not CIR-Shapes)")
    pairs = [(t.reference, t.meta["reference_scene"]) for t in triplets] + \
            [(t.targets[0], t.meta["target_scene"]) for t in triplets]
    if len(pairs) < a.batch_size:
        raise UserError(f"{len(pairs)} training images are fewer than one batch of {a.batch_size}")
    torch.manual_seed(a.seed)
    clip, preprocess, _ = build_clip(a.config)
    clip.to(device)
    clip_loss = open_clip.ClipLoss()
    dtype = precision.resolve(a.precision, device)
    clip.visual.output_tokens = True
    grid = clip.visual.grid_size[0]
    tokenizer = CaptionTokenizer(clip.context_length)
    content_tokens = tokenizer(list(CELL_CONTENTS)).to(device)

    def batches():
        for epoch in itertools.count():
            seed = a.seed * 100003 + epoch
            yield from DataLoader(ScenePairs(pairs, preprocess, tokenizer, grid, seed), batch_size=a.batch_size,
                                  shuffle=True, drop_last=True, num_workers=a.workers,
                                  generator=torch.Generator().manual_seed(seed))

    def loss_of(batch):
        """CLIP loss on (image, description) + a.patch_weight x cross-entropy of every patch
        embedding [B, P, E] against the texts of the 84 cell contents, labelled with what covers it
        + a.token_weight x cross-entropy of each object's or cell's word tokens [B, C, E] over the
        image's patches against the patches of its box."""
        images, tokens, contents, token_targets = (x.to(device) for x in batch)
        with precision.autocast(device, dtype):
            pooled, patches = clip.visual(images)
            words = text_tower_projection(clip, text_tower_states(clip, tokens))  # [B, C, E]
            text = words[torch.arange(len(tokens), device=device), (tokens == EOT_ID).int().argmax(1)]
            scale = clip.logit_scale.exp()
            scene = clip_loss(F.normalize(pooled, dim=-1), F.normalize(text, dim=-1), scale)
            loss, parts = scene, {"scene": scene.item()}
            patch_emb = F.normalize(patches @ clip.visual.proj, dim=-1)
            if a.patch_weight:
                logits = scale * patch_emb @ clip.encode_text(content_tokens, normalize=True).T
                patch = F.cross_entropy(logits.flatten(0, 1).float(), contents.flatten())
                loss = loss + a.patch_weight * patch
                parts |= {"patch": patch.item(), "patch_acc": (logits.argmax(-1) == contents).float().mean().item()}
            if a.token_weight:
                log_maps = (scale * F.normalize(words, dim=-1) @ patch_emb.transpose(1, 2)).float().log_softmax(-1)
                supervised = token_targets.sum(-1) > 0  # [B, C]
                token = -(token_targets * log_maps).sum(-1)[supervised].mean()
                hit = token_targets.gather(-1, log_maps.argmax(-1, keepdim=True))[..., 0][supervised] > 0
                loss = loss + a.token_weight * token
                parts |= {"token": token.item(), "token_acc": hit.float().mean().item()}
        return loss, parts

    @torch.no_grad()
    def clamp_temperature():  # as in CLIP: the logit scale stays at most 100
        clip.logit_scale.clamp_(0, math.log(100))

    out = Path(a.out)
    last = optimize(clip, batches(), loss_of, a, out, "train-clip", clamp_temperature)
    save_weights(out / "clip.safetensors", clip,
                 {"clip_model": a.config, "step": a.steps, "final_loss": last,
                  "data": {"train": str(train_file), "sha256": sha256_file(train_file), "images": len(pairs)},
                  "args": vars(a)}, CLIP_FORMAT)
    print(f"wrote {out / 'clip.safetensors'}")


@torch.no_grad()
def frozen_features(a, train_file: Path, triplets: list[Triplet], out: Path, device) -> dict:
    """Normalised CLIP features {"reference", "caption", "target"} [N, E], cached in OUT/features.safetensors
    (reused while the CLIP checkpoint and the triplets are the same)."""
    clip, preprocess, tokenizer = load_clip(a.clip)
    key = {"clip_sha256": sha256_file(a.clip), "train_sha256": sha256_file(train_file), "triplets": str(len(triplets))}
    cache = out / "features.safetensors"
    if cache.is_file():
        with safetensors.safe_open(str(cache), "pt") as f:
            if f.metadata() == key:
                print(f"using cached features {cache}")
                return {k: f.get_tensor(k).to(device) for k in f.keys()}
    encoder = Baseline(clip.to(device), tokenizer, "image")
    images = embed_gallery(encoder, [t.reference for t in triplets] + [t.targets[0] for t in triplets], preprocess,
                           device, a.feature_batch_size, a.workers, progress=True)
    captions = []
    for i in tqdm(range(0, len(triplets), a.feature_batch_size), desc="captions", unit="batch"):
        with precision.autocast(device):
            captions.append(encoder.encode_text([t.caption for t in triplets[i:i + a.feature_batch_size]]).float())
    n = len(triplets)
    feats = {"reference": images[:n], "caption": torch.cat(captions), "target": images[n:]}
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache) as tmp:
        save_file({k: v.cpu().contiguous() for k, v in feats.items()}, str(tmp), metadata=key)
    return feats


def train_combiner(a, device: torch.device) -> None:
    train_file, triplets = train_triplets(a)
    triplets = triplets[:a.limit] if a.limit else triplets
    if len(triplets) < a.batch_size:
        raise UserError(f"{len(triplets)} training triplets are fewer than one batch of {a.batch_size}")
    out = Path(a.out)
    feats = frozen_features(a, train_file, triplets, out, device)
    dim = feats["target"].shape[1]
    dims = {"feature_dim": dim, "projection_dim": a.projection_dim or 4 * dim, "hidden_dim": a.hidden_dim or 8 * dim,
            "dropout": a.dropout}
    torch.manual_seed(a.seed)
    combiner = Combiner(**dims).to(device)
    labels = torch.arange(a.batch_size, device=device)

    def batches():
        for epoch in itertools.count():
            order = torch.randperm(len(triplets), generator=torch.Generator().manual_seed(a.seed * 100003 + epoch))
            yield from order[:len(order) // a.batch_size * a.batch_size].to(device).split(a.batch_size)

    def loss_of(idx):  # CLIP4Cir: cross-entropy over the batch's targets, logit scale 100
        pred = combiner(feats["reference"][idx], feats["caption"][idx])
        return F.cross_entropy(100 * pred @ feats["target"][idx].T, labels), {}

    last = optimize(combiner, batches(), loss_of, a, out, "train-combiner")
    save_weights(out / "combiner.safetensors", combiner,
                 {"combiner": dims, "step": a.steps, "final_loss": last,
                  "clip": {"path": str(a.clip), "sha256": sha256_file(a.clip)},
                  "data": {"train": str(train_file), "sha256": sha256_file(train_file), "triplets": len(triplets)},
                  "args": vars(a)}, COMBINER_FORMAT)
    print(f"wrote {out / 'combiner.safetensors'}")


# ----------------------------------------------------------------------------- evaluation

def evaluate_baselines(a, device: torch.device) -> None:
    triplets, gallery, keep = read_data(a)
    clip, preprocess, tokenizer = load_clip(a.clip)
    clip.to(device)
    combiner = load_combiner(a.combiner, a.clip).to(device) if a.combiner else None
    gallery_emb = embed_gallery(Baseline(clip, tokenizer, "image"), gallery, preprocess, device, a.batch_size,
                                progress=True)
    results = {}
    for method, label in METHODS.items():
        if method == "combiner" and combiner is None:
            continue
        results[method] = evaluate(Baseline(clip, tokenizer, method, combiner), preprocess, triplets, gallery, device,
                                   keep, a.batch_size, with_grounding=False, progress=True, gallery_emb=gallery_emb)
        print(f"== {method}: {label}\n{format_results(results[method])}")
    if a.json:
        write_json(a.json, results)


# ----------------------------------------------------------------------------- command line

def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for torch (default: all cores; 1 is steadier on a machine shared with other work)")


def _training(p: argparse.ArgumentParser, steps: int, batch: int, lr: float, warmup: int, weight_decay: float) -> None:
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
    _common(p)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cir.baselines", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("train-clip", help="train CLIP towers on (CIR-Shapes image, scene description) pairs")
    c.add_argument("--config", default="cir-shapes-grid7",
                   help="open_clip model config: cir/configs/clip/<name>.json or any open_clip name (default cir-shapes-grid7)")
    c.add_argument("--precision", choices=precision.CHOICES, default="auto",
                   help="autocast dtype of the forward pass; auto (default) = bf16 where native (CUDA, CPUs with "
                        "bf16 instructions), else fp32")
    c.add_argument("--patch-weight", type=float, default=0.0,
                   help="weight of the dense (patch-level) loss: every patch embedding (its token through the "
                        "visual projection) is classified against the texts of the 84 cell contents (\"small red "
                        "circle\", ..., \"pink background\") by the cell holding its centre, so the towers align "
                        "words with image regions (default 0 = the scene-level CLIP loss only)")
    c.add_argument("--token-weight", type=float, default=0.0,
                   help="weight of the dense word loss: each token of an object's or a cell's words in the "
                        "description (\"small red circle\", \"top left\"), through the text projection, is "
                        "softmax-matched over the image's patch embeddings against the patches inside that "
                        "object's or cell's box, so single words point at regions (default 0 = off)")
    _training(c, steps=1100, batch=64, lr=5e-4, warmup=100, weight_decay=0.1)
    m = sub.add_parser("train-combiner", help="train a CLIP4Cir Combiner on frozen CLIP features of the triplets")
    m.add_argument("--clip", required=True, help="CLIP checkpoint written by train-clip")
    m.add_argument("--limit", type=positive_int, default=None, help="use only the first N training triplets (default all)")
    m.add_argument("--projection-dim", type=positive_int, default=None, help="projection width (default 4 x CLIP embedding dim, as CLIP4Cir)")
    m.add_argument("--hidden-dim", type=positive_int, default=None, help="hidden width of both MLPs (default 8 x CLIP embedding dim)")
    m.add_argument("--dropout", type=float, default=0.5, help="dropout in the Combiner (default 0.5, as CLIP4Cir)")
    m.add_argument("--feature-batch-size", type=positive_int, default=256,
                   help="images or captions per CLIP forward pass when extracting features (default 256)")
    _training(m, steps=1200, batch=512, lr=1e-4, warmup=100, weight_decay=0.0)
    e = sub.add_parser("evaluate", help="score image-only, text-only, sum and (with --combiner) Combiner retrieval")
    e.add_argument("--clip", required=True, help="CLIP checkpoint written by train-clip")
    e.add_argument("--combiner", default=None, help="Combiner checkpoint written by train-combiner (on the same CLIP)")
    add_data_flags(e)  # --json writes {method: cir.evaluate's result object}
    _common(e)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if a.cmd != "evaluate" and not (a.data or a.train):
        p.error("give --data DIR or --train FILE")
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    {"train-clip": train_clip, "train-combiner": train_combiner, "evaluate": evaluate_baselines}[a.cmd](a, device)
    return 0


if __name__ == "__main__":
    from cir.cli import run_cli
    run_cli(main)
