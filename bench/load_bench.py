"""Load: many users retrieving at once from the served app, as the issue measured it.

    python -m bench.load_bench [--clients 40] [--per-client 5] [--out test-artifacts/load.json]
                               [--examples FILE] [-- app.py arguments]

Starts `python app.py` (the shipped model and demo gallery unless app.py arguments say otherwise)
on a free loopback port, warms it up, then runs CLIENTS gradio_client clients at once, each making
PER_CLIENT /retrieve calls in a row (an example's reference image uploaded with its caption, then
the result thumbnails its page does not hold yet read, as a browser reads them: a data: URL in
place, a file URL fetched whole; gradio_client's own download fetches every file again through a
new HTTP client each, which costs the client more than the server), while the app's resident memory
(RSS) is sampled every 0.1 s. Writes the figures to --out: errors, retrieve
latency p50/p95/max, wall time, throughput, the CPU time the app and the clients used, RSS at the
start, its peak, and after the run has settled, and `cpu_probe_s`, the time of a fixed Python
workload taken just before (to compare runs made while the CPU's speed differs).
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cir.atomic import write_json
from cir.data.triplets import read_triplets

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_EXAMPLES = ROOT / "assets" / "demo" / "examples.jsonl"
PNG, PNG_END = b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"
SETTLE_S = 5.0  # after the run, how long RSS is watched before its end value is taken


def rss_mb(pid: int) -> float:
    """Resident memory of process `pid` in MB (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class RssSampler(threading.Thread):
    """Samples `rss_mb(pid)` every `every` seconds until stopped; `.peak` is the largest."""

    def __init__(self, pid: int, every: float = 0.1):
        super().__init__(daemon=True)
        self.pid, self.every, self.peak = pid, every, rss_mb(pid)
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.every):
            self.peak = max(self.peak, rss_mb(self.pid))

    def stop(self) -> float:
        self._done.set()
        self.join()
        return self.peak


