"""Security: weights load without pickle (safetensors; anything torch.load reads goes through
weights_only=True), the served app hands out no file outside Gradio's upload/cache folders (system
files, `../` tricks, URL encodings, the checkpoint, the app's source, server-side fetches), uploads
are size-limited, and app.py serves on loopback only with that limit."""
import ast
import http.client
import json
import os
import pickle
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch

from cir.checkpoint import load_checkpoint, save_checkpoint
from cir.errors import UserError
from cir.models.factory import build_model, config_from_dict, load_config
from cir.ui import limits, server
from cir.ui.edge import BodyCap
from hostile_inputs import one_line, rss_mb, served

ROOT = Path(__file__).resolve().parent.parent
TINY = load_config("context-cir-tiny").to_dict()


class Payload:
    """Unpickling this runs `touch MARKER`: the marker file exists only if pickle code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def evil(tmp_path):
    """(a malicious pickle file, the marker its code would create)."""
    marker = tmp_path / "code-ran"
    path = tmp_path / "weights.pt"
    path.write_bytes(pickle.dumps({"state_dict": Payload(marker)}, protocol=2))
    return path, marker


# ---------------------------------------------------------------------------- no pickle
def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = getattr(f.value, "id", "") if isinstance(f, ast.Attribute) else ""
            yield owner, name, {k.arg: k.value for k in node.keywords}


def test_no_code_path_unpickles():
    """Static: no pickle-family import; every torch.load passes weights_only=True; np.load never
    allow_pickle=True (cir/, app.py, scripts/)."""
    files = [*ROOT.joinpath("cir").rglob("*.py"), ROOT / "app.py", *ROOT.joinpath("scripts").glob("*.py")]
    problems = []
    for f in files:
        tree = ast.parse(f.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            problems += [f"{f}: imports {n}" for n in names if n.split(".")[0] in ("pickle", "dill", "joblib", "cloudpickle")]
        for owner, name, kw in _calls(tree):
            if owner == "torch" and name == "load":
                wo = kw.get("weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    problems.append(f"{f}: torch.load without weights_only=True")
            if name == "load" and owner in ("np", "numpy"):
                ap = kw.get("allow_pickle")
                if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                    problems.append(f"{f}: np.load with allow_pickle")
    assert problems == []


def test_open_clip_loads_local_weights_weights_only(evil, monkeypatch):
    """open_clip (cir.models' pretrained path) reads a local .pt/.bin with torch.load(weights_only=True)
    by default, and this torch defaults to weights_only too (open_clip's TypeError fallback calls
    torch.load without the argument; cir.models refuses such files before open_clip sees them)."""
    import inspect

    import open_clip.factory as factory
    for fn in (factory.create_model_and_transforms, factory.load_checkpoint, factory.load_state_dict):
        assert inspect.signature(fn).parameters["weights_only"].default is True
    assert "weights_only=weights_only" in inspect.getsource(factory.load_state_dict)
    payload, marker = evil
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(payload)
    assert not marker.exists()


def test_malicious_pickles_never_run(evil, tmp_path, monkeypatch, tiny_checkpoint):
    payload, marker = evil
    # 1. as a checkpoint (a pickle renamed .safetensors)
    fake = tmp_path / "model.safetensors"
    fake.write_bytes(payload.read_bytes())
    with pytest.raises(UserError) as e:
        load_checkpoint(fake)
    assert one_line(str(e.value)) and "safetensors" in str(e.value)
    # 2. as open_clip pretrained weights in a model config, even with torch's safety switched off by the environment
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    config = config_from_dict(dict(TINY, pretrained=str(payload)))
    with pytest.raises(UserError) as e:
        build_model(config)
    assert one_line(str(e.value)) and "weights_only=True" in str(e.value)
    # 3. named by a checkpoint's manifest: checkpoints never load pretrained weights
    torch.manual_seed(0)
    model, _ = build_model("context-cir-tiny")
    ckpt = tmp_path / "pointing.safetensors"
    save_checkpoint(ckpt, model, {"config": dict(TINY, pretrained=str(payload)), "step": 0})
    load_checkpoint(ckpt)
    assert not marker.exists()
    # plain tensors in a .pt still load (weights_only allows them)
    good = tmp_path / "ok.pt"
    torch.save({k: v for k, v in model.clip.state_dict().items()}, good)
    build_model(config_from_dict(dict(TINY, pretrained=str(good))))


# ---------------------------------------------------------------------------- the served app's files
def raw_get(url: str, path: str) -> tuple[int, bytes]:
    """GET `path` exactly as written (no client-side normalisation of `..` or escapes)."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def upload(url: str, name: str, data: bytes) -> tuple[int, bytes]:
    u = urllib.parse.urlsplit(url)
    boundary = "hostileboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    try:
        conn.request("POST", "/gradio_api/upload", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def test_no_file_outside_the_served_folders(ex, tiny_checkpoint):
    secret = Path("/etc/passwd").read_bytes()[:20]
    ckpt_head = tiny_checkpoint.read_bytes()[8:60]
    source = (ROOT / "cir" / "checkpoint.py").read_bytes()[:60]
    with served(ex) as url:
        port = urllib.parse.urlsplit(url).port
        status, body = upload(url, "probe.txt", b"hello from the test")
        assert status == 200, body
        cached = json.loads(body)[0]
        assert raw_get(url, "/gradio_api/file=" + cached) == (200, b"hello from the test")  # the route works
        q = urllib.parse.quote
        targets = [
            "/etc/passwd", "/proc/self/environ", "/proc/self/cmdline", str(tiny_checkpoint),
            str(ROOT / "cir" / "checkpoint.py"), str(ROOT / "app.py"), "../../../../../../../../etc/passwd",
            "app.py", "cir/checkpoint.py", cached + "/../../../../../../../etc/passwd",
            os.path.dirname(cached) + "/../../../../../../etc/passwd", "~/.bashrc", "file:///etc/passwd",
            f"http://127.0.0.1:{port}/config", f"http://localhost:{port}/gradio_api/info",
        ]
        paths = []
        for t in targets:
            paths += [f"/gradio_api/file={t}", f"/gradio_api/file={q(t, safe='')}",
                      f"/gradio_api/file={q(q(t, safe=''), safe='')}", f"/gradio_api/file/{t.lstrip('/')}", f"/file={t}"]
        paths += ["/static/../../../../etc/passwd", "/static/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
                  "/assets/../../../../../../etc/passwd", "/assets/%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
                  "/svelte/../../../../../etc/passwd", "/gradio_api/file=" + "%2e%2e%2f" * 12 + "etc%2fpasswd",
                  f"/gradio_api/proxy=http://127.0.0.1:{port}/config", "/gradio_api/proxy=file:///etc/passwd",
                  "/favicon.ico/../../../etc/passwd"]
        served_anything = []
        for p in paths:
            status, body = raw_get(url, p)
            leaked = any(s in body for s in (secret, ckpt_head, source))
            if status == 200 and (leaked or b"<html" not in body.lower()[:200]) or leaked:
                served_anything.append((p, status, body[:80]))
        assert served_anything == []


def test_uploads_are_size_limited(ex):
    limit = 25 * 1024 * 1024
    assert limits.MAX_FILE_SIZE == "25mb"
    with served(ex) as url:
        status, body = upload(url, "big.png", b"\0" * (limit + 1024))
        assert status == 413, (status, body[:200])
        status, body = upload(url, "fine.png", b"\0" * (1024 * 1024))
        assert status == 200


def api_call(url: str, data: list) -> tuple[str, str]:
    """POST `data` (image, caption, k, model: a raw body names every input) to the served /retrieve
    endpoint as a raw JSON body -> (SSE event kind, its data line)."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    try:
        conn.request("POST", "/gradio_api/call/retrieve", json.dumps({"data": data}), {"Content-Type": "application/json"})
        event = json.loads(conn.getresponse().read())["event_id"]
        conn.request("GET", f"/gradio_api/call/retrieve/{event}")
        lines = conn.getresponse().read().decode().splitlines()
    finally:
        conn.close()
    kinds = [line[len("event: "):] for line in lines if line.startswith("event: ")]
    datas = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    return kinds[-1], datas[-1]


def test_request_bodies_top_k_and_data_url_images(ex):
    """Through the HTTP API: k "abc", 2.7 or True fails with one message naming top k (Gradio's own
    check failed on "abc" with a hidden error and passed 2.7 and True on); a data: URL image larger
    than the upload limit inside a JSON body is refused like an upload, a small one is served."""
    import base64

    small = "data:image/png;base64," + base64.b64encode(Path(ex.examples[0].reference).read_bytes()).decode()
    image = lambda url: {"path": None, "url": url, "meta": {"_type": "gradio.FileData"}}
    with served(ex) as url:
        kind, data = api_call(url, [image(small), "make it red", 3, ex.name])
        assert kind == "complete" and "3 results" in data, data[:300]
        for k in ("abc", 2.7, True):
            kind, data = api_call(url, [image(small), "make it red", k, ex.name])
            assert kind == "error" and "top k must be a whole number" in data and one_line(data), (k, data)
        big = "data:image/png;base64," + "A" * (4 * limits.MAX_FILE_MB * 2 ** 20 // 3 + 1024)
        kind, data = api_call(url, [image(big), "make it red", 3, ex.name])
        assert kind == "error" and f"at most {limits.MAX_FILE_MB} MB" in data, data[:300]


def test_app_py_launches_on_loopback_with_the_upload_limit(tiny_checkpoint, shapes_data, monkeypatch):
    import importlib.util

    import gradio as gr

    seen = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: seen.update(kw))
    spec = importlib.util.spec_from_file_location("app_main", ROOT / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    assert app.main(["--checkpoint", str(tiny_checkpoint), "--gallery", str(shapes_data / "gallery_test.txt"),
                     "--device", "cpu"]) == 0
    assert seen["server_name"] == "127.0.0.1" and seen["max_file_size"] == limits.MAX_FILE_SIZE and not seen["share"]
    assert seen["state_session_capacity"] == limits.MAX_SESSIONS
    assert [m.cls for m in seen["app_kwargs"]["middleware"]] == [BodyCap]


def test_the_app_writes_nothing_into_the_source_tree(ex):
    """Building the app leaves the checkout alone (a gr.Image subclass would make Gradio write a .pyi
    stub beside its module on import)."""
    before = sorted(p for p in ROOT.joinpath("cir").rglob("*") if "__pycache__" not in p.parts)
    server.build_demo(ex)
    assert sorted(p for p in ROOT.joinpath("cir").rglob("*") if "__pycache__" not in p.parts) == before
    assert list(ROOT.joinpath("cir").rglob("*.pyi")) == []


def test_a_visitors_mistakes_leave_no_traceback_in_the_server_log(ex, capfd):
    """An empty caption, a k that is no number, an unreadable image: each is one line for the
    visitor and nothing of a traceback in the server's output."""
    import base64

    as_input = lambda data: {"path": None, "url": "data:image/png;base64," + base64.b64encode(data).decode(),
                             "meta": {"_type": "gradio.FileData"}}
    scene, broken = as_input(Path(ex.examples[0].reference).read_bytes()), as_input(b"not an image")
    with served(ex) as url:
        capfd.readouterr()
        for query, caption, k, message in ((scene, "   ", 3, "type a modification"), (scene, "make it red", "abc", "top k"),
                                           (broken, "make it red", 3, "cannot read image")):
            kind, answer = api_call(url, [query, caption, k, ex.name])
            assert kind == "error" and message in answer and one_line(answer), answer[:300]
        log = capfd.readouterr()
    assert "Traceback" not in log.err + log.out


def post_large(url: str, path: str, size: int, session: str, chunked: bool = False) -> tuple[int, bytes]:
    """POST a `size`-byte JSON-ish body to `path` (with Content-Length, or chunked without one),
    writing until the server stops reading -> (status, response body)."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    block = b"x" * 2 ** 20
    try:
        conn.putrequest("POST", f"{path}?session_hash={session}")
        conn.putheader("Content-Type", "application/json")
        conn.putheader(*(("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(size))))
        conn.endheaders()
        try:
            for _ in range(size // len(block)):
                conn.send(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
            if chunked:
                conn.send(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before the whole body was read
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_large_request_bodies_are_refused_at_the_edge_in_one_line(ex):
    """Twenty 100 MB bodies under fresh session hashes (with and without a Content-Length): each a
    one-line 413 before Gradio stores anything; the server grows by at most 100 MB and keeps answering
    GET /config within a second."""
    import time
    import uuid
    with served(ex) as url:
        assert urllib.request.urlopen(url + "config", timeout=5).status == 200
        before = rss_mb()
        for i in range(20):
            status, body = post_large(url, "/gradio_api/queue/join", 100 * 2 ** 20, uuid.uuid4().hex, chunked=i % 2 == 1)
            assert status == 413 and one_line(body.decode()) and b"over the limit" in body, (status, body[:200])
            t0 = time.perf_counter()
            assert urllib.request.urlopen(url + "config", timeout=5).status == 200
            assert time.perf_counter() - t0 < 1.0
        assert rss_mb() - before <= 100
        kind, data = api_call(url, [None, "make it red", 3, ex.name])  # ordinary requests still pass
        assert kind == "error" and "image" in data
