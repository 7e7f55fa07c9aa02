"""Photo search that sees colour: the colour features, the re-ranking score against a plain loop, the model file,
the fitting command on the tiny run, and the app's photo routes re-ranked by it."""
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from fashion_search import attributes
from fashion_search.errors import UserError
from fashion_search.stores import Hit


def square(colour, size=32, margin=8) -> np.ndarray:
    """uint8 [3, S, S]: a square of one colour on white."""
    image = np.full((3, size, size), 255, dtype=np.uint8)
    image[:, margin:size - margin, margin:size - margin] = np.asarray(colour, dtype=np.uint8)[:, None, None]
    return image


def test_colour_features_histogram_the_foreground_alone():
    red, blue, empty = square((200, 30, 30)), square((30, 60, 200)), np.full((3, 32, 32), 255, np.uint8)
    features = attributes.colour_features(np.stack([red, blue, empty]))
    histogram = features[:, :attributes.HISTOGRAM] ** 2  # the features are square roots
    assert np.allclose(histogram[:2].sum(1), 1) and histogram[2].sum() == 0  # white background counts nowhere
    assert histogram[0].argmax() != histogram[1].argmax() and histogram[0].max() == pytest.approx(1)
    mean = features[:2, attributes.HISTOGRAM:attributes.HISTOGRAM + 3] ** 2
    assert np.allclose(mean[0], np.asarray([200, 30, 30]) / 255, atol=1e-5)
    assert features[0, -1] ** 2 == pytest.approx(16 * 16 / 32 ** 2)  # the share of the photo that is the product


def loop_combined(model, scores, types, colours, probabilities, voters):
    """The re-ranking score written out, one candidate at a time (the independent computation)."""
    out = np.full(len(scores), -np.inf)
    weights = [np.exp((s - scores[0]) / model.tau) if i < voters else 0.0 for i, s in enumerate(scores)]
    for i in range(len(scores)):
        share = sum(w for w, t in zip(weights, types) if t == types[i]) / sum(weights)
        colour = probabilities[model.colours.index(colours[i])] if colours[i] in model.colours else 1 / 3
        out[i] = scores[i] + model.type_weight * np.log(share + attributes.TYPE_FLOOR) + \
            model.colour_weight * np.log(colour + attributes.COLOUR_FLOOR)
    return out


def tiny_model(dim=4, colours=("Black", "Blue", "Red"), seed=0) -> attributes.AttributeModel:
    rng = np.random.default_rng(seed)
    width = attributes.FEATURES + dim
    return attributes.AttributeModel(colours, rng.normal(size=width), rng.uniform(0.5, 2, width),
                                     rng.normal(size=(len(colours), width)), rng.normal(size=len(colours)),
                                     type_weight=0.2, colour_weight=0.1, tau=0.05)


def test_the_reranking_score_is_the_formula_and_the_reranker_orders_by_it():
    rng = np.random.default_rng(1)
    model = tiny_model()
    scores = np.sort(rng.uniform(0.2, 0.9, 12))[::-1]
    types = rng.choice(["Tshirts", "Shirts", None], 12).astype(object)
    colours = rng.choice(["Red", "Blue", "Navy Blue", None], 12).astype(object)  # one the model never saw, none
    probabilities = model.colour_probabilities(rng.uniform(size=(1, attributes.FEATURES)), rng.normal(size=(1, 4)))
    assert probabilities.shape == (1, 3) and probabilities.sum() == pytest.approx(1)
    expected = loop_combined(model, scores, list(types), list(colours), probabilities[0], voters=8)
    got = model.combined(scores[None], types[None], colours[None], probabilities, voters=8)[0]
    assert np.allclose(got, expected)
    hits = [Hit(str(i), float(s), {"articleType": t, "baseColour": c}) for i, (s, t, c) in
            enumerate(zip(scores, types, colours))]
    reranked = attributes.Reranker(model, probabilities[0], depth=8)(hits)
    head = [int(hit.key) for hit in reranked[:8]]
    assert head == list(np.argsort(-expected[:8], kind="stable")) and sorted(head) == list(range(8))
    assert [hit.key for hit in reranked[8:]] == [str(i) for i in range(8, 12)]  # after the depth: as they were
    assert [hit.score for hit in reranked[8:]] == pytest.approx(list(expected[8:]))


def test_the_model_file_round_trips_and_a_wrong_one_is_refused_in_one_line(tmp_path):
    assert attributes.load(tmp_path, 4) is None
    model = tiny_model()
    attributes.save(model, tmp_path, {"chosen_on": "a test"})
    back = attributes.load(tmp_path, 4)
    assert back.colours == model.colours and (back.type_weight, back.colour_weight, back.tau) == (0.2, 0.1, 0.05)
    assert np.array_equal(back.coef, model.coef) and np.array_equal(back.scale, model.scale)
    with pytest.raises(UserError, match="dimension 8"):
        attributes.load(tmp_path, 8)
    (tmp_path / attributes.FILE).write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="not an attribute model"):
        attributes.load(tmp_path, 4)


def photo(colour, size=64) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.transpose(square(colour, size, 12), (1, 2, 0))).save(buffer, "PNG")
    return buffer.getvalue()


def test_the_fitted_run_reranks_photo_queries_on_every_photo_route(clip_run, cache_dir, tmp_path):
    from fashion_search import calibration
    from fashion_search.cli import app, photo_attributes
    from fashion_search.serving.query import Part, Query

    run = tmp_path / "run"
    shutil.copytree(clip_run, run, ignore=shutil.ignore_patterns("index"))
    report = photo_attributes.main([str(run), "--cache-dir", str(cache_dir)])
    chosen = report["chosen on val"]
    assert chosen["tau"] in photo_attributes.TAUS and report["colour classes"] == 4
    cosine, reranked = report["val"]["cosine"], report["val"]["re-ranked"]
    assert reranked["type precision@5"] >= cosine["type precision@5"] - photo_attributes.TYPE_SLACK
    assert reranked["type and colour precision@5"] >= cosine["type and colour precision@5"]  # w = 0 is a choice
    assert calibration.for_kind(calibration.load(run), "photo attributes") is not None
    service, _ = app.load_service(app.parse_config(["--run", str(run), "--cache-dir", str(cache_dir)]))
    model = service.attributes
    assert model is not None and model.tau == chosen["tau"]
    red = photo((200, 30, 30))
    results = service.run(Query((Part("photo", red),), collapse=False))
    pixels = service.encoder.decode(red)
    vector = service.encoder.embed_many([pixels])[0]
    probabilities = model.colour_probabilities(attributes.colour_features(pixels[None]), vector[None])[0]
    expected = service.catalog.search(vector, k=5, rerank=attributes.Reranker(model, probabilities))
    assert [r["id"] for r in results] == [r["id"] for r in expected]
    assert all("confidence" in r for r in results)  # the "photo attributes" calibration
    plain = service.catalog.search(vector, k=attributes.DEPTH)
    assert [r["score"] for r in results] != [r["score"] for r in plain[:5]]  # scores are the re-ranking's
    batch = service.search_batch([red, b"not a photo"], Query((Part("photo", b""),), collapse=False))
    assert [r["id"] for r in batch[0]["results"]] == [r["id"] for r in results] and "error" in batch[1]
    json.dumps(results)  # plain values
