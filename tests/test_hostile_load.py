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


def test_concurrent_review_decisions_stay_whole(tmp_path):
    """Threads of one app and two other processes append to one review log at once: no line is lost
    or interleaved (each decision is one O_APPEND write)."""
    log = tmp_path / "x.review.jsonl"
    writer = ("import sys; from cir.ui import review\n"
              "for i in range(150):\n"
              "    review.append_decision(sys.argv[1], review.decision(f'{sys.argv[2]}-{i}', 'edit', 'n' * 500, "
              "caption='c' * 3000))\n")
    procs = [subprocess.Popen([sys.executable, "-c", writer, str(log), name], cwd=ROOT) for name in ("p", "q")]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: review.append_decision(log, review.decision(f"t-{i}", "accept", "✓" * 200)),
                      range(200)))
    for p in procs:
        assert p.wait(timeout=120) == 0
    lines = log.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 501
    decisions = review.read_decisions(log)
    assert len(decisions) == 500 and all(len(d.get("caption", "c" * 3000)) == 3000 for d in decisions.values())


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
