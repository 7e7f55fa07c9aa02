"""``row`` is always a row's place in its split as stored, also after a row whose photo does not decode: the
embeddings' metadata, the photo the app shows, the pixel baseline and CLIP's name pairing all read it so."""
import shutil

import pandas as pd
import pytest

from conftest import tiny_args

BROKEN = 2  # a row in the middle of the test split


@pytest.fixture(scope="module")
def broken_processed(processed, tmp_path_factory):
    """The processed fixture with its test split's third photo made unreadable after preparation."""
    import datasets
    from datasets import Image as ImageFeature

    data = datasets.load_from_disk(str(processed))
    raw = data["test"].cast_column("image", ImageFeature(decode=False))
    broken = raw.map(lambda cell, i: {"image": {"bytes": b"not a photo", "path": None} if i == BROKEN else cell},
                     input_columns="image", with_indices=True)
    data["test"] = broken.cast_column("image", ImageFeature())
    folder = tmp_path_factory.mktemp("broken") / "processed"
    data.save_to_disk(str(folder))
    shutil.copy(processed / "label_map.json", folder / "label_map.json")
    return folder


def test_rows_after_an_unreadable_photo_keep_their_own_place(broken_processed, tmp_path):
    import datasets
    from datasets import Image as ImageFeature

    from fashion_search.config import DataConfig
    from fashion_search.data import split_rows
    from fashion_search.serving.catalog import PhotoSource

    test = datasets.load_from_disk(str(broken_processed))["test"]
    rows, kept, ok = split_rows(test, DataConfig(image_size=32, cache_dir=str(tmp_path / "cache")))
    assert not ok[BROKEN] and ok.sum() == len(test) - 1
    assert rows.__getitems__([BROKEN])[2].item() == BROKEN + 1  # what CLIP's name pairing indexes by
    assert kept[BROKEN]["id"] == test[BROKEN + 1]["id"]

    from fashion_search.cli import clip

    run = tmp_path / "clip"
    clip.main(tiny_args(broken_processed, run, tmp_path / "cache"))
    meta = pd.read_parquet(run / "embeddings" / "test.parquet")
    assert BROKEN not in set(meta["row"]) and len(meta) == len(test) - 1
    assert meta["id"].tolist() == [test[int(row)]["id"] for row in meta["row"]]  # each record names its own row
    raw = test.cast_column("image", ImageFeature(decode=False))
    photos = PhotoSource({"test": test}, tmp_path / "photos")
    for record in meta.iloc[BROKEN:BROKEN + 3].to_dict("records"):  # the rows after the broken one
        assert photos.read(record) == raw[int(record["row"])]["image"]["bytes"]