def cpu_s(pid: int) -> float:
    """CPU time (user + system) process `pid` has used, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_probe_s(rounds: int = 3) -> float:
    """Seconds one core takes for a fixed pure-Python workload (best of `rounds`): the app's work is
    mostly Python under one lock, so runs on a CPU whose speed varies compare through this figure."""
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        sum(i * i for i in range(2_000_000))
        times.append(time.perf_counter() - t0)
    return min(times)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServedApp:
    """`with ServedApp(app_args) as (url, pid):` `python app.py` on a free loopback port, stopped on exit."""

    def __init__(self, app_args: list[str] = (), timeout: float = 180.0):
        self.app_args, self.timeout = list(app_args), timeout

    def __enter__(self) -> tuple[str, int]:
        port = free_port()
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--host", "127.0.0.1", "--port", str(port),
                                      *self.app_args], cwd=ROOT, stdout=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}/"
        deadline = time.time() + self.timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app.py exited with {self.proc.returncode} before answering")
            try:
                with urllib.request.urlopen(url, timeout=2):
                    return url, self.proc.pid
            except OSError:
                if time.time() > deadline:
                    self.__exit__()
                    raise RuntimeError(f"app.py did not answer at {url} within {self.timeout:.0f} s") from None
                time.sleep(0.3)

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def measure(url: str, pid: int, queries: list[tuple[str, str]], clients: int = 40, per_client: int = 5,
            k: int = 5) -> dict:
    """`clients` concurrent gradio_client clients x `per_client` /retrieve calls over `queries`
    [(image path, caption)] against the app at `url` (process `pid`) -> the figures."""
    from gradio_client import Client, handle_file

    # gradio_client opens a new httpx client per call, each loading the CA bundle (~25 ms CPU, 2/3 of
    # the client's work) unless certificates are not checked; the app is plain HTTP on loopback, so
    # no certificate is ever checked, and the clients leave the shared CPUs to the app
    users = [Client(url, verbose=False, download_files=False, ssl_verify=False) for _ in range(clients)]
    shown: list[set[str]] = [set() for _ in range(clients)]  # image URLs each user's page holds already

    def call(u: int, i: int) -> float:
        """One retrieve as a browser page makes it: the upload, the event, then each result image it
        does not hold yet read whole (urllib reads a data: URL in place)."""
        image, caption = queries[i % len(queries)]
        t0 = time.perf_counter()
        gallery, table, status = users[u].predict(handle_file(image), f"{caption} #{i}", k, api_name="/retrieve")
        if len(table["data"]) != k or f"{k} results" not in status:
            raise AssertionError(f"unexpected answer: {status!r}")
        for url_ in {item["image"]["url"] for item in gallery} - shown[u]:
            with urllib.request.urlopen(url_, timeout=60) as r:
                data = r.read()
            if not (data.startswith(PNG) and data.endswith(PNG_END)):
                raise AssertionError(f"result image {url_[:80]} is not a whole PNG ({len(data)} bytes)")
            shown[u].add(url_)
        return time.perf_counter() - t0

    probe = cpu_probe_s()
    for i in range(4):  # warm-up: first forwards, thumbnails of the first results
        call(0, i)
    time.sleep(1.0)
    rss_start = rss_mb(pid)
    sampler = RssSampler(pid)
    sampler.start()
    latencies, errors = [], []
    lock = threading.Lock()

    def user_session(u: int) -> None:
        for j in range(per_client):
            try:
                took = call(u, u * per_client + j)
                with lock:
                    latencies.append(took)
            except Exception as e:  # counted, not raised: the figures say how many and why
                with lock:
                    errors.append(f"{type(e).__name__}: {' '.join(str(e).split())[:200]}")

    t0, server_cpu, client_cpu = time.perf_counter(), cpu_s(pid), cpu_s(os.getpid())
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(user_session, range(clients)))
    wall = time.perf_counter() - t0
    server_cpu, client_cpu = cpu_s(pid) - server_cpu, cpu_s(os.getpid()) - client_cpu
    time.sleep(SETTLE_S)
    rss_peak, rss_end = sampler.stop(), rss_mb(pid)
    lat = np.asarray(sorted(latencies)) if latencies else np.asarray([np.nan])
    return {"clients": clients, "retrieves_per_client": per_client, "requests": clients * per_client,
            "errors": len(errors), "error_examples": sorted(set(errors))[:5],
            "p50_s": round(float(np.percentile(lat, 50)), 3), "p95_s": round(float(np.percentile(lat, 95)), 3),
            "max_s": round(float(lat[-1]), 3), "wall_s": round(wall, 2),
            "requests_per_s": round(len(latencies) / wall, 2),
            "server_cpu_s": round(server_cpu, 1), "client_cpu_s": round(client_cpu, 1),
            "rss_start_mb": round(rss_start, 1), "rss_peak_mb": round(rss_peak, 1), "rss_end_mb": round(rss_end, 1),
            "rss_growth_mb": round(rss_peak - rss_start, 1), "rss_after_mb": round(rss_end - rss_start, 1),
            "cpus": os.cpu_count(), "cpu_probe_s": round(probe, 3)}


def example_queries(examples: str | os.PathLike) -> list[tuple[str, str]]:
    return [(t.reference, t.caption) for t in read_triplets(examples)[0]]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    app_args = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--clients", type=int, default=40)
    p.add_argument("--per-client", type=int, default=5)
    p.add_argument("--examples", default=str(DEFAULT_EXAMPLES), help="triplet JSONL whose queries are sent")
    p.add_argument("--out", default=str(ROOT / "test-artifacts" / "load.json"))
    a = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    queries = example_queries(a.examples)
    with ServedApp(app_args) as (url, pid):
        report = measure(url, pid, queries, a.clients, a.per_client)
    report["app_args"] = app_args
    write_json(a.out, report)
    print(" ".join(f"{k}={v}" for k, v in report.items() if k != "error_examples"))
    return 0 if report["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
