"""The Review tab through the running app's HTTP API: it opens only triplet files inside the
review folders named at start (or uploads), shows only gallery and review-folder images, writes
only there, answers every outside path alike, and escapes what a triplet file says; one hostile
caption does not freeze the server."""
import json
import os
import shutil
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
from gradio_client import Client, handle_file

from cir.data.triplets import read_triplets, write_triplets
from cir.ui import limits, review, review_file, review_tab, why_panel
from cir.ui.access import IMAGE_REFUSED, NO_FOLDERS, REFUSED, FileAccess
from hostile_inputs import endpoints, rss_mb, served

REVIEW = {"open": "review-file:submit", "upload": "review-upload:upload", "accept": "review-accept:click"}


@pytest.fixture
def folders(tmp_path, shapes_data):
    """(review folder holding batch.jsonl, outside folder holding secret.jsonl and an image)."""
    inside, outside = tmp_path / "review", tmp_path / "outside"
    inside.mkdir()
    outside.mkdir()
    triplets = read_triplets(shapes_data / "test.jsonl")[0][:3]
    write_triplets(inside / "batch.jsonl", triplets)
    write_triplets(outside / "secret.jsonl", triplets)
    shutil.copy(triplets[0].reference, outside / "private.png")
    return inside, outside


def error_of(call) -> str:
    with pytest.raises(Exception) as e:
        call()
    return str(e.value)


def test_typed_paths_open_only_inside_the_review_folders(ex, folders):
    inside, outside = folders
    os.symlink(outside / "secret.jsonl", inside / "link.jsonl")  # a link out of the folder
    with served(ex, FileAccess([inside], ex.index.paths)) as url:
        client = Client(url, verbose=False)
        fn = endpoints(client, REVIEW)
        client.predict(str(inside / "batch.jsonl"), fn_index=fn["open"])  # inside: opens
        first = read_triplets(inside / "batch.jsonl")[0][0]
        client.predict(first.caption, "fine", fn_index=fn["accept"])
        assert review.read_decisions(review.store_path(inside / "batch.jsonl"))[first.id]["note"] == "fine"
        refused = {}
        for path in [outside / "secret.jsonl", outside / "missing.jsonl", "/etc/passwd", "/no/such/file",
                     inside / "link.jsonl", f"{inside}/../outside/secret.jsonl",
                     f"/proc/self/root{outside}/secret.jsonl"]:
            refused[str(path)] = error_of(lambda: client.predict(str(path), fn_index=fn["open"]))
        assert all(REFUSED in message for message in refused.values()), refused
        assert len({m.replace(p, "") for p, m in refused.items()}) == 1  # existing or not: the same answer
        assert sorted(p.name for p in outside.iterdir()) == ["private.png", "secret.jsonl"]  # nothing written there


def test_review_files_beside_a_triplet_file_are_never_followed_through_links(ex, folders):
    """A planted `x.review.sqlite` (or its journal) linking outside is refused instead of written,
    and a planted `x.review.jsonl` linking outside is refused instead of read in."""
    inside, outside = folders
    write_triplets(inside / "notes.jsonl", read_triplets(inside / "batch.jsonl")[0])
    os.symlink(outside / "planted.sqlite", inside / "batch.review.sqlite")
    (outside / "notes.jsonl").write_text(json.dumps(review.decision("x", "reject", "planted note")) + "\n")
    os.symlink(outside / "notes.jsonl", inside / "notes.review.jsonl")
    with served(ex, FileAccess([inside], ex.index.paths)) as url:
        client = Client(url, verbose=False)
        fn = endpoints(client, REVIEW)
        client.predict(str(inside / "batch.jsonl"), fn_index=fn["open"])
        first = read_triplets(inside / "batch.jsonl")[0][0]
        assert "symbolic link" in error_of(lambda: client.predict(first.caption, "fine", fn_index=fn["accept"]))
        assert "symbolic link" in error_of(lambda: client.predict(str(inside / "notes.jsonl"), fn_index=fn["open"]))
    assert sorted(p.name for p in outside.iterdir()) == ["notes.jsonl", "private.png", "secret.jsonl"]
    os.symlink(outside / "planted-wal", inside / "other.review.sqlite-wal")
    with pytest.raises(review.UserError, match="symbolic link"):
        review.append_decision(inside / "other.review.sqlite", review.decision("x", "accept"))
    assert not (outside / "planted-wal").exists() and not (inside / "other.review.sqlite").exists()


