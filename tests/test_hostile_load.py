"""Many users at once: concurrent retrieves through gradio_client against `python app.py` (no
errors, p95 and memory bounded; the full 40 x 5 run is `python -m bench.load_bench`), hostile
uploads mixed into a burst of good ones, concurrent queries batched with unchanged results,
thumbnails as static files made once (small ones inside the answer), queue settings, each upload
decoded once within the pixel budget, and review decisions saved concurrently by threads and
processes."""
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from bench import load_bench
from cir.ui import components, review, server
from hostile_inputs import BAD_KINDS, one_line, png_declaring, served, write_images

ROOT = Path(__file__).resolve().parent.parent


def test_concurrent_retrieves_through_the_served_app(tiny_checkpoint, shapes_data):
    """`python app.py` served, 16 gradio_client users at once making 2 retrieves each (upload, event,
    result thumbnails fetched): no errors, p95 within 5 s, the app's memory flat. The full 40 x 5 run
    on the shipped model is `python -m bench.load_bench` (test-artifacts/load.json)."""
    examples = shapes_data / "test.jsonl"
    app_args = ["--checkpoint", str(tiny_checkpoint), "--gallery", str(shapes_data / "gallery_test.txt"),
                "--examples", str(examples)]
    with load_bench.ServedApp(app_args) as (url, pid):
        report = load_bench.measure(url, pid, load_bench.example_queries(examples), clients=16, per_client=2)
    print(f"\nload: {report['requests']} retrieves by {report['clients']} users, {report['errors']} errors, "
          f"p50 {report['p50_s']} s, p95 {report['p95_s']} s, RSS {report['rss_start_mb']} -> peak "
          f"{report['rss_peak_mb']} -> {report['rss_end_mb']} MB")
    assert report["errors"] == 0, report["error_examples"]
    assert report["p95_s"] <= 5.0
    assert report["rss_growth_mb"] <= 200 and abs(report["rss_after_mb"]) <= 100
    assert 0.01 < report["cpu_probe_s"] < 10


def test_hostile_uploads_in_a_burst_fail_alone(ex, tmp_path):
    """Bad uploads in the middle of a burst of good retrieves: each fails with its own one-line
    reason, every good one gets its results (a failed query never fails its batch)."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    bad = write_images(tmp_path, BAD_KINDS[:8])
    with served(ex) as url:
        clients = [Client(url, verbose=False, download_files=False) for _ in range(8)]

        def good(i: int):
            t = ex.examples[i % len(ex.examples)]
            return clients[i % len(clients)].predict(handle_file(t.reference), f"{t.caption} #{i}", 5,
                                                     api_name="/retrieve")

        def hostile(kind: str):
            with pytest.raises(AppError) as e:
                Client(url, verbose=False).predict(handle_file(str(bad[kind])), "make it red", 5, api_name="/retrieve")
            return str(e.value)

        with ThreadPoolExecutor(16) as pool:
            goods = [pool.submit(good, i) for i in range(8)]
            evil = {k: pool.submit(hostile, k) for k in bad}
            assert all(len(f.result(timeout=300)[1]["data"]) == 5 for f in goods)
            for kind, f in evil.items():
                message = f.result(timeout=300)
                assert one_line(message) and bad[kind].name in message, (kind, message)


def test_concurrent_queries_share_forwards_with_the_same_results(ex):
    """Queries arriving together are encoded in one batch, and give the rankings and scores each
    gives alone (to float rounding: a batched matrix product may round differently)."""
    queries = [(t.reference, f"{t.caption} {'again ' * (i % 3)}") for i, t in enumerate(ex.examples[:8])]
    alone = [ex.retrieve(image, caption, 10) for image, caption in queries]
    before = ex.batcher.batch_sizes.copy()
    with ThreadPoolExecutor(len(queries)) as pool:
        with ex.lock:  # the model busy: the queries queue up, then go through in one forward
            futures = [pool.submit(ex.retrieve, image, caption, 10) for image, caption in queries]
            while len(ex.batcher._queue) < len(queries):
                time.sleep(0.01)
        together = [f.result(timeout=120) for f in futures]
    assert ex.batcher.batch_sizes - before == {len(queries): 1}
    for a, b in zip(alone, together):  # equal up to float rounding: only scores within 1e-5 may swap places
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], rtol=0, atol=1e-5)
        scores = {h.path: h.score for h in a}
        assert all(abs(scores[h.path] - h.score) <= 1e-5 for h in b if h.path in scores)
        assert all(x.path == y.path or abs(x.score - y.score) <= 1e-5 for x, y in zip(a, b))


def test_thumbnails_are_static_files_made_once(ex, monkeypatch):
    """Gallery and result thumbnails are PNG files made once: a retrieve encodes no image, and
    Gradio's own cache writer is not replaced. A small one travels inside the answer as a data: URL
    holding the file's bytes, with no file marker for Gradio to rewrite."""
    from gradio import processing_utils
    from gradio_client import Client, handle_file
    from PIL import Image

    from cir.ui.thumbnails import INLINE_BYTES, thumbnail

    assert processing_utils.save_pil_to_cache.__module__ == "gradio.processing_utils"
    encoded = []
    monkeypatch.setattr(processing_utils, "save_pil_to_cache", lambda *a, **k: encoded.append(1))
    t = ex.examples[0]
    with served(ex) as url:
        client = Client(url, verbose=False, download_files=False)
        first = client.predict(handle_file(t.reference), t.caption, 5, api_name="/retrieve")[0]
        files = [Path(item["image"]["path"]) for item in first]
        made = [f.stat().st_ino for f in files]  # a file made again is a new one (written and renamed)
        again = client.predict(handle_file(t.reference), t.caption, 5, api_name="/retrieve")[0]
        assert [Path(item["image"]["path"]) for item in again] == files
        assert [f.stat().st_ino for f in files] == made
        for item, f in zip(first, files):
            assert f.parent == thumbnail.folder and max(Image.open(f).size) <= 256
            assert f.stat().st_size <= INLINE_BYTES and "meta" not in item["image"]
            assert item["image"]["url"].startswith("data:image/png;base64,")
            with urllib.request.urlopen(item["image"]["url"]) as r:
                assert r.read() == f.read_bytes()
    assert encoded == []


