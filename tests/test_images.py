"""The project's first image decode, and the app's build, put PIL's own guard on the project's pixel
limit (`guard_pil`, which names the reason); importing a module changes nothing. Checked in a fresh
interpreter, where nothing else (pytest's warning capture included) has touched PIL or the warning
filters."""
import subprocess
import sys
from pathlib import Path

from cir.data.images import MAX_IMAGE_PIXELS
from hostile_inputs import png_declaring

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import io, sys
from PIL import Image
import cir.data.images as images
import cir.ui.server
assert Image.MAX_IMAGE_PIXELS != images.MAX_IMAGE_PIXELS, "importing changed PIL"
data = sys.stdin.buffer.read()
n = len(data) // 2
images.open_image(io.BytesIO(data[:n])).close()  # at the limit: opens, and the guard is on
assert Image.MAX_IMAGE_PIXELS == images.MAX_IMAGE_PIXELS, Image.MAX_IMAGE_PIXELS
try:
    Image.open(io.BytesIO(data[n:]))  # one row over, under PIL's own 2x: PIL's warning is an error
except Image.DecompressionBombWarning:
    print("refused")
images.guard_pil(); images.guard_pil()  # idempotent: still one filter
import warnings
print(sum(f[2] is Image.DecompressionBombWarning for f in warnings.filters))
"""


def test_the_first_decode_puts_pils_guard_on_the_project_limit():
    at = png_declaring(MAX_IMAGE_PIXELS // 1000, 1000)
    over = png_declaring(MAX_IMAGE_PIXELS // 1000 + 1, 1000)
    assert len(at) == len(over)
    r = subprocess.run([sys.executable, "-c", CHECK], input=at + over, capture_output=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode().split() == ["refused", "1"]