def test_without_review_folders_no_server_file_opens(ex, folders):
    inside, _ = folders
    with served(ex) as url:
        client = Client(url, verbose=False)
        fn = endpoints(client, REVIEW)
        assert NO_FOLDERS in error_of(lambda: client.predict(str(inside / "batch.jsonl"), fn_index=fn["open"]))
    assert list(inside.iterdir()) == [inside / "batch.jsonl"]


def test_an_uploaded_file_shows_only_gallery_images_and_writes_beside_its_copy(ex, folders, tmp_path):
    inside, outside = folders
    triplets = read_triplets(inside / "batch.jsonl")[0]
    hostile = [replace(triplets[0], id="[click](javascript:alert(1)) **bold** <b>x</b>",
                       reference=f"/proc/self/root{outside}/private.png"), triplets[1]]
    upload = tmp_path / "mine.jsonl"  # absolute image paths: an upload's relative ones are taken from the gallery
    upload.write_text("".join(json.dumps({"id": t.id, "reference": t.reference, "caption": t.caption,
                                          "targets": t.targets}) + "\n" for t in hostile))
    access = FileAccess([], ex.index.paths)
    with served(ex, access) as url:
        client = Client(url, verbose=False)
        client.predict(handle_file(str(upload)), fn_index=endpoints(client, REVIEW)["upload"])
    copies = list(Path(access.upload_root).rglob("mine.jsonl"))
    assert len(copies) == 1 and copies[0] != upload
    # what the page then shows of the copy: the outside reference is not shown, the gallery target is
    state = review_file.review_upload(ex, access, str(upload))  # the upload callback, as the page runs it
    assert Path(state["path"]).parent.parent == Path(access.upload_root)
    reference, targets, _, _, _, status = review_tab.review_show(ex, access, state)
    assert reference is None and IMAGE_REFUSED in status
    assert len(targets) == len(hostile[0].targets) and all(im is not None for im, _ in targets)
    assert "[click](" not in status and "**bold**" not in status and "<b>" not in status  # escaped
    maps, ranked = review_tab.review_details(ex, access, state, review_tab.RANK_OVER[0])
    assert maps is None and IMAGE_REFUSED in ranked
    review_tab.review_decide(state, hostile[0].caption, "", kind="accept")
    assert review.store_path(state["path"]).is_file() and not review.store_path(upload).exists()


def test_a_caption_of_combining_marks_does_not_freeze_the_server(ex):
    """'a' + 4,000 combining marks used to hold the GIL for ~25 s in the tokenizer (a case-folding
    search of a 4,000-character word). Now it is refused at once (caption limit), the longest
    caption accepted (1,999 marks) is encoded in linear time, and `GET /config` answers within a
    second while either is processed."""
    from cir.ui import limits

    with served(ex) as url:
        client = Client(url, verbose=False)
        image = ex.examples[0].reference
        for marks in (4000, limits.MAX_CAPTION_CHARS - 1):
            job = client.submit(handle_file(image), "a" + "\u0301" * marks, 5, api_name="/retrieve")
            latencies = []
            while not job.done():
                t0 = time.perf_counter()
                with urllib.request.urlopen(url + "config", timeout=30) as r:
                    r.read()
                latencies.append(time.perf_counter() - t0)
                time.sleep(0.05)
            assert not latencies or max(latencies) < 1.0, latencies
            if marks > limits.MAX_CAPTION_CHARS:
                with pytest.raises(Exception, match="at most"):
                    job.result(timeout=120)
            else:
                assert "5 results" in job.result(timeout=120)[2]


