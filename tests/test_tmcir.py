"""TMCIR: the token merge by hand, its masking, the shared interface and maps, the oracle
pseudo-targets, both training stages on a tiny config, and the diffusion backend on a tiny random
pipeline."""
from __future__ import annotations

import json
import math
import os
import random

import numpy as np
import pytest
import torch

from cir import align, train
from cir.training import objectives
from cir.checkpoint import load_checkpoint, save_checkpoint
from cir.data.datasets import TripletDataset, collate_triplets
from cir.data.images import load_rgb
from cir.data.shapes.render import render
from cir.data.shapes.scene import Scene
from cir.data.triplets import read_triplets
from cir.errors import UserError
from cir.retrieval.evaluate import grounding
from cir.models.context_cir import ConTextCIRConfig
from cir.models.factory import build_model, config_from_dict, load_config
from cir.pseudo_targets import ShapesOracle, oracle_scene, write_pseudo_targets
from cir.models.tmcir import TMCIR, TMCIRConfig, TokenMerge


@pytest.fixture(scope="module")
def tmcir():
    torch.manual_seed(0)
    model, preprocess = build_model("tmcir-tiny")
    return model.eval(), preprocess


def test_merge_by_hand():
    e = torch.eye(3)
    patches = e[None]  # [1, 3, 3]: patch i is the unit vector e_i
    text = torch.tensor([[[0.0, 0.0, 1.0],     # a start token (not merged): would join patch 2
                          [0.8, 0.6, 0.0],     # joins patch 0 with weight 0.8
                          [0.6, -0.8, 0.0],    # joins patch 0 with weight 0.6
                          [-1.0, 0.0, 0.0],    # best patch 1 at cosine 0: weight 0
                          [0.0, 1.0, 0.0]]])   # padding (not merged): would join patch 1
    merged = torch.tensor([[False, True, True, True, False]])
    out, maps = TokenMerge()(patches, text, merged, torch.tensor(10.0))
    # v'_0 = (e0 + 0.8 t1 + 0.6 t2) / (1 + 0.8 + 0.6) = (2.0, 0, 0) / 2.4
    assert torch.allclose(out[0, 0], torch.tensor([2.0 / 2.4, 0.0, 0.0]), atol=1e-6)
    assert torch.equal(out[0, 1], e[1]) and torch.equal(out[0, 2], e[2])
    assert maps.shape == (1, 5, 3)
    assert torch.allclose(maps[0, 1], (10 * torch.tensor([0.8, 0.6, 0.0])).softmax(-1))
    assert torch.allclose(maps.sum(-1), torch.ones(1, 5))


def test_fuse_masks_start_and_padding(tmcir):
    model, _ = tmcir
    torch.manual_seed(1)
    images = torch.randn(2, 3, 63, 63)
    with torch.no_grad():
        img = model.image_tokens(images)
        short, long = "remove the blue star", "make the red circle blue and move the green square to the top left"
        both = model.fuse(img, model.text_tokens(model.tokenizer([short, long])))
        alone = model.fuse(img[:1], model.text_tokens(model.tokenizer([short])))
        P, T = model.grid ** 2, both.text.shape[1]
        assert both.image.shape == (2, 1 + P, model.clip.visual.output_dim)
        assert both.attention.shape == (2, 1, 1, T, P)
        assert both.text_pad[0].sum() == T - alone.text.shape[1] and not both.text_pad[1].any()
        # padding never merges: the short caption's tokens are the same alone and beside a longer one
        assert torch.allclose(both.image[0], alone.image[0], atol=1e-5)
        assert not torch.allclose(both.image[0, 1:], img[0, 1:])  # its text did change patches
        assert torch.equal(both.image[:, 0], img[:, 0])  # the CLS token is kept
        # the start token never merges: a text of the start token alone leaves every patch as it is
        states, pad = model.text_tokens(model.tokenizer([short, long]))
        only_start = model.fuse(img, (states, torch.ones_like(pad).index_fill(1, torch.tensor([0]), False)))
        assert torch.equal(only_start.image, img)
        # the gallery merges nothing
        assert torch.equal(model.fuse(img, model.empty_text(2)).image, img)


