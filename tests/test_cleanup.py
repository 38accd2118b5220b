"""The cleanup policy (cir.ui.cleanup) for review uploads, exports and thumbnails: entries unused
for an hour go, then the least recently used until the folders fit their byte cap; a folder's last
use is its newest file; a deleted thumbnail is made again; the folders go at exit, on the app's SIGTERM
too, while a process that only builds the app keeps its own signal handling."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from cir.ui import cleanup, limits
from cir.ui.thumbnails import Thumbnails

ROOT = Path(__file__).resolve().parent.parent


def entry(path, size: int, age_s: float, now: float):
    """A file of `size` bytes last modified `age_s` seconds before `now`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    os.utime(path, (now - age_s, now - age_s))
    return path


def test_entries_unused_for_an_hour_go_then_the_oldest_until_under_the_cap(tmp_path):
    now, hour = time.time(), limits.CLEANUP_AGE_S
    uploads, exports, thumbs = tmp_path / "uploads", tmp_path / "exports", tmp_path / "thumbs"
    entry(uploads / "a" / "x.jsonl", 10, 2 * hour, now)  # an upload reviewed a minute ago: its store is new
    entry(uploads / "a" / "x.review.sqlite", 10, 60, now)
    entry(uploads / "b" / "y.jsonl", 10, 2 * hour, now)  # an upload idle for two hours
    entry(exports / "results-1" / "results.csv", 10, hour + 1, now)
    entry(thumbs / "old.png", 10, hour + 5, now)
    entry(thumbs / "fresh.png", 10, 30, now)
    folders = [uploads, exports, thumbs]
    deleted = cleanup.sweep(folders, now=now)
    assert [os.path.relpath(p, tmp_path) for p in deleted] == [os.path.join("uploads", "b"), os.path.join(
        "thumbs", "old.png"), os.path.join("exports", "results-1")]
    assert sorted(os.listdir(uploads)) == ["a"] and os.listdir(thumbs) == ["fresh.png"] and os.listdir(exports) == []
    # over the byte cap: the least recently used go first, however fresh
    entry(exports / "results-2" / "results.json", 100, 10, now)
    assert cleanup.sweep(folders, max_bytes=125, now=now) == [str(uploads / "a")]  # used 60 s ago
    assert cleanup.sweep(folders, max_bytes=105, now=now) == [str(thumbs / "fresh.png")]  # 30 s ago
    assert cleanup.sweep(folders, max_bytes=105, now=now) == [] and os.listdir(exports) == ["results-2"]


def test_a_thumbnail_in_use_is_kept_and_one_deleted_is_made_again(tmp_path):
    image = tmp_path / "im.png"
    Image.new("RGB", (400, 300), (255, 0, 0)).save(image)
    thumbs = Thumbnails()
    first = thumbs(image)
    os.utime(first, (0, 0))
    assert thumbs(image) == first and os.path.getmtime(first) > time.time() - 60  # handed out: touched
    assert cleanup.sweep([thumbs.folder], max_bytes=0) == [first]
    again = thumbs(image)
    assert again == first and Image.open(again).size == (256, 192)


def test_the_folders_are_removed_at_the_apps_sigterm(tmp_path):
    folder = tmp_path / "uploads"
    entry(folder / "a" / "x.jsonl", 10, 0, time.time())
    code = ("import sys, time\nimport app\nfrom cir.ui import cleanup\napp.exit_on_sigterm()\n"
            "cleanup.start([sys.argv[1]])\nprint('ready', flush=True)\ntime.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM and not folder.exists()


def test_the_app_sweeps_its_review_uploads_when_built(ex, tmp_path):
    from cir.ui.access import FileAccess
    from cir.ui.server import build_demo

    now = time.time()
    old = entry(tmp_path / "uploads" / "old" / "x.jsonl", 10, 2 * limits.CLEANUP_AGE_S, now).parent
    new = entry(tmp_path / "uploads" / "new" / "x.jsonl", 10, 60, now).parent
    build_demo(ex, FileAccess([], ex.index.paths, upload_root=tmp_path / "uploads"))
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # a test runner's own SIGTERM is left alone
    deadline = time.time() + 10
    while old.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert not old.exists() and new.exists()


def test_a_swept_upload_under_review_asks_to_be_opened_again(tmp_path):
    import pytest

    from cir.errors import UserError
    from cir.ui import review_file

    with pytest.raises(UserError, match="x.jsonl is gone .* open or upload it again"):
        review_file.review_items({"path": str(tmp_path / "x.jsonl"), "base": None})
