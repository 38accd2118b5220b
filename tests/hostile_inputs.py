"""Generators of hostile inputs shared by the tests/test_hostile_*.py family.

Images: `IMAGE_KINDS` maps a name to (maker, expectation). A maker writes one file into a folder
and returns its path; the expectation is either a check of the loaded RGB image (the kind must be
handled) or None (the kind must be rejected with a one-line reason).

Captions: `HOSTILE_CAPTIONS` maps a name to a caption string.
"""
from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path
from functools import lru_cache
from typing import Callable

import numpy as np
from PIL import Image

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


# ---------------------------------------------------------------------------- helpers
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_declaring(width: int, height: int, extra_chunks: bytes = b"", complete: bool = False) -> bytes:
    """A small PNG file whose header declares `width` x `height` 1-bit grey pixels (a decompression
    bomb when large). `complete`: the pixel stream is all there (zeros compress ~1000:1), so the file
    decodes; otherwise it holds 1 KB of it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * ((1 + -(-width // 8)) * height if complete else 1024), 9)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + extra_chunks + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def halves(size=(40, 20), left=RED, right=BLUE, mode="RGB") -> Image.Image:
    """An image whose left half is `left` and right half `right`."""
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2], arr[:, w // 2:] = left, right
    return Image.fromarray(arr).convert(mode)


def encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def mean_rgb(image: Image.Image, box=None) -> np.ndarray:
    arr = np.asarray(image.crop(box) if box else image, dtype=np.float64)
    return arr.reshape(-1, 3).mean(0)


def close(rgb, want, tol=40.0) -> bool:
    return bool(np.abs(np.asarray(rgb, float) - np.asarray(want, float)).max() <= tol)


# ---------------------------------------------------------------------------- makers
def _write(name: str, data: Callable[[], bytes]) -> Callable[[Path], Path]:
    """A maker writing `data()` (computed once, on first use) to `folder`/`name`."""
    data = lru_cache(maxsize=1)(data)

    def make(folder: Path) -> Path:
        path = Path(folder) / name
        path.write_bytes(data())
        return path
    return make


def _rgba() -> bytes:
    arr = np.zeros((20, 40, 4), np.uint8)
    arr[:, :20] = (255, 0, 0, 255)  # opaque red
    arr[:, 20:] = (0, 0, 0, 0)  # fully transparent black: must not come out black
    return encoded(Image.fromarray(arr, "RGBA"), "PNG")


def _palette(transparent: bool) -> bytes:
    im = halves().convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    if not transparent:
        return encoded(im, "PNG")
    right = im.getpixel((30, 10))
    return encoded(im, "PNG", transparency=right)  # the blue half becomes transparent


def _grey() -> bytes:
    return encoded(halves(left=(200, 200, 200), right=(30, 30, 30)).convert("L"), "PNG")


def _grey_alpha() -> bytes:
    im = Image.new("LA", (40, 20), (0, 0))
    im.paste((200, 255), (0, 0, 20, 20))
    return encoded(im, "PNG")


def _bilevel() -> bytes:
    return encoded(halves(left=WHITE, right=(0, 0, 0)).convert("1"), "PNG")


def _cmyk_jpeg() -> bytes:
    return encoded(halves().convert("CMYK"), "JPEG", quality=95)


def _i16_png() -> bytes:
    arr = np.zeros((20, 40), np.uint16)
    arr[:, :20], arr[:, 20:] = 65535, 16384  # white | a quarter grey (64 of 255)
    return encoded(Image.fromarray(arr), "PNG")


def _exif_jpeg(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(halves(size=(80, 40)), "JPEG", quality=95, exif=exif)


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (20, 20), c) for c in (RED, BLUE, (0, 255, 0))]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def _jpeg() -> bytes:
    rng = np.random.default_rng(0)  # noise: a JPEG stream long enough to cut in half
    return encoded(Image.fromarray(rng.integers(0, 255, (96, 96, 3), np.uint8)), "JPEG", quality=90)


def _png() -> bytes:
    rng = np.random.default_rng(1)
    return encoded(Image.fromarray(rng.integers(0, 255, (96, 96, 3), np.uint8)), "PNG")


def _corrupt_png() -> bytes:
    data = bytearray(_png())
    start = data.index(b"IDAT") + 4
    for i in range(start + 50, start + 400):
        data[i] ^= 0x5A  # the compressed pixels are scrambled (and the chunk CRC no longer matches)
    return bytes(data)


def _jpeg_bomb() -> bytes:
    """A real small JPEG whose frame header (SOF0) is patched to declare 60000 x 60000 pixels."""
    data = bytearray(encoded(Image.new("RGB", (16, 16), RED), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", 60000, 60000)
    return bytes(data)


def _ztxt_bomb() -> bytes:
    """A PNG with a compressed text chunk that inflates to 64 MB."""
    text = _png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"A" * (64 << 20), 9))
    return png_declaring(8, 8, extra_chunks=text)


def _rgb_check(left=RED, right=BLUE, size=(40, 20)):
    def check(im: Image.Image) -> None:
        assert im.mode == "RGB" and im.size == size, (im.mode, im.size)
        w, h = size
        if w < 8:
            assert close(mean_rgb(im), left), mean_rgb(im)
            return
        assert close(mean_rgb(im, (0, 0, w // 2 - 2, h)), left), mean_rgb(im, (0, 0, w // 2 - 2, h))
        assert close(mean_rgb(im, (w // 2 + 2, 0, w, h)), right), mean_rgb(im, (w // 2 + 2, 0, w, h))
    return check


def _check_exif(orientation: int):
    """Orientation 6 shows the stored image turned 90 degrees clockwise (left half on top), 8 counter-
    clockwise (left half at the bottom), 3 upside down (left half on the right)."""
    def check(im: Image.Image) -> None:
        assert im.mode == "RGB"
        if orientation == 3:
            assert im.size == (80, 40)
            assert close(mean_rgb(im, (0, 0, 36, 40)), BLUE) and close(mean_rgb(im, (44, 0, 80, 40)), RED)
            return
        assert im.size == (40, 80), im.size
        top, bottom = mean_rgb(im, (0, 0, 40, 36)), mean_rgb(im, (0, 44, 40, 80))
        want = (RED, BLUE) if orientation == 6 else (BLUE, RED)
        assert close(top, want[0]) and close(bottom, want[1]), (top, bottom)
    return check


def _check_first_frame(im: Image.Image) -> None:
    assert im.mode == "RGB" and im.size == (20, 20) and close(mean_rgb(im), RED, 10), mean_rgb(im)


def _check_i16(im: Image.Image) -> None:
    _rgb_check(WHITE, (64, 64, 64), (40, 20))(im)  # 16-bit values scaled to 8 bits, not clipped to white


def _check_grey_alpha(im: Image.Image) -> None:
    _rgb_check((200, 200, 200), WHITE)(im)


IMAGE_KINDS: dict[str, tuple[Callable[[Path], Path], Callable[[Image.Image], None] | None]] = {
    # handled: loaded as the RGB image a viewer would show
    "rgb-jpeg": (_write("plain.jpg", lambda: encoded(halves(), "JPEG", quality=95)), _rgb_check()),
    "rgba-transparent": (_write("rgba.png", _rgba), _rgb_check(RED, WHITE)),
    "palette": (_write("palette.png", lambda: _palette(False)), _rgb_check()),
    "palette-transparent": (_write("palette-t.png", lambda: _palette(True)), _rgb_check(RED, WHITE)),
    "grayscale": (_write("grey.png", _grey), _rgb_check((200, 200, 200), (30, 30, 30))),
    "grayscale-alpha": (_write("grey-alpha.png", _grey_alpha), _check_grey_alpha),
    "bilevel": (_write("bilevel.png", _bilevel), _rgb_check(WHITE, (0, 0, 0))),
    "cmyk-jpeg": (_write("cmyk.jpg", _cmyk_jpeg), _rgb_check()),
    "16-bit-grey": (_write("deep.png", _i16_png), _check_i16),
    "exif-rotated-90cw": (_write("exif6.jpg", lambda: _exif_jpeg(6)), _check_exif(6)),
    "exif-rotated-90ccw": (_write("exif8.jpg", lambda: _exif_jpeg(8)), _check_exif(8)),
    "exif-rotated-180": (_write("exif3.jpg", lambda: _exif_jpeg(3)), _check_exif(3)),
    "animated-gif": (_write("anim.gif", _animated_gif), _check_first_frame),
    "webp": (_write("plain.webp", lambda: encoded(halves(), "WEBP", lossless=True)), _rgb_check()),
    "tiff": (_write("plain.tiff", lambda: encoded(halves(), "TIFF")), _rgb_check()),
    "one-pixel": (_write("dot.png", lambda: encoded(Image.new("RGB", (1, 1), RED), "PNG")), _rgb_check(RED, RED, (1, 1))),
    # rejected with a one-line reason
    "zero-bytes": (_write("empty.png", lambda: b""), None),
    "text-as-png": (_write("notes.png", lambda: b"these are not pixels\n" * 20), None),
    "html-as-jpg": (_write("page.jpg", lambda: b"<!doctype html><html><body><script>alert(1)</script></body></html>"), None),
    "corrupt-png": (_write("corrupt.png", _corrupt_png), None),
    "truncated-png": (_write("cut.png", lambda: _png()[:2000]), None),
    "truncated-jpeg": (_write("cut.jpg", lambda: _jpeg()[:2000]), None),
    "bomb-png-60000x60000": (_write("bomb.png", lambda: png_declaring(60000, 60000)), None),
    "bomb-png-9000x9000": (_write("bomb-mild.png", lambda: png_declaring(9000, 9000, complete=True)), None),  # under PIL's own hard limit
    "bomb-jpeg-60000x60000": (_write("bomb.jpg", _jpeg_bomb), None),
    "bomb-png-ztxt": (_write("ztxt.png", _ztxt_bomb), None),
    "extreme-aspect-20000x1": (_write("sliver.png", lambda: encoded(Image.new("RGB", (20000, 1), RED), "PNG")), None),
}
GOOD_KINDS = [k for k, (_, check) in IMAGE_KINDS.items() if check is not None]
BAD_KINDS = [k for k, (_, check) in IMAGE_KINDS.items() if check is None]


def write_images(folder: Path, kinds=None) -> dict[str, Path]:
    """Write one file per kind into `folder` -> {kind: path}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return {k: IMAGE_KINDS[k][0](folder) for k in (kinds or IMAGE_KINDS)}


