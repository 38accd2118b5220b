"""TMCIR stage 1, intent-aware cross-modal alignment: pseudo-targets, then the CLIP towers
fine-tuned contrastively on (pseudo-target image, modification text) pairs.

    python -m cir.align --data data/shapes --out runs/tmcir-align \\
        --towers-from assets/context-cir-shapes-grid7-step0.safetensors      # oracle pseudo-targets
    python -m cir.train --init-from runs/tmcir-align/aligned.safetensors --data data/shapes --out runs/tmcir

1. One pseudo-target per training triplet is written to OUT/pseudo_targets/ (`cir.pseudo_targets`;
   `--generator oracle` for CIR-Shapes, `--generator diffusion --diffusion-weights DIR` for real
   images); images already there are kept, so an interrupted run resumes.
2. The towers are fine-tuned with InfoNCE between the pseudo-target's image embedding and the
   text's (cir.losses.contrastive_loss, averaged over both directions as in CLIP; the paper writes
   the image -> text one) at the towers' own learnable temperature (clip.logit_scale). Only the
   towers train; TMCIR's pooling and head are stage 2's.
3. OUT/last.safetensors (+ .json) holds weights, optimizer and RNG state every --save-every steps
   (`--resume` continues from it); at the end OUT/aligned.safetensors holds the model at step 0
   of stage 2, which `cir.train --init-from` starts from. `--no-alignment` writes the unaligned
   towers there: TMCIR without stage 1, on the same towers.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from cir.cli import add_training_flags, parse_first, positive_int, run_cli
from cir.pseudo_targets import GENERATORS


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m cir.align", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tmcir-shapes-grid7",
                   help="TMCIR model config name (cir/models/configs/) or JSON path (default tmcir-shapes-grid7)")
    p.add_argument("--pretrained", default=None, help="override the config's open_clip pretrained tag or weights file")
    p.add_argument("--towers-from", default=None, metavar="CKPT",
                   help="take the CLIP towers (clip.* weights) of any checkpoint, e.g. a ConText-CIR one, so both "
                        "methods start from the same towers")
    add_training_flags(p, steps=1000, batch=64, lr=1e-4, warmup=100, weight_decay=1e-2)
    p.add_argument("--limit", type=positive_int, default=None, help="use the first N training triplets only")
    p.add_argument("--generator", choices=GENERATORS, default="oracle",
                   help="pseudo-targets: oracle (CIR-Shapes: the operations applied to the reference scene, "
                        "rendered with fresh jitter) or diffusion (an instruction-following diffusers editor)")
    p.add_argument("--diffusion-weights", default=None, metavar="DIR",
                   help="--generator diffusion: a local diffusers pipeline folder (InstructPix2Pix-style)")
    p.add_argument("--diffusion-steps", type=positive_int, default=20, help="denoising steps per image (default 20)")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="text guidance of the editor (default 7.5)")
    p.add_argument("--image-guidance-scale", type=float, default=1.5, help="image guidance of the editor (default 1.5)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="autocast dtype (cir.precision): auto = bf16 where the hardware runs it natively, else fp32")
    p.add_argument("--save-every", type=positive_int, default=100, help="write last.safetensors every N steps (default 100)")
    p.add_argument("--no-alignment", action="store_true",
                   help="skip stage 1: write the towers as they are to OUT/aligned.safetensors (TMCIR without stage 1)")
    p.add_argument("--resume", action="store_true", help="continue exactly from OUT/last.safetensors (weights, optimizer, RNG)")
    p.add_argument("--stop-after", type=positive_int, default=None,
                   help="stop (after saving) once this step is reached, keeping the schedule of --steps")
    a = p.parse_args(argv)
    if a.generator == "diffusion" and not a.diffusion_weights:
        p.error("--generator diffusion needs --diffusion-weights DIR")
    if not (a.data or a.train):
        p.error("give --data DIR or --train FILE")
    return a


parse_first(__name__, parse_args)  # `python -m cir.align`: --help and argument errors before torch loads

import math
import random

import numpy as np
import torch
from torch.utils.data import DataLoader

from cir import precision
from cir.atomic import sha256_file
from cir.checkpoint import load_checkpoint, load_weights, read_tensors, save_checkpoint
from cir.data.images import load_rgb
from cir.data.triplets import read_triplets
from cir.errors import UserError
from cir.losses import contrastive_loss
from cir.models.factory import build_model, load_config
from cir.models.tmcir import TMCIRConfig
from cir.pseudo_targets import DiffusionEditor, ShapesOracle, write_pseudo_targets
from cir.training.loop import LoopConfig, OptimConfig, epoch_order, make_optimizer, restore_optimizer, run_loop


class PseudoTargetPairs:
    """Stage 1's training pairs: item i -> (pseudo-target image `paths[i]` preprocessed [3, S, S],
    its modification text's tokens `tokens[i]` [C])."""

    def __init__(self, paths: list[str], tokens, preprocess):
        self.paths, self.tokens, self.preprocess = paths, tokens, preprocess

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.preprocess(load_rgb(self.paths[i])), self.tokens[i]


def alignment_loss(model, images, tokens):
    """InfoNCE between the towers' image embeddings of pseudo-targets [B, 3, S, S] and their text
    embeddings (the EOT token) of the modification texts [B, C], at clip.logit_scale."""
    image = model.image_tokens(images)[:, 0]  # the CLS embedding, unit
    states, pad = model.text_tokens(tokens)
    text = states[torch.arange(len(states), device=states.device), (~pad).sum(1) - 1]
    return contrastive_loss(image, text, None, model.clip.logit_scale)


