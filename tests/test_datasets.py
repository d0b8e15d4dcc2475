"""Training datasets: the procedural Motifs dataset (determinism, class rule, balance, no global-colour shortcut) and
the folder datasets (ImageFolder trees, landmark / place layouts by folder or CSV, id-disjoint splits, errors)."""
from __future__ import annotations

import csv
import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from aggnets.data import MOTIF_SHAPES, ImageFolderDataset, LandmarkDataset, MotifDataset, motif_pairs

# ---------------------------------------------------------------------------------------------------- Motifs


def _digests(dataset, count):
    return {hashlib.sha1(dataset.image_uint8(i).numpy().tobytes()).hexdigest() for i in range(count)}


def test_motif_items_shape_dtype_range():
    dataset = MotifDataset("val", size=12)
    image, label = dataset[3]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0 and float(image.std()) > 0.05
    assert isinstance(label, int) and label == 3
    assert dataset.targets.dtype == torch.int64 and dataset.targets.shape == (12,)
    assert dataset.num_classes == len(dataset.classes) == 10
    assert MotifDataset("test", size=2, image_size=40)[1][0].shape == (3, 40, 40)
    assert dataset[-1][1] == dataset[11][1]
    with pytest.raises(IndexError):
        dataset[12]


def test_motif_default_sizes():
    assert [len(MotifDataset(split)) for split in ("train", "val", "test")] == [4000, 1000, 1000]


def test_motif_deterministic_and_order_free():
    first = MotifDataset("train", size=16, cache=True)
    second = MotifDataset("train", size=16, cache=False)
    forward = [first[i][0] for i in range(16)]
    backward = [second[i][0] for i in reversed(range(16))][::-1]
    for a, b, c in zip(forward, backward, [first[i][0] for i in range(16)]):  # the last from the cache
        assert torch.equal(a, b) and torch.equal(a, c)


def test_motif_thread_count_does_not_change_images():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [MotifDataset("val", size=3, image_size=128, cache=False)[i][0] for i in range(3)]
        torch.set_num_threads(2)
        two = [MotifDataset("val", size=3, image_size=128, cache=False)[i][0] for i in range(3)]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_motif_seeds_and_splits_differ():
    base = MotifDataset("train", size=50)
    assert _digests(base, 50).isdisjoint(_digests(MotifDataset("train", size=50, seed=1), 50))
    splits = [_digests(MotifDataset(split, size=150), 150) for split in ("train", "val", "test")]
    assert all(len(s) == 150 for s in splits)
    assert splits[0].isdisjoint(splits[1]) and splits[0].isdisjoint(splits[2]) and splits[1].isdisjoint(splits[2])


