"""catalog.py add | remove on a served catalog: new items are found and removed ones never come back, in the running
service, without a restart."""
import shutil

import numpy as np
import pytest

from conftest import COLOURS, product_photo


@pytest.fixture
def live(trained_runs, cache_dir, tmp_path):
    import app

    run = tmp_path / "run"
    shutil.copytree(trained_runs["clip"], run, ignore=shutil.ignore_patterns("index"))
    service, _ = app.load_service(app.parse_args(["--run", str(run), "--cache-dir", str(cache_dir)]))
    return run, service


def new_photos(folder, count=10):
    rng = np.random.default_rng(7)
    folder.mkdir()
    photos = {}
    for i in range(count):
        photos[f"new-{i}"] = product_photo(i % 5, list(COLOURS.values())[i % 4], rng)
        (folder / f"new-{i}.jpg").write_bytes(photos[f"new-{i}"])
    return photos


def test_added_items_are_found_and_removed_ones_never_return(live, cache_dir, tmp_path, capsys):
    import catalog

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
    import app

    again, _ = app.load_service(app.parse_args(["--run", str(run), "--cache-dir", str(cache_dir)]))
    assert len(again.catalog) == before + 5 and again.catalog.vector("new-9") is not None


def test_catalog_command_errors_are_one_line(live, tmp_path, capsys):
    import catalog
    from fashion_search.errors import UserError

    run, _ = live
    with pytest.raises(SystemExit):
        catalog.main(["remove", "--run", str(run)])  # no ids
    with pytest.raises(UserError, match="not a clip.py run"):
        catalog.main(["count", "--run", str(tmp_path)])
    catalog.main(["remove", "no-such-id", "--run", str(run)])
    out = capsys.readouterr().out
    assert "not in the catalog: no-such-id" in out and "removed 0 items" in out
