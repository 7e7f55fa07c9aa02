"""A synthetic catalog in the hub dataset's layout and columns (data/train-00000-of-00001.parquet with an Image
feature; 60x80 product-like photos, 20 article types), for machines without the data set: the app's --dataset, and
data_preparation.py --dataset for training runs.

Usage: python benchmarks/synthetic_catalog.py FOLDER [--photos 4096]
"""
import argparse
from pathlib import Path

import numpy as np

from embed_pipeline import product_photos

TYPES = [f"Type{i:02d}" for i in range(20)]
COLOURS = ["Black", "White", "Blue", "Red", "Green", "Grey", "Navy Blue", "Brown"]


def main(argv=None):
    import datasets

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--photos", type=int, default=4096)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    n = args.photos
    kinds, colours = rng.integers(0, len(TYPES), n), rng.integers(0, len(COLOURS), n)
    genders = rng.choice(["Men", "Women"], n)
    rows = {"id": list(range(10_000, 10_000 + n)), "gender": list(genders),
            "masterCategory": [f"Master{k % 4}" for k in kinds], "subCategory": [f"Sub{k % 8}" for k in kinds],
            "articleType": [TYPES[k] for k in kinds], "baseColour": [COLOURS[c] for c in colours],
            "season": ["Summer"] * n, "year": [2012.0] * n, "usage": ["Casual"] * n,
            "productDisplayName": [f"{g} {COLOURS[c]} {TYPES[k]}" for g, c, k in zip(genders, colours, kinds)],
            "image": [{"bytes": photo, "path": None} for photo in product_photos(n)]}
    features = datasets.Features({
        "id": datasets.Value("int64"), **{k: datasets.Value("string") for k in (
            "gender", "masterCategory", "subCategory", "articleType", "baseColour", "season")},
        "year": datasets.Value("float64"), "usage": datasets.Value("string"),
        "productDisplayName": datasets.Value("string"), "image": datasets.Image()})
    (Path(args.folder) / "data").mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(
        str(Path(args.folder) / "data" / "train-00000-of-00001.parquet"))
    print(f"wrote {n} synthetic products to {args.folder}")


if __name__ == "__main__":
    main()
