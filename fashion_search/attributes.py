"""Photo search that sees colour and keeps type: a photo query's first DEPTH results by cosine, re-ranked by

    cosine + type_weight x log P(the result's articleType | query) + colour_weight x log P(its baseColour | query).

P(type | query) is the vote of those results' own article types, each weighted by softmax(cosine / tau): a nearest-
neighbour classifier over the catalog's labels. P(colour | query) is a logistic regression on the photo's colour
histogram (its pixels that are not white background) and its embedding, fitted on the train split's photos and their
baseColour. Both sides read the result's own columns, so a user's catalog with those columns is re-ranked alike (an
item without a colour the model knows counts every colour as equally likely). The weights are chosen on val by ``python -m fashion_search.cli.attributes RUN``,
which writes the model to RUN/attributes.safetensors (safetensors: loading runs no code)."""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from fashion_search.errors import UserError

FILE = "attributes.safetensors"
DEPTH = 100  # results re-ranked; later pages follow in cosine order, so pages never overlap or skip
TYPE_FLOOR, COLOUR_FLOOR = 1e-3, 1e-4  # log(0) guards
BACKGROUND = 235 / 255  # a pixel whose every channel is at least this is the photo's white background (or padding)
HUES, SATURATIONS, VALUES, GREYS = 18, 3, 3, 8
HISTOGRAM = HUES * SATURATIONS * VALUES + GREYS
FEATURES = HISTOGRAM + 7  # the histogram, the mean and spread of each channel, the share of foreground


def colour_features(images: np.ndarray, batch: int = 1024) -> np.ndarray:
    """uint8 [N, 3, S, S] -> float32 [N, FEATURES]: the square root of the foreground's hue x saturation x value
    histogram (grey levels apart), of each channel's mean and spread over the foreground, and of its share."""
    out = np.zeros((len(images), FEATURES), dtype=np.float32)
    for start in range(0, len(images), batch):
        out[start:start + batch] = np.sqrt(_features(np.asarray(images[start:start + batch], np.float32) / 255))
    return out


def _features(pixels: np.ndarray) -> np.ndarray:  # [B, 3, S, S] in 0..1 -> [B, FEATURES]
    r, g, b = pixels[:, 0], pixels[:, 1], pixels[:, 2]
    high, low = pixels.max(1), pixels.min(1)  # [B, S, S]
    chroma = high - low
    saturation = np.where(high > 0, chroma / np.maximum(high, 1e-6), 0)
    foreground = low < BACKGROUND
    safe = np.maximum(chroma, 1e-6)
    hue = np.where(high == r, ((g - b) / safe) % 6, np.where(high == g, (b - r) / safe + 2, (r - g) / safe + 4)) / 6
    coloured = (saturation > 0.15) & (high > 0.12)
    hue_bin = np.minimum((hue * HUES).astype(int), HUES - 1)
    saturation_bin = np.clip(((saturation - 0.15) / 0.85 * SATURATIONS).astype(int), 0, SATURATIONS - 1)
    value_bin = np.minimum((high * VALUES).astype(int), VALUES - 1)
    bins = np.where(coloured, (hue_bin * SATURATIONS + saturation_bin) * VALUES + value_bin,
                    HUES * SATURATIONS * VALUES + np.minimum((high * GREYS).astype(int), GREYS - 1))
    count = foreground.sum((1, 2)).astype(np.float32)  # [B]
    rows = np.broadcast_to(np.arange(len(pixels))[:, None, None], bins.shape)
    histogram = np.bincount((rows * HISTOGRAM + bins)[foreground], minlength=len(pixels) * HISTOGRAM)
    out = np.zeros((len(pixels), FEATURES), dtype=np.float32)
    out[:, :HISTOGRAM] = histogram.reshape(len(pixels), HISTOGRAM) / np.maximum(count, 1)[:, None]
    mask = foreground[:, None].astype(np.float32)  # [B, 1, S, S]
    mean = (pixels * mask).sum((2, 3)) / np.maximum(count, 1)[:, None]
    spread = np.sqrt(np.maximum(((pixels - mean[:, :, None, None]) ** 2 * mask).sum((2, 3))
                                / np.maximum(count, 1)[:, None], 0))
    out[:, HISTOGRAM:HISTOGRAM + 3], out[:, HISTOGRAM + 3:HISTOGRAM + 6] = mean, spread
    out[:, -1] = count / foreground[0].size
    return out


