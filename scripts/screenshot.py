"""Screenshot a running explorer (for the README): pick an example, retrieve, capture.

    python app.py &  python scripts/screenshot.py --url http://127.0.0.1:7860/ --out docs/explorer-retrieve.png \
        --compare "ConText-CIR λ = 0"

Drives Debian's headless Chromium through Playwright (never `playwright install`).
"""
import argparse
import shutil

from playwright.sync_api import expect, sync_playwright

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:7860/", help="the running app (default http://127.0.0.1:7860/)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--example", type=int, default=0, help="which example query to click (default 0)")
    p.add_argument("--compare", default=None, metavar="MODEL",
                   help="choose MODEL (a name in the page's Model list) under the Why panel's \"Compare with\", "
                        "so its maps show beside the model's")
    a = p.parse_args()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium", args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        expect.set_options(timeout=60_000)
        page.goto(a.url)
        page.locator("#examples img").nth(a.example).click()
        expect(page.locator("#caption textarea")).not_to_have_value("")  # the example's caption is in
        page.locator("#retrieve").click()
        expect(page.locator("#status")).to_contain_text("results")
        expect(page.locator("#heatmaps img")).to_be_visible()
        if a.compare:
            before = page.locator("#heatmaps img").get_attribute("src")
            page.locator("#compare input").click()
            page.get_by_role("option", name=a.compare, exact=True).click()
            expect(page.locator("#heatmaps img")).not_to_have_attribute("src", before)
        page.screenshot(path=a.out, full_page=True)
        browser.close()


if __name__ == "__main__":
    main()
