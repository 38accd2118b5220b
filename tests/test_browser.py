"""The explorer in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright): pick an
example, retrieve, see k results, the examples, the phrase tables and the heatmaps whole at phone,
tablet and desktop widths (the maps right above their drawing controls on a phone; an opacity typed and
committed with Enter redraws them; an edited caption has no ground truth); the Research
tab's map (brushed), phrase influence, variants (one applied), make-up and export at phone and desktop
widths; the model
card; an uploaded photo gets the out-of-domain notice; select a second model (its results and card)
and compare the first one's maps beside its own; in the review tab accept an item with the 'a'
key, reject and undo, filter, export for download, and open the same file as an upload (a private copy
with none of those decisions); the Review tab at a phone's and a desktop's width: its buttons live only
once a file is open, the uploaded file's name whole, each target at the reference's size, one error
toast at a time. Screenshots go to test-artifacts/.

Skipped only where Chromium (or Playwright) is missing and the CI variable is unset."""
import importlib.util
import json
import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cir.data.triplets import read_triplets, write_triplets
from cir.ui import review, server
from cir.ui.access import FileAccess
from cir.ui.explorer import Explorer
from cir.ui.models import Models

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT = 60_000  # ms, for anything the server computes
K = 10
WIDTHS = (390, 768, 1400)  # px: a phone, a tablet, a desktop window

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:
    sync_playwright = None