def test_interface_checkpoint_and_maps(tmcir, tmp_path, shapes_data):
    model, preprocess = tmcir
    assert isinstance(model, TMCIR) and isinstance(model.config, TMCIRConfig)
    torch.manual_seed(2)
    images = torch.randn(3, 3, 63, 63)
    q = model.encode_query(images, ["make the red circle blue", "remove the star", ""])
    g = model.encode_gallery(images)
    assert q.shape == g.shape == (3, 64)
    assert torch.allclose(q.norm(dim=-1), torch.ones(3)) and torch.allclose(g.norm(dim=-1), torch.ones(3))
    with torch.no_grad():
        assert torch.allclose(g, model.embed(model.fuse(model.image_tokens(images), model.empty_text(3))))
    caption = "make the red circle blue"
    maps = model.phrase_attention(images[0], caption, [(5, 19), (0, 4)])
    assert [m.text for m in maps] == ["the red circle", "make"]
    assert maps[0].in_context.shape == maps[0].isolated.shape == (1, 1, model.grid, model.grid)
    assert torch.allclose(maps[0].in_context.sum(), torch.tensor(1.0), atol=1e-5)
    with torch.no_grad():  # the in-context map of "make" is its token's softmax over the patches
        img = model.image_tokens(images[:1])
        states, _ = model.text_tokens(model.tokenizer([caption]))
        sim = states[0, 1] @ img[0, 1:].T
    expected = (model.clip.logit_scale.exp() * sim).softmax(-1).reshape(model.grid, model.grid)
    assert torch.allclose(maps[1].in_context[0, 0], expected, atol=1e-5)
    # a checkpoint round trip gives the same model back, through the config's method key
    path = tmp_path / "tmcir.safetensors"
    save_checkpoint(path, model, {"config": model.config.to_dict(), "step": 0})
    loaded, _, manifest = load_checkpoint(path)
    assert manifest["config"]["method"] == "tmcir" and isinstance(loaded, TMCIR)
    assert torch.allclose(loaded.encode_query(images, ["a", "b", "c"]), model.encode_query(images, ["a", "b", "c"]))
    # evaluation's grounding reads its maps as ConText-CIR's (one layer, one head)
    triplets = read_triplets(shapes_data / "test.jsonl")[0][:4]
    res = grounding(model, preprocess, triplets, "cpu")
    assert res["grid"] == model.grid and res["count"] > 0


def test_config_dispatch_and_errors():
    assert isinstance(load_config("context-cir-tiny"), ConTextCIRConfig)
    assert config_from_dict(dict(load_config("context-cir-tiny").to_dict(), method="context-cir")) == \
        load_config("context-cir-tiny")
    cfg = load_config("tmcir-shapes-grid7")
    assert isinstance(cfg, TMCIRConfig) and cfg.clip_model == "cir-shapes-grid7" and cfg.fusion_layers == 1
    with pytest.raises(UserError, match="unknown method"):
        config_from_dict({"method": "other", "clip_model": "cir-tiny"})
    with pytest.raises(UserError, match="unknown model config keys"):
        config_from_dict({"method": "tmcir", "clip_model": "cir-tiny", "fusion_width": 64})


def test_oracle_renders_the_target_scene_with_fresh_jitter(shapes_data):
    triplets = read_triplets(shapes_data / "train.jsonl")[0]
    rng = random.Random(0)
    moved = 0
    for t in triplets:
        scene = oracle_scene(t.meta, rng)
        target = Scene.from_json(t.meta["target_scene"])
        assert scene.key() == target.key()  # the same scene up to jitter
        moved += scene != target
        assert all(max(abs(o.dx), abs(o.dy)) <= 3 for o in scene.objects)
    assert moved >= len(triplets) - 2  # the jitter is drawn anew
    t = triplets[0]
    image = ShapesOracle()(t, load_rgb(t.reference), seed=5)
    assert image.size == (128, 128)
    assert image.tobytes() == render(oracle_scene(t.meta, random.Random(5))).tobytes()
    with pytest.raises(UserError, match="CIR-Shapes"):
        oracle_scene({}, rng)