def test_motif_labels_balanced():
    dataset = MotifDataset("train", size=1000, num_classes=7)
    assert torch.bincount(dataset.targets).tolist() == [1000 // 7 + (c < 1000 % 7) for c in range(7)]
    assert torch.equal(MotifDataset("train", size=1000, num_classes=7, seed=5).targets, dataset.targets)


def test_motif_pairs_round_robin():
    pairs = motif_pairs(len(MOTIF_SHAPES))
    assert len(pairs) == len(set(pairs)) == 15 and all(a < b for a, b in pairs)
    for k in range(1, 6):  # the first 3k classes use every shape k times
        assert np.bincount(np.ravel(pairs[:3 * k]), minlength=6).tolist() == [k] * 6
    dataset = MotifDataset("train", size=1, num_classes=15)
    assert dataset.classes[0] == f"{MOTIF_SHAPES[pairs[0][0]]}+{MOTIF_SHAPES[pairs[0][1]]}"
    assert len(set(dataset.classes)) == 15


def test_motif_layout_follows_class_rule():
    dataset = MotifDataset("train", size=60, num_classes=15, motifs_per_image=(2, 5))
    for index in range(60):
        layout = dataset.layout(index)
        expected = set(dataset.classes[dataset.targets[index]].split("+"))
        assert {m["shape"] for m in layout} == expected  # only the class's two shapes, both present
        assert 2 <= len(layout) <= 5
        for m in layout:
            assert 0.14 * 32 <= m["radius"] <= 0.26 * 32
            assert m["radius"] <= m["x"] <= 64 - m["radius"] and m["radius"] <= m["y"] <= 64 - m["radius"]


def test_motif_drawing_matches_layout():
    """Without pixel noise, the pixel under the top motif's centre has its colour (a ring's centre is a hole)."""
    dataset = MotifDataset("val", size=40, noise=0.0, cache=False)
    for index in range(40):
        top = dataset.layout(index)[-1]
        pixel = dataset[index][0][:, int(top["y"]), int(top["x"])]
        close = torch.allclose(pixel, torch.tensor(top["colour"]), atol=1 / 255)
        assert close == (top["shape"] != "ring"), (index, top)


def test_motif_class_not_predictable_from_mean_colour():
    """Nearest class mean on per-image mean RGB (fit on 500 train images, scored on 500 val images) is near chance."""
    def features(split):
        dataset = MotifDataset(split, size=500, cache=False)
        return torch.stack([dataset[i][0].mean((1, 2)) for i in range(500)]).numpy(), dataset.targets.numpy()

    (x_fit, y_fit), (x_val, y_val) = features("train"), features("val")
    scale = x_fit.std(0)
    means = np.stack([x_fit[y_fit == c].mean(0) for c in range(10)])
    predicted = (((x_val[:, None] - means[None]) / scale) ** 2).sum(-1).argmin(1)
    assert (predicted == y_val).mean() < 2 * 0.1


@pytest.mark.parametrize("kwargs, message", [
    (dict(split="training"), "split must be one of"),
    (dict(num_classes=16), "num_classes must be in"),
    (dict(num_classes=1), "num_classes must be in"),
    (dict(motifs_per_image=(1, 3)), "motifs_per_image"),
    (dict(motifs_per_image=(4, 3)), "motifs_per_image"),
    (dict(scale=(0.0, 0.2)), "scale must be"),
    (dict(scale=(0.3, 0.2)), "scale must be"),
    (dict(scale=(0.2, 0.6)), "scale must be"),
    (dict(size=0), "size must be"),
    (dict(image_size=8), "image_size must be"),
    (dict(seed=-1), "seed must be"),
])
def test_motif_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MotifDataset(**kwargs)


def test_motif_materialize():
    dataset = MotifDataset("test", size=5).materialize()
    assert bool(dataset._filled.all())
    with pytest.raises(ValueError, match="cache=True"):
        MotifDataset("test", size=5, cache=False).materialize()

# ---------------------------------------------------------------------------------------------------- folders


def _write_image(path, seed=0, size=(20, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _tree(root, counts, ext=".png"):
    for k, (name, count) in enumerate(counts.items()):
        for i in range(count):
            _write_image(root / name / f"{i:02d}{ext}", seed=100 * k + i)
    return root


def test_image_folder_all_and_items(tmp_path):
    root = _tree(tmp_path / "data", {"cat": 3, "ant": 2, "bee": 4})
    dataset = ImageFolderDataset(root, image_size=12)
    assert dataset.classes == ["ant", "bee", "cat"] and dataset.num_classes == 3 and len(dataset) == 9
    assert dataset.targets.dtype == torch.int64 and dataset.targets.tolist() == [0, 0, 1, 1, 1, 1, 2, 2, 2]
    image, label = dataset[4]
    assert image.shape == (3, 12, 12) and image.dtype == torch.float32 and label == 1
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    augmented, _ = ImageFolderDataset(root, image_size=12, augment=True)[4]
    assert augmented.shape == (3, 12, 12) and augmented.dtype == torch.float32


def test_image_folder_resize_keeps_aspect(tmp_path):
    """Shorter side to image_size, then centre crop: the outer quarters of a 2:1 image are cut, not squeezed."""
    pixels = np.zeros((32, 64, 3), dtype=np.uint8)
    pixels[:, :16, 0] = pixels[:, 48:, 0] = 255  # red outer quarters
    pixels[:, 16:48, 2] = 255  # blue middle
    (tmp_path / "a").mkdir()
    Image.fromarray(pixels).save(tmp_path / "a" / "wide.png")
    image, _ = ImageFolderDataset(tmp_path, image_size=16)[0]
    blue = torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1)
    assert torch.allclose(image[:, :, 1:-1], blue.expand(3, 16, 14), atol=0.02)  # a squeeze would keep red columns
    assert float((image[:, :, [0, -1]] - blue).abs().max()) < 0.2  # the resampling kernel reaches past the crop


def test_image_folder_stratified_split(tmp_path):
    root = _tree(tmp_path, {"a": 10, "b": 20, "c": 10}, ext=".jpg")
    parts = {s: ImageFolderDataset(root, s, val_fraction=0.1, test_fraction=0.2) for s in ("train", "val", "test")}
    assert [len(parts[s]) for s in ("train", "val", "test")] == [28, 4, 8]
    assert torch.bincount(parts["val"].targets).tolist() == [1, 2, 1]  # stratified
    paths = [set(parts[s].paths) for s in ("train", "val", "test")]
    assert not (paths[0] & paths[1] or paths[0] & paths[2] or paths[1] & paths[2])
    assert set.union(*paths) == set(ImageFolderDataset(root).paths)
    assert ImageFolderDataset(root, "val", val_fraction=0.1, test_fraction=0.2).paths == parts["val"].paths
    other = [set(ImageFolderDataset(root, "test", test_fraction=0.2, seed=seed).paths) for seed in range(1, 4)]
    assert any(p != paths[2] for p in other)


def test_image_folder_presplit_layout(tmp_path):
    _tree(tmp_path / "train", {"a": 3, "b": 3})
    _tree(tmp_path / "val", {"a": 1, "b": 1})
    _tree(tmp_path / "test", {"a": 1, "c": 2})
    test = ImageFolderDataset(tmp_path, "test")
    assert test.classes == ["a", "b", "c"] and test.targets.tolist() == [0, 2, 2]
    assert len(ImageFolderDataset(tmp_path, "train")) == 6 and len(ImageFolderDataset(tmp_path)) == 11
    _tree(tmp_path / "other", {"val": 2, "test": 2})  # a plain tree whose classes happen to be named like splits
    assert ImageFolderDataset(tmp_path / "other").classes == ["test", "val"]


def test_image_folder_extensions(tmp_path):
    _tree(tmp_path, {"a": 2, "b": 2})
    _tree(tmp_path, {"a": 3}, ext=".jpg")
    assert len(ImageFolderDataset(tmp_path)) == 7
    assert len(ImageFolderDataset(tmp_path, extensions=("JPG",))) == 3
    assert len(ImageFolderDataset(tmp_path, extensions=".png")) == 4


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        ImageFolderDataset(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no class folder"):
        ImageFolderDataset(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no image"):
        ImageFolderDataset(tmp_path)
    _tree(tmp_path, {"a": 2, "b": 2})
    with pytest.raises(ValueError, match="split must be one of"):
        ImageFolderDataset(tmp_path, "training")
    with pytest.raises(ValueError, match="holds no image"):  # 10 % of 2 images rounds to 0
        ImageFolderDataset(tmp_path, "val")
    with pytest.raises(ValueError, match="sum below 1"):
        ImageFolderDataset(tmp_path, "train", val_fraction=0.6, test_fraction=0.5)
    _tree(tmp_path / "pre" / "train", {"a": 1})
    with pytest.raises(ValueError, match="no 'val' folder"):
        ImageFolderDataset(tmp_path / "pre", "val")


def _landmarks(root, n_ids=10, per_id=3):
    _tree(root, {f"id{k:02d}": per_id for k in range(n_ids)} | {"lonely": 1})
    return root


def _check_id_splits(make, n_ids=10):
    parts = {s: make(s) for s in ("train", "val", "test")}
    ids = {s: set(parts[s].ids) for s in parts}
    assert [len(ids[s]) for s in ("train", "val", "test")] == [n_ids - 4, 2, 2]
    assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])
    assert set.union(*ids.values()) == set(make(None).ids) and "lonely" not in make(None).ids
    for dataset in parts.values():
        assert dataset.classes == dataset.ids == sorted(dataset.ids)
        assert sorted(set(dataset.targets.tolist())) == list(range(len(dataset.ids)))
        assert torch.bincount(dataset.targets).min() >= 2
    assert make("val").paths == parts["val"].paths
    return parts


def test_landmark_folder_layout(tmp_path):
    root = _landmarks(tmp_path)
    parts = _check_id_splits(lambda split: LandmarkDataset(root, split, image_size=10))
    image, label = parts["test"][5]
    assert image.shape == (3, 10, 10) and image.dtype == torch.float32 and label == 1
    for path, label in zip(parts["val"].paths, parts["val"].targets.tolist()):
        assert f"/{parts['val'].ids[label]}/" in path
    assert len(LandmarkDataset(root, min_images_per_id=1).ids) == 11
    assert any(set(LandmarkDataset(root, "val", seed=seed).ids) != set(parts["val"].ids) for seed in range(1, 4))


def test_landmark_csv_layout(tmp_path):
    rows = [(f"imgs/{k}_{i}.jpg", str(1000 + k)) for k in range(10) for i in range(2 + k % 2)] + [("imgs/x.jpg", "7")]
    for n, (path, _) in enumerate(rows):
        _write_image(tmp_path / path, seed=n)
    with open(tmp_path / "train.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "path", "note"])
        writer.writerows([(image_id, path, "-") for path, image_id in rows])
    parts = _check_id_splits(lambda split: LandmarkDataset(tmp_path, split, csv=tmp_path / "train.csv"))
    assert set(parts["train"].ids) <= {str(1000 + k) for k in range(10)}
    assert parts["train"][0][0].shape == (3, 224, 224)


def test_landmark_errors(tmp_path):
    root = _landmarks(tmp_path / "lm")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        LandmarkDataset(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="csv"):
        LandmarkDataset(root, csv=tmp_path / "missing.csv")
    (tmp_path / "bad.csv").write_text("file,label\na.jpg,1\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['id', 'path'\]"):
        LandmarkDataset(root, csv=tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="no id with at least 4 images"):
        LandmarkDataset(root, min_images_per_id=4)
    with pytest.raises(ValueError, match="min_images_per_id"):
        LandmarkDataset(root, min_images_per_id=0)
    with pytest.raises(ValueError, match="holds no image"):
        LandmarkDataset(root, "val", val_fraction=0.01)
    with pytest.raises(ValueError, match="split must be one of"):
        LandmarkDataset(root, "query")
