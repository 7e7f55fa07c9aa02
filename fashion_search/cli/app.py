"""Find the five catalog items that look most like a photo: a Gradio page and a program API over a vector index
of CLIP embeddings (FAISS in the process by default, or Milvus). Queries: an uploaded photo, an image URL, a text
description (CLIP's text tower), or a click on a result. Optional filters (gender, masterCategory, articleType,
baseColour) are applied inside the search.

Usage: python app.py [--run runs/clip] [--dataset PATH] [--index faiss] [--host 127.0.0.1] [--port 7860]
"""
from __future__ import annotations

import argparse
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from fashion_search import attributes, calibration, combiner, lexical
from fashion_search.data import HUB_DATASET
from fashion_search.errors import UserError, cli
from fashion_search.photos import pool as photos
from fashion_search.runtime import add_device_arg, positive_int
from fashion_search.serving.catalog import calibration_photos, catalog_from_dataset, catalog_from_run
from fashion_search.backbones import CLIP_HUB_MODEL
from fashion_search.serving.encoder import INT8_CALIBRATION_PHOTOS, Encoder
from fashion_search.serving.front import Front, Server, Startup
from fashion_search.serving.json_api import json_app
from fashion_search.serving.page import page_app
from fashion_search.serving.service import MIN_CONFIDENCE, SearchService


@dataclass(frozen=True)
class AppConfig:
    """The app's flags, parsed once (their defaults and meaning: parse_config)."""
    run: str
    dataset: str | None
    model: str
    host: str
    port: int
    share: bool
    device: str
    index: str
    cache_dir: str
    engine: str
    ray_actors: int
    max_upload_mb: int
    page: bool
    min_confidence: float
    allow_private_urls: bool
    compile: bool
    int8: bool

    @property
    def embedding_actors(self) -> int:
        """Ray actors that embed a first start's catalog: none unless --engine ray."""
        return self.ray_actors if self.engine == "ray" else 0


def parse_config(argv=None) -> AppConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/clip", help="a clip.py run folder (fine-tuned model + embeddings)")
    parser.add_argument("--dataset", default=None, help="catalog to index instead of the run's own splits "
                        f"(hub name or folder); without a run it defaults to {HUB_DATASET}")
    parser.add_argument("--model", default=CLIP_HUB_MODEL,
                        help="CLIP model for the zero-shot fallback when there is no run")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 exposes it to the network)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="ask Gradio for a public share link (off by default)")
    add_device_arg(parser)
    parser.add_argument("--index", default="faiss", help="where the catalog's vectors live: faiss (a file in the "
                        "run's index folder), milvus:PATH.db (Milvus Lite) or milvus://HOST:PORT/COLLECTION (a Milvus "
                        "server); catalog.py adds and removes items in it while the app serves")
    parser.add_argument("--cache-dir", default="data/cache")
    parser.add_argument("--engine", choices=("local", "ray"), default="local", help="who embeds a --dataset catalog "
                        "at its first start: this process, or a Ray cluster (RAY_ADDRESS, else a local one)")
    parser.add_argument("--ray-actors", type=positive_int, default=2, help="--engine ray: model actors (one GPU "
                        "each on GPUs)")
    parser.add_argument("--max-upload-mb", type=int, default=10)
    parser.add_argument("--page", action=argparse.BooleanOptionalAction, default=True,
                        help="serve the Gradio page and its API beside the JSON routes (--no-page: the JSON routes "
                        "alone, for programs; Gradio is then not even imported)")
    parser.add_argument("--min-confidence", type=float, default=MIN_CONFIDENCE,
                        help="a result whose calibrated confidence (the chance that it shares the query's article type, "
                        "from the run's calibration.json) is below this is not a close match; when no result reaches "
                        "it, the page says so and the JSON API answers close_match false")
    parser.add_argument("--allow-private-urls", action="store_true",
                        help="let URL queries reach private/loopback addresses: for local testing only")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="compile the photo query path in the background at start (about a minute on a "
                        "small CPU; until then queries run eager): photo queries then run faster (BENCHMARKS.md, "
                        "section 3)")
    parser.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True,
                        help="with --compile, run batches of 8 concurrent photo queries through an int8 graph "
                        f"calibrated on {INT8_CALIBRATION_PHOTOS} catalog photos (needs torchao and a CPU with int8 "
                        "matrix units); not used if it disagrees with the bf16 model. Also embeds a catalog of 20k+ "
                        "photos in int8 (--no-int8: bf16)")
    return AppConfig(**vars(parser.parse_args(argv)))


