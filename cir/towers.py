"""Tower pretraining: the open_clip image and text towers every CIR-Shapes model starts from.

    python -m cir.towers --data DATA_DIR --out RUN_DIR        # cir-shapes-cells, the shipped towers' recipe
    python -m cir.train --pretrained RUN_DIR/clip.safetensors ...

No pretrained CLIP exists offline, so the towers of an open_clip config (cir/models/configs/clip/) are
trained from scratch on every reference and target image of train.jsonl, each described from its
scene metadata in a new random order and phrasing each epoch
(`cir.data.shapes.pretraining_texts.describe_scene`). Three losses, summed:
- the symmetric CLIP loss on (image, description);
- `--patch-weight`: every patch embedding classified against the texts of the 84 things a patch can
  show (80 objects, 4 backgrounds), labelled with what covers its centre;
- `--token-weight`: each token of an object's or a cell's words in the description softmax-matched
  over the image's patch embeddings against the patches inside that object's or cell's box.
The two dense losses stand in for the dense alignment of a CLIP pretrained on the web. Boxes enter
only here, never the losses of the fusion trained on top (cir.train). The checkpoint
(RUN_DIR/clip.safetensors) is the open_clip state dict, loadable as `pretrained`, with its
manifest embedded and as a .json beside it.
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import random
from pathlib import Path

from cir import precision
from cir.cli import add_training_flags, differing_flags, parse_first, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m cir.towers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="cir-shapes-cells",
                   help="open_clip model config: cir/models/configs/clip/<name>.json or any open_clip name (default cir-shapes-cells, the shipped towers)")
    p.add_argument("--precision", choices=precision.CHOICES, default="auto",
                   help="autocast dtype of the forward pass; auto (default) = bf16 where native (CUDA, CPUs with "
                        "bf16 instructions), else fp32")
    p.add_argument("--patch-weight", type=float, default=1.0,
                   help="weight of the dense (patch-level) loss: every patch embedding (its token through the "
                        "visual projection) is classified against the texts of the 84 cell contents (\"small red "
                        "circle\", ..., \"pink background\") by what covers its centre, so the towers align words "
                        "with image regions (default 1; 0 = the scene-level CLIP loss only)")
    p.add_argument("--token-weight", type=float, default=0.0,
                   help="weight of the dense word loss: each token of an object's or a cell's words in the "
                        "description (\"small red circle\", \"top left\"), through the text projection, is "
                        "softmax-matched over the image's patch embeddings against the patches inside that "
                        "object's or cell's box, so single words point at regions (default 0 = off, as the shipped towers; "
                        "the grid-7 towers use 1)")
    add_training_flags(p, steps=1000, batch=128, lr=5e-4, warmup=100, weight_decay=0.1)
    p.add_argument("--init-from", default=None, metavar="TOWERS",
                   help="start from these towers (a cir.towers checkpoint, or the CLIP towers of a model checkpoint) "
                        "instead of a random initialisation: more pretraining of existing towers, on a schedule of "
                        "its own from step 0")
    p.add_argument("--save-every", type=int, default=100,
                   help="write OUT/last.safetensors (weights, optimizer, RNG) every N steps (default 100)")
    p.add_argument("--resume", action="store_true", help="continue exactly from OUT/last.safetensors")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop (after saving) once this step is reached, keeping the schedule of --steps")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    a = p.parse_args(argv)
    if not (a.data or a.train):
        p.error("give --data DIR or --train FILE")
    if a.resume and a.init_from:
        p.error("--resume continues OUT/last.safetensors; --init-from starts a new run")
    if a.save_every < 1:
        p.error("--save-every must be at least 1")
    return a


parse_first(__name__, parse_args)  # `python -m cir.towers`: --help and argument errors before torch loads

import open_clip
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from cir.atomic import sha256_file
from cir.checkpoint import FORMAT as MODEL_FORMAT
from cir.checkpoint import embedded_manifest, load_checkpoint, load_module, read_tensors, save_module
from cir.data.images import load_rgb
from cir.data.shapes.pretraining_texts import CELL_CONTENTS, describe_scene, patch_contents, patch_distribution_of_box
from cir.data.shapes.scene import Scene
from cir.errors import UserError
from cir.models.base import EOT_ID, create_towers, text_tower_projection, text_tower_states
from cir.models.factory import CONFIG_DIR, register_tower_configs
from cir.text.tokenizer import CaptionTokenizer
from cir.data.triplets import read_training_triplets
from cir.training.loop import LoopConfig, OptimConfig, epoch_seed, make_optimizer, restore_optimizer, run_loop

TOWERS_FORMAT = "cir-clip-checkpoint/1"


def build_towers(name: str):
    """(CLIP, image preprocessing, tokenizer) of an open_clip config, randomly initialised."""
    register_tower_configs()
    if name not in open_clip.list_models():
        known = ", ".join(sorted(p.stem for p in [*(CONFIG_DIR / "clip").glob("*.json"),
                                                  *(CONFIG_DIR / "variants" / "clip").glob("*.json")]))
        raise UserError(f"unknown open_clip config {name!r}; this project's: {known} (or any open_clip model name)")
    clip, _, preprocess = create_towers(name)
    return clip, preprocess, open_clip.get_tokenizer(name)


def load_towers(path: str | os.PathLike):
    """(CLIP, preprocess, tokenizer) from a `python -m cir.towers` checkpoint, or the towers of any
    model checkpoint (its clip.* weights), so that baselines run on a model's own towers."""
    if embedded_manifest(path).get("format") == MODEL_FORMAT:
        model, preprocess, _ = load_checkpoint(path)
        clip = model.clip.float()
        clip.visual.output_tokens = False  # the model reads patch tokens; the baselines, CLIP's embeddings
        if hasattr(clip, "text"):
            clip.text.output_tokens = False
        return clip, preprocess, open_clip.get_tokenizer(model.config.clip_model)
    extras = {}

    def build(manifest):
        clip, extras["preprocess"], extras["tokenizer"] = build_towers(manifest["clip_model"])
        return clip

    clip, _ = load_module(path, TOWERS_FORMAT, build)
    return clip, extras["preprocess"], extras["tokenizer"]


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