def one_line(message: str) -> bool:
    return bool(message.strip()) and "\n" not in message.strip() and "Traceback" not in message


# ---------------------------------------------------------------------------- captions
MANY_PHRASES = ("move the red circle from the top left to the bottom right, make the blue square in the center "
                "large, add a green star at the bottom, recolor the yellow triangle on the left purple, remove the "
                "orange diamond on the right, put a small pentagon near the big hexagon and change the background "
                "to a pale pink with a thin border around the whole picture")

HOSTILE_CAPTIONS: dict[str, str] = {
    "empty": "",
    "whitespace": " \t\n \u00a0\u2003 ",
    "10k-characters": ("make the red circle blue and " * 400)[:10_000],
    "emoji": "make the 🔴 circle 🔵 and add 👨‍👩‍👧 next to the ⭐ 🏳️‍🌈",
    "right-to-left": "اجعل الدائرة الحمراء زرقاء ‏and‏ הפוך את הריבוע לגדול",
    "control-chars": "make\x00 the\x07 red\x1b[31m circle\x7f \u200b\u200e\u202e blue\r\n\x0c",
    "no-noun-phrase": "quickly!!! ... ???",
    "more-than-10-phrases": MANY_PHRASES,
    "combining-marks": "ma\u0301ke the cafe\u0301 sign Z\u0336\u0321\u0358a\u0337lgo red",
    "html-entities": "make the &amp; &lt;circle&gt; &#128308; red &notanentity;",
    "mixed-scripts": "把红色圆圈变成蓝色 and 赤い四角を大きく and Ελληνικά κύκλος",
}


