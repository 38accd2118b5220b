"""Baselines end to end on a tiny open_clip config: tower pretraining (cir.towers) -> train-combiner -> evaluate all four
methods through cir.evaluate's protocol; scene descriptions name everything and fit CLIP's context."""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import re
import subprocess
import sys

import torch
from open_clip.tokenizer import SimpleTokenizer
from safetensors.torch import load_file

from cir import towers as tower_pretraining
from cir.baselines import build_parser, main
from cir.data.shapes.pretraining_texts import describe_scene
from cir.data.shapes.scene import CELLS, Obj, Scene, cell_box, random_scene
from cir.data.triplets import read_gallery, read_triplets, write_triplets
from cir.retrieval.evaluate import evaluate
from cir.models.factory import build_model, load_config


def structure(x):
    """Nested keys and value types of a result object."""
    return {k: structure(v) for k, v in x.items()} if isinstance(x, dict) else type(x).__name__


def test_describe_scene_names_everything_and_fits_the_context():
    rng = random.Random(0)
    crowded = Scene("pink", tuple(Obj(shape, "cyan", "large", cell)  # cyan is 2 tokens, corners 2 words
                                  for shape, cell in zip(("circle", "square", "star", "diamond"), (0, 2, 6, 8))))
    scenes = [crowded] * 50 + [random_scene(rng) for _ in range(300)]
    bpe = SimpleTokenizer()
    texts = set()
    for scene in scenes:
        text, mentions = describe_scene(scene, rng)
        texts.add(text)
        # the mentions are each object's words (its box) and each cell's name (the cell's box)
        words = sorted((f"{o.size} {o.color} {o.shape}", o.box()) for o in scene.objects)
        cells = sorted((CELLS[o.cell], cell_box(o.cell)) for o in scene.objects)
        assert sorted((text[s:e], box) for s, e, box in mentions) == sorted(words + cells), text
        assert len(bpe.encode(text)) + 2 <= 40, text  # + start/end tokens: never truncated at 40
        assert re.search(rf"\b{scene.background} background\b|background is {scene.background}$", text), text
        for o in scene.objects:
            phrase = rf"\b{o.size} {o.color} {o.shape} (at|in|on) the {CELLS[o.cell]}(?=,|;| and | on |$)"
            assert re.search(phrase, text), (o, text)
    assert len({describe_scene(crowded, random.Random(i))[0] for i in range(20)}) > 5  # order and phrasing vary


