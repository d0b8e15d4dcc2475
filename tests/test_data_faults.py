"""Image files as they come in real folders: every PIL mode decoded to the right RGB, broken files skipped with a
counted warning (or an error, when asked), huge images decoded, and a training run that meets broken files
finishes."""
from __future__ import annotations

import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from aggnets.data import BadImageWarning, ImageFolderDataset, UnreadableImageError, open_rgb
from aggnets.retrieval import load_image

RED = (200, 30, 60)


def _rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int64)


def _png_header_only(path, width, height):
    """A PNG whose header claims width x height, followed by almost no pixel data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


# --- decoding every mode ---------------------------------------------------------------------------------------

def test_gray_and_palette_and_cmyk(tmp_path):
    Image.new("L", (8, 6), 77).save(tmp_path / "gray.png")
    assert (_rgb(open_rgb(tmp_path / "gray.png")) == 77).all()
    Image.new("1", (8, 6), 1).save(tmp_path / "bilevel.png")
    assert (_rgb(open_rgb(tmp_path / "bilevel.png")) == 255).all()
    Image.new("RGB", (8, 6), RED).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "palette.png")
    assert (_rgb(open_rgb(tmp_path / "palette.png")) == RED).all()
    Image.new("RGB", (16, 16), RED).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    decoded = _rgb(open_rgb(tmp_path / "cmyk.jpg"))
    assert decoded.shape == (16, 16, 3) and np.abs(decoded - RED).max() <= 6


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 32).reshape(32, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    decoded = _rgb(open_rgb(tmp_path / "g16.png"))
    expected = np.rint(ramp / 257.0)
    for channel in range(3):
        assert np.abs(decoded[..., channel] - expected).max() <= 1
    # what a plain PIL convert("RGB") gives: nearly everything clipped to white
    assert np.asarray(Image.open(tmp_path / "g16.png").convert("RGB")).mean() > 250 > decoded.mean() + 100


def test_transparency_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., :3] = RED
    rgba[:2, ..., 3] = 255  # top half opaque red, bottom half fully transparent (red underneath)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    decoded = _rgb(open_rgb(tmp_path / "alpha.png"))
    assert (decoded[:2] == RED).all() and (decoded[2:] == 255).all()
    Image.fromarray(rgba[..., [0, 3]], "LA").save(tmp_path / "la.png")
    decoded = _rgb(open_rgb(tmp_path / "la.png"))
    assert (decoded[:2] == RED[0]).all() and (decoded[2:] == 255).all()
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([*RED, 0, 0, 0] + [0] * 762)
    palette.paste(1, (0, 2, 4, 4))
    palette.save(tmp_path / "p.png", transparency=1)
    decoded = _rgb(open_rgb(tmp_path / "p.png"))
    assert (decoded[:2] == RED).all() and (decoded[2:] == 255).all()


def test_retrieval_loader_uses_the_same_decoding(tmp_path):
    Image.fromarray((np.full((8, 8), 32896)).astype(np.uint16)).save(tmp_path / "g16.png")  # 32896 / 257 = 128
    image = load_image(tmp_path / "g16.png", max_size=None)
    assert image.shape == (3, 8, 8) and torch.allclose(image, torch.full_like(image, 128 / 255))
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(UnreadableImageError, match="empty.jpg.*empty"):
        load_image(tmp_path / "empty.jpg")


def test_huge_jpeg_is_decoded_at_a_reduced_scale(tmp_path):
    width, height = 9600, 9400  # 90 Mpx: above PIL's warning limit (89.5 Mpx), below its hard limit
    left = Image.new("RGB", (width // 2, height), (250, 20, 20))
    image = Image.new("RGB", (width, height), (20, 20, 250))
    image.paste(left, (0, 0))
    image.save(tmp_path / "huge.jpg", quality=80)
    del image, left
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither a DecompressionBombWarning nor anything else
        decoded = open_rgb(tmp_path / "huge.jpg", min_size=224)
    assert 224 <= min(decoded.size) < 2 * 4 * 224 and decoded.width / decoded.height == pytest.approx(width / height,
                                                                                                      rel=0.01)
    pixels = _rgb(decoded)
    assert np.abs(pixels[:, : decoded.width // 4] - (250, 20, 20)).max() < 20
    assert np.abs(pixels[:, -decoded.width // 4:] - (20, 20, 250)).max() < 20


def test_decompression_bomb_is_an_unreadable_image(tmp_path):
    _png_header_only(tmp_path / "bomb.png", 20000, 20000)  # 400 Mpx > 2 x PIL.Image.MAX_IMAGE_PIXELS
    with pytest.raises(UnreadableImageError, match="bomb.png.*too large.*MAX_IMAGE_PIXELS"):
        open_rgb(tmp_path / "bomb.png")


# --- broken files in a dataset ----------------------------------------------------------------------------------

def _folder_with_broken_files(root):
    for label, colour in (("a", (240, 10, 10)), ("b", (10, 10, 240))):
        (root / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 30), colour).save(root / label / f"{i}.jpg")
    (root / "a" / "3_empty.jpg").write_bytes(b"")
    good = (root / "a" / "0.jpg").read_bytes()
    (root / "a" / "4_truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "b" / "3_text.png").write_text("not an image at all")
    _png_header_only(root / "b" / "4_header_only.png", 64, 64)
    return {"3_empty.jpg", "4_truncated.jpg", "3_text.png", "4_header_only.png"}


def test_dataset_skips_broken_files_with_a_counted_warning(tmp_path):
    broken = _folder_with_broken_files(tmp_path)
    dataset = ImageFolderDataset(tmp_path, image_size=16)
    assert len(dataset) == 10
    with pytest.warns(BadImageWarning) as caught:
        items = [dataset[i] for i in range(len(dataset))]
    assert len(caught) == 4
    assert {path.rsplit("/", 1)[-1] for path in dataset.bad_images} == broken
    assert "4 unreadable image(s) so far" in str(caught[-1].message)
    for image, label in items:
        assert image.shape == (3, 16, 16) and torch.isfinite(image).all()
        red = bool(image[0].mean() > image[2].mean())
        assert red == (label == 0)  # a skipped file is replaced by a readable image of the same dataset


def test_dataset_can_be_told_to_raise(tmp_path):
    _folder_with_broken_files(tmp_path)
    dataset = ImageFolderDataset(tmp_path, image_size=16, on_bad_image="raise")
    index = next(i for i, path in enumerate(dataset.paths) if path.endswith("3_empty.jpg"))
    with pytest.raises(UnreadableImageError, match="3_empty.jpg.*empty"):
        dataset[index]
    with pytest.raises(ValueError, match="on_bad_image must be one of"):
        ImageFolderDataset(tmp_path, on_bad_image="ignore")


def test_training_over_broken_files_finishes(tmp_path):
    from hydra import compose, initialize_config_dir

    from aggnets_train.run import train

    from .test_training import CONF, SMALL

    root = tmp_path / "data"
    _folder_with_broken_files(root)
    for label in ("a", "b"):
        for i in range(5, 9):
            Image.new("RGB", (40, 30), (240, 10, 10) if label == "a" else (10, 10, 240)).save(root / label / f"{i}.jpg")
    overrides = [o for o in SMALL if not o.startswith("data.")] + [
        "data=image_folder", f"data.train.root={root}", "data.num_classes=2", "data.num_workers=0",
        "data.batch_size=4", "data.train.image_size=32", "data.train.val_fraction=0.3", "data.train.test_fraction=0.3",
        "head=gem", f"paths.output_dir={tmp_path / 'run'}", "callbacks.codebook_init.enabled=false"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with pytest.warns(BadImageWarning):
        metric = train(cfg)
    assert metric is not None and 0.0 <= metric <= 1.0
