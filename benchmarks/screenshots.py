"""The README's two pictures, taken in headless Chromium: docs/app.png (the page after a photo query, the app serving
RUN on loopback) and docs/report.png (the first query of an evaluation.py report's grid).

Usage: python benchmarks/screenshots.py --run runs/clip --report runs/full/report.html [--photo PHOTO.jpg]
(without --photo, the first test photo of the run's processed data is the query)
"""
import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,1000", "--no-first-run",
                 "--disable-background-networking", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def query_photo(run: str, folder: Path) -> Path:
    from fashion_search.data import cell_bytes, encoded_images, load_processed
    from fashion_search.runs import trained_data

    dataset, _ = load_processed(trained_data(run))
    path = folder / "query.jpg"
    path.write_bytes(cell_bytes(encoded_images(dataset["test"].select(range(1)))[0]["image"]))
    return path


def app_picture(run: str, photo: Path, port: int = 7899):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server = subprocess.Popen([sys.executable, "app.py", "--run", run, "--port", str(port), "--no-compile"], cwd=REPO)
    try:
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/status", timeout=2).json().get("page") == "serving":
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        page = browser()
        try:
            page.get(f"http://127.0.0.1:{port}/")
            WebDriverWait(page, 60).until(lambda b: b.find_elements(By.CSS_SELECTOR, "input[type=file]"))
            page.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(photo))
            try:
                WebDriverWait(page, 60).until(
                    lambda b: len(b.find_elements(By.CSS_SELECTOR, "#results-gallery img")) >= 5)
            except Exception:
                page.save_screenshot("/tmp/screenshot-failed.png")
                raise
            time.sleep(1)  # the photos' own loading
            page.save_screenshot(str(REPO / "docs" / "app.png"))
        finally:
            page.quit()
    finally:
        server.terminate()
        server.wait(30)


def report_picture(report: Path):
    from selenium.webdriver.common.by import By

    page = browser()
    try:
        page.get(report.resolve().as_uri())
        page.find_elements(By.CSS_SELECTOR, ".query")[0].screenshot(str(REPO / "docs" / "report.png"))
    finally:
        page.quit()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/clip")
    parser.add_argument("--report", default="runs/full/report.html")
    parser.add_argument("--photo", default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        photo = Path(args.photo) if args.photo else query_photo(args.run, Path(folder))
        app_picture(args.run, photo.resolve())
    report_picture(Path(args.report))
    print("docs/app.png, docs/report.png")


if __name__ == "__main__":
    main()
