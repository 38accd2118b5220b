"""Pseudo-target images for TMCIR's stage 1 (`cir.align`): what the reference should look like
after the modification text, synthesised from (reference image, text).

A generator is a callable (triplet, reference PIL image, seed) -> PIL image, described by its
`describe()` dict (recorded with the images it wrote). Two of them:

- `ShapesOracle`: CIR-Shapes only. It applies the triplet's operations (meta) to its reference
  scene and renders the result with fresh jitter. An oracle standing in for the paper's
  diffusion model: it produces exactly the intended change and nothing else.
- `DiffusionEditor`: real images. An instruction-following image editor through `diffusers`
  (InstructPix2Pix, `StableDiffusionInstructPix2PixPipeline`, or any pipeline taking prompt,
  image and image_guidance_scale) loaded from a local weights folder, never downloaded. The paper
  names Stable Diffusion 3; any such editor can stand in. `diffusers` and `transformers` are
  optional: `pip install -r requirements-diffusion.txt`.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import replace
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from cir.atomic import atomic_path, remove_stale_temporaries, sha256_file, write_json
from cir.data.images import load_rgb
from cir.data.shapes.render import render
from cir.data.shapes.scene import MAX_JITTER, Operation, Scene, apply_all
from cir.data.triplets import Triplet
from cir.errors import UserError

GENERATORS = ("oracle", "diffusion")


def oracle_scene(meta: dict, rng: random.Random) -> Scene:
    """A CIR-Shapes query's (`meta` of its triplet) reference scene with all its operations applied,
    every object's jitter drawn anew from `rng` (0 .. MAX_JITTER px each way)."""
    if meta.get("reference_scene") is None or meta.get("operations") is None:
        raise UserError("the oracle generator needs CIR-Shapes triplets (meta with reference_scene and operations)")
    scene = apply_all(Scene.from_json(meta["reference_scene"]), [Operation.from_json(op) for op in meta["operations"]])
    jitter = lambda: rng.randint(-MAX_JITTER, MAX_JITTER)
    return replace(scene, objects=tuple(replace(o, dx=jitter(), dy=jitter()) for o in scene.objects))


class ShapesOracle:
    """CIR-Shapes pseudo-targets: the operations applied to the reference scene, rendered with fresh jitter."""

    def __call__(self, triplet: Triplet, reference: Image.Image, seed: int) -> Image.Image:
        return render(oracle_scene(triplet.meta or {}, random.Random(seed)))

    def describe(self) -> dict:
        return {"generator": "oracle"}


class DiffusionEditor:
    """An instruction-following diffusers pipeline from a local folder (`save_pretrained` layout):
    reference image + modification text -> edited image, resized to the reference's size."""

    def __init__(self, weights: str | os.PathLike, steps: int = 20, guidance_scale: float = 7.5,
                 image_guidance_scale: float = 1.5, device: str = "cpu"):
        try:
            import torch
            from diffusers import DiffusionPipeline
        except ImportError:
            raise UserError("the diffusion generator needs diffusers and transformers: "
                            "pip install -r requirements-diffusion.txt") from None
        if not Path(weights, "model_index.json").is_file():
            raise UserError(f"{weights} is not a diffusers pipeline folder (no model_index.json)")
        try:
            self.pipe = DiffusionPipeline.from_pretrained(str(weights), local_files_only=True).to(device)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load the diffusers pipeline {weights}: {' '.join(str(e).split())[:200]}") from None
        self.pipe.set_progress_bar_config(disable=True)
        self.torch, self.device = torch, device
        self.weights, self.steps = str(weights), steps
        self.guidance_scale, self.image_guidance_scale = guidance_scale, image_guidance_scale

    def __call__(self, triplet: Triplet, reference: Image.Image, seed: int) -> Image.Image:
        out = self.pipe(prompt=triplet.caption, image=reference, num_inference_steps=self.steps,
                        guidance_scale=self.guidance_scale, image_guidance_scale=self.image_guidance_scale,
                        generator=self.torch.Generator(self.device).manual_seed(seed), output_type="pil")
        return out.images[0].convert("RGB").resize(reference.size, Image.BICUBIC)

    def describe(self) -> dict:
        return {"generator": "diffusion", "weights": self.weights, "class": type(self.pipe).__name__,
                "steps": self.steps, "guidance_scale": self.guidance_scale,
                "image_guidance_scale": self.image_guidance_scale}


def write_pseudo_targets(triplets: list[Triplet], generator, folder: str | os.PathLike, seed: int,
                         source: str | os.PathLike, progress: bool = True) -> list[str]:
    """Render one pseudo-target per triplet into `folder` (`{index:07d}.png`, written atomically;
    ones already there are kept, so an interrupted run resumes). `folder`/manifest.json records the
    triplet file `source` (and its sha256), the generator and the seed; a folder written for
    other ones is refused. Returns the image paths in triplet order."""
    folder = Path(folder)
    manifest = {"source": str(source), "sha256": sha256_file(source), "triplets": len(triplets), "seed": seed,
                **generator.describe()}
    known = folder / "manifest.json"
    if known.is_file() and json.loads(known.read_text()) != manifest:
        raise UserError(f"{folder} holds pseudo-targets of other triplets, another generator or seed; use another --out")
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder)  # left by a killed earlier run
    write_json(known, manifest)
    paths = [str(folder / f"{i:07d}.png") for i in range(len(triplets))]
    todo = [i for i, p in enumerate(paths) if not os.path.isfile(p)]
    for i in tqdm(todo, desc="pseudo-targets", unit="img", disable=not progress):
        image = generator(triplets[i], load_rgb(triplets[i].reference), seed * 1_000_003 + i)
        with atomic_path(paths[i], bulk=True) as tmp:
            image.save(tmp, format="PNG")
    return paths