def shuffled_order(n: int, batch_size: int, seed: int) -> list[int]:
    """The order `DataLoader(..., shuffle=True, drop_last=True, generator=Generator().manual_seed(seed))`
    visits n items in, cut to whole batches: the loader draws its workers' base seed from the
    generator, then the sampler draws the permutation."""
    generator = torch.Generator().manual_seed(seed)
    torch.empty((), dtype=torch.int64).random_(generator=generator)
    return torch.randperm(n, generator=generator)[: n // batch_size * batch_size].tolist()


RESUME_FLAGS = ("config", "steps", "batch_size", "lr", "min_lr", "warmup", "weight_decay", "patch_weight",
                "token_weight", "seed")  # a resumed run's flags that must be the interrupted run's


def starting_towers(a, last: Path, device: torch.device):
    """(CLIP, preprocess, manifest or None, training tensors or None, step) a run starts from: its
    checkpoint (--resume), the towers of --init-from, or new towers of --config (seeded)."""
    if a.resume:
        if not last.is_file():
            raise UserError(f"--resume: no checkpoint at {last}")
        clip, preprocess, _ = load_towers(last)
        manifest = embedded_manifest(last)
        trained = manifest.get("args", {})
        differ = differing_flags(a, trained, RESUME_FLAGS)
        if differ:
            raise UserError(f"--resume: {last} was trained with " + ", ".join(differ))
        a.init_from = trained.get("init_from")  # kept in the manifests of the resumed run
        return clip, preprocess, manifest, read_tensors(last), manifest["step"]
    torch.manual_seed(a.seed)
    clip, preprocess, _ = build_towers(a.config)
    if a.init_from:
        source, _, _ = load_towers(a.init_from)
        if source.state_dict().keys() != clip.state_dict().keys():
            raise UserError(f"--init-from {a.init_from}: its towers are not of config {a.config!r}")
        clip.load_state_dict(source.state_dict())
    return clip, preprocess, None, None, 0


def train_towers(a, device: torch.device) -> None:
    """Pretrain the towers of open_clip config a.config; writes OUT/last.safetensors every
    --save-every steps and, at the end, OUT/clip.safetensors (+ .json)."""
    train_file, triplets = read_training_triplets(a.data, a.train)
    if not all("reference_scene" in t.meta and "target_scene" in t.meta for t in triplets):
        raise UserError(f"{train_file}: triplets lack meta.reference_scene / target_scene (not CIR-Shapes)")
    pairs = [(t.reference, t.meta["reference_scene"]) for t in triplets] + \
            [(t.targets[0], t.meta["target_scene"]) for t in triplets]
    if len(pairs) < a.batch_size:
        raise UserError(f"{len(pairs)} training images are fewer than one batch of {a.batch_size}")
    out = Path(a.out)
    last = out / "last.safetensors"
    clip, preprocess, manifest, tensors, start = starting_towers(a, last, device)
    clip.to(device)
    clip_loss = open_clip.ClipLoss()
    dtype = precision.resolve(a.precision, device)
    clip.visual.output_tokens = True
    grid = clip.visual.grid_size[0]
    tokenizer = CaptionTokenizer(clip.context_length)
    content_tokens = tokenizer(list(CELL_CONTENTS)).to(device)
    opt = make_optimizer(clip, a.lr, a.weight_decay)
    if tensors is not None:
        restore_optimizer(opt, tensors, manifest)
        torch.set_rng_state(tensors["rng.torch"])

    def batches():
        """The batches of steps start + 1, ...: each epoch in its seeded order, with its own phrasings."""
        per_epoch = len(pairs) // a.batch_size
        for epoch in itertools.count(start // per_epoch):
            seed = epoch_seed(a.seed, epoch)
            order = shuffled_order(len(pairs), a.batch_size, seed)
            if epoch == start // per_epoch:
                order = order[start % per_epoch * a.batch_size:]
            yield from DataLoader(Subset(ScenePairs(pairs, preprocess, tokenizer, grid, seed), order),
                                  batch_size=a.batch_size, num_workers=a.workers,
                                  generator=torch.Generator().manual_seed(seed))  # its workers' seeds as shuffled

    def loss_of(batch):
        """CLIP loss on (image, description) + a.patch_weight x cross-entropy of every patch
        embedding [B, P, E] against the 84 CELL_CONTENTS texts, labelled with what covers its centre
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

    made = {"clip_model": a.config, "data": {"train": str(train_file), "sha256": sha256_file(train_file),
                                             "images": len(pairs)},
            "args": {k: v for k, v in vars(a).items() if k not in ("resume", "stop_after")}}
    stop = min(a.steps, a.stop_after or a.steps)

    def on_step(step, record):
        if step % a.save_every == 0 or step == stop:
            save_module(last, clip, dict(made, step=step, loss=record["loss"]), TOWERS_FORMAT, optimizer=opt)

    clip.train()
    schedule = OptimConfig.from_args(a).schedule
    run_loop(batches(), loss_of, opt, LoopConfig(schedule, stop, a.clip_grad, out / "log.jsonl", "towers"), start,
             after_step=clamp_temperature, on_step=on_step)
    if stop < a.steps:
        print(f"stopped at step {stop} of {a.steps}; continue with --resume")
        return
    clip.eval()
    final = embedded_manifest(last) if last.is_file() else {}
    save_module(out / "clip.safetensors", clip, dict(made, step=a.steps, final_loss=final.get("loss")), TOWERS_FORMAT)
    print(f"wrote {out / 'clip.safetensors'}")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    train_towers(a, torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    return 0


if __name__ == "__main__":
    run_cli(main)
