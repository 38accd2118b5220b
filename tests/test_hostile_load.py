"""Many users at once: 32 concurrent retrieve requests through gradio_client against the served
app (zero errors; p50/p95 latency printed and written to test-artifacts/load.json), hostile uploads
mixed into a burst of good ones, and review decisions appended concurrently by threads and
processes (every line whole)."""
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from cir.ui import app as ui
from cir.ui import review
from hostile_inputs import BAD_KINDS, one_line, served, write_images

ROOT = Path(__file__).resolve().parent.parent
REQUESTS = 32


def test_32_concurrent_retrieve_requests(ex, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    queries = [ex.examples[i % len(ex.examples)] for i in range(REQUESTS)]
    bad = write_images(tmp_path, BAD_KINDS[:8])
    with served(ex) as url:
        clients = [Client(url, verbose=False) for _ in range(8)]  # 8 users, 4 requests each in flight

        def one(i: int):
            t = queries[i]
            t0 = time.perf_counter()
            _, table, status = clients[i % len(clients)].predict(handle_file(t.reference), f"{t.caption} #{i}", 5,
                                                                 api_name="/retrieve")
            return time.perf_counter() - t0, table, status

        one(0)  # warm-up (first forward, caches)
        alone = float(np.median([one(i)[0] for i in range(4)]))  # one request at a time, for comparison
        t0 = time.perf_counter()
        with ThreadPoolExecutor(REQUESTS) as pool:
            futures = [pool.submit(one, i) for i in range(REQUESTS)]
            results, errors = [], []
            for f in futures:
                try:
                    results.append(f.result(timeout=300))
                except Exception as e:  # counted, not raised: the report says how many
                    errors.append(f"{type(e).__name__}: {e}")
        wall = time.perf_counter() - t0
        latencies = sorted(r[0] for r in results)
        report = {"requests": REQUESTS, "concurrent": REQUESTS, "clients": len(clients), "errors": len(errors),
                  "p50_s": round(float(np.percentile(latencies, 50)), 4) if latencies else None,
                  "p95_s": round(float(np.percentile(latencies, 95)), 4) if latencies else None,
                  "max_s": round(latencies[-1], 4) if latencies else None, "wall_s": round(wall, 4),
                  "single_request_s": round(alone, 4),
                  "gallery_images": len(ex.index), "device": "cpu", "concurrency_limit": 4}
        artifacts = ROOT / "test-artifacts"
        artifacts.mkdir(exist_ok=True)
        (artifacts / "load.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nload: {REQUESTS} concurrent /retrieve requests, {len(errors)} errors, p50 {report['p50_s']} s, "
              f"p95 {report['p95_s']} s, max {report['max_s']} s, wall {report['wall_s']} s (one request alone: {alone:.3f} s)")
        assert errors == []
        assert all(len(table["data"]) == 5 and "5 results" in status for _, table, status in results)

        # hostile uploads in the middle of a burst of good ones: they fail alone, with their reason
        def hostile(kind: str):
            with pytest.raises(AppError) as e:
                clients[0].predict(handle_file(str(bad[kind])), "make it red", 5, api_name="/retrieve")
            return str(e.value)

        with ThreadPoolExecutor(16) as pool:
            good = [pool.submit(one, i) for i in range(8)]
            evil = {k: pool.submit(hostile, k) for k in bad}
            assert all(len(f.result(timeout=300)[1]["data"]) == 5 for f in good)
            for kind, f in evil.items():
                message = f.result(timeout=300)
                assert one_line(message) and bad[kind].name in message, (kind, message)


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


def test_cached_result_images_are_never_seen_half_written(tmp_path):
    """Gradio caches every image a callback returns under a hash of its bytes; two requests returning
    the same thumbnail used to rewrite that file in place while a third was downloading it (a
    truncated response under load). cir.ui.app makes the write happen once, atomically."""
    import threading

    from gradio import processing_utils
    from PIL import Image

    assert processing_utils.save_pil_to_cache is ui._save_pil_to_cache_once
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    path = Path(processing_utils.save_pil_to_cache(image, str(tmp_path), format="png"))
    whole, stop, torn = path.read_bytes(), threading.Event(), []

    def writer():
        while not stop.is_set():
            processing_utils.save_pil_to_cache(image, str(tmp_path), format="png")

    def reader():
        for _ in range(1500):
            if path.read_bytes() != whole:
                torn.append(1)

    threads = [threading.Thread(target=writer) for _ in range(2)] + [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads[2:]:
        t.join()
    stop.set()
    for t in threads[:2]:
        t.join()
    assert torn == [] and sorted(p.name for p in path.parent.iterdir()) == ["image.png"]