def stage1_model(a, last: Path, device):
    """The model stage 1 starts from: its checkpoint (--resume) or a new TMCIR of --config, with the
    towers of --towers-from. -> (model, preprocess, manifest or None, training tensors or None, step)."""
    if a.resume:
        if not last.is_file():
            raise UserError(f"--resume: no checkpoint at {last}")
        model, preprocess, manifest, tensors = load_checkpoint(last, device, with_training_state=True)
        if manifest.get("stage") != "align":
            raise UserError(f"--resume: {last} is not a stage-1 (cir.align) checkpoint")
        return model, preprocess, manifest, tensors, manifest["step"]
    config = load_config(a.config)
    if not isinstance(config, TMCIRConfig):
        raise UserError(f"config {a.config!r} is not a TMCIR config (\"method\": \"tmcir\")")
    if a.pretrained is not None:
        config.pretrained = a.pretrained
    model, preprocess = build_model(config, device)
    if a.towers_from:
        towers = {k: v for k, v in read_tensors(a.towers_from).items() if k.startswith("clip.")}
        if not towers:
            raise UserError(f"{a.towers_from} holds no CLIP towers (clip.* tensors)")
        load_weights(model, a.towers_from, towers)
    return model, preprocess, None, None, 0


def align_towers(a, model, preprocess, triplets, train_file: Path, opt, manifest_base: dict, start: int, stop: int,
                 device) -> None:
    """Steps start + 1 .. stop of the alignment loss on the pseudo-targets (written first, or kept
    from an interrupted run), checkpointing OUT/last.safetensors every --save-every steps."""
    out, last = Path(a.out), Path(a.out) / "last.safetensors"
    generator = (ShapesOracle() if a.generator == "oracle" else
                 DiffusionEditor(a.diffusion_weights, a.diffusion_steps, a.guidance_scale, a.image_guidance_scale,
                                 str(device)))
    paths = write_pseudo_targets(triplets, generator, out / "pseudo_targets", a.seed, train_file)
    manifest_base["pseudo_targets"] = generator.describe()
    pairs = PseudoTargetPairs(paths, model.tokenizer([t.caption for t in triplets]), preprocess)
    dtype = precision.resolve(a.precision, device)

    def batches():
        per_epoch, step = len(paths) // a.batch_size, start
        while True:
            epoch, offset = divmod(step, per_epoch)
            order = epoch_order(len(paths), a.batch_size, a.seed, epoch)[offset * a.batch_size:].tolist()
            yield from DataLoader(torch.utils.data.Subset(pairs, order), batch_size=a.batch_size, num_workers=a.workers)
            step = (epoch + 1) * per_epoch

    def loss_of(batch):
        images, toks = batch
        with precision.autocast(device, dtype):
            return alignment_loss(model, images.to(device), toks.to(device)), {}

    @torch.no_grad()
    def clamp_temperature():
        model.clip.logit_scale.clamp_(0, math.log(100))

    def on_step(step, record):
        if step % a.save_every == 0 or step == stop:
            save_checkpoint(last, model, dict(manifest_base, step=step), optimizer=opt)

    model.train()
    optim = OptimConfig.from_args(a)
    run_loop(batches(), loss_of, opt, LoopConfig(optim.schedule, stop, a.clip_grad, out / "log.jsonl", "align"),
             start, after_step=clamp_temperature, on_step=on_step)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(a.out)
    last = out / "last.safetensors"
    train_file = Path(a.train) if a.train else Path(a.data) / "train.jsonl"
    random.seed(a.seed)
    np.random.seed(a.seed)
    torch.manual_seed(a.seed)
    triplets = read_triplets(train_file, check_images=False)[0][:a.limit]
    model, preprocess, manifest, tensors, start = stage1_model(a, last, device)
    steps = 0 if a.no_alignment else a.steps
    if len(triplets) < a.batch_size and steps:
        raise UserError(f"{len(triplets)} training triplets are fewer than one batch of {a.batch_size}")
    manifest_base = {"config": model.config.to_dict(), "stage": "align",
                     "tokenizer": {"type": "clip-bpe", "context_length": model.config.context_length},
                     "data": {"train": str(train_file), "sha256": sha256_file(train_file), "triplets": len(triplets)},
                     "args": {k: v for k, v in vars(a).items() if k not in ("resume", "stop_after")}}
    opt = make_optimizer(model.clip, a.lr, a.weight_decay)
    if tensors is not None:
        restore_optimizer(opt, tensors, manifest)
        torch.set_rng_state(tensors["rng.torch"])
    out.mkdir(parents=True, exist_ok=True)
    stop = min(steps, a.stop_after or steps)
    if stop > start:
        align_towers(a, model, preprocess, triplets, train_file, opt, manifest_base, start, stop, device)
    if stop < steps:
        print(f"stopped at step {stop} of {steps}; continue with --resume")
        return 0
    aligned = out / "aligned.safetensors"
    save_checkpoint(aligned, model, {k: v for k, v in manifest_base.items() if k != "stage"}
                    | {"step": 0, "alignment": {"steps": steps}})
    print(f"done: {steps} alignment steps; stage 2 starts from {aligned}")
    return 0


if __name__ == "__main__":
    run_cli(main)
