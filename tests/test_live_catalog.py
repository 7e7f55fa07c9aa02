"""catalog.py add | remove on a served catalog: new items are found and removed ones never come back, in the running
service, without a restart."""
import shutil

import numpy as np
import pytest

from conftest import COLOURS, product_photo


def new_photos(folder, count=10):
    rng = np.random.default_rng(7)
    folder.mkdir()
    photos = {}
    for i in range(count):
        photos[f"new-{i}"] = product_photo(i % 5, list(COLOURS.values())[i % 4], rng)
        (folder / f"new-{i}.jpg").write_bytes(photos[f"new-{i}"])
    return photos


def test_added_items_are_found_and_removed_ones_never_return(live, cache_dir, tmp_path, capsys):
    from fashion_search.cli import catalog_admin as catalog

    run, service = live
    before = len(service.catalog)
    photos = new_photos(tmp_path / "new")
    catalog.main(["add", str(tmp_path / "new"), "--run", str(run), "--cache-dir", str(cache_dir)])
    assert f"added 10 items and replaced 0: the catalog holds {before + 10}" in capsys.readouterr().out
    assert len(service.catalog) == before + 10  # the running service sees them
    for item_id, data in photos.items():
        results = service.search_image_bytes(data)
        mine = [r for r in results if r["id"] == item_id]
        assert mine and mine[0]["score"] >= 0.999, (item_id, results)
    assert service.search_item("new-3")[0]["id"] == "new-3"
    assert service.gallery(service.search_item("new-3"))  # its photo is served from the index folder

    removed = [f"new-{i}" for i in range(5)]
    catalog.main(["remove", *removed, "--run", str(run), "--cache-dir", str(cache_dir)])
    assert "removed 5 items" in capsys.readouterr().out
    assert len(service.catalog) == before + 5
    for data in photos.values():
        assert not {r["id"] for r in service.search_image_bytes(data)} & set(removed)

    # a second app start reads the updated catalog as it is (nothing rebuilt, nothing lost)
    from fashion_search.cli import app

    again, _ = app.load_service(app.parse_config(["--run", str(run), "--cache-dir", str(cache_dir)]))
    assert len(again.catalog) == before + 5 and again.catalog.vector("new-9") is not None


def test_catalog_command_errors_are_one_line(live, tmp_path, capsys):
    from fashion_search.cli import catalog_admin as catalog
    from fashion_search.errors import UserError

    run, _ = live
    with pytest.raises(SystemExit):
        catalog.main(["remove", "--run", str(run)])  # no ids
    with pytest.raises(UserError, match="not a clip.py run"):
        catalog.main(["count", "--run", str(tmp_path)])
    catalog.main(["remove", "no-such-id", "--run", str(run)])
    out = capsys.readouterr().out
    assert "not in the catalog: 'no-such-id'" in out and "removed 0 items" in out


def readme_commands(script):
    """The README's `python SCRIPT ...` commands, as written, for runs/clip (not those naming a remote server)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    return [c for c in re.findall(r"`(python " + script + r" [^`]*)`", text) if "://" not in c]


def test_every_catalog_command_in_the_readme_runs_as_written(live, cache_dir, tmp_path, monkeypatch, capsys):
    """`python catalog.py add --run runs/clip NEW_PHOTOS` (options before the items) once failed with "unrecognized
    arguments"; each command has its own parser now."""
    import shlex

    from fashion_search.cli import catalog_admin as catalog

    run, service = live
    work = tmp_path / "work"
    (work / "runs").mkdir(parents=True)
    (work / "runs" / "clip").symlink_to(run)
    (work / "data").symlink_to(cache_dir, target_is_directory=True)  # the default --cache-dir data/cache
    new_photos(work / "NEW_PHOTOS", count=3)
    monkeypatch.chdir(work)
    commands = readme_commands("catalog.py")
    assert {shlex.split(c)[2] for c in commands} == {"add", "remove", "count", "duplicates"}, commands
    before = len(service.catalog)
    for command in commands:
        argv = shlex.split(command)
        assert argv[:2] == ["python", "catalog.py"]
        catalog.main(argv[2:])
    out = capsys.readouterr().out
    assert f"added 3 items and replaced 0: the catalog holds {before + 3}" in out
    assert "groups of near-duplicates (cosine >= 0.99995)" in out
    assert len(service.catalog) == before + 3


def test_a_replaced_photo_is_shown_anew_and_ids_are_stable(live, cache_dir, tmp_path, capsys):
    from fashion_search.cli import catalog_admin as catalog
    from fashion_search.photos.pool import open_rgb

    run, service = live
    folder = tmp_path / "v1"
    new_photos(folder, count=2)
    catalog.main(["add", str(folder), "--run", str(run), "--cache-dir", str(cache_dir)])
    first = np.asarray(open_rgb(open(service.photo_file("new-0"), "rb").read()), dtype=float)
    replacement = tmp_path / "v2"
    replacement.mkdir()
    (replacement / "new-0.jpg").write_bytes(product_photo(3, (20, 200, 20), np.random.default_rng(9)))
    catalog.main(["add", str(replacement), "--run", str(run), "--cache-dir", str(cache_dir)])
    assert "added 0 items and replaced 1" in capsys.readouterr().out
    second = np.asarray(open_rgb(open(service.photo_file("new-0"), "rb").read()), dtype=float)
    assert np.abs(first - second).mean() > 20  # the gallery shows the new photo, not the one cached before


