"""evaluation.py --report on the tiny runs: one self-contained HTML file whose grid agrees with the metrics, and which
a browser opens without a single network request."""
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from fashion_search.cli import evaluation
from fashion_search.metrics import relevance, search
from fashion_search.runs import load_split

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


class Grid(HTMLParser):
    """The report's query blocks: for each, its dataset row and, per grid row, the run and its frames."""

    def __init__(self):
        super().__init__()
        self.queries, self.divs, self.row, self.images, self.fetching = [], [], None, [], 0

    def inside_query(self) -> bool:
        return any("query" in classes for classes in self.divs)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        self.fetching += tag in ("script", "link", "iframe")
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag == "div":
            if "query" in classes:
                self.queries.append({"row": int(attrs["data-row"]), "runs": {}})
            elif "grid-row" in classes and "data-run" in attrs and self.inside_query():
                self.row = self.queries[-1]["runs"].setdefault(
                    attrs["data-run"], {"precision": float(attrs["data-precision"]), "frames": []})
            self.divs.append(classes)
        elif tag == "figure" and self.row is not None:
            self.row["frames"].append("right" in classes)

    def handle_endtag(self, tag):
        if tag == "div" and self.divs:
            if "grid-row" in self.divs.pop():
                self.row = None


@pytest.fixture(scope="module")
def report(trained_runs, processed, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    runs = [str(trained_runs[name]) for name in ("resnet", "siamese", "clip", "vae")]
    assert evaluation.main([*runs, "--baseline", "pixels", "--output", str(out / "table.md"), "--plot",
                            str(out / "curves.png"), "--cache-dir", str(cache_dir), "--report",
                            str(out / "report.html")]) == 0
    return out / "report.html", trained_runs


def test_the_report_holds_one_grid_row_per_query_and_run(report):
    path, runs = report
    grid = Grid()
    grid.feed(path.read_text())
    assert grid.fetching == 0  # no script, stylesheet or frame to fetch
    assert all(src.startswith("data:image/png;base64,") for src in grid.images) and len(grid.images) >= 3
    assert len(grid.queries) >= 3 and len({q["row"] for q in grid.queries}) == len(grid.queries)
    for query in grid.queries:
        assert set(query["runs"]) == {*runs, "pixels (baseline)"}, query
        for frames in (r["frames"] for r in query["runs"].values()):
            assert len(frames) == 5
    text = path.read_text()
    for heading in ("Most-confused type pairs", "precision@5 per class", "Match confidence", "Product names"):
        assert heading in text


def test_every_frame_agrees_with_an_independent_search(report):
    """A query's share of right frames is its precision@5, and both are what a search of the run's own embeddings
    gives for that query."""
    path, runs = report
    grid = Grid()
    grid.feed(path.read_text())
    for query in grid.queries:
        for name, row in query["runs"].items():
            assert np.mean(row["frames"]) == pytest.approx(row["precision"])
            if name not in runs:
                continue
            (queries, query_meta), (gallery, gallery_meta) = load_split(runs[name], "test"), \
                load_split(runs[name], "train")
            q = int(np.flatnonzero(query_meta["row"].to_numpy() == query["row"])[0])
            _, indices = search(queries[q:q + 1], gallery, 5)
            expected = relevance(query_meta["label"].to_numpy()[q:q + 1], gallery_meta["label"].to_numpy(), indices)
            assert row["frames"] == expected[0].tolist(), (name, query["row"])


def test_the_report_opens_in_chromium_without_a_network_request(report):
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("Debian chromium / chromium-driver not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    path, _ = report
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,1200", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--host-resolver-rules=MAP * ~NOTFOUND"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    browser = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        browser.get(path.as_uri())
        tiles = browser.find_elements(By.CSS_SELECTOR, ".query .ph")
        assert tiles and all(browser.execute_script(
            "return getComputedStyle(arguments[0]).backgroundSize", tile) == "contain" for tile in tiles[:10])
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "report.png"))
        requests = [json.loads(entry["message"])["message"] for entry in browser.get_log("performance")]
        urls = [m["params"]["request"]["url"] for m in requests if m["method"] == "Network.requestWillBeSent"]
        fetched = [url for url in urls if not url.startswith(("data:", path.as_uri()))]
        assert not fetched, fetched
        assert path.as_uri() in urls  # the log saw the page itself: an empty log proves nothing
    finally:
        browser.quit()
