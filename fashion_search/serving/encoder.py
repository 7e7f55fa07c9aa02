"""The query encoder: a CLIP save_pretrained folder's image and text towers, preprocessing as in training, compiled
query graphs (bf16 for one photo, int8 for batches of eight)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from fashion_search import backbones
from fashion_search.photos.pool import decode_square
from fashion_search.serving.gate import MAX_BATCH
from fashion_search.inference import embed_images
from fashion_search.runtime import autocast_dtype, resolve_device
from fashion_search.serving.batching import MAX_PENDING, MicroBatcher
from fashion_search.errors import QueryError, UserError
from fashion_search.files import read_json



TEXT_TOWER_FILE = "text_tower.json"  # written by clip.py beside the exported model


QUERY_BATCH = 8  # the bigger of the two compiled query batch sizes (the other is 1)


INT8_CALIBRATION_PHOTOS = 64


class VisionTower(torch.nn.Module):
    """CLIP's image embedding (vision transformer, then projection: what get_image_features computes) as a module
    that owns its weights, so that torch.export and the int8 quantizer see them."""

    def __init__(self, vision_model, projection):
        super().__init__()
        self.vision_model, self.projection = vision_model, projection

    def forward(self, pixel_values):  # [B, 3, S, S] -> [B, projection_dim]
        return self.projection(self.vision_model(pixel_values=pixel_values).pooler_output)


class QueryGraphs:
    """The compiled query path, called like a model's embed: batches of 8 through one graph, of 1 through another."""

    def __init__(self, single, batch):
        self.single, self.batch = single, batch

    def __call__(self, pixels):
        return (self.batch if len(pixels) == QUERY_BATCH else self.single)(pixels)


def text_tower_usable(model_path: str) -> tuple[bool, str]:
    """(usable, why not) for the text tower of a CLIP folder, as clip.py recorded it in text_tower.json; a folder
    without that file (a pretrained model) is taken as usable."""
    record = read_json(Path(model_path) / TEXT_TOWER_FILE)
    if record.get("usable", True):
        return True, ""
    return False, record.get("why") or "this model's text tower was not trained (train clip.py with --text-loss-weight > 0)"


def run_encoder(run_dir, device: str, text: bool = False) -> "Encoder":
    """The model of a clip.py run for a command (catalog.py, the protocols): int8 off, as bulk jobs embed. UserError
    where the folder is not such a run or, with ``text``, its text tower cannot search."""
    model = Path(run_dir) / "hf_model"
    if not (model / "config.json").exists():
        raise UserError(f"{run_dir} is not a clip.py run (no hf_model/config.json)")
    encoder = Encoder(str(model), device, int8=False)
    if text and not encoder.text_search:
        raise UserError(encoder.text_search_why)
    return encoder


