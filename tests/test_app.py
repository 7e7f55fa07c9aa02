"""The app: the search service, and the page + API through gradio_client and a headless Chromium, all on
127.0.0.1 with a tiny trained CLIP run over the fixture catalog (the URL route's guards: test_fetch.py)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fashion_search.cli import app
from conftest import jpeg_bytes
from fashion_search import accel
from fashion_search.photos.pool import decode_square, open_rgb
from fashion_search.serving import catalog, gate
from fashion_search.serving.encoder import QUERY_BATCH, Encoder
from fashion_search.errors import QueryError

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


# --------------------------------------------------------------------------- the service and the page

def catalog_photo(service, position=0):
    """(id, JPEG bytes) of a catalog item, exactly as the dataset stores it."""
    key = service.catalog.store.items()[0][position]
    return int(key), service.catalog.image_bytes(key)


@pytest.mark.slow
def test_compiled_query_path_matches_eager_without_compiling_on_queries(clip_run):
    """After compile_queries(), every batch size the MicroBatcher forms (1-16) runs through the two graphs compiled
    at start (batch 1 in bf16, and 8 with padding in int8, calibrated on photos): no compile on a user's query, and
    the eager embeddings (int8: up to its small error)."""
    import torch

    encoder = Encoder(str(clip_run / "hf_model"))
    size = encoder.image_size
    # Laid out as decoded photos are, channels last in memory: the warm-up's blank images are not.
    images = np.random.default_rng(0).integers(0, 256, (16, size, size, 3), dtype=np.uint8).transpose(0, 3, 1, 2)
    sizes = (1, 3, 5, 8, 13, 16)
    eager = {n: encoder.embed_queries(images[:n]) for n in sizes}
    try:
        encoder.compile_queries(calibration=images)
        graphs = encoder.query_model
        assert graphs.single.fn is not graphs.single.eager, "compiling failed"
        assert graphs.batch is not graphs.single, "the int8 batch-8 graph was not built"
        with torch._dynamo.config.patch(error_on_recompile=True):  # a third graph would fall back to eager
            for n in sizes:
                compiled = encoder.embed_queries(images[:n])
                assert compiled.shape == eager[n].shape
                cosines = np.sum(compiled * eager[n], axis=1)
                quantized = n - (n % 8 if n % 8 < 4 else 0)  # rows in passes of 8; a rest of 1-3 runs one by one
                assert np.all(cosines > 0.99)
                # int8 rows measured 0.99992-0.99996 here, bf16 ones 0.99999: int8 errs visibly, not much
                assert np.all(cosines[:quantized] < 0.99999), "passes of 8 ran unquantised"
                assert np.all(cosines[quantized:] > 0.999), "single photos ran quantised"
        assert graphs.single.fn is not graphs.single.eager, "a batch size recompiled"
    finally:
        torch.compiler.reset()


def test_int8_graph_is_refused_when_it_disagrees_with_bf16_or_torchao_is_missing(clip_run, monkeypatch, capsys):
    import torch

    encoder = Encoder(str(clip_run / "hf_model"))
    photos = np.random.default_rng(1).integers(0, 256, (8, 3, encoder.image_size, encoder.image_size), np.uint8)
    monkeypatch.setattr(accel, "INT8_MIN_COSINE", 1.01)  # no int8 graph can agree this well
    try:
        assert encoder.quantize_int8_batches(photos) is None
    finally:
        torch.compiler.reset()
    assert "int8 embedding not used" in capsys.readouterr().out

    def no_torchao(*args):
        raise ImportError("No module named 'torchao'")
    monkeypatch.setattr(accel, "quantize_int8", no_torchao)
    assert encoder.quantize_int8_batches(photos) is None
    assert "torchao is not installed" in capsys.readouterr().out


def test_calibration_photos_are_decoded_catalog_photos(service):
    size = service.encoder.image_size
    photos = catalog.calibration_photos(service.catalog, size, count=10)
    assert photos.shape == (10, 3, size, size) and photos.dtype == np.uint8
    first = decode_square(service.catalog.image_bytes(service.catalog.store.items()[0][0]), size)
    assert np.array_equal(photos[0], first)  # spread over the catalog from its first row to its last
    assert catalog.calibration_photos(service.catalog, size, count=QUERY_BATCH - 1) is None  # under one batch


def test_the_item_itself_comes_first(service):
    item_id, data = catalog_photo(service, 3)
    results = service.search_image_bytes(data)
    assert len(results) == 5 and results[0]["id"] == item_id
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True) and scores[0] == pytest.approx(1.0, abs=1e-2)
    assert set(results[0]) == {"id", "productDisplayName", "articleType", "baseColour", "gender", "score",
                               "confidence", "close_match", "duplicates"}
    _, item = service.catalog.store.fetch(gate.item_id(item_id))  # the record is that item's metadata
    assert all(results[0][field] == item[field] for field in catalog.RESULT_FIELDS)
    assert type(results[0]["id"]) is int and json.dumps(results)  # plain Python values, JSON as they are


def test_gallery_shows_each_result_photo_from_a_jpeg_file_written_once(service):
    item_id, data = catalog_photo(service, 2)
    results = service.search_item(item_id)
    gallery = service.gallery(results)
    assert len(gallery) == 5
    path, caption = gallery[0]
    assert caption == f"1. confidence {results[0]['confidence']:.0%}"
    details = service.describe(results)  # each result in full under the gallery
    assert all(r["productDisplayName"] in details and r["articleType"] in details for r in results)
    with Image.open(path) as shown:
        assert shown.format == "JPEG" and shown.mode == "RGB"
        original = np.asarray(open_rgb(data), dtype=np.float32)
        assert shown.size == (original.shape[1], original.shape[0])
        assert np.abs(np.asarray(shown, dtype=np.float32) - original).mean() < 4  # the same photo, re-encoded
    written = Path(path).stat().st_mtime_ns
    assert service.gallery(results)[0][0] == path and Path(path).stat().st_mtime_ns == written  # not rewritten


def test_filters_apply_inside_the_search(service):
    _, data = catalog_photo(service, 0)
    results = service.search_image_bytes(data, "Women", "Accessories", None)
    assert len(results) == 5
    assert all(r["gender"] == "Women" for r in results)
    assert all(service.catalog.store.fetch(gate.item_id(r["id"]))[1]["masterCategory"] == "Accessories"
               for r in results)


def test_text_query(service):
    results = service.search_text("Red Watches")
    assert len(results) == 5 and [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    with pytest.raises(QueryError, match="type a description"):
        service.search_text("   ")


def test_bad_upload_is_a_clear_message(service, tmp_path):
    for name, data in (("empty.jpg", b""), ("text.jpg", b"hello"), ("cut.jpg", jpeg_bytes()[:200])):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(QueryError, match="not a readable image"):
            service.search_image_file(str(tmp_path / name))


def test_index_is_persisted_reused_and_rebuilt_when_stale(service, clip_run, cache_dir):
    folder = clip_run / "index"
    version = json.loads((folder / "CURRENT").read_text())["version"]
    info = json.loads((folder / version / "store.json").read_text())
    assert info["items"] == len(service.catalog) and info["dim"] == service.encoder.dim
    stamp = (folder / version / "index.faiss").stat().st_mtime_ns
    config = app.parse_config(["--run", str(clip_run), "--cache-dir", str(cache_dir)])
    app.load_service(config)
    assert json.loads((folder / "CURRENT").read_text())["version"] == version  # reused
    assert (folder / version / "index.faiss").stat().st_mtime_ns == stamp
    (folder / version / "store.json").write_text(json.dumps({**info, "fingerprint": "stale"}))
    app.load_service(config)
    rebuilt = json.loads((folder / "CURRENT").read_text())["version"]
    assert rebuilt > version
    assert json.loads((folder / rebuilt / "store.json").read_text())["fingerprint"] == info["fingerprint"]


def test_catalog_from_another_dataset(clip_run, hub_dataset, cache_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(clip_run, run, ignore=shutil.ignore_patterns("index"))
    config = app.parse_config(["--run", str(run), "--dataset", str(hub_dataset), "--cache-dir", str(cache_dir)])
    service, _ = app.load_service(config)
    assert len(service.catalog) == 69  # every decodable row of the hub-layout folder, as one split 'all'


def test_no_run_and_offline_is_one_clear_line(tmp_path, cache_dir):
    from fashion_search.errors import UserError

    config = app.parse_config(["--run", str(tmp_path / "none"), "--cache-dir", str(cache_dir)])
    with pytest.raises(UserError) as exc:
        app.load_service(config)
    message = str(exc.value)
    assert "--run" in message and "--dataset" in message and "--model" in message and "\n" not in message


def test_api_with_gradio_client(served, service, server, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(served, verbose=False)
    item_id, data = catalog_photo(service, 5)
    (tmp_path / "query.jpg").write_bytes(data)
    results = client.predict(handle_file(str(tmp_path / "query.jpg")), "Any", "Any", "Any", "Any", api_name="/search_image")
    assert len(results) == 5 and results[0]["id"] == item_id
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    text = client.predict("Blue Shirts", "Men", "Any", "Any", api_name="/search_text")
    assert len(text) == 5 and all(r["gender"] == "Men" for r in text)
    by_item = client.predict(results[2]["id"], "Any", "Any", "Any", "Any", api_name="/search_item")  # a click on a result
    assert by_item[0]["id"] == results[2]["id"] and len(by_item) == 5
    by_url = client.predict(f"{server}/img.jpg", "Any", "Any", "Any", "Any", api_name="/search_url")
    assert len(by_url) == 5
    with pytest.raises(Exception, match="only http and https"):
        client.predict("file:///etc/passwd", "Any", "Any", "Any", "Any", api_name="/search_url")
    (tmp_path / "bad.jpg").write_bytes(b"not an image at all")
    with pytest.raises(Exception, match="not a readable image"):
        client.predict(handle_file(str(tmp_path / "bad.jpg")), "Any", "Any", "Any", "Any", api_name="/search_image")
    assert client.predict("Red Watches", "Any", "Any", "Any", "Any", api_name="/search_text")  # still serving


def test_plain_json_api(served, service, server):
    """The fast route for programs: same results as the service, clear errors with 4xx codes, size cap."""
    import httpx

    item_id, data = catalog_photo(service, 5)
    with httpx.Client(base_url=served, timeout=30) as http:
        response = http.post("/api/search_image", content=data)
        assert response.status_code == 200
        results = response.json()["results"]
        assert len(results) == 5 and results[0]["id"] == item_id
        # every route folds near-duplicates (each result lists them: none here), the page's searches too
        assert all(r["duplicates"] == [] for r in results) and results == service.search_image_bytes(data)
        filtered = http.post("/api/search_image", params={"gender": "Men"}, content=data).json()["results"]
        assert filtered and all(r["gender"] == "Men" for r in filtered)
        text = http.get("/api/search_text", params={"q": "Blue Shirts", "gender": "Men"}).json()["results"]
        assert len(text) == 5 and all(r["gender"] == "Men" for r in text)
        assert len(http.get("/api/search_url", params={"url": f"{server}/img.jpg"}).json()["results"]) == 5
        bad = http.post("/api/search_image", content=b"not an image at all")
        assert bad.status_code == 400 and "image" in bad.json()["error"]
        assert http.post("/api/search_image", content=b"").status_code == 400
        refused = http.get("/api/search_url", params={"url": "file:///etc/passwd"})
        assert refused.status_code == 400 and "only http and https" in refused.json()["error"]
        assert http.get("/api/search_text", params={"q": "  "}).status_code == 400
        too_big = http.post("/api/search_image", content=b"\xff" * (10 * 2**20 + 1))
        assert too_big.status_code == 413 and "10 MB" in too_big.json()["error"]


def test_page_in_headless_chromium(served, service, tmp_path):
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("Debian chromium / chromium-driver not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    # no background traffic, and no name resolves but the loopback page's: the browser sends packets to loopback only
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,1200", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        browser.get(served)
        WebDriverWait(browser, 60).until(lambda b: b.find_elements(By.CSS_SELECTOR, "input[type=file]"))
        assert f"{len(service.catalog):,}" in browser.find_element(By.TAG_NAME, "body").text
        _, data = catalog_photo(service, 1)
        (tmp_path / "query.jpg").write_bytes(data)
        browser.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(tmp_path / "query.jpg"))
        WebDriverWait(browser, 60).until(
            lambda b: len(b.find_elements(By.CSS_SELECTOR, "#results-gallery img")) >= 5)
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "app_search.png"))
        text = browser.find_element(By.TAG_NAME, "body").text
        # each result in full under the gallery; the raw answer (its "score" keys) only inside the closed accordion
        assert "confidence" in text and "API answer" in text and '"score"' not in text
        gallery = browser.find_element(By.CSS_SELECTOR, "#results-gallery")
        photos = browser.find_elements(By.CSS_SELECTOR, "#results-gallery img")
        fits = {browser.execute_script("return getComputedStyle(arguments[0]).objectFit", photo) for photo in photos}
        assert fits == {"contain"}  # every product whole: shoes and heads are never cropped off
        lowest = max(photo.rect["y"] + photo.rect["height"] for photo in photos)
        assert gallery.rect["y"] + gallery.rect["height"] - lowest < 80  # no band of empty space below the photos
        browser.find_element(By.CSS_SELECTOR, "#more-results").click()
        WebDriverWait(browser, 60).until(
            lambda b: len(b.find_elements(By.CSS_SELECTOR, "#results-gallery img")) >= 10)
    finally:
        browser.quit()