@dataclass(frozen=True)
class AttributeModel:
    colours: tuple[str, ...]  # the colour classes, in the order of coef's rows
    mean: np.ndarray  # [FEATURES + D]: the inputs' standardisation
    scale: np.ndarray  # [FEATURES + D]
    coef: np.ndarray  # [C, FEATURES + D]
    intercept: np.ndarray  # [C]
    type_weight: float = 0.1
    colour_weight: float = 0.1
    tau: float = 0.01

    @property
    def dim(self) -> int:
        return len(self.mean) - FEATURES

    def colour_probabilities(self, features: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """[Q, FEATURES] colour features and [Q, D] embeddings -> [Q, C] P(colour | photo)."""
        inputs = (np.hstack([features, vectors]).astype(np.float64) - self.mean) / self.scale
        logits = inputs @ self.coef.T + self.intercept
        logits -= logits.max(1, keepdims=True)
        odds = np.exp(logits)
        return odds / odds.sum(1, keepdims=True)

    def combined(self, scores: np.ndarray, types: np.ndarray, colours: np.ndarray, probabilities: np.ndarray,
                 voters: int = DEPTH) -> np.ndarray:
        """The re-ranking score of each query's candidates: scores [Q, K] (cosine, best first; -inf where there is
        none), types and colours [Q, K] (the candidates' articleType and baseColour, None where missing),
        probabilities [Q, C] (colour_probabilities) -> [Q, K]. The first ``voters`` candidates vote on the type."""
        valid = np.isfinite(scores)
        codes = np.unique(np.where(valid, types, None).astype(str), return_inverse=True)[1].reshape(scores.shape)
        weights = np.where(valid, np.exp((scores - scores[:, :1]) / self.tau), 0)  # softmax(cosine / tau), unnormed
        weights[:, voters:] = 0
        votes = np.zeros((len(scores), int(codes.max()) + 1))
        np.add.at(votes, (np.arange(len(scores))[:, None].repeat(scores.shape[1], 1), codes), weights)
        rows = np.arange(len(scores))[:, None]
        type_share = votes[rows, codes] / np.maximum(votes.sum(1, keepdims=True), 1e-12)
        known = {colour: i for i, colour in enumerate(self.colours)}
        places = np.vectorize(lambda c: known.get(c, -1), otypes=[int])(colours)
        # a colour the model does not know (or none): as likely as any, so that it neither helps nor sinks the item
        colour_share = np.where(places >= 0, probabilities[rows, np.maximum(places, 0)], 1 / len(self.colours))
        return np.where(valid, scores + self.type_weight * np.log(type_share + TYPE_FLOOR)
                        + self.colour_weight * np.log(colour_share + COLOUR_FLOOR), -np.inf)

    def with_weights(self, type_weight: float, colour_weight: float, tau: float) -> "AttributeModel":
        return replace(self, type_weight=type_weight, colour_weight=colour_weight, tau=tau)


@dataclass(frozen=True)
class Reranker:
    """One photo query's re-ranking of its hits (stores.Hit, in cosine order): the first ``depth`` in the order of the
    re-ranking score, the rest after them in their order, each scored by the re-ranking score."""
    model: AttributeModel
    probabilities: np.ndarray  # [C]: the query's P(colour) (AttributeModel.colour_probabilities)
    depth: int = DEPTH

    def __call__(self, hits: list) -> list:
        if not hits:
            return hits
        column = lambda name: np.asarray([[hit.record.get(name) for hit in hits]], dtype=object)  # noqa: E731
        combined = self.model.combined(np.asarray([[hit.score for hit in hits]]), column("articleType"),
                                       column("baseColour"), self.probabilities[None], self.depth)[0]
        order = [*np.argsort(-combined[:self.depth], kind="stable"), *range(self.depth, len(hits))]
        return [replace(hits[i], score=float(combined[i])) for i in order]


def fit(features: np.ndarray, vectors: np.ndarray, colours) -> AttributeModel:
    """The colour model of the train split's photos: features [N, FEATURES], embeddings [N, D], baseColour [N]
    (rows without one are left out)."""
    from sklearn.linear_model import LogisticRegression

    colours = np.asarray(colours, dtype=object)
    keep = np.asarray([isinstance(c, str) and c != "" for c in colours])
    inputs = np.hstack([features, vectors]).astype(np.float64)[keep]
    mean, scale = inputs.mean(0), inputs.std(0) + 1e-6
    names = sorted(set(colours[keep]))
    if len(names) < 2:
        raise UserError("the catalog needs at least two baseColour values to learn colour")
    labels = np.searchsorted(names, colours[keep].astype(str))
    model = LogisticRegression(max_iter=500, C=0.5).fit((inputs - mean) / scale, labels)
    return AttributeModel(tuple(names), mean, scale, model.coef_, model.intercept_)


def save(model: AttributeModel, run_dir, record: dict):
    from safetensors.numpy import save_file

    from fashion_search.files import atomic_write

    tensors = {"mean": model.mean, "scale": model.scale, "coef": model.coef, "intercept": model.intercept}
    metadata = {"colours": json.dumps(list(model.colours)), "type_weight": str(model.type_weight),
                "colour_weight": str(model.colour_weight), "tau": str(model.tau), "record": json.dumps(record)}
    atomic_write(Path(run_dir) / FILE, lambda tmp: save_file(
        {name: np.ascontiguousarray(value, dtype=np.float64) for name, value in tensors.items()}, tmp, metadata))


def load(run_dir, dim: int) -> AttributeModel | None:
    """The run's attribute model for embeddings of ``dim``; None where the run has none. A file that is not one
    (or of another dimension) is refused with one clear line (UserError)."""
    from safetensors import SafetensorError, safe_open

    path = Path(run_dir) / FILE
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="numpy") as file:
            metadata = file.metadata() or {}
            tensors = {name: file.get_tensor(name) for name in ("mean", "scale", "coef", "intercept")}
        colours = tuple(str(c) for c in json.loads(metadata["colours"]))
        model = AttributeModel(colours, tensors["mean"], tensors["scale"], tensors["coef"], tensors["intercept"],
                               float(metadata["type_weight"]), float(metadata["colour_weight"]),
                               float(metadata["tau"]))
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise UserError(f"{path} is not an attribute model ({str(exc)[:200]}): rerun "
                        f"python -m fashion_search.cli.attributes {run_dir}") from None
    width = FEATURES + dim
    shapes_ok = (model.mean.shape == model.scale.shape == (width,) and model.coef.shape == (len(colours), width)
                 and model.intercept.shape == (len(colours),))
    weights_ok = all(np.isfinite(w) and 0 <= w <= 100 for w in (model.type_weight, model.colour_weight)) and \
        np.isfinite(model.tau) and 1e-4 <= model.tau <= 10
    if not (shapes_ok and weights_ok):
        raise UserError(f"{path} does not fit this run's embeddings of dimension {dim}: rerun "
                        f"python -m fashion_search.cli.attributes {run_dir}")
    return model
