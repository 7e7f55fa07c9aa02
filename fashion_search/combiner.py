"""A small combiner for "this photo, but in colour C2": a residual MLP over the photo's and the words' unit
embeddings, fitted on triplets from the train split's metadata (a reference photo of type T and gender G, a colour
word C2, and the train photos of type T (and G) in colour C2 as the targets), with the whole train gallery as the
negatives. The weighted sum of unit embeddings keeps the photo's type but cannot move its colour far when the image
embedding carries little colour; the combiner learns where in the embedding space "T in C2" lies.

Saved beside the run (combiner.safetensors + combiner.json); the app uses it for a query of one photo (or URL, or
catalog item) and one text part with a positive weight, and the weighted sum for every other query.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fashion_search.files import atomic_write, atomic_write_json

WEIGHTS_FILE, RECORD_FILE = "combiner.safetensors", "combiner.json"


class Combiner(nn.Module):
    def __init__(self, dim: int, hidden: int = 512):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, dim))

    def forward(self, image, text):  # unit [B, D] each -> unit [B, D]
        return F.normalize(image + self.mlp(torch.cat([image, text], dim=-1)), dim=-1)


def colour_targets(meta, min_targets: int) -> dict[str, list[str]]:
    """Per article type, the colours (sorted) of at least min_targets items of that type: the colours a composed
    query may ask a photo of that type for (the protocol's queries and the combiner's training alike)."""
    targets = {}
    for (article, colour), count in meta.groupby(["articleType", "baseColour"]).size().items():
        if count >= min_targets and colour:
            targets.setdefault(article, []).append(colour)
    return {article: sorted(colours) for article, colours in targets.items()}


def other_colour(targets: dict, article: str, colour: str, rng) -> str | None:
    """A colour other than the photo's own drawn among its type's targets; None where the photo has no colour or its
    type no other target."""
    options = [other for other in targets.get(article, []) if other != colour]
    if not options or not colour:
        return None
    return options[rng.integers(len(options))]


def triplets(meta, min_targets: int, rng) -> tuple[np.ndarray, list[str], list[np.ndarray]]:
    """One epoch's triplets over the train split: (reference rows, a colour word each, the target rows of each).
    Each photo with a type and colour once, with another colour drawn among those of at least min_targets photos of
    its type; the targets are the photos of that type and colour (of its gender where there are min_targets)."""
    by_type_colour = meta.groupby(["articleType", "baseColour"]).indices
    by_type_colour_gender = meta.groupby(["articleType", "baseColour", "gender"]).indices
    colours_of = colour_targets(meta, min_targets)
    references, words, targets = [], [], []
    for row, (article, colour, gender) in enumerate(zip(meta["articleType"], meta["baseColour"], meta["gender"])):
        other = other_colour(colours_of, article, colour, rng)
        if other is None:
            continue
        gendered = by_type_colour_gender.get((article, other, gender), [])
        references.append(row)
        words.append(other)
        targets.append(gendered if len(gendered) >= min_targets else by_type_colour[(article, other)])
    return np.asarray(references), words, targets


def fit(train: np.ndarray, train_meta, word_vectors: dict, val_check, epochs=12, batch=256, lr=2e-3,
        min_targets=5, seed=0, temperature=0.05) -> tuple[Combiner, list[dict]]:
    """Train on the train split's triplets; ``val_check(combiner) -> success@5`` after each epoch; the best epoch's
    weights are kept. Returns (combiner, per-epoch log)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gallery = torch.from_numpy(np.ascontiguousarray(train, dtype=np.float32))
    combiner = Combiner(gallery.shape[1])
    optimizer = torch.optim.AdamW(combiner.parameters(), lr=lr, weight_decay=1e-4)
    log, best, best_state = [], -1.0, None
    for epoch in range(epochs):
        references, words, targets = triplets(train_meta, min_targets, rng)  # another colour drawn each epoch
        words_tensor = torch.from_numpy(np.stack([word_vectors[w] for w in words]).astype(np.float32))
        order = rng.permutation(len(references))
        combiner.train()
        losses = []
        for start in range(0, len(order), batch):
            part = order[start:start + batch]
            out = combiner(gallery[references[part]], words_tensor[part])
            logits = out @ gallery.T / temperature  # [B, G]: every train photo is a candidate
            positive = torch.zeros_like(logits, dtype=torch.bool)
            for i, p in enumerate(part):
                positive[i, targets[p]] = True
            positive[torch.arange(len(part)), torch.from_numpy(references[part])] = False  # not the photo itself
            loss = (torch.logsumexp(logits, 1) - torch.logsumexp(logits.masked_fill(~positive, -1e9), 1)).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        combiner.eval()
        score = val_check(combiner)
        log.append({"epoch": epoch + 1, "loss": round(float(np.mean(losses)), 4), "val success@5": round(score, 4)})
        print(f"combiner epoch {epoch + 1}/{epochs} loss {np.mean(losses):.4f} val success@5 {score:.4f}", flush=True)
        if score > best:
            best, best_state = score, {k: v.detach().clone() for k, v in combiner.state_dict().items()}
    combiner.load_state_dict(best_state)
    return combiner.eval(), log


def combine(combiner: Combiner, image: np.ndarray, text: np.ndarray) -> np.ndarray:
    """unit [B, D] (or [D]) photo and text embeddings -> unit [B, D] (or [D])."""
    single = image.ndim == 1
    with torch.inference_mode():
        out = combiner(torch.from_numpy(np.atleast_2d(image).astype(np.float32)),
                       torch.from_numpy(np.atleast_2d(text).astype(np.float32))).numpy()
    return out[0] if single else out


def save(combiner: Combiner, run_dir, record: dict):
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    atomic_write(run_dir / WEIGHTS_FILE, lambda tmp: save_file(combiner.state_dict(), tmp))
    atomic_write_json(run_dir / RECORD_FILE, {"dim": combiner.mlp[0].in_features // 2,
                                              "hidden": combiner.mlp[0].out_features, **record})


def load(run_dir) -> Combiner | None:
    """The run's combiner, or None where it has none (safetensors: loading runs no code)."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    try:
        record = json.loads((run_dir / RECORD_FILE).read_text())
        combiner = Combiner(int(record["dim"]), int(record["hidden"]))
        combiner.load_state_dict(load_file(str(run_dir / WEIGHTS_FILE)))
    except (OSError, ValueError, KeyError, RuntimeError):
        return None
    return combiner.eval()