def triplet_line(tid: str, reference: str, caption: str, targets: list[str]) -> str:
    return json.dumps({"id": tid, "reference": reference, "caption": caption, "targets": targets}, ensure_ascii=False)


# ---------------------------------------------------------------------------- serving the app in tests
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class served:
    """`with served(explorer[, access]) as url:` the explorer's app on a free loopback port, launched
    the way app.py launches it (queue, concurrency, upload limit); closed on exit."""

    def __init__(self, explorer, access=None):
        self.explorer, self.access = explorer, access

    def __enter__(self) -> str:
        from cir.ui import server
        from cir.ui.edge import launch_options

        port = free_port()
        self.demo = server.build_demo(self.explorer, self.access)
        self.demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                         **launch_options())
        return f"http://127.0.0.1:{port}/"

    def __exit__(self, *exc):
        self.demo.close()


def rss_mb() -> float:
    """This process's resident memory in MB."""
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) / 1024


def wait_for_http(url: str, proc=None, timeout: float = 120.0) -> None:
    """Poll `url` until it answers (or `proc` exits, or `timeout` seconds pass: AssertionError)."""
    import time
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode} before answering")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{url} did not answer within {timeout} s")


def endpoints(client, wanted: dict[str, str]) -> dict[str, int]:
    """fn ids of private endpoints by {name: "elem_id:event"} (the page calls them through the same
    queue; the client is allowed to here, as a browser would)."""
    by_elem = {c["id"]: c.get("props", {}).get("elem_id") for c in client.config["components"]}
    ids = {}
    for i, dep in enumerate(client.config["dependencies"]):
        for target, event in dep.get("targets", []):
            for name, key in wanted.items():
                if f"{by_elem.get(target)}:{event}" == key:
                    ids[name] = dep.get("id", i)
    for fn in ids.values():
        client.endpoints[fn].is_valid = True
    return ids
