"""GSV-Cities on a tiny copy of its released layout written here (Dataframes/<City>.csv, Images/<City>/<name>.jpg with
the name built as the authors' loader builds it): places and labels, the city choice, the minimum images per place,
P x K batches with every place once per epoch, clear errors naming the file, and corrupt images skipped."""
from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aggnets.data import BadImageWarning, GSVCitiesDataset
from aggnets_train.datamodule import ImageDataModule

COLUMNS = ["place_id", "year", "month", "northdeg", "city_id", "lat", "lon", "panoid"]


def image_name(city, place_id, year, month, north, lat, lon, panoid):
    """The authors' get_img_name: city_placeid(7)_year(4)_month(2)_northdeg(3)_lat_lon_panoid.jpg."""
    return (f"{city}_{str(place_id).zfill(7)}_{str(year).zfill(4)}_{str(month).zfill(2)}_{str(north).zfill(3)}_"
            f"{lat}_{lon}_{panoid}.jpg")


def write_gsv(root: Path, cities: dict[str, dict[int, int]], seed: int = 0) -> dict[str, list[Path]]:
    """``cities``: {city: {place_id: number of images}}; returns the image paths written per city."""
    rng = np.random.default_rng(seed)
    (root / "Dataframes").mkdir(parents=True)
    written: dict[str, list[Path]] = {}
    for city, places in cities.items():
        folder = root / "Images" / city
        folder.mkdir(parents=True)
        rows = []
        for place_id, count in places.items():
            for k in range(count):
                row = [place_id, 2010 + k, 1 + k, 5 * k, city, round(40.0 + place_id / 1000 + k / 1e5, 6),
                       round(-3.5 - place_id / 1000, 6), f"pano{place_id}x{k}"]
                rows.append(row)
                path = folder / image_name(city, *row[:4], *row[5:])
                Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(path, format="JPEG")
                written.setdefault(city, []).append(path)
        with open(root / "Dataframes" / f"{city}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(COLUMNS)
            writer.writerows(rows)
    return written


@pytest.fixture()
def gsv(tmp_path):
    root = tmp_path / "gsv"
    written = write_gsv(root, {"London": {7: 4, 8: 5, 9: 3}, "Boston": {7: 4, 12: 4, 13: 6}})
    return root, written


def test_places_are_unique_across_cities_and_need_min_images(gsv):
    root, written = gsv
    data = GSVCitiesDataset(root, image_size=16)
    assert data.cities == ["Boston", "London"]
    assert data.places == [("Boston", 7), ("Boston", 12), ("Boston", 13), ("London", 7), ("London", 8)]
    assert len(data) == 4 + 4 + 6 + 4 + 5 and data.targets.tolist() == [0] * 4 + [1] * 4 + [2] * 6 + [3] * 4 + [4] * 5
    assert {Path(p) for p in data.paths} == set(written["Boston"]) | (set(written["London"]) - {
        p for p in written["London"] if "_0000009_" in p.name})
    image, label = data[5]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and label == 1
    assert len(GSVCitiesDataset(root, min_images_per_place=3).places) == 6
    only = GSVCitiesDataset(root, cities=["London"], image_size=[12, 20], augment="randaugment")
    assert only.places == [("London", 7), ("London", 8)] and only[0][0].shape == (3, 12, 20)


def test_batches_hold_p_places_with_k_images_each_and_an_epoch_visits_every_place_once(tmp_path):
    root = tmp_path / "gsv"
    write_gsv(root, {"Rome": {i: 4 + i % 3 for i in range(10)}})
    data = GSVCitiesDataset(root, image_size=8)
    module = ImageDataModule(data, batch_size=6, samples_per_class=2, each_class_once=True, seed=3)
    loader = module.train_dataloader()
    assert len(loader) == 10 // 3
    seen = []
    for _, labels in loader:
        assert labels.tolist()[::2] == labels.tolist()[1::2] and len(set(labels.tolist())) == 3
        seen += labels.tolist()[::2]
    assert len(seen) == len(set(seen)) == 9
    with pytest.raises(ValueError, match="each_class_once needs P x K"):
        ImageDataModule(data, batch_size=6, each_class_once=True)


def test_layout_errors_name_the_file(gsv, tmp_path):
    root, written = gsv
    with pytest.raises(FileNotFoundError, match="Dataframes.*GSV-Cities layout"):
        GSVCitiesDataset(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"\['Paris'\].*cities found: \['Boston', 'London'\]"):
        GSVCitiesDataset(root, cities=["Paris"])
    written["Boston"][0].unlink()
    with pytest.raises(FileNotFoundError, match=r"1 images .* missing from disk, e\.g\. .*Boston_0000007_2010"):
        GSVCitiesDataset(root)
    csv_path = root / "Dataframes" / "London.csv"
    lines = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join([lines[0], lines[1], lines[2].replace("2011", "twenty")]) + "\n")
    with pytest.raises(ValueError, match=r"London.csv' line 3: place_id / year"):
        GSVCitiesDataset(root, cities=["London"])
    csv_path.write_text("place_id,year,city_id\n1,2010,London\n")
    with pytest.raises(ValueError, match=r"London.csv' lacks the column\(s\) \['month', 'northdeg'"):
        GSVCitiesDataset(root, cities=["London"])