def test_a_large_thumbnail_is_served_as_a_file(tmp_path):
    """A thumbnail over INLINE_BYTES is not inlined: its gallery item is a file Gradio serves from
    the thumbnail folder (a static path), and `data_url` reads no more than the limit allows."""
    from PIL import Image

    from cir.ui.thumbnails import INLINE_BYTES, thumbnail

    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), np.uint8)).save(noise)
    small = tmp_path / "flat.png"
    Image.new("RGB", (200, 200), (30, 90, 200)).save(small)
    big_thumb, small_thumb = thumbnail(noise), thumbnail(small)
    assert Path(big_thumb).stat().st_size > INLINE_BYTES >= Path(small_thumb).stat().st_size
    assert thumbnail.data_url(big_thumb) is None
    assert thumbnail.data_url(big_thumb, limit=10 ** 6).startswith("data:image/png;base64,")
    big, flat = components.gallery_value([(big_thumb, "#1"), (small_thumb, "#2")])
    assert big == {"image": {"path": big_thumb, "url": None, "size": None, "orig_name": Path(big_thumb).name,
                             "mime_type": "image/png", "is_stream": False, "meta": {"_type": "gradio.FileData"}},
                   "caption": "#1"}
    assert flat["caption"] == "#2" and "meta" not in flat["image"] and flat["image"]["path"] == small_thumb


def test_the_queue_sends_positions_once_a_second_and_keeps_few_records(ex):
    """The served queue tells waiting visitors their position every STATUS_UPDATE_S (not every
    waiting event each time one starts) and keeps and summarises limits.GRADIO_ANALYTICS events."""
    from cir.ui import limits

    queue = server.build_demo(ex)._queue
    assert queue.live_updates is False and queue.update_intervals == server.STATUS_UPDATE_S == 1.0
    assert queue.ANALYTICS_MAX_EVENTS == limits.GRADIO_ANALYTICS["GRADIO_ANALYTICS_MAX_EVENTS"] == 1000
    assert queue.ANAYLTICS_CACHE_FREQUENCY == limits.GRADIO_ANALYTICS["GRADIO_ANALYTICS_CACHE_FREQUENCY"]


