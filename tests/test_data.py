"""Fashion-MNIST from local IDX files: the IDX reader, the folder search (Debian package, torchvision raw layout)."""
from __future__ import annotations

import gzip
import os

import numpy as np
import pytest

from aggnets.data import FashionMNIST, find_fashion_mnist, load_fashion_mnist, read_idx, stratified_indices


def _write_idx(path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    with (gzip.open if compress else open)(path, "wb") as handle:
        handle.write(data)


def _fake_raw_folder(folder, n_train=20, n_test=10, compress=True) -> tuple[np.ndarray, np.ndarray]:
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8)
    labels = np.arange(n_train) % 10
    suffix = ".gz" if compress else ""
    _write_idx(os.path.join(folder, "train-images-idx3-ubyte" + suffix), images, compress)
    _write_idx(os.path.join(folder, "train-labels-idx1-ubyte" + suffix), labels, compress)
    _write_idx(os.path.join(folder, "t10k-images-idx3-ubyte" + suffix), images[:n_test], compress)
    _write_idx(os.path.join(folder, "t10k-labels-idx1-ubyte" + suffix), labels[:n_test], compress)
    return images, labels


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_roundtrip(tmp_path, compress):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / ("a.idx.gz" if compress else "a.idx")
    _write_idx(str(path), array, compress)
    np.testing.assert_array_equal(read_idx(path), array)


def test_read_idx_rejects_truncated_and_garbage(tmp_path):
    path = tmp_path / "a.idx"
    _write_idx(str(path), np.zeros((4, 5), np.uint8), False)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)
    path.write_bytes(b"\x89PNG....")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(path)


@pytest.mark.parametrize("compress", [True, False])
def test_torchvision_raw_layout(tmp_path, compress):
    images, labels = _fake_raw_folder(tmp_path / "FashionMNIST" / "raw", compress=compress)
    found = find_fashion_mnist(str(tmp_path))
    assert found["train"][0].startswith(str(tmp_path))
    x, y = load_fashion_mnist("train", str(tmp_path))
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels)
    dataset = FashionMNIST("test", str(tmp_path), image_size=40, channels=3)
    image, label = dataset[3]
    assert image.shape == (3, 40, 40) and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert label == 3 and len(dataset) == 10


def test_missing_dataset_message(tmp_path, monkeypatch):
    import aggnets.data.fashion_mnist as fm
    monkeypatch.setattr(fm, "DEBIAN_DIR", str(tmp_path / "none"))
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        find_fashion_mnist(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation", str(tmp_path))


def test_stratified_indices():
    labels = np.repeat(np.arange(5), 20)
    chosen = stratified_indices(labels, 7, seed=1)
    assert len(chosen) == 35 and np.all(np.bincount(labels[chosen]) == 7)


def test_debian_package_when_installed():
    try:
        found = find_fashion_mnist()
    except FileNotFoundError:
        if os.environ.get("CI"):
            raise  # .ci/run installs Debian's dataset-fashion-mnist
        pytest.skip("Fashion-MNIST not installed")
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.all(np.bincount(labels) == 1000) and found