if (sync_playwright is None or not os.path.exists(CHROMIUM)) and not os.environ.get("CI"):
    pytest.skip("needs Playwright and Chromium (apt-get install -y chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_checkpoint, tiny_tmcir_checkpoint):
    """(URL, explorer, triplet file to review) of the app serving a 4-query demo on a free loopback port,
    with a tiny TMCIR model to select besides the demo's."""
    root = tmp_path_factory.mktemp("browser")
    spec = importlib.util.spec_from_file_location("build_demo_assets", ROOT / "scripts" / "build_demo_assets.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.build(root / "demo", tiny_checkpoint, queries=4, seed=7, progress=False)
    ex = Explorer.load(tiny_checkpoint, root / "demo" / "index", examples=root / "demo" / "examples.jsonl", device="cpu")
    to_review = root / "demo" / "batch.jsonl"
    write_triplets(to_review, read_triplets(root / "demo" / "examples.jsonl")[0])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    models = Models(ex, {"TMCIR": tiny_tmcir_checkpoint})
    demo = server.build_demo(models, FileAccess([root / "demo"], ex.index.paths))
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/", ex, to_review
    demo.close()


@contextmanager
def page_at(url: str, width: int, height: int = 900):
    """A headless Chromium page `width` x `height` px opened at `url`, with the tests' timeouts."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(TIMEOUT)
            expect.set_options(timeout=TIMEOUT)
            page.goto(url)
            yield page
        finally:
            browser.close()


def inside(page, selector: str, within: str | None = None) -> list:
    """The boxes [left, top, right, bottom] of the elements `selector` that reach outside the window's
    width (or outside the element `within`); [] when all lie inside it."""
    return page.locator(selector).evaluate_all("""(els, within) => {
        const c = within ? document.querySelector(within).getBoundingClientRect() : {left: 0, right: innerWidth};
        return els.map(e => e.getBoundingClientRect()).filter(r => r.left < c.left - 1 || r.right > c.right + 1)
                  .map(r => [r.left, r.top, r.right, r.bottom]); }""", within)


@pytest.mark.parametrize("width", WIDTHS)
def test_retrieve_at_every_width(served, width, tmp_path):
    url, ex, _ = served
    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    with page_at(url, width) as page:
        page.get_by_text("About this model").click()
        expect(page.locator("#model-card")).to_contain_text("synthetic scenes")
        page.locator("#examples img").first.click()
        expect(page.locator("#caption textarea")).to_have_value(ex.examples[0].caption)
        page.locator("#retrieve").click()
        expect(page.locator("#results img")).to_have_count(K)
        # the result thumbnails came inside the answer as data: URLs, and each one is drawn
        shown = page.locator("#results img").evaluate_all(
            "imgs => Promise.all(imgs.map(i => i.decode().then(() => [i.src.slice(0, 22), i.naturalWidth])))")
        assert shown == [["data:image/png;base64,", 128]] * K, shown
        expect(page.locator("#maps-info")).to_contain_text("(gold)")
        heatmaps = page.locator("#heatmaps img")
        heatmaps.scroll_into_view_if_needed()
        expect(heatmaps).to_be_visible()
        box = heatmaps.bounding_box()
        assert box["width"] >= min(250, width * 0.85) and box["height"] >= 200, box  # was 0 x 0 at <= 640 px
        # every result, example and phrase-table cell inside the window (and the tables inside their
        # boxes), and nothing to scroll sideways
        assert inside(page, "#results img") == [] and inside(page, "#examples img", "#examples") == []
        for table in ("#phrases", "#cc-table"):
            assert inside(page, f"{table} th, {table} td", table) == [], table
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        opacity = page.locator("#opacity").bounding_box()
        assert 0 <= opacity["y"] - (box["y"] + box["height"]) <= 80, (box, opacity)  # the opacity under the maps
        if width < 640:  # a phone: the maps and their drawing controls above the phrase table
            patches, table = page.locator("#upsampling").bounding_box(), page.locator("#phrases").bounding_box()
            assert 0 <= table["y"] - max(opacity["y"] + opacity["height"], patches["y"] + patches["height"]) <= 80, \
                (opacity, patches, table)
        page.screenshot(path=str(artifacts / f"explorer-retrieve-{width}.png"), full_page=True)
        if width == WIDTHS[-1]:  # an opacity typed and committed with Enter redraws the maps
            drawn = heatmaps.get_attribute("src")
            number = page.locator("#opacity input[type=number]")
            number.fill("")
            number.type("0.2")
            number.press("Enter")
            expect(heatmaps).not_to_have_attribute("src", drawn)
            # the example's caption edited: no ground truth is promised or reported
            page.locator("#caption textarea").fill(ex.examples[0].caption + " twice")
            expect(page.locator("#query-info")).to_contain_text("with another modification, so no ground truth")
            page.locator("#retrieve").click()
            expect(page.locator("#status")).not_to_contain_text("Ground truth")
            expect(page.locator("#status")).to_contain_text(f"{K} results")
            expect(page.locator("#results")).not_to_contain_text("★")
        if width == WIDTHS[0]:  # an uploaded photo is told it is unlike the training scenes
            x, y = np.meshgrid(np.linspace(0, 1, 96), np.linspace(0, 1, 96))
            Image.fromarray((np.stack([x, y, x * y], -1) * 255).astype(np.uint8)).save(tmp_path / "photo.png")
            page.locator("#query-image input[type=file]").set_input_files(str(tmp_path / "photo.png"))
            expect(page.get_by_text("looks unlike the training data")).to_be_visible()


@pytest.mark.parametrize("width", (390, 1400))
def test_research_views_at_two_widths(served, width):
    """The Research tab for the Retrieve tab's query: the map, each phrase masked, variants scored against a
    result marked ideal (one applied to the modification), the make-up; each inside the window."""
    url, ex, _ = served
    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    t = ex.examples[0]
    with page_at(url, width) as page:
        page.locator("#examples img").first.click()
        expect(page.locator("#caption textarea")).to_have_value(t.caption)
        page.locator("#retrieve").click()
        expect(page.locator("#results img")).to_have_count(K)
        page.get_by_role("tab", name="Research").click()
        page.locator("#map-draw").click()
        expect(page.locator("#map-info")).to_contain_text(f"PCA map of {len(ex.index)} gallery images")
        plot = page.locator("#map-plot canvas, #map-plot svg").first
        expect(plot).to_be_visible()
        box = plot.bounding_box()
        assert box["width"] >= min(250, width * 0.6) and box["x"] + box["width"] <= width + 1, box
        # brushing across the map (right of its y axis) opens the best-ranked image there, whose maps the
        # Why panel then draws
        plot.scroll_into_view_if_needed()
        box = plot.bounding_box()
        page.mouse.move(box["x"] + 0.35 * box["width"], box["y"] + box["height"] / 2)
        page.mouse.down()
        page.mouse.move(box["x"] + 0.98 * box["width"], box["y"] + box["height"] / 2, steps=8)
        page.mouse.up()
        expect(page.locator("#map-picked-info")).to_contain_text("images in the range")
        first = page.locator("#map-picked-info strong").inner_text()
        page.locator("#influence-run").click()
        expect(page.locator("#influence-info")).to_contain_text("Followed: the target")
        for phrase in t.noun_phrases:  # one row each, the example's gold phrases
            expect(page.locator("#influence-table")).to_contain_text(phrase["text"])
        expect(page.locator("#influence-plot canvas, #influence-plot svg").first).to_be_visible()
        page.locator("#ideal input").click()
        page.get_by_role("option").first.click()
        page.locator("#variants-run").click()
        expect(page.locator("#variants-info")).to_contain_text("variants, each encoded and ranked")
        expect(page.locator("#variants-table")).to_contain_text("original")
        expect(page.locator("#variants-heatmap img, #variants-heatmap canvas, #variants-heatmap svg").first
               ).to_be_visible()
        page.locator("#variant-choice input").click()
        page.get_by_role("option").nth(1).click()
        chosen = page.locator("#variant-choice input").input_value()
        page.locator("#variant-apply").click()
        page.locator("#makeup-run").click()
        expect(page.locator("#makeup-info")).to_contain_text("by their CIR-Shapes scenes")
        expect(page.locator("#makeup-plot canvas, #makeup-plot svg").first).to_be_visible()
        page.locator("#research-export").click()
        expect(page.locator("#research-file")).to_contain_text("research")
        page.screenshot(path=str(artifacts / f"explorer-research-{width}.png"), full_page=True)
        page.get_by_role("tab", name="Retrieve").click()
        expect(page.locator("#caption textarea")).to_have_value(chosen)  # the variant applied
        expect(page.locator("#maps-info")).to_contain_text(first)  # over the image opened from the map


@pytest.mark.parametrize("width", (390, 1400))
def test_review_tab_at_two_widths(served, width):
    """Before a file is open only the ways to open one are live; the uploaded file's name shows whole;
    each target is drawn at the reference's size and whole; a second error replaces the first toast."""
    url, ex, to_review = served
    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    with page_at(url, width) as page:
        page.get_by_role("tab", name="Review").click()
        expect(page.locator("#review-intro")).to_contain_text("triplet file")
        for name in ("prev", "accept", "reject", "next", "undo", "export"):
            expect(page.locator(f"#review-{name}")).to_be_disabled()
        page.locator("#review-open").click()  # two mistakes in a row: one toast, the latest
        expect(page.get_by_text("type the path of a triplet file")).to_be_visible()
        page.locator("#review-file textarea").fill("/etc/passwd")
        page.locator("#review-open").click()
        expect(page.get_by_text("only triplet files inside")).to_be_visible()
        expect(page.locator("[data-testid=toast-text]:visible")).to_have_count(1)
        page.locator("#review-upload input[type=file]").set_input_files(str(to_review))
        expect(page.locator("#review-status")).to_contain_text("Item 1 of")
        expect(page.locator("#review-accept")).to_be_enabled()
        name = page.locator("#review-upload td.filename")
        expect(name).to_have_attribute("aria-label", to_review.name)
        assert name.evaluate("e => e.scrollWidth <= e.clientWidth && e.clientWidth > 0")
        reference, target = page.locator("#review-reference img"), page.locator("#review-targets img").first
        expect(target).to_be_visible()
        target.evaluate("img => img.decode()")
        ref, tgt = reference.bounding_box(), target.bounding_box()
        assert (tgt["width"], tgt["height"]) == (ref["width"], ref["height"]) and ref["width"] >= 200, (ref, tgt)
        assert inside(page, "#review-targets img", "#review-targets") == []
        gallery = page.locator("#review-targets").bounding_box()
        assert gallery["y"] <= tgt["y"] and tgt["y"] + tgt["height"] <= gallery["y"] + gallery["height"] + 1
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        page.screenshot(path=str(artifacts / f"explorer-review-{width}.png"), full_page=True)


def test_retrieve_and_review_in_the_browser(served):
    url, ex, to_review = served
    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(TIMEOUT)
            expect.set_options(timeout=TIMEOUT)
            page.goto(url)
            page.locator("#examples img").first.click()
            expect(page.locator("#caption textarea")).to_have_value(ex.examples[0].caption)
            page.locator("#retrieve").click()
            expect(page.locator("#results img")).to_have_count(K)
            expect(page.locator("#status")).to_contain_text(f"{K} results")
            expect(page.locator("#maps-info")).to_contain_text(os.path.basename(ex.examples[0].reference))
            heatmaps = page.locator("#heatmaps img")
            expect(heatmaps).to_be_visible()
            # one row per phrase, each an in-context / isolated pair plus their difference
            assert heatmaps.evaluate("img => img.complete && img.naturalHeight") >= 200
            page.screenshot(path=str(artifacts / "explorer-retrieve.png"), full_page=True)

            # the second model: the shown results are retrieved again with it, then the first one's maps beside its own
            single = heatmaps.evaluate("img => img.naturalWidth")
            page.locator("#model input").click()
            page.get_by_role("option", name="TMCIR").click()
            expect(page.locator("#status")).to_contain_text(f"{K} results of TMCIR")
            expect(page.locator("#results img")).to_have_count(K)
            page.get_by_text("About this model").click()
            expect(page.locator("#model-card")).to_contain_text("token merging")
            expect(page.locator("#maps-info")).to_contain_text("by TMCIR ·")
            page.locator("#compare input").click()
            page.get_by_role("option", name=ex.name).click()
            expect(page.locator("#maps-info")).to_contain_text(f"by TMCIR beside {ex.name}")
            page.locator("#examples img").nth(1).click()  # another query, retrieved with TMCIR, compared
            expect(page.locator("#caption textarea")).to_have_value(ex.examples[1].caption)
            page.locator("#retrieve").click()
            expect(page.locator("#maps-info")).to_contain_text(
                f"{os.path.basename(ex.examples[1].reference)} by TMCIR beside {ex.name}")
            expect(page.locator("#status")).to_contain_text(f"{K} results of TMCIR")
            assert heatmaps.evaluate("img => img.decode().then(() => img.naturalWidth)") > single  # both models' maps
            page.screenshot(path=str(artifacts / "explorer-compare.png"), full_page=True)

            page.get_by_role("tab", name="Review").click()
            page.locator("#review-file textarea").fill(str(to_review))
            page.locator("#review-open").click()
            status = page.locator("#review-status")
            expect(status).to_contain_text("Item 1 of")
            page.locator("h1").click()  # focus outside the text fields, where the shortcuts act
            page.keyboard.press("a")
            expect(status).to_contain_text("Item 2 of")
            second = read_triplets(to_review)[0][1].id
            expect(page.locator("#review-rank")).to_contain_text(f"{second}: the model ranks the target")
            expect(page.locator("#review-maps img")).to_be_visible()
            page.screenshot(path=str(artifacts / "explorer-review.png"), full_page=True)
            # reject the second, undo it with 'u', then show only the accepted ones
            page.keyboard.press("r")
            expect(status).to_contain_text("Item 3 of")
            page.keyboard.press("u")
            expect(status).to_contain_text("Item 2 of")
            expect(status).to_contain_text("0 rejected")
            page.locator("#review-show").get_by_text("accepted").click()
            expect(status).to_contain_text("Item 1 of")
            page.locator("#review-export").click()
            expect(page.locator("#review-downloads")).to_contain_text("batch.review")
            # the same file uploaded by the visitor opens as a private copy, with none of these decisions
            n = len(read_triplets(to_review)[0])
            expect(status).to_contain_text(f"1 of {n} decided")
            page.locator("#review-show").get_by_text("all", exact=True).click()
            page.locator("#review-upload input[type=file]").set_input_files(str(to_review))
            expect(status).to_contain_text(f"0 of {n} decided")
            expect(status).to_contain_text("Item 1 of")
        finally:
            browser.close()
    log = review.log_path(to_review).read_text().splitlines()
    first = read_triplets(to_review)[0][0]
    second = read_triplets(to_review)[0][1]
    assert [(r["id"], r["decision"]) for r in map(json.loads, log)] == [(first.id, "accept"), (second.id, "reject"),
                                                                        (second.id, "undo")]