def test_a_corrupt_image_is_skipped_and_counted(gsv):
    root, written = gsv
    written["London"][0].write_bytes(b"not a jpeg")
    data = GSVCitiesDataset(root, cities=["London"], image_size=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image, label = data[0]
    assert label == 0 and image.shape == (3, 8, 8)
    assert len(data.bad_images) == 1 and any(issubclass(w.category, BadImageWarning) for w in caught)


def test_a_short_training_run_on_gsv_cities_validates_on_an_index_layout_set(tmp_path):
    """train.py's wiring: GSV-Cities P x K batches, validation on a SPED-layout set (val/sped/R@N logged, the best
    checkpoint chosen by its R@1), the test stage on the same set."""
    import json

    from hydra import compose, initialize_config_dir

    from aggnets_train.run import train
    from tests.test_vpr_sets import write_index_set

    root = tmp_path / "gsv"
    write_gsv(root, {"Rome": {i: 4 for i in range(6)}, "Oslo": {i: 4 for i in range(4)}})
    write_index_set(tmp_path / "vpr" / "SPEDTEST", tmp_path / "vpr" / "SPED", "SPED")
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "data=gsv_cities", f"data.train.root={root}", "data.batch_size=12", "data.num_workers=0",
            "data.train.image_size=32", "data.val_sets=[sped]", f"data.val_root={tmp_path / 'vpr'}",
            "data.val_image_size=[32,32]", "task=metric_learning", "backbone=resnet18", "backbone.weights=null",
            "head=gem", "trainer.max_epochs=2", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
            "monitor.metric=val/sped/R@1", "task.recall_ks=[1,4]", "callbacks.head_monitor=null", "logger=csv",
            f"paths.output_dir={tmp_path / 'run'}"])
    train(cfg)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert {"val/sped/R@1", "val/sped/R@4", "test/sped/R@1", "test/sped/R@4"} <= set(results)
    # 3 queries: one without positives, so R@N <= 66.7 and R@4 (the whole database) = 66.7 exactly
    assert 0.0 <= results["test/sped/R@1"] <= 200 / 3 + 1e-6
    assert results["test/sped/R@4"] == pytest.approx(200 / 3) and results["val/sped/R@4"] == pytest.approx(200 / 3)
    assert list((tmp_path / "run" / "checkpoints").glob("best-*.ckpt"))


def test_a_seeded_item_draws_the_same_augmentation_whatever_the_process(gsv):
    """The samplers hand each item a seed (exact resume, any number of workers): RandAugment follows it alone."""
    root, _ = gsv
    data = GSVCitiesDataset(root, image_size=16, augment="randaugment")
    first, label = data[(3, 1234)]
    torch.manual_seed(99)  # the global stream does not matter
    again, _ = data[(3, 1234)]
    other, _ = data[(3, 4321)]
    assert torch.equal(first, again) and label == data.targets[3]
    assert not torch.equal(first, other)