def test_pseudo_targets_resume_and_refuse_another_generator(shapes_data, tmp_path):
    triplets = read_triplets(shapes_data / "train.jsonl")[0][:3]
    source = shapes_data / "train.jsonl"
    paths = write_pseudo_targets(triplets, ShapesOracle(), tmp_path, 7, source, progress=False)
    first = [open(p, "rb").read() for p in paths]
    os.remove(paths[1])
    assert write_pseudo_targets(triplets, ShapesOracle(), tmp_path, 7, source, progress=False) == paths
    assert [open(p, "rb").read() for p in paths] == first  # the missing one is rendered again, the same
    with pytest.raises(UserError, match="another --out"):
        write_pseudo_targets(triplets, ShapesOracle(), tmp_path, 8, source, progress=False)


STAGE1 = ["--config", "tmcir-tiny", "--batch-size", "8", "--warmup", "1", "--lr", "3e-3", "--workers", "0",
          "--save-every", "2", "--precision", "fp32"]


def log_of(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_stage1_aligns_resumes_and_feeds_stage2(shapes_data, tmp_path):
    data = ["--data", str(shapes_data)]
    torch.manual_seed(0)
    assert align.main(STAGE1 + data + ["--out", str(tmp_path / "none"), "--no-alignment"]) == 0
    assert not (tmp_path / "none" / "pseudo_targets").exists()
    torch.manual_seed(0)
    align.main(STAGE1 + data + ["--out", str(tmp_path / "full"), "--steps", "8"])
    align.main(STAGE1 + data + ["--out", str(tmp_path / "split"), "--steps", "8", "--stop-after", "4"])
    align.main(STAGE1 + data + ["--out", str(tmp_path / "split"), "--steps", "8", "--resume"])
    full, split = log_of(tmp_path / "full"), log_of(tmp_path / "split")
    assert [r["step"] for r in full] == [r["step"] for r in split] == list(range(1, 9))
    for a, b in zip(full, split):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)

    # the alignment loss on a fixed batch of pseudo-targets falls from the unaligned towers to the aligned
    before, preprocess, _ = load_checkpoint(tmp_path / "none" / "aligned.safetensors")
    after, _, manifest = load_checkpoint(tmp_path / "full" / "aligned.safetensors")
    assert manifest["step"] == 0 and manifest["alignment"]["steps"] == 8
    triplets = read_triplets(shapes_data / "train.jsonl")[0][:16]
    images = torch.stack([preprocess(load_rgb(tmp_path / "full" / "pseudo_targets" / f"{i:07d}.png")) for i in range(16)])
    tokens = before.tokenizer([t.caption for t in triplets])
    with torch.no_grad():
        loss_before, loss_after = (float(align.alignment_loss(m, images, tokens)) for m in (before, after))
    assert loss_after < loss_before - 0.1, (loss_before, loss_after)
    assert math.isclose(loss_before, math.log(16), rel_tol=0.2)  # random towers: about chance

    # stage 2: cir.train from the aligned model lowers the contrastive loss on a fixed batch
    out2 = tmp_path / "stage2"
    train.main(["--init-from", str(tmp_path / "full" / "aligned.safetensors"), *data, "--out", str(out2),
                "--steps", "30", "--batch-size", "8", "--warmup", "1", "--lr", "1e-3", "--lambda-cc", "0",
                "--val-every", "0", "--workers", "0", "--precision", "fp32"])
    trained, _, manifest = load_checkpoint(out2 / "last.safetensors")
    assert isinstance(trained, TMCIR) and manifest["step"] == 30
    phrases = [t.noun_phrases for t in triplets]
    batch = collate_triplets([TripletDataset(triplets, phrases, preprocess, before.tokenizer)[i] for i in range(16)])
    loss = {}
    for name, m in (("before", after), ("after", trained)):
        objective = objectives.TrainingObjective(m, objectives.LossConfig(0.0, 0.0, "mean", 0, True))
        with torch.no_grad():
            loss[name] = float(objectives.train_step(objective, batch, "cpu", lambda: torch.autocast("cpu", enabled=False))[0])
    assert loss["after"] < loss["before"] - 0.2, loss


