import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fashion_search.cli import data_preparation
from conftest import CLASSES, SHARED_DATA

REPO = Path(__file__).resolve().parents[1]


def test_splits_are_disjoint_stratified_and_complete(processed):
    import datasets

    splits = datasets.load_from_disk(str(processed))
    label_map = json.loads((processed / "label_map.json").read_text())
    ids = {s: set(splits[s]["id"]) for s in ("train", "val", "test")}
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])
    kept = sum(count for _, _, count in CLASSES if count >= 2)
    assert sum(len(v) for v in ids.values()) == kept  # nothing lost, the corrupt row and the singleton gone
    assert "Ties" not in label_map["labels"] and label_map["dropped"]["small_classes"] == {"Ties": 1}
    assert label_map["dropped"]["undecodable_images"] == 1
    assert label_map["train_only_classes"] == ["Caps"]  # 2 rows: cannot give val and test one each
    names = sorted(label_map["labels"])
    assert [label_map["labels"][n]["id"] for n in names] == list(range(len(names)))
    for split in ("val", "test"):
        labels = splits[split]["label"]
        for name, _, count in CLASSES:
            if name in label_map["labels"] and name != "Caps":
                assert labels.count(label_map["labels"][name]["id"]) == round(count * 0.2)


def test_split_is_deterministic_and_seeded():
    labels = np.array(["a"] * 30 + ["b"] * 20 + ["c"] * 2, dtype=object)
    first, small = data_preparation.stratified_split(labels, 0.1, 0.1, seed=0)
    again, _ = data_preparation.stratified_split(labels, 0.1, 0.1, seed=0)
    other, _ = data_preparation.stratified_split(labels, 0.1, 0.1, seed=1)
    assert (first == again).all() and not (first == other).all()
    assert small == ["c"] and (first[labels == "c"] == "train").all()
    assert (first[labels == "a"] == "test").sum() == 3 and (first[labels == "b"] == "val").sum() == 2


def test_rerun_replaces_the_output_atomically(hub_dataset, tmp_path, capsys):
    out = tmp_path / "processed"
    data_preparation.main(["--dataset", str(hub_dataset), "--output-dir", str(out)])
    first = (out / "label_map.json").read_text()
    data_preparation.main(["--dataset", str(hub_dataset), "--output-dir", str(out), "--min-class-size", "5"])
    assert (out / "label_map.json").read_text() != first
    assert "Caps" not in json.loads((out / "label_map.json").read_text())["labels"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["processed"]  # no temp folders left behind
    assert "train rows" in capsys.readouterr().out


def test_offline_hub_name_is_one_clear_line(tmp_path):
    result = subprocess.run([sys.executable, "data_preparation.py", "--output-dir", str(tmp_path / "x")], cwd=REPO,
                            capture_output=True, text=True, timeout=120,
                            env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "ashraq/fashion-product-images-small" in last and "--dataset PATH" in last


def test_missing_label_column_is_a_clear_error(hub_dataset, tmp_path):
    from fashion_search.errors import UserError

    with pytest.raises(UserError, match="no column 'style'"):
        data_preparation.main(["--dataset", str(hub_dataset), "--output-dir", str(tmp_path / "p"),
                               "--label-column", "style"])


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="shared real data not present")
def test_real_data(tmp_path):
    import datasets

    out = tmp_path / "processed"
    data_preparation.main(["--dataset", str(SHARED_DATA), "--output-dir", str(out)])
    splits = datasets.load_from_disk(str(out))
    label_map = json.loads((out / "label_map.json").read_text())
    # expected counts from the copy itself, whichever copy is there (all its photos decode)
    counts = Counter(datasets.load_dataset(str(SHARED_DATA), split="train")["articleType"])
    singletons = [label for label, count in counts.items() if count == 1]
    assert len(label_map["labels"]) == len(counts) - len(singletons)
    assert sorted(label_map["dropped"]["small_classes"]) == sorted(singletons)
    assert sum(len(splits[s]) for s in splits) == sum(counts.values()) - len(singletons)
    assert len(set(splits["train"]["id"]) & set(splits["test"]["id"])) == 0