def test_train_and_evaluate_all_baselines(shapes_data, tiny_model, tmp_path, capsys):
    clip_dir, comb_dir = tmp_path / "clip", tmp_path / "comb"
    small = ["--steps", "3", "--batch-size", "16", "--warmup", "1", "--workers", "0"]
    tower_pretraining.main(["--config", "cir-tiny", "--data", str(shapes_data), "--out", str(clip_dir), "--patch-weight", "0.5",
                           "--token-weight", "2"] + small)
    for row in map(json.loads, (clip_dir / "log.jsonl").read_text().splitlines()):  # loss = scene + 0.5 patch + 2 token
        assert abs(row["loss"] - (row["scene"] + 0.5 * row["patch"] + 2 * row["token"])) < 1e-4
        assert row["patch"] > 0 and row["token"] > 0 and 0 <= row["patch_acc"] <= 1 and 0 <= row["token_acc"] <= 1
    clip = str(clip_dir / "clip.safetensors")
    # the trained CLIP is also a local weights file for ConText-CIR's towers (the paper's recipe: start
    # from aligned CLIP towers): every tower tensor comes from it
    cfg = dataclasses.replace(load_config("context-cir-tiny"), pretrained=clip)
    towers = build_model(cfg)[0].clip.state_dict()
    trained = load_file(clip)
    assert trained.keys() == towers.keys() and all(torch.equal(trained[k], towers[k]) for k in trained)
    main(["train-combiner", "--clip", clip, "--data", str(shapes_data), "--out", str(comb_dir)] + small)
    main(["train-combiner", "--clip", clip, "--data", str(shapes_data), "--out", str(comb_dir)] + small)
    assert "using cached features" in capsys.readouterr().out
    assert len((comb_dir / "log.jsonl").read_text().splitlines()) == 3
    manifest = json.loads((comb_dir / "combiner.json").read_text())
    assert manifest["combiner"] == {"feature_dim": 64, "projection_dim": 256, "hidden_dim": 512, "dropout": 0.5}

    test, gallery = shapes_data / "test.jsonl", shapes_data / "gallery_test.txt"
    out = tmp_path / "res.json"
    main(["evaluate", "--clip", clip, "--combiner", str(comb_dir / "combiner.safetensors"), "--triplets", str(test),
          "--gallery", str(gallery), "--json", str(out)])
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert list(res) == ["image", "text", "sum", "combiner"]
    model, preprocess = tiny_model
    triplets = read_triplets(test)[0]
    reference = evaluate(model, preprocess, triplets, read_gallery(gallery), with_grounding=False)
    for method, r in res.items():
        assert structure(r) == structure(reference), method
        assert f"== {method}" in printed
    groups = len(reference["by_num_modifications"]) + len(reference["by_operation"])
    assert printed.count("R@1 ") == 4 * (1 + groups)  # overall, then per number of modifications and per operation

    # with the reference as the target, image-only retrieval finds it first for every query (one query per
    # background: a barely trained tiny CLIP embeds scenes of one background within rounding of each other)
    one_per_background = list({t.meta["reference_scene"]["background"]: t for t in triplets}.values())
    self_file, self_gallery = tmp_path / "self.jsonl", tmp_path / "gallery.txt"
    write_triplets(self_file, [dataclasses.replace(t, targets=[t.reference]) for t in one_per_background])
    self_gallery.write_text("".join(t.reference + "\n" for t in one_per_background))
    main(["evaluate", "--clip", clip, "--triplets", str(self_file), "--gallery", str(self_gallery), "--json", str(out)])
    res = json.loads(out.read_text())
    assert res["image"]["count"] >= 3
    assert list(res) == ["image", "text", "sum"] and res["image"]["keep_reference"] is True
    assert res["image"]["recall"]["1"] == 100.0
    assert all(g["recall"]["1"] == 100.0 for g in res["image"]["by_num_modifications"].values())

    # user mistakes: one line, exit code 2
    bad = subprocess.run([sys.executable, "-m", "cir.baselines", "evaluate", "--clip", str(comb_dir / "combiner.safetensors"),
                          "--triplets", str(test), "--gallery", str(gallery)], capture_output=True, text=True)
    assert bad.returncode == 2 and "cir-clip-checkpoint/1" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_every_flag_is_explained():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"train-combiner", "evaluate"}
    for name, parser in [*sub.choices.items(), ("cir.towers", tower_pretraining.build_parser())]:
        for action in parser._actions:
            assert action.help, (name, action.dest)


def test_baselines_take_the_towers_of_a_model_checkpoint(tiny_checkpoint, shapes_data):
    """`--clip` may name a model checkpoint: its towers embed images and texts exactly as the model's own."""
    from cir.checkpoint import load_checkpoint
    from cir.data.images import load_rgb

    clip, preprocess, tokenizer = tower_pretraining.load_towers(tiny_checkpoint)
    model, model_preprocess, _ = load_checkpoint(tiny_checkpoint)
    image = load_rgb(read_triplets(shapes_data / "test.jsonl")[0][0].reference)
    assert torch.equal(preprocess(image), model_preprocess(image))
    with torch.no_grad():
        embedded = clip.encode_image(preprocess(image)[None], normalize=True)  # what the baselines embed
        pooled, _ = model.clip.visual(model_preprocess(image)[None])  # the model's own towers: (pooled, patches)
        assert embedded.shape == (1, model.clip.visual.output_dim)
        torch.testing.assert_close(embedded, torch.nn.functional.normalize(pooled, dim=-1))
        tokens = tokenizer(["a small red circle"])
        text = clip.encode_text(tokens, normalize=True)
        assert text.shape == embedded.shape
        assert not torch.allclose(text, clip.encode_text(tokenizer(["a large blue star"]), normalize=True))