class Encoder:
    """CLIP image and text towers, with the same preprocessing as training (pad to a white square, resize). An
    Embedder (fashion_search.model) for the batch jobs and the int8 quantizer."""
    channels_last = False

    def __init__(self, model_path: str, device="cpu", int8=True):
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # a local model loads in a moment: no bar in the server's log

        self.model_path = model_path
        self.model = backbones.load_pretrained(CLIPModel.from_pretrained, model_path, "CLIP model").eval()
        self.tokenizer = backbones.load_pretrained(CLIPTokenizer.from_pretrained, model_path, "CLIP tokenizer")
        processor = backbones.load_pretrained(CLIPImageProcessor.from_pretrained, model_path, "CLIP image processor")
        size = processor.crop_size if processor.do_center_crop else processor.size
        self.image_size = int(size.get("height") or size.get("shortest_edge"))
        self.mean, self.std = tuple(processor.image_mean), tuple(processor.image_std)
        self.device = resolve_device(device)
        self.dtype = autocast_dtype(self.device)
        # Inference only: bf16 weights run the ViT faster on a bf16 CPU than autocast over fp32 weights, which
        # re-casts every weight on every call (BENCHMARKS.md, section 1).
        self.model.to(self.device, dtype=self.dtype or torch.float32)
        self.dim = self.model.config.projection_dim
        self.text_search, self.text_search_why = text_tower_usable(model_path)
        self.int8_worthwhile = int8  # False: a very big catalog embeds in bf16 too (fashion_search.embed.job_graph)
        self.query_model = None  # QueryGraphs once compile_queries() ran; None = eager
        # room for MAX_PENDING single queries and one batch request's photos at once
        self.batcher = MicroBatcher(self.embed_queries, max_pending=MAX_PENDING + MAX_BATCH)

    def embed_pixels(self, images_uint8: np.ndarray, progress=False, compiled=None) -> np.ndarray:
        """uint8 [B, 3, S, S] -> float32 [B, D], unit length (``compiled``: an accel.CompiledEmbed of self)."""
        return embed_images(self, images_uint8, self.device, self.dtype, desc="embed catalog",
                                   progress=progress, compiled=compiled)

    def embed_queries(self, images_uint8: np.ndarray, compiled=None) -> np.ndarray:
        """The MicroBatcher's batch of 1-16 query images. Eager: one forward pass at the batch's own size. Once
        compile_queries() ran (or with ``compiled``): passes at the two compiled sizes, 8 (the last padded) while 4
        or more images are left, since one pass of 8 costs about four of 1, then passes of 1."""
        compiled = compiled or self.query_model
        parts, start = [], 0
        while start < len(images_uint8):
            left = len(images_uint8) - start
            size = left if compiled is None else QUERY_BATCH if left >= QUERY_BATCH // 2 else 1
            parts.append(embed_images(self, images_uint8[start:start + size], self.device, self.dtype,
                                             batch_size=size, progress=False, compiled=compiled))
            start += size
        return np.concatenate(parts)

    def compile_queries(self, calibration: np.ndarray | None = None):
        """Compile the query path at its two batch sizes, 1 (one user at a time) and 8 (concurrent users), now rather
        than on users' first queries. Graphs with the weights frozen in run both sizes faster than eager; one graph
        with a symbolic batch size, for any size, gained little (BENCHMARKS.md, section 3). With ``calibration`` photos (uint8 [N, 3, S, S],
        N >= 8) the batch-8 graph is int8 instead (quantize_int8_batches). Queries run eager until both graphs are
        ready, so it may run in a thread beside a serving app. Call it after the catalog is built: the catalog job
        drops every compiled graph when it ends."""
        started = time.monotonic()
        from fashion_search.accel import CompiledEmbed

        single = CompiledEmbed(self)
        blank = np.full((QUERY_BATCH, 3, self.image_size, self.image_size), 255, dtype=np.uint8)
        self.embed_queries(blank[:1], single)
        batch = self.quantize_int8_batches(calibration) if calibration is not None else None
        if batch is None:
            batch = single
            self.embed_queries(blank, single)  # compiles the bf16 batch-8 graph
        self.query_model = QueryGraphs(single, batch)
        print(f"compiled the image query path in {time.monotonic() - started:.0f} s "
              f"(batch 8: {'int8' if batch is not single else 'bf16'})")

    def quantize_int8_batches(self, calibration: np.ndarray):
        """An int8 graph for batches of 8 (accel.int8_embed_graph, calibrated on ``calibration``), or None where it
        cannot be had (no torchao, not a CPU) or disagrees with the bf16 model on the calibration photos. On a CPU with
        int8 matrix units it runs batches of 8 faster than the frozen bf16 graph; batch 1 gained nothing clear, so it
        stays bf16 (BENCHMARKS.md, section 3). The graph keeps an fp32 copy of the vision tower alive."""
        photos = calibration[:len(calibration) // QUERY_BATCH * QUERY_BATCH]
        from fashion_search.accel import int8_embed_graph

        return int8_embed_graph(self, photos, QUERY_BATCH, self.device, self.dtype)

    def float_embed_module(self):
        """The image embedding as an fp32 module that owns its weights, for accel.int8_embed_graph to export."""
        import copy

        return VisionTower(copy.deepcopy(self.model.vision_model).float(),
                           copy.deepcopy(self.model.visual_projection).float())

    # embed_images() calls these two: the Encoder quacks like a model script's module.
    def eval(self):
        return self

    def embed(self, pixel_values):
        return backbones.clip_image_features(self.model, pixel_values)

    def decode(self, data: bytes, box=None) -> np.ndarray:
        """A photo from outside -> uint8 [3, S, S], through the gate (QueryError for a refused photo)."""
        return decode_square(data, self.image_size, box)

    def embed_image(self, data: bytes, box=None) -> np.ndarray:
        return self.batcher(self.decode(data, box))

    def embed_many(self, pixels: list[np.ndarray]) -> list[np.ndarray]:
        """Decoded photos embedded through the micro-batcher together (one model batch, not one call each)."""
        return self.batcher.map(pixels) if pixels else []

    def embed_text(self, text: str) -> np.ndarray:
        text = (text or "").strip()
        if not text:
            raise QueryError("type a description to search by text")
        tokens = self.tokenizer([text[:1000]], padding=True, truncation=True,
                                max_length=self.model.config.text_config.max_position_embeddings, return_tensors="pt")
        with torch.inference_mode():
            features = backbones.clip_text_features(self.model, tokens["input_ids"].to(self.device),
                                                 tokens["attention_mask"].to(self.device)).float()
        return torch.nn.functional.normalize(features, dim=1)[0].cpu().numpy()