def test_an_upload_is_decoded_once_within_the_pixel_budget(ex, tmp_path, monkeypatch):
    """A retrieve decodes its uploaded image once (the check, the encoding and the domain notice
    share it); an image over limits.MAX_REQUEST_PIXELS is refused from its header, undecoded."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError
    from PIL import Image

    from cir.ui import decoded, limits

    decodes = []
    real = decoded.load_rgb
    monkeypatch.setattr(decoded, "load_rgb", lambda path, name=None: decodes.append(path) or real(path, name))
    upload = tmp_path / "fresh.png"
    Image.open(ex.examples[1].reference).rotate(90).save(upload)
    big = tmp_path / "big.png"
    big.write_bytes(png_declaring(5000, 5000))  # 25 MP declared
    assert 5000 * 5000 > limits.MAX_REQUEST_PIXELS
    with served(ex) as url:
        client = Client(url, verbose=False, download_files=False)
        _, table, status = client.predict(handle_file(str(upload)), "make the circle red", 5, api_name="/retrieve")
        assert len(table["data"]) == 5 and "5 results" in status
        assert len(decodes) == 1 and Path(decodes[0]).name == "fresh.png"
        with pytest.raises(AppError) as e:
            client.predict(handle_file(str(big)), "make it red", 5, api_name="/retrieve")
    assert one_line(str(e.value)) and "big.png" in str(e.value) and f"{limits.MAX_REQUEST_PIXELS:,}" in str(e.value)
    assert len(decodes) == 1


def test_drawn_pictures_are_written_once():
    """The maps the app draws are PNG files written once under a hash of their pixels."""
    from PIL import Image

    image = components.image_output(format="png")
    pixels = np.random.default_rng(0).integers(0, 255, (40, 60, 3), np.uint8)
    path = Path(image.postprocess(pixels).path)
    made = path.stat().st_mtime_ns
    assert Path(image.postprocess(pixels.copy()).path) == path and path.stat().st_mtime_ns == made
    assert np.array_equal(np.asarray(Image.open(path)), pixels)
    assert Path(image.postprocess(pixels[::-1]).path) != path


def test_concurrent_review_decisions_are_all_kept(tmp_path):
    """Three OS processes (three annotators deciding the same items) and eight threads of this one
    save to one review store at the same moment: every decision is kept whole, under its name."""
    store = tmp_path / "x.review.sqlite"
    start = time.time() + 3  # all writers begin together, on a store none has created yet
    writer = ("import sys, time; from cir.ui import review\n"
              "name, start = sys.argv[2], float(sys.argv[3])\n"
              "time.sleep(max(0.0, start - time.time()))\n"
              "for i in range(150):\n"
              "    kind = 'reject' if name == 'carol' and i % 3 == 0 else 'edit'\n"
              "    review.append_decision(sys.argv[1], review.decision(f'item-{i}', kind, name + ' ✓' * 250, "
              "caption=f'{name} caption {i} ' + 'c' * 3000, annotator=name))\n")
    names = ("ada", "bob", "carol")
    procs = [subprocess.Popen([sys.executable, "-c", writer, str(store), name, str(start)], cwd=ROOT) for name in names]
    time.sleep(max(0.0, start - time.time()))
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: review.append_decision(store, review.decision(f"t-{i}", "accept", "✓" * 200)),
                      range(200)))
    for p in procs:
        assert p.wait(timeout=300) == 0
    assert len(review.read_records(store)) == 3 * 150 + 200
    for name in names:
        mine = review.read_decisions(store, name)
        assert sorted(mine) == sorted(f"item-{i}" for i in range(150))
        assert all(d["annotator"] == name and d["note"] == name + " ✓" * 250 for d in mine.values())
        assert all(d["decision"] == "reject" or d["caption"] == f"{name} caption {i} " + "c" * 3000
                   for i, d in ((int(k.split("-")[1]), d) for k, d in mine.items()))
    assert set(review.read_decisions(store, "")) == {f"t-{i}" for i in range(200)}
    # four annotators; the 150 items decided by three of them agree except where carol rejects
    assert review.agreement(store) == (4, 150, pytest.approx(100 / 150))


def test_writers_that_create_a_store_together_all_save(tmp_path):
    """Four threads save the first decisions of a store none has created yet, released together by a
    barrier, 40 times over: every save lands (switching a new file to WAL mode at the same moment
    used to fail at once with "database is locked")."""
    for round_no in range(40):
        store = tmp_path / f"r{round_no}.review.sqlite"
        barrier = threading.Barrier(4)

        def save(i: int) -> None:
            barrier.wait()
            review.append_decision(store, review.decision(f"t-{i}", "accept", annotator=f"a{i}"))

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(save, range(4)))
        assert {r["annotator"] for r in review.read_records(store)} == {"a0", "a1", "a2", "a3"}