def test_photos_without_names_get_ids_from_their_content_and_duplicate_names_are_an_error(tmp_path):
    import datasets

    from fashion_search.data import catalog_splits
    from fashion_search.errors import UserError

    rng = np.random.default_rng(3)
    photos = [product_photo(i, (200, 30, 30), rng) for i in range(3)]
    for name in ("a", "b"):
        datasets.Dataset.from_dict({"image": [{"bytes": p, "path": None} for p in photos]},
                                   features=datasets.Features({"image": datasets.Image()})).save_to_disk(
            str(tmp_path / name))
    ids_a, ids_b = (catalog_splits(str(tmp_path / name))["all"]["id"] for name in ("a", "b"))
    assert ids_a == ids_b and len(set(ids_a)) == 3 and all(i.startswith("photo-") for i in ids_a)
    twice = tmp_path / "twice"
    twice.mkdir()
    (twice / "shirt.jpg").write_bytes(photos[0])
    (twice / "shirt.png").write_bytes(photos[1])
    with pytest.raises(UserError, match="two photos named 'shirt'"):
        catalog_splits(str(twice))


def test_the_app_serves_the_newest_intact_version_with_its_added_items(live, cache_dir, tmp_path):
    from fashion_search.cli import app
    from fashion_search.cli import catalog_admin as catalog

    run, service = live
    new_photos(tmp_path / "new", count=2)
    catalog.main(["add", str(tmp_path / "new"), "--run", str(run), "--cache-dir", str(cache_dir)])
    catalog.main(["remove", "new-1", "--run", str(run), "--cache-dir", str(cache_dir)])  # the newest version
    current = (run / "index" / "CURRENT").read_text().split('"')[3]
    (run / "index" / current / "items.parquet").write_bytes(b"damaged")
    again, _ = app.load_service(app.parse_config(["--run", str(run), "--cache-dir", str(cache_dir)]))
    assert again.search_item("new-0")[0]["id"] == "new-0"  # the add survived: nothing was rebuilt over it


def test_an_empty_catalog_answers_no_results(live, cache_dir):
    run, service = live
    ids = service.catalog.store.items()[0]
    service.catalog.store.delete(ids)
    assert service.search_image_bytes(product_photo(0, (200, 30, 30), np.random.default_rng(0))) == []
    assert service.search_text("shirt") == []


@pytest.mark.parametrize("index", ["faiss", "milvus"])
def test_catalog_py_works_on_the_catalog_the_app_serves_and_refuses_another(clip_run, cache_dir, tmp_path,
                                                                          capsys, index):
    """The app serves a --dataset catalog; catalog.py without --dataset reads that source from the index and adds to
    it; with another --dataset it is refused and nothing is written; a restart keeps what was added."""
    from fashion_search.cli import app
    from fashion_search.cli import catalog_admin as catalog
    from conftest import make_hub_dataset

    from fashion_search.stores import OtherCatalog

    run = tmp_path / "run"
    shutil.copytree(clip_run, run, ignore=shutil.ignore_patterns("index"))
    shop = make_hub_dataset(tmp_path / "shop", corrupt_rows=0)
    spec = ["--index", f"milvus:{tmp_path / 'shop.db'}"] if index == "milvus" else ["--index", "faiss"]
    argv = ["--run", str(run), "--cache-dir", str(cache_dir), "--dataset", str(shop), *spec]
    service, _ = app.load_service(app.parse_config(argv))
    served = len(service.catalog)
    photos = new_photos(tmp_path / "new", count=3)
    catalog.main(["add", str(tmp_path / "new"), "--run", str(run), "--cache-dir", str(cache_dir), *spec])
    assert f"the index holds the catalog of dataset {shop.resolve()}" in capsys.readouterr().out
    assert len(service.catalog) == served + 3
    with pytest.raises(OtherCatalog, match="holds the catalog of dataset"):
        catalog.main(["count", "--run", str(run), "--cache-dir", str(cache_dir), "--dataset", str(tmp_path / "new"),
                      *spec])
    with pytest.raises(OtherCatalog, match=f"holds the catalog of dataset:{shop.resolve()}, not of run"):
        catalog.catalog_from_run(run, service.encoder, None, str(cache_dir), spec[1], rebuild=False)
    assert len(service.catalog) == served + 3  # nothing written
    again, _ = app.load_service(app.parse_config(argv))
    assert len(again.catalog) == served + 3 and again.catalog.vector(next(iter(photos))) is not None
    service.catalog.store.close()
    again.catalog.store.close()


def test_catalog_py_add_leaves_out_hostile_photos_and_says_why(live, cache_dir, tmp_path, capsys):
    import hostile

    from fashion_search.cli import catalog_admin as catalog

    run, service = live
    before = len(service.catalog)
    folder = tmp_path / "feed"
    new_photos(folder, count=2)
    expected = 2
    for i, (name, build, file_name, expect) in enumerate(hostile.CASES):
        (folder / f"hostile-{i}{file_name[file_name.rindex('.'):]}").write_bytes(build())
        expected += expect == "results"
    catalog.main(["add", str(folder), "--run", str(run), "--cache-dir", str(cache_dir)])
    out = capsys.readouterr().out
    assert f"the catalog holds {before + expected}" in out, out
    assert f"left out {len(hostile.CASES) - expected + 2} photos" in out and "too large" in out, out