def test_the_caption_fallback_is_linear():
    from cir.text.tokenizer import CaptionTokenizer

    tok = CaptionTokenizer(40)
    times = {}
    for n in (4000, 16000):
        t0 = time.perf_counter()
        ids, spans = tok.encode_with_offsets("a" + "\u0301" * n)
        times[n] = time.perf_counter() - t0
        assert spans[0][0] == 0 and spans[-1][1] == n + 1  # every character is covered
    assert times[16000] < 2.0 and times[16000] < 8 * times[4000] + 0.2, times


def test_notes_phrase_rows_and_the_tokenizer_memo_are_bounded(ex, folders):
    from cir.text.tokenizer import CACHE_BYTES, CaptionTokenizer
    from cir.ui import limits

    inside, _ = folders
    access = FileAccess([inside], ex.index.paths)
    state = review_file.review_open(access, str(inside / "batch.jsonl"))
    caption = read_triplets(inside / "batch.jsonl")[0][0].caption
    with pytest.raises(Exception, match=f"at most {limits.MAX_NOTE_CHARS:,}"):
        review_tab.review_decide(state, caption, "x" * (limits.MAX_NOTE_CHARS + 1), kind="accept")
    assert not review.store_path(inside / "batch.jsonl").exists()  # nothing saved
    rows = [["the red circle", None, None]] * (limits.MAX_PHRASE_ROWS + 1)
    with pytest.raises(Exception, match=f"at most {limits.MAX_PHRASE_ROWS}"):
        why_panel.add_phrase("the red circle", rows, "the red circle")
    tok = CaptionTokenizer(40)
    for i in range(30):  # 30 distinct 100k-character captions: about 3 MB of memo each, unbounded before
        tok.encode_with_offsets(f"{i} " + "make the red circle blue " * 4000)
    assert tok._memo.currsize <= CACHE_BYTES and len(tok._memo) < 30