def test_stage1_user_errors(shapes_data, tmp_path):
    with pytest.raises(UserError, match="not a TMCIR config"):
        align.main(["--config", "context-cir-tiny", "--data", str(shapes_data), "--out", str(tmp_path)])
    with pytest.raises(UserError, match="no checkpoint"):
        align.main(STAGE1 + ["--data", str(shapes_data), "--out", str(tmp_path / "x"), "--resume"])
    with pytest.raises(SystemExit):
        align.parse_args(["--out", str(tmp_path), "--data", "d", "--generator", "diffusion"])


def tiny_instruct_pix2pix(folder):
    """A randomly initialised InstructPix2Pix pipeline from configs (a 52-token character vocabulary,
    widths 8-16), saved in the diffusers folder layout."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{w: i + 2 for i, w in enumerate(letters + [c + "</w>" for c in letters])}}
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    torch.manual_seed(0)
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=AutoencoderKL(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                          up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=4),
        text_encoder=CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=16,
                                                  intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                                                  vocab_size=len(vocab), max_position_embeddings=16)),
        tokenizer=CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16),
        unet=UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=8,
                                  out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                  norm_num_groups=4, attention_head_dim=4),
        scheduler=PNDMScheduler(skip_prk_steps=True), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(folder / "pipeline")
    return folder / "pipeline"


def test_diffusion_backend_edits_with_a_tiny_random_pipeline(shapes_data, tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from cir.pseudo_targets import DiffusionEditor

    editor = DiffusionEditor(tiny_instruct_pix2pix(tmp_path / "tiny"), steps=1)
    assert editor.describe()["class"] == "StableDiffusionInstructPix2PixPipeline"
    triplets = read_triplets(shapes_data / "train.jsonl")[0][:2]
    paths = write_pseudo_targets(triplets, editor, tmp_path / "pseudo", 0, shapes_data / "train.jsonl", progress=False)
    edited, reference = load_rgb(paths[0]), load_rgb(triplets[0].reference)
    assert edited.size == reference.size == (128, 128)
    assert np.asarray(edited).std() > 0 and edited.tobytes() != reference.tobytes()
    with pytest.raises(UserError, match="not a diffusers pipeline folder"):
        DiffusionEditor(tmp_path)


def test_the_index_and_the_app_take_a_tmcir_checkpoint(tmcir, tmp_path, shapes_data):
    from cir.index import GalleryIndex, build_index
    from cir.ui.explorer import Explorer

    model, preprocess = tmcir
    path = tmp_path / "tmcir.safetensors"
    save_checkpoint(path, model, {"config": model.config.to_dict(), "step": 0})
    build_index(tmp_path / "index", shapes_data / "gallery_test.txt", path, batch_size=8)
    index = GalleryIndex.load(tmp_path / "index", checkpoint_path=path)
    first = torch.stack([preprocess(load_rgb(p)) for p in index.paths[:3]])
    assert np.allclose(np.asarray(index.embeddings)[:3], model.encode_gallery(first).numpy(), atol=1e-5)
    ex = Explorer.load(path, index=tmp_path / "index", examples=shapes_data / "test.jsonl", device="cpu")
    t = ex.examples[0]
    hits = ex.retrieve(t.reference, t.caption, k=5)
    assert len(hits) == 5 and hits[0].score >= hits[-1].score
    results = ex.phrase_maps(t.reference, t.caption, t.noun_phrases, layer=0, head=0)
    assert len(results) == len(t.noun_phrases)
    for r in results:
        assert r.in_context.shape == (model.grid, model.grid)
        assert abs(float(r.in_context.sum()) - 1) < 1e-4 and r.cc is not None