def load_service(config: AppConfig, startup: Startup | None = None) -> tuple[SearchService, str]:
    """The model and the catalog's index (embedded and built at a first start), reporting each phase to
    ``startup``."""
    startup = startup or Startup()
    run = Path(config.run)
    photos.POOL.start()  # the decode workers start while the model loads
    startup.begin("loading the model")
    if (run / "hf_model" / "config.json").exists():
        encoder = Encoder(str(run / "hf_model"), config.device, config.int8)
        photo_attributes = attributes.load(run, encoder.dim)  # a broken file fails before the catalog is built
        catalog = catalog_from_run(run, encoder, config.dataset, config.cache_dir, config.index,
                                   config.embedding_actors, startup.report)
        return SearchService(encoder, catalog, f"fine-tuned CLIP ({run})", config.allow_private_urls,
                             calibration.load(run), config.min_confidence, combiner.load(run),
                             lexical.load_weights(run), photo_attributes), ""
    notice = (f"No fine-tuned run at {run} (train one with `python clip.py`): using pretrained {config.model} "
              f"zero-shot.")
    print(notice)
    dataset = config.dataset or HUB_DATASET
    try:
        encoder = Encoder(config.model, config.device, config.int8)
        index_dir = Path("runs") / "zero-shot-clip" / "index"
        catalog = catalog_from_dataset(dataset, encoder, index_dir, config.cache_dir, config.model, config.index,
                                       config.embedding_actors, startup.report)
    except UserError as exc:
        cause = str(exc).split(";")[0]  # what failed, without the model scripts' advice
        raise UserError(f"no run at --run {run}, and the zero-shot fallback failed: {cause}; pass --run RUN_DIR "
                               f"(a clip.py run), or local copies with --dataset PATH and --model PATH") from None
    return SearchService(encoder, catalog, f"pretrained {config.model} (zero-shot)", config.allow_private_urls), notice


def go_live(front: Front, service: SearchService, notice: str = "", max_upload_mb: int = 10, page=True):
    """Hand the front the JSON routes (they answer from here on), then the page (Gradio's import and build take
    seconds that the JSON routes need not wait for)."""
    # the text index (a second or two for 40k items) is built beside the first queries, for either kind of catalog
    threading.Thread(target=service.catalog.words.current, daemon=True, name="text-index").start()
    front.serve_api(json_app(service, max_upload_mb * 2**20), len(service.catalog))
    if page:
        front.serve_page(page_app(service, notice, max_upload_mb))
    else:
        front.startup.page_off()


def share_link(host: str, port: int):
    """A public share link through Gradio's tunnel service, as Gradio's own launch(share=True) asks for one."""
    import secrets

    from gradio import networking

    try:
        print(f"public share link: {networking.setup_tunnel(host, port, secrets.token_urlsafe(32), None, None)}")
    except Exception as exc:  # the page still serves locally
        print(f"no share link: {exc}")


def serve(service: SearchService, notice="", host="127.0.0.1", port=7860, max_upload_mb=10) -> Server:
    """The JSON API, the page and its Gradio API on one server, ready when this returns (the tests and benchmarks
    start it so; main() starts the server first and loads the service while the front says how far it has got)."""
    front = Front(Startup())
    server = Server(front, host, port)
    try:
        go_live(front, service, notice, max_upload_mb)
    except BaseException:
        server.close()
        raise
    return server


def main(argv=None):
    config = parse_config(argv)
    # a server's lines (listening, serving, compiled) reach its log as they happen, also when stdout is a file
    sys.stdout.reconfigure(line_buffering=True)
    startup = Startup()
    server = Server(Front(startup), config.host, config.port)  # listening from here on: it says how far it has got
    print(f"listening on http://{config.host}:{config.port} (GET /api/status says how far the start has got)")
    try:
        service, notice = load_service(config, startup)
        go_live(server.app, service, notice, config.max_upload_mb, config.page)
    except BaseException as exc:
        startup.failed(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        server.close()
        raise
    if config.compile:  # serve at once, eager, and switch to the compiled graphs when they are ready
        def compile_queries():
            calibration = calibration_photos(service.catalog, service.encoder.image_size) if config.int8 else None
            service.encoder.compile_queries(calibration)
        threading.Thread(target=compile_queries, daemon=True, name="compile-queries").start()
    print(f"serving {len(service.catalog):,} items with {service.model_name} on http://{config.host}:{config.port} "
          f"(JSON API: POST /api/search_image, GET /api/search_text?q=)")
    if config.share:
        share_link(config.host, config.port)
    server.block()


def command():  # fashion-app, python app.py
    cli(main)


if __name__ == "__main__":
    command()