def hostile_review_file(path: Path, reference: str, target: str, size_mb: int = 19, lines: int = 20) -> Path:
    """A triplet file of `lines` lines of about `size_mb` MB in all, each carrying a huge list of small
    numbers in its meta (about 21x its size once parsed)."""
    numbers = "0," * (size_mb * 2 ** 20 // lines // 2)
    with open(path, "w") as f:
        for i in range(lines):
            f.write(f'{{"id": "h{i}", "reference": "{reference}", "caption": "make it red", '
                    f'"targets": ["{target}"], "meta": {{"junk": [{numbers}0]}}}}\n')
    return path


def test_ten_hostile_review_uploads_stay_small_and_the_server_answers(ex, tmp_path):
    """Ten 19 MB uploads of 20 lines with huge meta: each line is skipped unread (over MAX_LINE_CHARS),
    the server grows by at most 200 MB and GET /config answers within a second throughout."""
    import threading

    t = ex.examples[0]
    upload = hostile_review_file(tmp_path / "hostile.jsonl", t.reference, t.targets[0])
    with served(ex, FileAccess([], ex.index.paths)) as url:
        client = Client(url, verbose=False)
        fn = endpoints(client, REVIEW)
        urllib.request.urlopen(url + "config", timeout=5).read()
        before, latencies, done = rss_mb(), [], threading.Event()

        def poll():
            while not done.is_set():
                t0 = time.perf_counter()
                urllib.request.urlopen(url + "config", timeout=30).read()
                latencies.append(time.perf_counter() - t0)
                time.sleep(0.1)
        poller = threading.Thread(target=poll)
        poller.start()
        answers = []
        try:
            for _ in range(10):
                try:
                    answers.append(client.predict(handle_file(str(upload)), fn_index=fn["upload"]))
                except Exception as e:
                    answers.append(str(e))
        finally:
            done.set()
            poller.join()
        growth = rss_mb() - before
    print(f"RSS growth {growth:.0f} MB, GET /config max {max(latencies):.2f} s over {len(latencies)} polls")
    assert growth <= 200 and latencies and max(latencies) < 1.0, (growth, max(latencies))
    assert all("no usable triplets" in str(a) for a in answers), answers[0]


def test_review_targets_are_capped_and_merged_by_their_real_path(ex, folders):
    """A triplet naming one gallery image through 17,136 `/proc/self/root` spellings (a line over
    MAX_LINE_CHARS) or 100 times (over MAX_TARGETS) is skipped as a problem, fast; one naming it
    three ways (a link among them) shows it once."""
    from cir.ui import limits

    inside, _ = folders
    good = read_triplets(inside / "batch.jsonl")[0][0]
    base, target = {"reference": good.reference, "caption": good.caption}, good.targets[0]
    os.symlink(target, inside / "alias.png")
    lines = [base | {"id": "spelled", "targets": ["/proc/self/root" * (1 + k % 64) + "/." * (k // 64) + target
                                                  for k in range(17_136)]},
             base | {"id": "repeated", "targets": [target] * 100},
             base | {"id": "three", "targets": [target, "/proc/self/root" + target, str(inside / "alias.png")]}]
    (inside / "limits.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    access = FileAccess([inside], ex.index.paths)
    t0 = time.perf_counter()
    state = review_file.review_open(access, str(inside / "limits.jsonl"))
    triplets, problems = review_file.review_items(state)
    shown = review_tab.review_show(ex, access, state)
    assert time.perf_counter() - t0 < 5.0
    assert [t.id for t in triplets] == ["three"] and triplets[0].targets == [target] and len(shown[1]) == 1
    assert len(problems) == 2 and f"longer than {limits.MAX_LINE_CHARS:,}" in problems[0]
    assert f"100 targets; at most {limits.MAX_TARGETS}" in problems[1]


def test_a_review_file_of_too_many_lines_is_refused(ex, folders):
    from cir.ui import limits

    inside, _ = folders
    line = (inside / "batch.jsonl").read_text().splitlines()[0]
    (inside / "long.jsonl").write_text(line + "\n" + "\n" * limits.MAX_REVIEW_LINES)
    with pytest.raises(Exception, match=f"more than {limits.MAX_REVIEW_LINES:,} lines"):
        review_file.review_open(FileAccess([inside], ex.index.paths), str(inside / "long.jsonl"))


def scene_json(n: int) -> dict:
    cells = [(shape, color, cell) for shape in ("circle", "square", "triangle", "star") for color in
             ("red", "blue", "green", "yellow", "purple") for cell in range(9)]
    return {"background": "white", "objects": [{"shape": s, "color": c, "size": "small", "cell": k}
                                               for s, c, k in (cells * (n // len(cells) + 1))[:n]]}


def test_the_flagged_check_compares_only_small_scenes(ex, folders):
    """A 130 KB line of 1,000 objects per scene (41 s of CPU per display before: the matching is
    cubic) is skipped unread, and a short line of 40 objects per scene is skipped for its scene;
    opening and showing the file takes well under the seconds either cost."""
    from cir.ui import limits

    inside, _ = folders
    good = read_triplets(inside / "batch.jsonl")[0][0]
    base = {"reference": good.reference, "caption": good.caption, "targets": good.targets}
    lines = [base | {"id": f"n{n}", "meta": {"reference_scene": scene_json(n), "target_scene": scene_json(n - 1)}}
             for n in (1000, 40)] + [good.to_json()]
    assert 100_000 < len(json.dumps(lines[0])) < 200_000
    (inside / "scenes.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    access = FileAccess([inside], ex.index.paths)
    t0 = time.perf_counter()
    state = review_file.review_open(access, str(inside / "scenes.jsonl"))
    status = review_tab.review_show(ex, access, state)[5]
    assert time.perf_counter() - t0 < 3.0
    triplets, problems = review_file.review_items(state)
    assert [t.id for t in triplets] == [good.id] and "0 flagged" in status
    assert len(problems) == 2 and f"longer than {limits.MAX_LINE_CHARS:,}" in problems[0]
    assert f"40 objects in its reference_scene; at most {limits.MAX_SCENE_OBJECTS}" in problems[1]


def test_export_accepted_downloads_from_a_review_folder_outside_cwd_and_temp_with_the_uploads_paths(ex, shapes_data):
    """A review folder outside the working directory and the temp folder: "Export accepted" offers
    its files for download; an uploaded file's export names its images as the upload did."""
    import tempfile

    home = Path(tempfile.mkdtemp(prefix="cir-test-review-", dir=Path.home()))
    try:
        assert not str(home).startswith((tempfile.gettempdir(), os.getcwd()))
        triplets = read_triplets(shapes_data / "test.jsonl")[0][:2]
        write_triplets(home / "batch.jsonl", triplets)
        upload = home / "mine.jsonl"  # as an annotator writes it beside the images folder
        upload.write_text("".join(json.dumps(t.to_json(shapes_data)) + "\n" for t in triplets))
        access = FileAccess([home], ex.index.paths)
        with served(ex, access) as url:
            client = Client(url, verbose=False)
            fn = endpoints(client, REVIEW | {"export": "review-export:click"})
            opens = [(lambda: client.predict(str(home / "batch.jsonl"), fn_index=fn["open"]), home / "batch.jsonl"),
                     (lambda: client.predict(handle_file(str(upload)), fn_index=fn["upload"]), upload)]
            for opened, source in opens:  # the export names images as the file opened did
                opened()
                client.predict(triplets[0].caption, "", fn_index=fn["accept"])
                files, message = client.predict(fn_index=fn["export"])
                assert "1 accepted" in message
                accepted = [json.loads(line) for line in Path(files["value"][0]).read_text().splitlines()]
                want = json.loads(source.read_text().splitlines()[0])
                assert [(a["id"], a["reference"], a["targets"]) for a in accepted] == [
                    (want["id"], want["reference"], want["targets"])]
        assert want["reference"].startswith("images/")
    finally:
        shutil.rmtree(home)


def test_an_uploads_refusal_names_the_file_not_its_server_copy(ex, tmp_path):
    access = FileAccess([], ex.index.paths)
    bad_json, not_utf8 = tmp_path / "bad.jsonl", tmp_path / "latin.jsonl"
    bad_json.write_text("{not json\n")
    not_utf8.write_bytes(b'{"id": "caf\xe9"}\n')
    for upload in (bad_json, not_utf8):
        message = error_of(lambda: review_file.review_upload(ex, access, str(upload)))
        assert upload.name in message and access.upload_root not in message and "/" not in message, message


def test_a_triplet_file_over_the_byte_cap_is_refused_in_one_line(ex, folders):
    """A triplet file over limits.MAX_REVIEW_MB, typed or uploaded, is refused by its size before it is
    read or copied, in one line naming the file."""
    inside, _ = folders
    big = inside / "big.jsonl"
    with open(big, "wb") as f:
        f.truncate((limits.MAX_REVIEW_MB + 1) * 2 ** 20)
    access = FileAccess([inside], ex.index.paths)
    want = f"big.jsonl has {limits.MAX_REVIEW_MB + 1:.1f} MB; the Review tab opens triplet files of at most " \
           f"{limits.MAX_REVIEW_MB} MB"
    for call in (lambda: review_file.review_open(access, str(big)),
                 lambda: review_file.review_upload(ex, access, str(big))):
        with pytest.raises(Exception) as refused:
            call()
        assert refused.value.message == want
    assert os.listdir(access.upload_root) == [] and not review.store_path(big).exists()
