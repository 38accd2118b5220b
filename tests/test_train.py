"""End to end on a tiny config: data -> noun-phrase spans -> both losses -> checkpoint -> resume ->
evaluate. A resumed run reproduces the uninterrupted loss curve."""
from __future__ import annotations

import json
import subprocess
import shutil
import sys

import pytest
import torch

from cir.train import leaf_only, parse_args
from cir.training.loop import OptimConfig, Schedule

TRAIN = [sys.executable, "-m", "cir.train", "--config", "context-cir-tiny", "--batch-size", "8", "--steps", "6",
         "--warmup", "2", "--workers", "0", "--val-every", "3", "--val-limit", "8", "--save-every", "2", "--lambda-cc", "0.5",
         "--eps", "0.0"]
TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def run(args):
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def losses(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_train_resume_evaluate(shapes_data, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    train = TRAIN + ["--data", str(shapes_data), "--partial-negatives", "2"]  # resumed partial draws must match too
    run(train + ["--out", str(full)])
    run(train + ["--out", str(split), "--stop-after", "3"])
    assert len(losses(split)) == 3
    run(train + ["--out", str(split), "--resume"])
    a, b = losses(full), losses(split)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4, abs=1e-5)
        assert ra["cc"] == pytest.approx(rb["cc"], rel=1e-4, abs=1e-6)
    assert any(r["cc"] > 0 for r in a)  # the CC loss is live
    manifest = json.loads((full / "last.json").read_text())
    assert manifest["step"] == 6 and manifest["metrics"]["step"] == 6 and manifest["data"]["triplets"] == 48
    assert len((full / "val.jsonl").read_text().splitlines()) == 2
    out = tmp_path / "res.json"
    r = run([sys.executable, "-m", "cir.evaluate", "--checkpoint", str(full / "last.safetensors"),
             "--triplets", str(shapes_data / "test.jsonl"), "--gallery", str(shapes_data / "gallery_test.txt"),
             "--json", str(out)])
    res = json.loads(out.read_text())
    assert set(res["recall"]) == {"1", "5", "10", "50"} and res["count"] == 16 and res["keep_reference"] is True
    assert set(res["by_num_modifications"]) <= {"1", "2", "3"}
    assert sum(g["count"] for g in res["by_num_modifications"].values()) == 16
    assert set(res["by_operation"]) <= {"add", "remove", "recolor", "reshape", "resize", "move", "background"}
    test_triplets = [json.loads(line) for line in (shapes_data / "test.jsonl").read_text().splitlines()]
    assert sum(g["count"] for g in res["by_operation"].values()) == sum(
        len({op["type"] for op in t["meta"]["operations"]}) for t in test_triplets)
    assert sum(res["top1"].values()) == 16 and res["top1"]["target"] == round(res["recall"]["1"] * 16 / 100)
    assert res["grounding"]["count"] > 0 and 0 <= res["grounding"]["in_context"] <= 100
    per_head = res["grounding"]["per_layer_head"]["in_context"]
    assert len(per_head) == 2 and all(len(row) == 2 and all(0 <= v <= 100 for v in row) for row in per_head)
    assert "R@1" in r.stdout and "grounding" in r.stdout


def test_torchrun_two_processes_match_one(shapes_data, tmp_path):
    """DDP through torchrun (gloo on CPU): 2 processes x 4 rows follow the 1 process x 8 rows curve,
    gradient norms included (a missing or doubled all-reduce would change them; Adam would hide it
    in the loss)."""
    args = TRAIN + ["--data", str(shapes_data), "--steps", "3", "--val-every", "0", "--precision", "fp32",
                    "--lambda-cc", "0", "--partial-negatives"]
    run(args + ["--out", str(tmp_path / "one")])
    run(TORCHRUN_2 + args[1:]
        + ["--out", str(tmp_path / "two")])
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-3)
    assert json.loads((tmp_path / "two" / "last.json").read_text())["step"] == 3
    # the CC loss under DDP (each process averages over its own phrases)
    run(TORCHRUN_2 + args[1:]
        + ["--out", str(tmp_path / "cc"), "--steps", "2", "--lambda-cc", "0.5"])
    assert all(r["cc"] > 0 for r in losses(tmp_path / "cc"))


