"""SIGKILL at the worst moments: during training (`--resume` continues), during a gallery index
build (mid-embedding, just before and just after the swap: the previous index stays intact, the
next build completes), and of the app itself while an annotator reviews (every decision the app
acknowledged before the kill is in the review log)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import pytest

from cir.checkpoint import read_manifest
from cir.data.triplets import read_gallery, read_triplets, write_triplets
from cir.index import MANIFEST, GalleryIndex, build_index
from cir.ui import review
from hostile_inputs import BAD_KINDS, endpoints, free_port, wait_for_http, write_images

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
SMALL = dict(chunk_size=8, batch_size=8, workers=0)


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def wait_until(condition, proc: subprocess.Popen, timeout: float = 120.0, what: str = "") -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the process exited ({proc.returncode}) before {what}")
        if time.time() > deadline:
            kill(proc)
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def leftovers(folder: Path) -> list[str]:
    """Temporary files of interrupted atomic writes."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ---------------------------------------------------------------------------- training
TRAIN = [sys.executable, "-m", "cir.train", "--config", "context-cir-tiny", "--batch-size", "8", "--steps", "200",
         "--warmup", "2", "--workers", "0", "--val-every", "0", "--save-every", "1", "--lambda-cc", "0.5", "--eps", "0.0",
         "--threads", "1"]