def test_ablation_flags_and_user_errors(shapes_data, tmp_path):
    run(TRAIN + ["--data", str(shapes_data), "--out", str(tmp_path / "abl"), "--steps", "1", "--val-every", "0",
                 "--freeze-text", "--freeze-image", "--no-query-negative", "--leaf-nps-only", "--lambda-cc", "0"])
    bad = subprocess.run(TRAIN + ["--data", str(shapes_data), "--out", str(tmp_path / "none"), "--resume"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "no checkpoint" in bad.stderr and "Traceback" not in bad.stderr
    plain = tmp_path / "plain.jsonl"  # triplets without CIR-Shapes scenes: no partial fulfilments to draw
    plain.write_text("".join(json.dumps({k: v for k, v in json.loads(line).items() if k != "meta"}) + "\n"
                             for line in (shapes_data / "train.jsonl").read_text().splitlines()))
    bad = subprocess.run(TRAIN + ["--train", str(plain), "--out", str(tmp_path / "p"), "--val-every", "0",
                                  "--partial-negatives"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--partial-negatives" in bad.stderr and "Traceback" not in bad.stderr


def test_a_lost_run_continues_from_its_export(shapes_data, tmp_path):
    """--continue-from an fp32 export of a run stopped at step 3 (its folder gone): the same batches
    (equal losses at step 4, before any update differs), the lr ramped onto the uninterrupted run's
    schedule over --warmup steps, the ramp kept by --resume; other flags are refused."""
    full, split = tmp_path / "full", tmp_path / "split"
    train = TRAIN + ["--data", str(shapes_data), "--warmup", "3"]
    run(train + ["--out", str(full)])
    run(train + ["--out", str(split), "--stop-after", "3"])
    export = tmp_path / "export.safetensors"
    run([sys.executable, "-m", "cir.checkpoint", "export", "--checkpoint", str(split / "last.safetensors"),
         "--out", str(export), "--dtype", "fp32"])
    for f in split.iterdir():
        f.unlink()
    refused = subprocess.run(train + ["--out", str(split), "--continue-from", str(export), "--steps", "7"],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and refused.stderr.strip().endswith("its run had --steps 6 (not 7)")
    r = run(train + ["--out", str(split), "--continue-from", str(export), "--stop-after", "4"])
    assert f"continued from {export}" in r.stdout
    run(train + ["--out", str(split), "--resume"])
    a, b = {x["step"]: x for x in losses(full)}, losses(split)
    assert [x["step"] for x in b] == [4, 5, 6]
    assert b[0]["loss"] == pytest.approx(a[4]["loss"], rel=1e-5)
    assert [x["lr"] / a[x["step"]]["lr"] for x in b] == pytest.approx([1 / 3, 2 / 3, 1])
    assert json.loads((split / "last.json").read_text())["args"]["rewarm_at"] == 3


def test_a_lost_restarted_run_continues_on_its_restarted_schedule(shapes_data, tmp_path):
    """A phase warm-started with --restart-schedule (steps 2 -> 6), its folder gone at step 4: continued
    from its export, its lr at step 6 is the uninterrupted phase's (its schedule starts at step 2, not 0)."""
    from cir.checkpoint import save_checkpoint
    from cir.models.factory import build_model
    first = tmp_path / "first.safetensors"  # a model at step 2
    model, _ = build_model("context-cir-tiny")
    save_checkpoint(first, model, {"config": model.config.to_dict(), "step": 2})
    phase = TRAIN + ["--data", str(shapes_data), "--warmup", "1", "--val-every", "0", "--init-from", str(first),
                     "--restart-schedule"]
    full, split = tmp_path / "full", tmp_path / "split"
    run(phase + ["--out", str(full)])
    run(phase + ["--out", str(split), "--stop-after", "4"])
    export = tmp_path / "export.safetensors"
    run([sys.executable, "-m", "cir.checkpoint", "export", "--checkpoint", str(split / "last.safetensors"),
         "--out", str(export), "--dtype", "fp32"])
    shutil.rmtree(split)
    run(TRAIN + ["--data", str(shapes_data), "--warmup", "1", "--val-every", "0", "--out", str(split),
                 "--continue-from", str(export)])
    a, b = {x["step"]: x for x in losses(full)}, {x["step"]: x for x in losses(split)}
    assert sorted(b) == [5, 6] and [b[k]["lr"] for k in b] == pytest.approx([a[5]["lr"], a[6]["lr"]], rel=1e-6)
    assert a[3]["lr"] > a[6]["lr"]  # the restarted cosine, not the tail of one from step 0


def test_a_warm_start_sharpens_the_attention_prior_by_the_scale_asked(shapes_data, tmp_path):
    """--prior-gain-scale 3 --init-from the grid-7 step-0 file: every head's prior gain starts at 3x
    the file's (20 -> 60), every other weight is the file's; a model without a prior is refused in one line."""
    from cir.checkpoint import load_checkpoint
    step0 = "assets/context-cir-shapes-grid7-step0.safetensors"
    warm = [sys.executable, "-m", "cir.train", "--data", str(shapes_data), "--steps", "0", "--val-every", "0", "--batch-size", "8",
            "--workers", "0", "--prior-gain-scale", "3"]
    run(warm + ["--out", str(tmp_path / "sharp"), "--init-from", step0])
    got = load_checkpoint(tmp_path / "sharp" / "last.safetensors", "cpu")[0].state_dict()
    want = load_checkpoint(step0, "cpu")[0].state_dict()
    gains = [k for k in want if k.endswith("prior_gain")]
    assert len(gains) == 2 and all(torch.allclose(got[k], 3 * want[k]) and want[k].min() > 19 for k in gains)
    assert all(torch.equal(got[k], want[k]) for k in want if k not in gains)
    refused = subprocess.run(warm + ["--out", str(tmp_path / "plain"), "--init-from", "assets/context-cir-shapes.safetensors"],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        "error: --prior-gain-scale: the model has no attention prior (config attention_prior)"]


def test_zero_steps_writes_the_model_as_initialised(shapes_data, tmp_path):
    from cir.checkpoint import load_checkpoint
    from cir.models.factory import build_model
    run(TRAIN + ["--data", str(shapes_data), "--out", str(tmp_path / "z"), "--steps", "0", "--seed", "3"])
    model, _, manifest = load_checkpoint(tmp_path / "z" / "last.safetensors", "cpu")
    assert manifest["step"] == 0
    torch.manual_seed(3)
    fresh, _ = build_model("context-cir-tiny")
    got, want = model.state_dict(), fresh.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_schedule_and_leaf_filter():
    a = parse_args(["--out", "x", "--steps", "100", "--warmup", "10", "--lr", "1e-3", "--min-lr", "1e-5"])
    lr_at = OptimConfig.from_args(a).schedule.at
    assert lr_at(0) == pytest.approx(1e-4) and lr_at(9) == pytest.approx(1e-3)
    assert lr_at(10) == pytest.approx(1e-3) and lr_at(100) == pytest.approx(1e-5)
    assert lr_at(55) == pytest.approx((1e-3 + 1e-5) / 2)
    # --restart-schedule from a warm start at step 40: warm-up again, cosine over 40..100
    restarted = Schedule(1e-3, 1e-5, 10, 100, start=40).at
    assert restarted(40) == pytest.approx(1e-4) and restarted(50) == pytest.approx(1e-3)
    assert restarted(75) == pytest.approx((1e-3 + 1e-5) / 2) and restarted(100) == pytest.approx(1e-5)
    # a run continued at step 60 with fresh moments: ramped onto the same cosine over 10 steps
    rewarmed, plain = Schedule(1e-3, 1e-5, 10, 100, rewarm_at=60).at, Schedule(1e-3, 1e-5, 10, 100).at
    assert rewarmed(60) == pytest.approx(plain(60) / 10) and rewarmed(64) == pytest.approx(plain(64) / 2)
    assert rewarmed(69) == pytest.approx(plain(69)) and rewarmed(90) == pytest.approx(plain(90))
    phrases = [{"text": "the red circle at the top", "start": 0, "end": 25}, {"text": "the red circle", "start": 0, "end": 14},
               {"text": "the top", "start": 18, "end": 25}]
    assert leaf_only(phrases) == phrases[1:]


def test_warm_start_grows_a_text_to_image_model_into_both_directions(shapes_data, tmp_path):
    """--init-from with another --config: the checkpoint's weights, the image -> text halves new and
    zero-initialised, so the grown model embeds exactly like the checkpoint before training; with
    --restart-schedule the lr warms up again from the checkpoint's step."""
    import torch

    from cir.checkpoint import load_checkpoint, load_weights, save_checkpoint
    from cir.errors import UserError
    from cir.models.factory import build_model, load_config

    tiny = load_config("context-cir-tiny").to_dict()
    config, both = tmp_path / "tiny-t2i.json", tmp_path / "tiny-both.json"
    config.write_text(json.dumps(dict(tiny, fusion_image_to_text=False, pool_text=True)))
    both.write_text(json.dumps(dict(tiny, fusion_image_to_text=True, pool_text=True)))
    base = tmp_path / "base"
    run(TRAIN + ["--config", str(config), "--data", str(shapes_data), "--out", str(base), "--steps", "3", "--val-every", "0"])
    small, _, _ = load_checkpoint(base / "last.safetensors")
    grown, _ = build_model(load_config(str(both)))
    new = load_weights(grown, base / "last.safetensors")
    assert new and all(".image_to_text." in k or ".ln_image" in k or ".image_mlp." in k or ".ln_text_kv." in k for k in new)
    grown.eval()
    images, texts = torch.rand(3, 3, 64, 64), ["remove the red circle", "", "make the background pink"]
    with torch.no_grad():
        assert torch.allclose(small.encode_query(images, texts), grown.encode_query(images, texts), atol=1e-6)
    save_checkpoint(tmp_path / "grown.safetensors", grown, {"config": grown.config.to_dict()})
    with pytest.raises(UserError, match="unexpected: fusion.blocks.0"):  # the other way round: keys with no place
        load_weights(small, tmp_path / "grown.safetensors")
    out = tmp_path / "grown"
    r = run(TRAIN + ["--config", str(both), "--init-from", str(base / "last.safetensors"), "--data", str(shapes_data),
                     "--out", str(out), "--steps", "6", "--val-every", "0", "--restart-schedule", "--lr", "1e-3"])
    assert "newly initialised" in r.stdout
    log = losses(out)
    assert [x["step"] for x in log] == [4, 5, 6]
    assert log[0]["lr"] == pytest.approx(1e-3 / 2) and log[1]["lr"] == pytest.approx(1e-3)  # warm-up 2 from step 3
    manifest = json.loads((out / "last.json").read_text())
    assert manifest["config"]["fusion_image_to_text"] is True and manifest["args"]["schedule_start"] == 3


def test_every_partial_fulfilment_is_a_negative_for_every_row(shapes_data):
    """--partial-negatives all: each multi-operation query brings all its partial fulfilments (2 or
    6), and the objective's fixed per-row slots hold each of them once: its contrastive loss equals
    the loss with every rendered partial as a plain extra negative column."""
    import functools

    from cir.data.datasets import TripletDataset, collate_triplets
    from cir.data.shapes.partials import partial_subsets
    from cir.data.triplets import read_triplets
    from cir.losses import contrastive_loss
    from cir.models.factory import build_model
    from cir.train import MAX_PARTIALS
    from cir.training.batches import shapes_partials
    from cir.training.objectives import LossConfig, TrainingObjective

    torch.manual_seed(0)
    model, preprocess = build_model("context-cir-tiny")
    triplets = read_triplets(shapes_data / "train.jsonl")[0][:12]
    ds = TripletDataset(triplets, [[] for _ in triplets], preprocess, model.tokenizer,
                        hard_negatives=functools.partial(shapes_partials, count=MAX_PARTIALS))
    batch = collate_triplets([ds[i] for i in range(len(triplets))])
    counts = [len(partial_subsets(t.meta["num_modifications"])) for t in triplets]
    assert MAX_PARTIALS == 6 and 6 in counts and 2 in counts and 0 in counts
    assert batch["hard_rows"].tolist() == [b for b, n in enumerate(counts) for _ in range(n)]
    a = parse_args(["--out", "x", "--lambda-cc", "0", "--partial-negatives", "all"])
    images = torch.cat([batch["reference"], batch["target"], batch["hard"]])
    _, cont, _ = TrainingObjective(model, LossConfig.from_args(a))(images, batch["tokens"], batch["hard_rows"], batch["phrase_rows"],
                                             batch["phrase_positions"], batch["phrase_texts"])
    B = len(triplets)
    query = model.embed(model.fuse(model.image_tokens(images[:B]), model.text_tokens(batch["tokens"])))
    gal = model.embed(model.fuse(model.image_tokens(images), model.empty_text(len(images))))
    expected = contrastive_loss(query, gal[B:2 * B], gal[:B], model.logit_scale, gal[2 * B:])
    assert cont.item() == pytest.approx(expected.item(), rel=1e-5)
    fewer = contrastive_loss(query, gal[B:2 * B], gal[:B], model.logit_scale, gal[2 * B:2 * B + 3])
    assert cont.item() != pytest.approx(fewer.item(), rel=1e-5)  # every partial counts
    assert parse_args(["--out", "x", "--partial-negatives"]).partial_negatives == 1
    assert parse_args(["--out", "x", "--partial-negatives", "3"]).partial_negatives == 3


BEFORE_LOOP = "43c5c50"  # the last commit with cir.train's own loop: the long grid-7 runs started on it


def test_a_checkpoint_written_before_the_one_loop_resumes_after_it(shapes_data, tmp_path):
    """A run stopped by the code of BEFORE_LOOP continues under today's code as if uninterrupted."""
    import os
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    if subprocess.run(["git", "cat-file", "-e", BEFORE_LOOP + "^{commit}"], cwd=root, capture_output=True).returncode:
        pytest.skip(f"commit {BEFORE_LOOP} is not in this clone's history (shallow clone)")
    old = tmp_path / "old"
    old.mkdir()
    archive = subprocess.run(["git", "archive", BEFORE_LOOP, "cir"], cwd=root, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
    assert not (old / "cir" / "training").exists()  # the old layout
    train = TRAIN + ["--data", str(shapes_data), "--partial-negatives", "2"]
    env = dict(os.environ, PYTHONPATH=str(old))
    r = subprocess.run(train + ["--out", str(tmp_path / "split"), "--stop-after", "3"], cwd=old, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    run(train + ["--out", str(tmp_path / "split"), "--resume"])
    run(train + ["--out", str(tmp_path / "full")])
    a, b = losses(tmp_path / "full"), losses(tmp_path / "split")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4, abs=1e-5)
        assert ra["cc"] == pytest.approx(rb["cc"], rel=1e-4, abs=1e-6)