def test_sigkill_during_training_then_resume(shapes_data, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(TRAIN + ["--data", str(shapes_data), "--out", str(run)], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def saved_step() -> int:
        try:
            return json.loads((run / "last.json").read_text())["step"]
        except (OSError, ValueError, KeyError):
            return 0
    wait_until(lambda: saved_step() >= 3, proc, what="the third checkpoint")
    time.sleep(0.05)  # land somewhere inside a later step (or its save)
    kill(proc)
    assert proc.returncode == -signal.SIGKILL
    killed_log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    step = read_manifest(run / "last.safetensors")["step"]  # the checkpoint is whole, whatever the kill hit
    assert step >= 3

    resumed = subprocess.run(TRAIN + ["--data", str(shapes_data), "--out", str(run), "--resume",
                                      "--stop-after", str(step + 2)], cwd=ROOT, env=ENV, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, step + 3))  # no step lost, none twice
    assert read_manifest(run / "last.safetensors")["step"] == step + 2
    # steps the killed run had already logged past its checkpoint come out the same when redone
    redone = {r["step"]: r for r in log}
    for r in killed_log:
        if step < r["step"] <= step + 2:
            assert redone[r["step"]]["loss"] == pytest.approx(r["loss"], rel=1e-4, abs=1e-5)
    assert leftovers(run) == []


def test_resume_after_a_torn_log_line(shapes_data, tmp_path):
    """A crash that cuts the last training-log line (power loss) does not stop `--resume`."""
    run = tmp_path / "run"
    done = subprocess.run(TRAIN + ["--data", str(shapes_data), "--out", str(run), "--stop-after", "2"], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(run / "log.jsonl", "a") as f:
        f.write('{"step": 3, "lr": 0.0001, "loss": 4.1')  # step 3 was being logged when the power went
    again = subprocess.run(TRAIN + ["--data", str(shapes_data), "--out", str(run), "--resume", "--stop-after", "3"],
                           cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [1, 2, 3]


# ---------------------------------------------------------------------------- index builds
@pytest.fixture(scope="module")
def gallery(tmp_path_factory, shapes_data):
    """A gallery folder: CIR-Shapes images plus the hostile files (the unreadable ones get skipped)."""
    folder = tmp_path_factory.mktemp("crash") / "gallery"
    write_images(folder)
    for p in read_gallery(shapes_data / "gallery_test.txt")[:40]:
        shutil.copy(p, folder / Path(p).name)
    return folder


def build_cmd(ckpt, gallery, out, *extra):
    return [sys.executable, "-m", "cir.index", "build", "--checkpoint", str(ckpt), "--gallery", str(gallery),
            "--out", str(out), "--chunk-size", "8", "--batch-size", "8", "--workers", "0", *extra]


def killed_at(hook: str, cmd: list[str]) -> subprocess.CompletedProcess:
    """Run `python -m cir.index` (cmd[3:]) in a child that SIGKILLs itself at `hook`:
    "before-swap" (everything staged, the old index still in place) or "after-swap" (the new index
    in place, the old one and the work folder not yet removed)."""
    code = (
        "import os, signal, sys\n"
        "import cir.atomic as A\n"
        "import cir.index as I\n"
        "swap = A.replace_dir\n"
        "def hooked(src, dst):\n"
        f"    if {hook!r} == 'after-swap':\n"
        "        swap(src, dst)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "A.replace_dir = hooked\n"
        "I.main(sys.argv[1:])\n")
    return subprocess.run([sys.executable, "-c", code, *cmd[3:]], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in folder.iterdir()}


def test_sigkill_during_index_build(gallery, tiny_checkpoint, tmp_path):
    out, partial = tmp_path / "idx", tmp_path / "idx.partial"
    reference = tmp_path / "reference"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed builds (OMP_NUM_THREADS=1): the same arithmetic, bit for bit
    try:
        build_index(reference, gallery, tiny_checkpoint, **SMALL)  # uninterrupted, for comparison
    finally:
        torch.set_num_threads(threads)
    first = tmp_path / "first.txt"
    first.write_text("\n".join(read_gallery(gallery)[:5]) + "\n")
    build_index(out, first, tiny_checkpoint, **SMALL)
    old = snapshot(out)

    # 1. killed mid-embedding (after its first chunk is on disk)
    proc = subprocess.Popen(build_cmd(tiny_checkpoint, gallery, out), cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: (partial / "chunk-000001.npz").exists(), proc, what="two chunks")
    kill(proc)
    assert proc.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    assert snapshot(out) == old
    GalleryIndex.load(out, checkpoint_path=tiny_checkpoint)

    # 2. killed with everything staged, just before the swap: the old index, still whole
    r = killed_at("before-swap", build_cmd(tiny_checkpoint, gallery, out, "--resume"))
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert snapshot(out) == old and (partial / "staged" / MANIFEST).is_file()
    GalleryIndex.load(out, checkpoint_path=tiny_checkpoint)

    # 3. killed just after the swap: the new index, whole; the next build clears the leftovers
    r = killed_at("after-swap", build_cmd(tiny_checkpoint, gallery, out, "--resume"))
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    new = GalleryIndex.load(out, checkpoint_path=tiny_checkpoint)
    want = GalleryIndex.load(reference)
    assert new.paths == want.paths and np.array_equal(new.embeddings, want.embeddings)
    assert new.manifest["skipped"] == want.manifest["skipped"] and len(want.manifest["skipped"]) == len(BAD_KINDS)

    r = subprocess.run(build_cmd(tiny_checkpoint, gallery, out), cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "skipped" in r.stderr and not partial.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.txt", "idx", "reference"]
    again = GalleryIndex.load(out, checkpoint_path=tiny_checkpoint)
    assert again.paths == want.paths and np.array_equal(again.embeddings, want.embeddings)


# ---------------------------------------------------------------------------- the app, during review
def test_sigkill_of_the_app_during_review(tiny_checkpoint, shapes_data, tmp_path):
    from gradio_client import Client

    src = tmp_path / "batch.jsonl"
    triplets = read_triplets(shapes_data / "test.jsonl")[0][:12]
    write_triplets(src, triplets)
    port = free_port()
    log_file = open(tmp_path / "app.log", "wb")
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--checkpoint", str(tiny_checkpoint), "--gallery",
                             str(shapes_data / "gallery_test.txt"), "--port", str(port), "--device", "cpu",
                             "--review-dir", str(tmp_path)], cwd=tmp_path, env=ENV, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/config", proc)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        fn = endpoints(client, {name: f"review-{name}:click" for name in ("open", "accept", "reject")})
        client.predict(str(src), fn_index=fn["open"])
        acknowledged = {}
        for i, t in enumerate(triplets[:7]):
            kind = ("accept", "reject", "edit")[i % 3]
            caption = t.caption if kind != "edit" else f"edited caption {i} ✓"
            client.predict(caption, f"note {i}", fn_index=fn["reject" if kind == "reject" else "accept"])
            acknowledged[t.id] = (kind, f"note {i}", caption)  # the server answered: it is on disk
        in_flight = client.submit(triplets[7].caption, "in flight", fn_index=fn["accept"])
        time.sleep(0.02)
    finally:
        kill(proc)
        log_file.close()
    assert proc.returncode == -signal.SIGKILL
    del in_flight, client

    decisions = review.open_store(review.store_path(src), review.log_path(src))  # what the restarted app reads
    assert set(decisions) - set(acknowledged) <= {triplets[7].id}
    for tid, (kind, note, caption) in acknowledged.items():
        d = decisions[tid]
        assert (d["decision"], d["note"]) == (kind, note)
        if kind == "edit":
            assert d["caption"] == caption
    assert review.first_undecided(triplets, decisions) in (7, 8)
